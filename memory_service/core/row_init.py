"""Deterministic row initialisation: a row's values depend only on (table seed, row id).

Value ``(row, col)`` is ``std * sqrt(2) * erfinv(u)``, with ``u`` uniform on (-1, 1) taken from the top
bits of a counter-based hash of ``(seed, row, col)``: a normal draw truncated at about 5.3 std. Because
no random generator state is involved, a table's content does not depend on how many shards hold
it or in which order they fill their slots.
"""
from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import torch

_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
# lowbias32's multipliers (Chris Wellons' hash-prospector).
_MIX32_MUL1 = np.uint32(0x7FEB352D)
_MIX32_MUL2 = np.uint32(0x846CA68B)

# Values hashed per task of the thread pool: large enough to amortise the calls, small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 18
# Values per torch call inside a task: at most torch's grain size, so torch runs it on the calling thread.
_TORCH_ELEMENTS = 1 << 15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _SPLITMIX_GAMMA
        x = (x ^ (x >> np.uint64(30))) * _SPLITMIX_MUL1
        x = (x ^ (x >> np.uint64(27))) * _SPLITMIX_MUL2
        return x ^ (x >> np.uint64(31))


def row_keys(seed: int, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 32-bit keys per row (low and high halves of a 64-bit hash), as uint32."""
    seed_key = _splitmix64(np.array([seed], dtype=np.uint64))
    keys = _splitmix64(np.asarray(row_ids, dtype=np.int64).view(np.uint64) ^ seed_key)
    halves = keys.view(np.uint32).reshape(-1, 2)
    return np.ascontiguousarray(halves[:, 0]), np.ascontiguousarray(halves[:, 1])


def _mix32_(x: np.ndarray, scratch: np.ndarray) -> None:
    """lowbias32 in place on uint32 ``x``, ``scratch`` (same shape) holding each shifted copy."""
    for shift, multiplier in ((16, _MIX32_MUL1), (15, _MIX32_MUL2)):
        x ^= np.right_shift(x, shift, out=scratch)
        x *= multiplier
    x ^= np.right_shift(x, 16, out=scratch)


def fill_initial_rows(out: torch.Tensor, seed: int, row_ids: np.ndarray, std: float) -> None:
    """Write the initial values of ``row_ids`` into ``out`` ([n, dim], float32 or bfloat16).

    Chunks of rows go to a pool of ``torch.get_num_threads()`` threads; each hashes its chunk in numpy and
    takes erfinv in torch calls small enough to stay on that thread, so no call holds the GIL for long
    and no thread waits for another.
    """
    n, dim = out.shape
    if len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} ids but out has {n} rows")
    columns = np.arange(dim, dtype=np.uint32)
    scale = std * math.sqrt(2.0)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // dim)
    rows_per_call = max(1, _TORCH_ELEMENTS // dim)

    def fill(start: int) -> None:
        stop = min(n, start + rows_per_chunk)
        # Each row walks its own Weyl sequence: start key_lo, odd stride key_hi | 1, one lowbias32 per value.
        key_lo, stride = row_keys(seed, row_ids[start:stop])
        stride |= np.uint32(1)
        bits = np.multiply(columns, stride[:, None])
        bits += key_lo[:, None]
        _mix32_(bits, np.empty_like(bits))
        # The top 24 bits as a signed value, made odd: uniform over the odd integers in (-2**23, 2**23),
        # exact in float32 and symmetric around 0.
        odd = bits.view(np.int32)
        odd >>= 8
        odd |= 1
        uniform = odd.astype(np.float32)
        uniform *= np.float32(2.0**-23)
        values = torch.from_numpy(uniform)
        for first in range(0, stop - start, rows_per_call):
            last = min(stop - start, first + rows_per_call)
            out[start + first:start + last].copy_(values[first:last].erfinv_().mul_(scale))

    starts = range(0, n, rows_per_chunk)
    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        for start in starts:
            fill(start)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, starts))


def init_rows(seed: int, row_ids: np.ndarray, dim: int, std: float) -> np.ndarray:
    """The initial float32 values [n, dim] of ``row_ids``: a pure function of (seed, row id)."""
    out = torch.empty(len(row_ids), dim, dtype=torch.float32)
    fill_initial_rows(out, seed, np.asarray(row_ids, dtype=np.int64), std)
    return out.numpy()
