"""Conversions between the wire's raw bytes and numpy/torch arrays, shared by every servicer."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from memory_service.row_store import TRANSPORT_DTYPES
from protos import engram_memory_v1_pb2 as pb

DTYPE_NAMES = {pb.FLOAT32: "float32", pb.BFLOAT16: "bfloat16", pb.FLOAT16: "float16"}

# Received payloads are immutable bytes viewed without a copy and only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only-backed tensor view of ``data`` (no copy); callers must not write into it."""
    if not data:
        return torch.empty(shape, dtype=TRANSPORT_DTYPES[dtype])
    return torch.frombuffer(data, dtype=TRANSPORT_DTYPES[dtype]).view(shape)


def as_row_words(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous rows viewed as int64 words when a row is whole words (copies by index run several times faster)."""
    return rows.view(torch.int64) if rows.shape[-1] * rows.element_size() % 8 == 0 else rows


def arrays_to_proto(arrays: dict[str, np.ndarray]) -> list[pb.NamedArray]:
    out = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        out.append(pb.NamedArray(name=name, dtype=array.dtype.str, shape=array.shape, data=array.tobytes()))
    return out


def arrays_from_proto(named: list[pb.NamedArray]) -> dict[str, np.ndarray]:
    return {a.name: np.frombuffer(a.data, dtype=np.dtype(a.dtype)).reshape(tuple(a.shape)).copy() for a in named}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_lookup_response(rows: torch.Tensor, dtype: int, epoch: int, rows_in_reply: bool = True) -> bytes:
    """``LookupResponse`` bytes, identical to protobuf's, built with one copy of the rows.

    Protobuf would copy the rows three times (into bytes, into the message, into the wire buffer);
    at 64K rows of dim 64 that is most of the server's time. Without ``rows_in_reply`` (rows written
    to the client's shared memory) the ``rows`` field stays empty.
    """
    payload = rows.contiguous().view(torch.uint8).numpy().reshape(-1)
    if not rows_in_reply:
        payload = payload[:0]
    num_rows, dim = rows.shape
    head = b"\x0a" + _varint(payload.nbytes) if payload.nbytes else b""
    tail = b"".join(tag + _varint(value) for tag, value in
                    ((b"\x10", num_rows), (b"\x18", dim), (b"\x20", dtype), (b"\x28", epoch)) if value)
    return b"".join((head, payload.data, tail))


PENDING_PREFIX = "pending."


def pending_to_arrays(records: list[dict]) -> dict[str, np.ndarray]:
    """``StepAggregator.export_pending`` records as flat named arrays (for ``NamedArray``)."""
    arrays = {}
    for i, record in enumerate(records):
        prefix = f"{PENDING_PREFIX}{i}."
        arrays[prefix + "header"] = np.asarray([record["step"], record["world_size"]], dtype=np.int64)
        arrays[prefix + "ranks"] = np.asarray(record["ranks"], dtype=np.int64)
        for j, part in enumerate(record["parts"]):
            arrays[f"{prefix}{j}.rank"] = np.asarray([part["rank"]], dtype=np.int64)
            arrays[f"{prefix}{j}.row_ids"] = np.asarray(part["row_ids"], dtype=np.int64)
            arrays[f"{prefix}{j}.grads"] = np.asarray(part["grads"], dtype=np.float32)
    return arrays


def pending_from_arrays(arrays: dict[str, np.ndarray]) -> list[dict]:
    """The inverse of ``pending_to_arrays``; pops the pending entries out of ``arrays``."""
    flat = {name[len(PENDING_PREFIX):]: arrays.pop(name) for name in list(arrays) if name.startswith(PENDING_PREFIX)}
    records = []
    for i in sorted({int(name.split(".")[0]) for name in flat}):
        step, world_size = flat[f"{i}.header"].tolist()
        parts = sorted({int(name.split(".")[1]) for name in flat if name.startswith(f"{i}.") and name.count(".") == 2})
        records.append({"step": step, "world_size": world_size, "ranks": flat[f"{i}.ranks"].tolist(), "parts": [
            {"rank": int(flat[f"{i}.{j}.rank"][0]), "row_ids": flat[f"{i}.{j}.row_ids"], "grads": flat[f"{i}.{j}.grads"]}
            for j in parts]})
    return records
