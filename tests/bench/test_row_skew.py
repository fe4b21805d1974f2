"""bench.row_skew's statistics and cache simulation, on a hand-made four-step stream of a six-row table."""
from __future__ import annotations

import numpy as np
import pytest

from bench.row_skew import (LayerStream, cache_hit_rates, hot_set_overlap, previous_step_reuse, resident,
                            rows_to_cover, top_share)


@pytest.fixture
def stream() -> LayerStream:
    stream = LayerStream(table_rows=6)
    for unique, counts in (([0, 1], [3, 1]), ([0, 2], [2, 2]), ([0, 3], [1, 1]), ([2, 3], [1, 3])):
        stream.add(np.array(unique), np.repeat(np.arange(len(unique)), counts))
    return stream


def test_counts_and_skew(stream):
    counts = stream.row_counts()
    assert counts.tolist() == [6, 1, 3, 4, 0, 0]
    assert top_share(counts, 1) == pytest.approx(6 / 14)
    assert top_share(counts, 2) == pytest.approx(10 / 14)
    assert rows_to_cover(counts, 0.5) == 2 and rows_to_cover(counts, 0.8) == 3
    assert hot_set_overlap(stream.row_counts(slice(0, 2)), stream.row_counts(slice(2, None)), 1) == 0.0
    assert hot_set_overlap(stream.row_counts(slice(0, 2)), stream.row_counts(slice(2, None)), 3) == 0.5


def test_resident_splits_ties_at_the_boundary():
    score = np.array([0, 3, 3, 1])
    assert resident(score, 1, np.arange(4)).tolist() == [0.0, 0.5, 0.5, 0.0]
    assert resident(score, 2, np.arange(4)).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert resident(score, 5, np.arange(4)).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_previous_step_reuse(stream):
    assert previous_step_reuse(stream) == pytest.approx({"lookups": 6 / 10, "unique_rows": 3 / 6})


def test_cache_hit_rates(stream):
    rates = cache_hit_rates(stream, capacity=1, warmup=2)
    assert rates["static"] == pytest.approx({"lookups": 1 / 6, "unique_rows": 1 / 4})
    assert rates["lfu"] == pytest.approx({"lookups": 1 / 6, "unique_rows": 1 / 4})
    # Before step 2 rows 0 and 2 were last read at step 1, before step 3 rows 0 and 3 at step 2: each half held.
    assert rates["lru"] == pytest.approx({"lookups": 2 / 6, "unique_rows": 1 / 4})
