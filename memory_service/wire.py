"""Conversions between the wire's raw bytes and numpy/torch arrays, shared by every servicer."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from protos import engram_memory_v1_pb2 as pb

DTYPE_NAMES = {pb.FLOAT32: "float32", pb.BFLOAT16: "bfloat16", pb.FLOAT16: "float16"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Received payloads are immutable bytes viewed without a copy and only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The row-major bytes of a tensor of any dtype (numpy has no bfloat16, so go through uint8)."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only-backed tensor view of ``data`` (no copy); callers must not write into it."""
    if not data:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(data, dtype=TORCH_DTYPES[dtype]).view(shape)


def arrays_to_proto(arrays: dict[str, np.ndarray]) -> list[pb.NamedArray]:
    out = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        out.append(pb.NamedArray(name=name, dtype=array.dtype.str, shape=array.shape, data=array.tobytes()))
    return out


def arrays_from_proto(named: list[pb.NamedArray]) -> dict[str, np.ndarray]:
    return {a.name: np.frombuffer(a.data, dtype=np.dtype(a.dtype)).reshape(tuple(a.shape)).copy() for a in named}
