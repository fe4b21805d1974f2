"""Integration: synchronous steps that never wedge and checkpoints cut at a step boundary, on real shard
actors and gRPC servers (issue #19 parts 5 and 6)."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
import torch

from compute.memory.client import MemoryClient, MemoryServiceError
from memory_service.core.table_spec import TableSpec
from memory_service.row_store import ShardStore
from memory_service.step_aggregator import StepAggregator
from tests.integration.memory_deploy import TOKEN, deployment, reference_rows, spec

pytestmark = pytest.mark.ray

STEP_TIMEOUT_S = 2.0
WEDGED = spec("wedged", rows=2000, dim=8, kind="sgd", lr=0.5)
ABORTED = spec("aborted", rows=2000, dim=8, kind="sgd", lr=0.5)
STALE = spec("stale", rows=2000, dim=8, kind="sgd", lr=0.5)
HELD = spec("held", rows=2000, dim=8, kind="sgd", lr=0.5)
CUT = spec("cut", rows=2000, dim=8, kind="adam", lr=0.01)


def _grads(step: int, rank: int, ids: np.ndarray, dim: int) -> torch.Tensor:
    return torch.randn(len(ids), dim, generator=torch.Generator().manual_seed(1000 * step + rank))


def _ids(step: int, rank: int, rows: int) -> np.ndarray:
    return np.sort(np.random.default_rng(1000 * step + rank).choice(rows, size=64, replace=False))


def _pending(controller) -> list[tuple[int, str, int, list[int]]]:
    return [(shard["shard"], p["table"], p["step"], p["reported_ranks"])
            for shard in ray.get(controller.status.remote()) for p in shard["pending_steps"]]


@pytest.fixture(scope="module")
def steps(ray_cluster):
    with deployment([WEDGED, ABORTED, STALE, HELD], shards=2, step_timeout_s=STEP_TIMEOUT_S) as (controller, client):
        yield controller, client


def test_a_step_whose_worker_never_reports_is_aborted_within_the_timeout(steps):
    controller, client = steps
    ids = _ids(0, 0, WEDGED.rows)
    started = time.monotonic()
    assert client.push("wedged", ids, _grads(0, 0, ids, WEDGED.dim), step=0, rank=0, world_size=2).result().pending
    assert sorted(_pending(controller)) == [(0, "wedged", 0, [0]), (1, "wedged", 0, [0])]
    while _pending(controller):
        assert time.monotonic() - started < STEP_TIMEOUT_S + 3, "the step was not aborted within the timeout"
        time.sleep(0.2)
    assert all(shard["aborted_steps"] >= 1 for shard in ray.get(controller.status.remote()))
    # The job is told: the rank that never reported gets an explicit error naming the step and the ranks.
    with pytest.raises(MemoryServiceError) as caught:
        client.push("wedged", ids, _grads(0, 1, ids, WEDGED.dim), step=0, rank=1, world_size=2).result()
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert "step 0 of table 'wedged' was aborted" in caught.value.details and "ranks [1]" in caught.value.details
    # Nothing of the aborted step was applied, and the next step goes through.
    every = np.arange(WEDGED.rows)
    torch.testing.assert_close(client.lookup("wedged", every, dtype=torch.float32).result(),
                               reference_rows(WEDGED, every), rtol=0, atol=0)
    for rank in (0, 1):
        client.push("wedged", ids, torch.ones(len(ids), WEDGED.dim), step=1, rank=rank, world_size=2).result()
    expected = reference_rows(WEDGED, ids) - WEDGED.optimizer.lr * 2
    torch.testing.assert_close(client.lookup("wedged", ids, dtype=torch.float32).result(), expected)


def test_the_job_driver_aborts_a_step_with_the_data_token(steps):
    controller, client = steps
    ids = _ids(5, 0, ABORTED.rows)
    client.push("aborted", ids, _grads(5, 0, ids, ABORTED.dim), step=5, rank=0, world_size=3).result()
    assert client.abort_step("aborted", 5).result() == {0: [1, 2], 1: [1, 2]}
    assert not _pending(controller)
    with pytest.raises(MemoryServiceError, match="ABORTED: .*step 5 of table 'aborted' was aborted"):
        client.push("aborted", ids, _grads(5, 0, ids, ABORTED.dim), step=5, rank=0, world_size=3).result()
    # A step that completed cannot be aborted: the driver learns where it was applied.
    for rank in range(3):
        client.push("aborted", ids, _grads(6, rank, ids, ABORTED.dim), step=6, rank=rank, world_size=3).result()
    assert client.abort_step("aborted", 6).result() == {0: None, 1: None}


def test_a_push_older_than_the_remembered_steps_gets_an_explicit_error(steps):
    _, client = steps
    ids = _ids(0, 0, STALE.rows)
    for step in range(12):
        client.push("stale", ids, torch.ones(len(ids), STALE.dim), step=step).result()
    assert client.push("stale", ids, torch.ones(len(ids), STALE.dim), step=11).result().duplicate  # a retry
    with pytest.raises(MemoryServiceError) as caught:  # a trainer restarted from step 0 against the service
        client.push("stale", ids, torch.ones(len(ids), STALE.dim), step=0).result()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "step 0 is older" in caught.value.details and "newest applied: 11" in caught.value.details


def test_a_checkpoint_waiting_on_a_step_that_never_completes_times_out_and_writes_nothing(steps):
    controller, client = steps
    ray.get(controller.checkpoint.remote("held"))
    root = Path(ray.get(controller.connection_info.remote())["data_root"])
    before = json.loads((root / "held" / "manifest.json").read_text())
    ids = _ids(0, 0, HELD.rows)
    client.push("held", ids, _grads(0, 0, ids, HELD.dim), step=0, rank=0, world_size=2).result()
    with pytest.raises(TimeoutError, match=r"\('held', 0\).*nothing was written"):
        ray.get(controller.checkpoint.remote("held", 0.5))
    # The earlier checkpoint is still there, whole; no half-written folder is left beside it.
    assert json.loads((root / "held" / "manifest.json").read_text()) == before
    assert sorted(os.listdir(root)) == ["held"]
    # The hold was released: an asynchronous push goes through at once.
    client.push("held", ids, torch.ones(len(ids), HELD.dim), step=0, synchronous=False).result()
    while _pending(controller):  # the step timeout clears the step this test left pending
        time.sleep(0.2)


def _replay(table: TableSpec, last_step: int) -> torch.Tensor:
    """The table after whole steps 0..last_step of two ranks, applied in-process as a shard applies them."""
    store = ShardStore()
    store.add_table(table, range(table.num_slots))
    aggregator = StepAggregator()
    for step in range(last_step + 1):
        for rank in (0, 1):
            ids = _ids(step, rank, table.rows)
            for update in aggregator.add(step, rank, 2, store.check_update(table.name, ids,
                                                                            _grads(step, rank, ids, table.dim))):
                store.apply_update(table.name, update)
    return store.gather(table.name, np.arange(table.rows))


def test_a_checkpoint_under_concurrent_synchronous_pushes_is_cut_at_a_step_boundary(ray_cluster, tmp_path):
    num_steps = 40
    with deployment([CUT], shards=2, data_root=str(tmp_path)) as (controller, client):
        errors = []

        def train(rank: int) -> None:
            with MemoryClient(client.directory, TOKEN) as own:
                try:
                    for step in range(num_steps):
                        ids = _ids(step, rank, CUT.rows)
                        own.push("cut", ids, _grads(step, rank, ids, CUT.dim), step=step, rank=rank,
                                 world_size=2).result()
                        time.sleep(0.02 + 0.01 * rank)  # rank 1 lags: rank 0's steps wait pending for it
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

        ranks = [threading.Thread(target=train, args=(rank,)) for rank in (0, 1)]
        for thread in ranks:
            thread.start()
        time.sleep(0.5)
        ray.get(controller.checkpoint.remote("mid-training"))
        for thread in ranks:
            thread.join(timeout=50)
        assert not errors and not any(thread.is_alive() for thread in ranks)
        manifest = json.loads((tmp_path / "mid-training" / "manifest.json").read_text())
        [table] = manifest["tables"]
        cut = table["steps"]["synchronous"]
        assert 0 <= cut < num_steps - 1, cut  # taken mid-training

        every = np.arange(CUT.rows)
        trained = client.lookup("cut", every, dtype=torch.float32).result()
        torch.testing.assert_close(trained, _replay(CUT, num_steps - 1))
        ray.get(controller.restore.remote("mid-training"))
        torch.testing.assert_close(client.lookup("cut", every, dtype=torch.float32).result(), _replay(CUT, cut))
        # The restored step counters: a trainer resuming after the cut is taken, one before it refused.
        with pytest.raises(MemoryServiceError, match=f"newest applied: {cut}"):
            client.push("cut", _ids(cut, 0, CUT.rows), torch.zeros(64, CUT.dim), step=cut, rank=0,
                        world_size=2).result()
        for rank in (0, 1):
            client.push("cut", _ids(cut + 1, rank, CUT.rows), torch.zeros(64, CUT.dim), step=cut + 1, rank=rank,
                        world_size=2).result()


def test_a_failed_restore_leaves_the_live_tables_and_routing_unchanged(ray_cluster, tmp_path):
    with deployment([CUT], shards=2, data_root=str(tmp_path)) as (controller, client):
        ids = _ids(0, 0, CUT.rows)
        client.push("cut", ids, _grads(0, 0, ids, CUT.dim), step=0).result()
        ray.get(controller.checkpoint.remote("good"))
        client.push("cut", ids, _grads(1, 0, ids, CUT.dim), step=1).result()  # live differs from the checkpoint
        before, epoch = ray.get(controller.checksums.remote()), client.refresh_routing()

        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "manifest.json").write_text((tmp_path / "good" / "manifest.json").read_text())
        (bad / "cut").mkdir()
        good_file = tmp_path / "good" / "cut" / "shard-0001.npz"
        (bad / "cut" / "shard-0000.npz").write_bytes((tmp_path / "good" / "cut" / "shard-0000.npz").read_bytes())
        (bad / "cut" / "shard-0001.npz").write_bytes(good_file.read_bytes()[:good_file.stat().st_size // 2])
        for shards in (2, 3):  # onto the same shards, and onto a new one that must go again
            with pytest.raises(RuntimeError, match="live tables and routing are unchanged.*not a checkpoint shard"):
                ray.get(controller.restore.remote("bad", shards))
            assert ray.get(controller.checksums.remote()) == before
            assert client.refresh_routing() == epoch and len(ray.get(controller.status.remote())) == 2
        (bad / "manifest.json").write_text("{not json")
        with pytest.raises(ValueError, match="not a checkpoint manifest"):
            ray.get(controller.restore.remote("bad"))
        assert ray.get(controller.checksums.remote()) == before
        client.push("cut", ids, _grads(2, 0, ids, CUT.dim), step=2).result()  # the live service still trains

        ray.get(controller.restore.remote("good"))
        assert ray.get(controller.checksums.remote()) != before
