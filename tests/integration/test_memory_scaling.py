"""Integration: scaling under live traffic, and checkpoint/restore across shard counts."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import ray
import torch

from compute.memory.client import MemoryServiceError
from tests.integration.memory_deploy import deployment, reference_rows, spec

pytestmark = pytest.mark.ray

LIVE = spec("live", kind="sgd", lr=0.25, dim=8)
SAVED = spec("saved", kind="adam", lr=0.01)


def _push_rows(rank: int, step: int) -> tuple[np.ndarray, torch.Tensor]:
    """The rows and gradients rank ``rank`` pushes at ``step``: a pure function, so a lagging rank can catch up."""
    ids = np.sort(np.random.default_rng([rank, step]).choice(LIVE.rows, size=300, replace=False))
    return ids, torch.full((len(ids), LIVE.dim), float(rank + 1 + step % 3))


@pytest.mark.parametrize("synchronous", [False, True], ids=["asynchronous", "synchronous-2-ranks"])
def test_scaling_2_3_1_under_lookups_and_pushes_loses_and_fails_nothing(ray_cluster, synchronous):
    world_size = 2 if synchronous else 1
    with deployment([LIVE], shards=2) as (controller, client):
        stop = threading.Event()
        errors: list[BaseException] = []
        steps_done = [0] * world_size
        lookups = [0]

        def push(rank: int, step: int) -> None:
            ids, grads = _push_rows(rank, step)
            client.push("live", ids, grads, step=step, rank=rank, world_size=world_size,
                        synchronous=synchronous).result()

        def push_until_stopped(rank: int) -> None:
            try:
                while not stop.is_set():
                    push(rank, steps_done[rank])
                    steps_done[rank] += 1
            except BaseException as error:  # noqa: BLE001 - any failure fails the test below
                errors.append(error)

        def look_up_until_stopped():
            reader_rng = np.random.default_rng(1)
            try:
                while not stop.is_set():
                    ids = reader_rng.integers(0, LIVE.rows, size=2000)
                    assert client.lookup("live", ids, dtype=torch.float32).result().shape == (len(ids), LIVE.dim)
                    lookups[0] += 1
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        workers = [threading.Thread(target=push_until_stopped, args=(rank,)) for rank in range(world_size)]
        workers.append(threading.Thread(target=look_up_until_stopped))
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
        assert lookups[0] > 0 and min(steps_done) > 0 and client.epoch >= 3
        last_step = max(steps_done)
        for rank in range(world_size):  # a lagging rank completes the steps the other one left pending
            for step in range(steps_done[rank], last_step):
                push(rank, step)
        pushed = torch.zeros(LIVE.rows, LIVE.dim)
        for rank in range(world_size):
            for step in range(last_step):
                ids, grads = _push_rows(rank, step)
                pushed[torch.from_numpy(ids)] += grads
        every = np.arange(LIVE.rows)
        expected = reference_rows(LIVE, every) - LIVE.optimizer.lr * pushed
        torch.testing.assert_close(client.lookup("live", every, dtype=torch.float32).result(), expected)
        assert len(ray.get(controller.status.remote())) == 1


def test_checkpoint_on_3_shards_restores_bit_identical_on_2(ray_cluster, tmp_path):
    ids = np.random.default_rng(2).choice(SAVED.rows, size=1000, replace=False)
    with deployment([SAVED], shards=3, data_root=str(tmp_path)) as (controller, client):
        gen = torch.Generator().manual_seed(3)
        for step in range(3):
            client.push("saved", ids[step * 200:step * 200 + 600], torch.randn(600, SAVED.dim, generator=gen),
                        step=step).result()
        every = np.arange(SAVED.rows)
        saved_rows = client.lookup("saved", every, dtype=torch.float32).result()
        ray.get(controller.checkpoint.remote("saved-at-step-3"))
        # One shard holds every slot in slot order, so its checksum covers the whole table and its state.
        ray.get(controller.scale.remote(1))
        [original] = ray.get(controller.checksums.remote())["saved"]

        assert ray.get(controller.restore.remote(str(tmp_path / "saved-at-step-3"), 2)) > 0
        assert len(ray.get(controller.status.remote())) == 2
        assert torch.equal(client.lookup("saved", every, dtype=torch.float32).result(), saved_rows)
        ray.get(controller.scale.remote(1))
        assert ray.get(controller.checksums.remote())["saved"] == [original]


def test_a_push_retried_after_its_slots_moved_is_still_applied_once(ray_cluster):
    ids = np.arange(0, LIVE.rows, 7, dtype=np.int64)  # rows in every slot
    grads = torch.ones(len(ids), LIVE.dim)
    with deployment([LIVE], shards=1) as (controller, client):
        assert client.push("live", ids, grads, step=0, synchronous=False).result().applied_rows == len(ids)
        once = client.lookup("live", ids, dtype=torch.float32).result()
        assert ray.get(controller.scale.remote(3))["live"] > 0  # most slots now live on new shards
        assert client.push("live", ids, grads, step=0, synchronous=False).result().applied_rows == 0
        assert torch.equal(client.lookup("live", ids, dtype=torch.float32).result(), once)


def test_a_checkpoint_restores_as_read_only_serving_tables_in_half_the_memory(ray_cluster, tmp_path):
    with deployment([SAVED], shards=2, data_root=str(tmp_path)) as (controller, client):
        ids = np.arange(0, SAVED.rows, 7)
        client.push("saved", ids, torch.randn(len(ids), SAVED.dim, generator=torch.Generator().manual_seed(5)),
                    step=0).result()
        every = np.arange(SAVED.rows)
        trained = client.lookup("saved", every, dtype=torch.float32).result()
        training_bytes = sum(shard["bytes"] for shard in ray.get(controller.status.remote()))
        ray.get(controller.checkpoint.remote("trained"))

        ray.get(controller.restore.remote("trained", 2, True))
        served = client.lookup("saved", every, dtype=torch.float32).result()
        assert torch.equal(served, trained.to(torch.bfloat16).float())
        serving_bytes = sum(shard["bytes"] for shard in ray.get(controller.status.remote()))
        assert serving_bytes * SAVED.bytes_per_row() == training_bytes * SAVED.dim * 2  # bf16 rows, no Adam state
        with pytest.raises(MemoryServiceError) as caught:
            client.push("saved", ids[:4], torch.ones(4, SAVED.dim), step=1).result()
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "read-only" in caught.value.details


def test_a_step_pending_on_moving_slots_is_applied_once_and_whole(ray_cluster):
    """Rank 0 has pushed a synchronous step when the service scales from 3 shards to 2; rank 1 pushes
    while slots move onto shards that already hold rows of that step. Under Adam a step applied in
    two parts (on a target that had released it: rank 0's moved rows on arrival, rank 1's later)
    differs from one update of the sum, so the rows must equal those of the same pushes unscaled."""
    table = spec("adam_moves", rows=4000, kind="adam", lr=0.01)

    def pushes(rank: int, step: int):
        ids = np.sort(np.random.default_rng([rank, step, 7]).choice(table.rows, size=1500, replace=False))
        return ids, torch.randn(len(ids), table.dim, generator=torch.Generator().manual_seed(100 * step + rank))

    def train(scale_at_step: int | None) -> torch.Tensor:
        with deployment([table], shards=3) as (controller, client):
            for step in range(4):
                client.push("adam_moves", *pushes(0, step), step=step, rank=0, world_size=2).result()
                scaling = controller.scale.remote(2) if step == scale_at_step else None
                if scaling is not None:
                    time.sleep(0.05)  # rank 1 pushes while the slots of shard 2 move
                client.push("adam_moves", *pushes(1, step), step=step, rank=1, world_size=2).result()
                if scaling is not None:
                    assert ray.get(scaling)["adam_moves"] > 0
            return client.lookup("adam_moves", np.arange(table.rows), dtype=torch.float32).result()

    assert torch.equal(train(scale_at_step=1), train(scale_at_step=None))
