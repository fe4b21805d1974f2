"""Integration: scaling under live traffic, and checkpoint/restore across shard counts."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
import torch

from tests.memory_deploy import deployment, reference_rows, spec

pytestmark = pytest.mark.ray

LIVE = spec("live", kind="sgd", lr=0.25, dim=8)
SAVED = spec("saved", kind="adam", lr=0.01)


def test_scaling_2_3_1_under_lookups_and_pushes_loses_and_fails_nothing(ray_cluster):
    rng = np.random.default_rng(0)
    with deployment([LIVE], shards=2) as (controller, client):
        stop = threading.Event()
        errors: list[BaseException] = []
        pushed = torch.zeros(LIVE.rows, LIVE.dim)
        lookups = [0]

        def push_forever():
            step = 0
            while not stop.is_set():
                ids = np.sort(rng.choice(LIVE.rows, size=500, replace=False))
                grads = torch.full((len(ids), LIVE.dim), float(step % 5 + 1))
                try:
                    client.push("live", ids, grads, step=step, synchronous=False).result()
                except BaseException as error:  # noqa: BLE001 - any failure fails the test below
                    errors.append(error)
                    return
                pushed[torch.from_numpy(ids)] += grads
                step += 1

        def look_up_forever():
            reader_rng = np.random.default_rng(1)
            while not stop.is_set():
                ids = reader_rng.integers(0, LIVE.rows, size=2000)
                try:
                    rows = client.lookup("live", ids, dtype=torch.float32).result()
                    assert rows.shape == (len(ids), LIVE.dim)
                except BaseException as error:  # noqa: BLE001
                    errors.append(error)
                    return
                lookups[0] += 1

        workers = [threading.Thread(target=push_forever), threading.Thread(target=look_up_forever)]
        for worker in workers:
            worker.start()
        try:
            assert ray.get(controller.scale.remote(3))["live"] > 0
            assert ray.get(controller.scale.remote(1))["live"] > 0
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert not errors, errors[0]
        assert lookups[0] > 0 and client.epoch >= 3
        every = np.arange(LIVE.rows)
        expected = reference_rows(LIVE, every) - LIVE.optimizer.lr * pushed
        torch.testing.assert_close(client.lookup("live", every, dtype=torch.float32).result(), expected)
        assert len(ray.get(controller.status.remote())) == 1


def test_checkpoint_on_3_shards_restores_bit_identical_on_2(ray_cluster, tmp_path):
    ids = np.random.default_rng(2).choice(SAVED.rows, size=1000, replace=False)
    with deployment([SAVED], shards=3) as (controller, client):
        gen = torch.Generator().manual_seed(3)
        for step in range(3):
            client.push("saved", ids[step * 200:step * 200 + 600], torch.randn(600, SAVED.dim, generator=gen),
                        step=step).result()
        every = np.arange(SAVED.rows)
        saved_rows = client.lookup("saved", every, dtype=torch.float32).result()
        ray.get(controller.checkpoint.remote(str(tmp_path)))
        # One shard holds every slot in slot order, so its checksum covers the whole table and its state.
        ray.get(controller.scale.remote(1))
        [original] = ray.get(controller.checksums.remote())["saved"]

        assert ray.get(controller.restore.remote(str(tmp_path), 2)) > 0
        assert len(ray.get(controller.status.remote())) == 2
        assert torch.equal(client.lookup("saved", every, dtype=torch.float32).result(), saved_rows)
        ray.get(controller.scale.remote(1))
        assert ray.get(controller.checksums.remote())["saved"] == [original]
