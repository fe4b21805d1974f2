"""Tiered tables (rows in files, hot rows cached in DRAM): the same lookups, updates and slot moves give the
same bits as an all-DRAM table, the cache stays within its cap, and the files go with the table."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import signal
import tempfile

import numpy as np
import pytest
import torch

from memory_service import checkpoint
from memory_service.core.table_spec import OptimizerSpec, TableSpec, TierSpec
from memory_service.row_store import RowStoreError, ShardStore

DRAM_ROWS = 1000
SPEC = TableSpec("layer1", rows=4 * DRAM_ROWS, dim=8, optimizer=OptimizerSpec(kind="adam", lr=0.01), seed=3,
                 num_slots=16)
TIERED = dataclasses.replace(SPEC, tier=TierSpec(dram_rows=DRAM_ROWS))


def _stores(tmp_path, spec: TableSpec = SPEC, slots=range(SPEC.num_slots)) -> tuple[ShardStore, ShardStore]:
    """An all-DRAM store and a tiered one holding the same slots of ``spec``."""
    dram, tiered = ShardStore(), ShardStore(tier_dir=tmp_path)
    dram.add_table(spec, slots)
    tiered.add_table(dataclasses.replace(spec, tier=TierSpec(dram_rows=DRAM_ROWS)), slots)
    return dram, tiered


def _train(stores, name: str, rng: np.random.Generator, steps: int, batch: int, rows: int = SPEC.rows,
           dim: int = SPEC.dim) -> None:
    """The same updates and lookups on every store; their lookups must agree bit for bit after each step."""
    for _ in range(steps):
        ids = np.unique(rng.integers(0, rows, batch))
        grads = rng.standard_normal((len(ids), dim)).astype(np.float32)
        for store in stores:
            store.apply_update(name, store.check_update(name, ids, grads))
        lookup = rng.integers(0, rows, batch)
        first, *others = [store.gather(name, lookup) for store in stores]
        assert all(torch.equal(first, other) for other in others)


@pytest.mark.parametrize("optimizer", [OptimizerSpec(kind="adam", lr=0.01),
                                       OptimizerSpec(kind="adagrad", lr=0.05, initial_accumulator=0.1),
                                       OptimizerSpec(kind="sgd", lr=0.1, weight_decay=0.01)])
def test_a_table_four_times_the_cache_trains_bit_identical_to_dram(tmp_path, optimizer):
    """Steps of fewer and of more distinct rows than the cache holds (the latter go through it in parts)."""
    dram, tiered = _stores(tmp_path, dataclasses.replace(SPEC, optimizer=optimizer))
    rng = np.random.default_rng(0)
    _train([dram, tiered], "layer1", rng, steps=6, batch=600)
    _train([dram, tiered], "layer1", rng, steps=3, batch=3000)  # ~2100 distinct rows a step: 3 passes
    assert tiered.checksum("layer1") == dram.checksum("layer1")
    every_row = np.arange(SPEC.rows)
    assert torch.equal(tiered.gather("layer1", every_row), dram.gather("layer1", every_row))
    stats = tiered.tier_stats("layer1")
    assert stats.capacity == DRAM_ROWS and stats.cached_rows == DRAM_ROWS
    assert stats.rows_read > SPEC.rows and stats.evictions == stats.rows_read - DRAM_ROWS
    assert stats.written_back > 0 and dram.tier_stats("layer1") is None


def test_the_dram_held_is_the_cap_and_the_index(tmp_path):
    dram, tiered = _stores(tmp_path)
    _train([dram, tiered], "layer1", np.random.default_rng(1), steps=3, batch=2000)
    spec = tiered.spec("layer1")
    assert tiered.memory_bytes() == spec.dram_bytes(SPEC.rows) \
        == DRAM_ROWS * (SPEC.bytes_per_row() + 13) + 4 * SPEC.rows
    assert tiered.memory_bytes() < dram.memory_bytes() / 3 == SPEC.rows * SPEC.bytes_per_row() / 3
    by_bytes = ShardStore(tier_dir=tmp_path)
    by_bytes.add_table(dataclasses.replace(SPEC, tier=TierSpec(dram_bytes=250 * SPEC.bytes_per_row() + 7)), [0, 1])
    assert by_bytes.tier_stats("layer1").capacity == 250


def test_hits_and_misses_count_ids_and_rows_read_count_rows(tmp_path):
    _, tiered = _stores(tmp_path)
    tiered.gather("layer1", [1, 1, 2])
    tiered.gather("layer1", [1, 2, 3])
    tiered.apply_update("layer1", tiered.check_update("layer1", [3, 4], np.ones((2, SPEC.dim), dtype=np.float32)))
    stats = tiered.tier_stats("layer1")
    assert (stats.hits, stats.misses, stats.rows_read, stats.cached_rows) == (3, 5, 4, 4)
    tiered.checksum("layer1")  # writes the dirty rows back
    assert tiered.tier_stats("layer1").written_back == 2


def test_hot_rows_stay_cached_while_cold_rows_pass_through(tmp_path):
    """Least-frequently-used eviction: a hot set of half the cache, looked up with a stream of cold rows,
    is served from DRAM once it has been read."""
    _, tiered = _stores(tmp_path)
    rng = np.random.default_rng(2)
    hot = rng.choice(SPEC.rows, DRAM_ROWS // 2, replace=False)
    for _ in range(3):
        tiered.gather("layer1", np.concatenate([hot, rng.integers(0, SPEC.rows, 800)]))
    before = tiered.tier_stats("layer1")
    for _ in range(10):
        tiered.gather("layer1", np.concatenate([hot, rng.integers(0, SPEC.rows, 800)]))
    after = tiered.tier_stats("layer1")
    assert after.hits - before.hits >= 10 * len(hot)


def test_slot_moves_between_tiered_and_dram_stores_keep_every_bit(tmp_path):
    """Export, import and release on tiered tables; then both sides train on, equal to DRAM stores doing the same."""
    moved = [3, 5, 7, 12]
    kept = [slot for slot in range(SPEC.num_slots) if slot not in moved]
    dram, tiered = _stores(tmp_path)
    dram_target, tiered_target = _stores(tmp_path, slots=[])
    rng = np.random.default_rng(3)
    _train([dram, tiered], "layer1", rng, steps=4, batch=900)
    exported = tiered.export_slots("layer1", moved)
    expected = dram.export_slots("layer1", moved)
    assert exported.keys() == expected.keys()
    assert all(np.array_equal(exported[key], expected[key]) for key in expected)
    for store, target in ((dram, dram_target), (tiered, tiered_target)):
        target.import_slots("layer1", exported)
        store.release_slots("layer1", moved)
    assert tiered.owned_slots("layer1") == kept and tiered_target.owned_slots("layer1") == moved
    assert tiered.checksum("layer1") == dram.checksum("layer1")
    assert tiered_target.checksum("layer1") == dram_target.checksum("layer1")
    on_kept = np.flatnonzero(np.isin(np.arange(SPEC.rows) % SPEC.num_slots, kept))
    on_moved = np.flatnonzero(np.isin(np.arange(SPEC.rows) % SPEC.num_slots, moved))
    for ids in (on_kept, on_moved):  # train each side on its own rows
        stores = [dram, tiered] if ids is on_kept else [dram_target, tiered_target]
        for _ in range(3):
            step = np.unique(rng.choice(ids, 400))
            grads = rng.standard_normal((len(step), SPEC.dim)).astype(np.float32)
            for store in stores:
                store.apply_update("layer1", store.check_update("layer1", step, grads))
        assert torch.equal(stores[0].gather("layer1", ids), stores[1].gather("layer1", ids))
    assert tiered.checksum("layer1") == dram.checksum("layer1")


def test_read_only_bfloat16_tables_serve_the_same_rows(tmp_path):
    spec = dataclasses.replace(SPEC, storage_dtype="bfloat16")
    dram, tiered = _stores(tmp_path, spec)
    lookup = np.random.default_rng(4).integers(0, SPEC.rows, 3000)
    assert torch.equal(tiered.gather("layer1", lookup, "bfloat16"), dram.gather("layer1", lookup, "bfloat16"))
    assert tiered.checksum("layer1") == dram.checksum("layer1")
    with pytest.raises(RowStoreError) as caught:
        tiered.check_update("layer1", [1], np.zeros((1, SPEC.dim), dtype=np.float32))
    assert caught.value.code == "FAILED_PRECONDITION"


def test_each_table_has_its_own_files_which_go_with_it(tmp_path):
    first, second = ShardStore(tier_dir=tmp_path), ShardStore(tier_dir=tmp_path)
    first.add_table(TIERED, range(SPEC.num_slots))
    second.add_table(TIERED, range(8))  # another shard, same table, same folder
    first.add_table(dataclasses.replace(TIERED, name="layer3"), range(SPEC.num_slots))
    folders = sorted(path.name.rsplit("-", 1)[0] for path in tmp_path.iterdir())
    assert folders == [f"table-{os.getpid()}-{name}" for name in ("layer1", "layer1", "layer3")]
    _train([first, second], "layer1", np.random.default_rng(5), steps=2, batch=300, rows=8)  # rows on slots 0-7
    first.release_slots("layer1", range(8, 16))
    assert first.checksum("layer1") == second.checksum("layer1")
    first.drop_table("layer1")
    first.drop_table("layer3")
    assert len(list(tmp_path.iterdir())) == 1
    assert second.gather("layer1", [7]).shape == (1, SPEC.dim)
    del second  # a store replaced by a restore: its files go once nothing refers to it
    assert list(tmp_path.iterdir()) == []


def test_a_table_larger_than_the_disk_is_refused_and_leaves_nothing(tmp_path):
    huge = TableSpec("huge", rows=1 << 20, dim=1 << 20, tier=TierSpec(dram_rows=1))  # 12 TiB of rows and state
    store = ShardStore(tier_dir=tmp_path)
    with pytest.raises(RowStoreError) as caught:
        store.add_table(huge, range(huge.num_slots))
    assert (caught.value.code, caught.value.field) == ("RESOURCE_EXHAUSTED", "tier")
    assert store.specs() == [] and list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """Files of this process may not grow past ``max_bytes`` (as on a full disk: allocations fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_no_room_for_the_files_is_refused_and_changes_nothing(tmp_path):
    """The files' space is allocated when they are made: a full disk refuses the table or the slot move cleanly."""
    store = ShardStore(tier_dir=tmp_path)
    with file_size_limit(SPEC.rows * SPEC.dim * 4 // 2):  # room for half the table's rows
        with pytest.raises(RowStoreError) as caught:
            store.add_table(TIERED, range(SPEC.num_slots))
    assert (caught.value.code, caught.value.field) == ("RESOURCE_EXHAUSTED", "tier")
    assert store.specs() == [] and list(tmp_path.iterdir()) == []
    dram, tiered = _stores(tmp_path, slots=range(8))
    _train([dram, tiered], "layer1", np.random.default_rng(6), steps=2, batch=500, rows=8)
    before = tiered.checksum("layer1")
    source, _ = _stores(tmp_path / "source")
    with file_size_limit(SPEC.rows * SPEC.dim * 4 // 2 - 4096):  # the 8 slots' rows fit, not all 16
        with pytest.raises(RowStoreError) as caught:
            tiered.import_slots("layer1", source.export_slots("layer1", range(8, 16)))
    assert (caught.value.code, caught.value.field) == ("RESOURCE_EXHAUSTED", "tier")
    assert tiered.owned_slots("layer1") == list(range(8)) and tiered.checksum("layer1") == before
    assert len(list(next(tmp_path.glob("table-*-layer1-*")).iterdir())) == 4  # rows and Adam's 3 states, no new files


def test_reading_a_tiered_tables_checkpoint_file_makes_no_files(tmp_path, monkeypatch):
    """A restore reads each shard file through a scratch store: in DRAM, not in tier files of its own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-temp"))  # where default_tier_dir() points
    dram, tiered = _stores(tmp_path / "tier")
    _train([dram, tiered], "layer1", np.random.default_rng(7), steps=2, batch=800)
    path = checkpoint.write_shard_file(tmp_path / "ckpt", "layer1", 0, tiered.export_slots("layer1", range(16)))
    parts = checkpoint.read_slots(tmp_path / "ckpt", TIERED, [path], [2, 5])
    expected = dram.export_slots("layer1", [2, 5])
    assert len(parts) == 1 and all(np.array_equal(parts[0][key], expected[key]) for key in expected)
    assert not (tmp_path / "system-temp").exists()
