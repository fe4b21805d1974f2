"""MemoryConfig's wire dtypes: rows may travel in any wire dtype, float8_e4m3 included; gradients never in FP8."""
from __future__ import annotations

import pytest
import torch

from compute.train.config import MemoryConfig


def test_rows_may_travel_in_float8_and_gradients_may_not():
    assert MemoryConfig(wire_dtype="float8_e4m3").wire_torch_dtype == torch.float8_e4m3fn
    assert MemoryConfig(wire_dtype="float8_e4m3").wire_row_bytes(128) == 128 + 4  # E4M3 values, float32 scale
    assert MemoryConfig(wire_dtype="bfloat16").wire_row_bytes(128) == 256
    with pytest.raises(ValueError, match=r"memory.grad_wire_dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
        MemoryConfig(grad_wire_dtype="float8_e4m3")
    with pytest.raises(ValueError, match=r"memory.wire_dtype must be one of \[.*'float8_e4m3'\], got 'int8'"):
        MemoryConfig(wire_dtype="int8")
