"""Deterministic row initialisation: a row's values depend only on (table seed, row id).

Value ``(row, col)`` is ``std * sqrt(2) * erfinv(u)``, with ``u`` uniform on (-1, 1) taken from the top
bits of a counter-based hash of ``(seed, row, col)``: a normal draw truncated at about 5.3 std. Because
no random generator state is involved, a table's content does not depend on how many shards hold
it or in which order they fill their slots.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
# lowbias32's multipliers (Chris Wellons' hash-prospector), as the int32 values of their bit patterns.
_MIX32_MUL1 = 0x7FEB352D
_MIX32_MUL2 = 0x846CA68B - (1 << 32)

# Elements hashed per pass and thread: large enough to amortise op overhead, small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 18


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _SPLITMIX_GAMMA
        x = (x ^ (x >> np.uint64(30))) * _SPLITMIX_MUL1
        x = (x ^ (x >> np.uint64(27))) * _SPLITMIX_MUL2
        return x ^ (x >> np.uint64(31))


def row_keys(seed: int, row_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent 32-bit keys per row (low and high halves of a 64-bit hash), as int32."""
    seed_key = _splitmix64(np.array([seed], dtype=np.uint64))
    keys = _splitmix64(np.asarray(row_ids, dtype=np.int64).view(np.uint64) ^ seed_key)
    halves = torch.from_numpy(keys.view(np.int32).reshape(-1, 2))
    return halves[:, 0].contiguous(), halves[:, 1].contiguous()


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on int32 bit patterns, ``scratch`` (same shape) holding each shifted copy; shifts are
    masked to make them logical."""
    for shift, mask, multiplier in ((16, 0xFFFF, _MIX32_MUL1), (15, 0x1FFFF, _MIX32_MUL2)):
        x ^= torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_(mask)
        x *= multiplier
    x ^= torch.bitwise_right_shift(x, 16, out=scratch).bitwise_and_(0xFFFF)
    return x


def fill_initial_rows(out: torch.Tensor, seed: int, row_ids: np.ndarray, std: float) -> None:
    """Write the initial values of ``row_ids`` into ``out`` ([n, dim], float32 or bfloat16), chunk by chunk.

    Each chunk's ops are element-wise, so torch runs them on all ``torch.get_num_threads()`` threads; chunks
    grow with the thread count, and the int32 and float32 scratch of one chunk is allocated once.
    """
    n, dim = out.shape
    if len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} ids but out has {n} rows")
    # Each row walks its own Weyl sequence: start key_lo, odd stride key_hi | 1, one lowbias32 per value.
    key_lo, key_hi = row_keys(seed, row_ids)
    stride = key_hi.bitwise_or_(1)
    columns = torch.arange(dim, dtype=torch.int32)
    rows_per_chunk = max(1, min(n, _CHUNK_ELEMENTS * torch.get_num_threads() // dim))
    bits, scratch = torch.empty(rows_per_chunk, dim, dtype=torch.int32), torch.empty(rows_per_chunk, dim, dtype=torch.int32)
    values = None if out.dtype == torch.float32 else torch.empty(rows_per_chunk, dim)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        x = torch.mul(columns, stride[start:stop, None], out=bits[:stop - start]).add_(key_lo[start:stop, None])
        _mix32_(x, scratch[:stop - start])
        # The top 24 bits as a signed value, made odd: uniform over the odd integers in (-2**23, 2**23),
        # exact in float32 and symmetric around 0.
        odd = x.bitwise_right_shift_(8).bitwise_or_(1)
        chunk = out[start:stop] if values is None else values[:stop - start]
        chunk.copy_(odd).mul_(2.0**-23).erfinv_().mul_(std * math.sqrt(2.0))
        if values is not None:
            out[start:stop].copy_(chunk)


def init_rows(seed: int, row_ids: np.ndarray, dim: int, std: float) -> np.ndarray:
    """The initial float32 values [n, dim] of ``row_ids``: a pure function of (seed, row id)."""
    out = torch.empty(len(row_ids), dim, dtype=torch.float32)
    fill_initial_rows(out, seed, np.asarray(row_ids, dtype=np.int64), std)
    return out.numpy()
