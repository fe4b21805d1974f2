"""MemoryConfig: rows may travel in any wire dtype, float8_e4m3 included, gradients never in FP8; the hot-row
cache and the SSD tier are sized in rows or bytes, for remote tables only, and the tier reaches the tables' specs."""
from __future__ import annotations

import pytest
import torch

from compute.config import dataclass_from_mapping
from compute.train.config import CacheConfig, MemoryConfig, TierConfig, TrainConfig
from compute.train.tables import engram_table_specs
from memory_service.core.table_spec import TierSpec


def test_rows_may_travel_in_float8_and_gradients_may_not():
    assert MemoryConfig(wire_dtype="float8_e4m3").wire_torch_dtype == torch.float8_e4m3fn
    assert MemoryConfig(wire_dtype="float8_e4m3").wire_row_bytes(128) == 128 + 4  # E4M3 values, float32 scale
    assert MemoryConfig(wire_dtype="bfloat16").wire_row_bytes(128) == 256
    with pytest.raises(ValueError, match=r"memory.grad_wire_dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
        MemoryConfig(grad_wire_dtype="float8_e4m3")
    with pytest.raises(ValueError, match=r"memory.wire_dtype must be one of \[.*'float8_e4m3'\], got 'int8'"):
        MemoryConfig(wire_dtype="int8")


def test_the_ssd_tier_reaches_every_table_of_remote_runs_only():
    config = dataclass_from_mapping(TrainConfig, {"memory": {"tier": {"dram_rows": 5000}}})  # as a run YAML has it
    specs = engram_table_specs(config, {layer: 20011 for layer in config.engram.layer_ids})
    assert [spec.tier for spec in specs] == [TierSpec(dram_rows=5000)] * len(config.engram.layer_ids)
    assert TierConfig(dram_bytes=1 << 30).spec() == TierSpec(dram_bytes=1 << 30)
    assert all(spec.tier is None for spec in engram_table_specs(TrainConfig(), {1: 100, 3: 100}))
    with pytest.raises(ValueError, match="only remote tables"):
        MemoryConfig(tables="local", tier=TierConfig(dram_rows=5000))
    with pytest.raises(ValueError, match=r"memory.tier.dram_rows must be an integer >= 0, got 'many'"):
        TierConfig(dram_rows="many")
    with pytest.raises(ValueError, match=r"memory.tier: give its size in one of \['dram_rows', 'dram_bytes'\]"):
        TierConfig(dram_rows=10, dram_bytes=4096)


def test_the_cache_is_sized_in_rows_or_bytes_and_only_in_front_of_remote_tables():
    assert not MemoryConfig().cache.enabled
    assert CacheConfig(rows=1000).capacity(dim=64) == 1000
    assert CacheConfig(bytes=1 << 20).capacity(dim=64) == (1 << 20) // 256  # float32 rows on the device
    with pytest.raises(ValueError, match=r"memory.cache: give its size in one of \['rows', 'bytes'\], not several"):
        CacheConfig(rows=10, bytes=4096)
    with pytest.raises(ValueError, match=r"memory.cache.rows must be an integer >= 0, got -1"):
        CacheConfig(rows=-1)
    with pytest.raises(ValueError, match=r"memory.cache.readmit_every must be >= 1, got 0"):
        CacheConfig(rows=10, readmit_every=0)
    with pytest.raises(ValueError, match="in-process tables are on the device already"):
        MemoryConfig(tables="local", cache=CacheConfig(rows=10))


def test_a_run_of_several_workers_with_a_cache_and_staleness_1_is_refused_before_it_starts(tmp_path):
    from compute.train.job import run_training
    from tests.integration.tiny_runs import tiny_run

    with pytest.raises(ValueError, match="memory.cache with several workers needs memory.staleness: 0"):
        run_training(tiny_run(tmp_path, num_workers=2, memory__staleness=1, memory__cache=CacheConfig(rows=8)))
    assert not (tmp_path / "run").exists()
