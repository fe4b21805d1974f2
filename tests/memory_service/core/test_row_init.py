"""Deterministic row initialisation: a pure function of (seed, row id), normal with the asked std."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_service.core import row_init
from memory_service.core.row_init import fill_initial_rows, init_rows


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _reference_rows(seed: int, row_ids: np.ndarray, dim: int, std: float) -> np.ndarray:
    """The documented algorithm in unsigned numpy arithmetic, where wrap-around is well defined."""
    with np.errstate(over="ignore"):
        keys = _splitmix64(row_ids.astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64)))
        key_lo = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
        stride = (keys >> np.uint64(32)).astype(np.uint32)[:, None] | np.uint32(1)
        bits = _lowbias32(key_lo + np.arange(dim, dtype=np.uint32) * stride)
    odd = (bits.view(np.int32) >> 8) | 1
    uniform = torch.from_numpy(odd.astype(np.float32) * np.float32(2.0**-23))
    return (torch.erfinv(uniform) * (std * np.sqrt(2.0))).numpy()


def test_matches_the_documented_algorithm():
    row_ids = np.array([0, 1, 2, 12345, 2**40 + 17, 99_999_999], dtype=np.int64)
    assert np.array_equal(init_rows(11, row_ids, 48, 0.5), _reference_rows(11, row_ids, 48, 0.5))


def test_rows_depend_only_on_seed_and_row_id():
    all_rows = init_rows(5, np.arange(5000), 16, 0.02)
    picked = np.array([4999, 3, 2500, 3, 17])
    assert np.array_equal(init_rows(5, picked, 16, 0.02), all_rows[picked])
    # Chunk boundaries must not matter: fill in one call and in slices of awkward sizes.
    pieces = np.concatenate([init_rows(5, np.arange(start, min(5000, start + 777)), 16, 0.02)
                             for start in range(0, 5000, 777)])
    assert np.array_equal(pieces, all_rows)
    # A narrower table's row is a prefix of the wider one's: columns hash independently.
    assert np.array_equal(init_rows(5, picked, 8, 0.02), all_rows[picked, :8])


def test_seeds_and_rows_differ():
    rows = init_rows(0, np.arange(1000), 32, 1.0)
    assert len(np.unique(rows, axis=0)) == 1000
    assert not np.array_equal(init_rows(1, np.arange(10), 32, 1.0), rows[:10])


def test_distribution_is_normal_with_the_asked_std():
    values = init_rows(3, np.arange(20_000), 64, 0.02).ravel()
    assert values.dtype == np.float32
    assert abs(values.mean()) < 0.02 * 0.01
    assert abs(values.std() / 0.02 - 1) < 0.01
    assert abs((np.abs(values) < 0.02).mean() - 0.6827) < 0.005  # one-sigma mass
    assert np.abs(values).max() < 0.02 * 5.5  # the 23-bit uniform truncates at about 5.3 std
    assert np.all(init_rows(3, np.arange(10), 4, 0.0) == 0)


def test_fills_bfloat16_storage_by_rounding():
    row_ids = np.arange(300, dtype=np.int64)
    out = torch.empty(300, 24, dtype=torch.bfloat16)
    fill_initial_rows(out, 9, row_ids, 0.1)
    expected = torch.from_numpy(init_rows(9, row_ids, 24, 0.1)).to(torch.bfloat16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_parallel_fill_equals_the_documented_algorithm(monkeypatch, threads, dtype):
    """Many chunks and torch calls per chunk (the last of each short), in turn or on a pool of two threads:
    the rows are those of the per-row algorithm, for a whole small table and for scattered ids of a large one."""
    monkeypatch.setattr(row_init, "_CHUNK_ELEMENTS", 1000)  # 25 rows of 40 values
    monkeypatch.setattr(row_init, "_TORCH_ELEMENTS", 300)  # 7 rows
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for row_ids in (np.arange(3001, dtype=np.int64),
                        np.random.default_rng(threads).integers(0, 10**11, 2000, dtype=np.int64)):
            out = torch.empty(len(row_ids), 40, dtype=dtype)
            fill_initial_rows(out, 13, row_ids, 0.02)
            assert torch.equal(out, torch.from_numpy(_reference_rows(13, row_ids, 40, 0.02)).to(dtype))
    finally:
        torch.set_num_threads(previous)
