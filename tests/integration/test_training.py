"""Training on remote Engram rows: equal to in-process tables, to one big batch, and across a resume."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import numpy as np
import ray
import pytest
import torch

from compute.memory.service import open_client
from compute.train.checkpoints import load_trainer_state, memory_checkpoint
from compute.train.config import CacheConfig, TrainConfig, table_name
from compute.train.job import RunMemory, run_training
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy, deploy_from_checkpoint, get_controller
from tests.integration.tiny_runs import tiny_run


@contextlib.contextmanager
def memory_service(handle):
    try:
        yield handle
    finally:
        handle.stop()


def train(config: TrainConfig, memory=None, resume=None, device="cpu") -> tuple[list[float], EngramTrainer]:
    trainer = EngramTrainer(config, WorkerContext(memory=memory, device=torch.device(device)))
    try:
        if resume is not None:
            trainer.load(resume)
        return trainer.train(), trainer
    finally:
        trainer.close()


def all_rows(handle, config: TrainConfig) -> dict[int, torch.Tensor]:
    """Every row of every Engram table, as float32."""
    client = open_client(handle)
    try:
        return {layer: client.lookup(table_name(layer), np.arange(spec.rows), dtype=torch.float32).result()
                for layer, spec in zip(config.engram.layer_ids, engram_table_specs(config))}
    finally:
        client.close()


def check_remote_rows_train_like_in_process_tables(tmp_path, device: str, rtol: float, rows_atol: float,
                                                   cache: CacheConfig = CacheConfig()) -> None:
    config = tiny_run(tmp_path, memory__cache=cache)
    with memory_service(deploy(engram_table_specs(config), 2, data_root=tmp_path)) as handle:
        remote_losses, remote = train(config, handle, device=device)
        remote_rows = all_rows(handle, config)
    if cache.enabled:  # the cached rows were stepped in place and served lookups
        assert all(table.stats.hits > 0 and len(table.cached_ids) for table in remote.tables.values())
    # The loader split each layer's rows by shard under the service's routing, for the client to use.
    epoch, owners = remote.runtime.client.slot_owners()
    first = next(iter(remote.batches(num_steps=1)))
    for layer, layer_rows in first.layers.items():
        assert layer_rows.routing_epoch == epoch and layer_rows.shard_positions.keys() == {0, 1}
        shards = owners[table_name(layer)][layer_rows.unique.numpy() % config.memory.num_slots]
        for shard, positions in layer_rows.shard_positions.items():
            assert (shards[positions.numpy()] == shard).all()
    local_losses, local = train(config.replace(memory__tables="local", memory__cache=CacheConfig(),
                                               output_dir=str(tmp_path / "local")), device=device)
    np.testing.assert_allclose(remote_losses, local_losses, rtol=rtol)
    assert remote_losses[-1] < remote_losses[0]
    for layer, rows in remote_rows.items():
        torch.testing.assert_close(rows, local.tables[layer].weight.detach().cpu(), rtol=1e-5, atol=rows_atol)


def test_remote_rows_train_step_for_step_like_in_process_tables(ray_cluster, tmp_path):
    check_remote_rows_train_like_in_process_tables(tmp_path, "cpu", rtol=1e-6, rows_atol=1e-6)


def test_remote_rows_behind_a_hot_row_cache_train_step_for_step_like_in_process_tables(ray_cluster, tmp_path):
    """Up to 90 rows of each table cached, chosen after 2 lookups, then every 4: rows are admitted with their Adam
    state while the run trains, stepped on the worker and on the shards alike."""
    check_remote_rows_train_like_in_process_tables(tmp_path, "cpu", rtol=1e-6, rows_atol=1e-6,
                                                   cache=CacheConfig(rows=90, readmit_every=4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache", [CacheConfig(), CacheConfig(rows=90, readmit_every=4)], ids=["uncached", "cached"])
def test_on_the_gpu_remote_rows_train_like_in_process_tables(ray_cluster, tmp_path, cache):
    """Rows up on the copy stream, gradients down on the push stream, the Triton kernels in between.

    The in-process table's backward sums row gradients with float32 atomics, in another order than
    the remote rows' segment sums; Adam's g / sqrt(v) turns a last-bit difference of a near-zero
    gradient into up to ~1e-5 of a row value (2 of 7,120 values on the H200), hence ``rows_atol``.
    """
    check_remote_rows_train_like_in_process_tables(tmp_path, "cuda", rtol=1e-5, rows_atol=5e-5, cache=cache)


def test_a_resumed_run_continues_exactly_where_its_checkpoint_left_off(ray_cluster, tmp_path):
    config = tiny_run(tmp_path, checkpoint_every=2)
    with memory_service(deploy(engram_table_specs(config), 2, data_root=tmp_path)) as handle:
        straight, _ = train(config, handle)
    halfway = tmp_path / "run" / "checkpoints" / "step_000002"
    assert load_trainer_state(halfway).step == 2
    resumed_config = config.replace(output_dir=str(tmp_path / "resumed"))
    with memory_service(deploy_from_checkpoint(memory_checkpoint(halfway), 3, data_root=tmp_path)) as handle:
        resumed, trainer = train(resumed_config, handle, resume=halfway)
    assert trainer.step == 4
    np.testing.assert_allclose(resumed, straight[2:], rtol=1e-6)


def test_two_workers_on_half_batches_equal_one_worker_on_the_whole_batch(ray_cluster, tmp_path):
    """The two workers each have a hot-row cache, so both paths run: the rows a cache misses are looked up and
    pushed as without one, and a cached row another worker updated is forgotten at the step's end, so no worker
    reads a copy that missed an update. (Each run starts Ray Train's workers: two runs, not three, keep it short.)"""
    results = {}
    config = tiny_run(tmp_path)
    with memory_service(deploy(engram_table_specs(config), 1, data_root=tmp_path)) as handle:
        initial_rows = all_rows(handle, config)
    runs = {"1 worker": (1, CacheConfig()), "2 workers, cached": (2, CacheConfig(rows=90, readmit_every=4))}
    for name, (workers, cache) in runs.items():
        config = tiny_run(tmp_path, num_workers=workers, steps=3, memory__cache=cache,
                          output_dir=str(tmp_path / name.replace(" ", "_").replace(",", "")))
        sigint = signal.getsignal(signal.SIGINT)
        summary = run_training(config)
        # Ray Train's own handler would hold the run's TrainController, alive until the session's teardown.
        assert signal.getsignal(signal.SIGINT) is sigint, "run_training must put the SIGINT handler back"
        if cache.enabled:
            assert summary["cache_hits"] > 0, "the workers' caches must have served rows"
        state = load_trainer_state(summary["checkpoint"])
        saved_tables = memory_checkpoint(summary["checkpoint"])
        with memory_service(deploy_from_checkpoint(saved_tables, 2, data_root=tmp_path)) as h:
            results[name] = (state.model, all_rows(h, config))
    (dense_1, rows_1), (dense_2, rows_2) = results["1 worker"], results["2 workers, cached"]
    assert dense_1.keys() == dense_2.keys()
    # Averaging two half-batch gradients rounds differently from one whole-batch mean, and Adam scales
    # a near-zero gradient's rounding up to a step of ~lr: 1e-4 is 1% of lr, far below a real mismatch.
    for key in dense_1:
        torch.testing.assert_close(dense_2[key], dense_1[key], rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")
    for layer in rows_1:
        torch.testing.assert_close(rows_2[layer], rows_1[layer], rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"layer {layer}: {m}")
        assert not torch.allclose(rows_1[layer], initial_rows[layer], atol=1e-3), "the rows must have trained"


def test_staleness_1_lookups_miss_only_the_latest_update(ray_cluster, tmp_path):
    exact_config = tiny_run(tmp_path, steps=3)
    stale_config = exact_config.replace(memory__staleness=1, output_dir=str(tmp_path / "stale"))
    losses = {}
    for name, config in (("exact", exact_config), ("stale", stale_config)):
        with memory_service(deploy(engram_table_specs(config), 2, data_root=tmp_path)) as handle:
            losses[name], _ = train(config, handle)
    # Step 0 reads the initial rows either way; step 1's rows were fetched before step 0's update.
    assert losses["stale"][0] == losses["exact"][0]
    assert losses["stale"][1] != losses["exact"][1]
    assert all(np.isfinite(losses["stale"]))


def kill_a_shard_once_checkpointed(handle, checkpoint) -> None:
    """SIGKILL the shard of group 0 once ``checkpoint`` is complete (its ``latest`` names it)."""
    deadline = time.monotonic() + 120
    while not (checkpoint.parent / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = ray.get(get_controller(handle.controller, handle.namespace).shard_pids.remote())
    os.kill(next(info["pid"] for info in pids.values() if info["group"] == 0), signal.SIGKILL)


def test_a_run_whose_only_copy_of_a_shard_dies_resumes_from_its_checkpoint_and_ends_as_if_not(ray_cluster, tmp_path,
                                                                                               caplog):
    config = tiny_run(tmp_path, steps=6, checkpoint_every=2)
    with memory_service(deploy(engram_table_specs(config), 2, data_root=tmp_path)) as handle:  # one copy
        killer = threading.Thread(target=kill_a_shard_once_checkpointed,
                                  args=(handle, tmp_path / "run" / "checkpoints" / "step_000002"))
        killer.start()
        with caplog.at_level(logging.WARNING, logger="compute.train.job"):
            summary = run_training(config, memory=RunMemory(handle))
        killer.join()
        rows = all_rows(handle, config)
    assert "restoring every table and the run from" in caplog.text
    with memory_service(deploy(engram_table_specs(config), 2, data_root=tmp_path)) as handle:
        straight, _ = train(config.replace(output_dir=str(tmp_path / "straight")), handle)
        straight_rows = all_rows(handle, config)
    assert summary["step"] == 6
    np.testing.assert_allclose(summary["loss"], straight[-1], rtol=1e-5)
    # A resumed run rounds a few sums differently, and Adam scales a near-zero gradient's rounding up to a step
    # of ~lr (as with two workers below); a lost or doubled step would move rows by ~lr = 1e-2.
    for layer in rows:
        torch.testing.assert_close(rows[layer], straight_rows[layer], rtol=1e-3, atol=1e-4)
