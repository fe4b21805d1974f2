"""MemoryConfig's wire dtypes: rows may travel in any wire dtype, float8_e4m3 included; gradients never in FP8.
Its SSD tier reaches the tables' specs."""
from __future__ import annotations

import pytest
import torch

from compute.train.config import MemoryConfig, TrainConfig
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
    config = TrainConfig(memory=MemoryConfig(tier_dram_rows=5000))
    specs = engram_table_specs(config, {layer: 20011 for layer in config.engram.layer_ids})
    assert [spec.tier for spec in specs] == [TierSpec(dram_rows=5000)] * len(config.engram.layer_ids)
    assert all(spec.tier is None for spec in engram_table_specs(TrainConfig(), {1: 100, 3: 100}))
    with pytest.raises(ValueError, match="only remote tables"):
        MemoryConfig(tables="local", tier_dram_rows=5000)
    with pytest.raises(ValueError, match="memory.tier_dram_rows must be an integer >= 1, got 0"):
        MemoryConfig(tier_dram_rows=0)
