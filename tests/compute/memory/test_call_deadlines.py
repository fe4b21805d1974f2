"""A call's deadline: a few times the p99 of the method's recent calls, within bounds, or one fixed value."""
from __future__ import annotations

import pytest

from compute.memory.calls import CallDeadlines


def test_until_enough_calls_the_first_deadline_holds_then_four_times_the_p99_within_bounds():
    deadlines = CallDeadlines()
    for _ in range(CallDeadlines.MIN_CALLS - 1):
        deadlines.record("Lookup", 0.9)
    assert deadlines.of("Lookup") == CallDeadlines.FIRST_DEADLINE_S
    deadlines.record("Lookup", 0.9)
    assert deadlines.of("Lookup") == pytest.approx(3.6)  # 4 x p99
    assert deadlines.of("Update") == CallDeadlines.FIRST_DEADLINE_S  # each method on its own
    for _ in range(CallDeadlines.WINDOW):
        deadlines.record("Lookup", 0.001)  # fast calls: the floor, never a hair trigger
    assert deadlines.of("Lookup") == CallDeadlines.DEADLINE_BOUNDS_S[0]
    for _ in range(CallDeadlines.WINDOW):
        deadlines.record("Lookup", 60.0)  # slow calls: the ceiling, so a dead peer never holds a call long
    assert deadlines.of("Lookup") == CallDeadlines.DEADLINE_BOUNDS_S[1]


def test_a_fixed_deadline_overrides_the_recent_calls():
    deadlines = CallDeadlines(fixed_s=0.25)
    for _ in range(100):
        deadlines.record("Lookup", 3.0)
    assert deadlines.of("Lookup") == 0.25
