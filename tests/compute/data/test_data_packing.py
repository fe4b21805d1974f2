"""Packing a token stream into windows, and the step/rank schedule."""
from __future__ import annotations

import numpy as np
import pytest

from compute.data import PackedSequences, StepSchedule

PAD = 2


def test_windows_are_slices_of_the_stream_with_their_left_context():
    tokens = np.arange(100, 141, dtype=np.int32)  # 41 tokens: 4 windows of 10 (+1)
    packed = PackedSequences(tokens, seq_len=10, context_len=2, pad_id=PAD)
    assert len(packed) == 4

    windows, contexts = packed.windows(np.array([0, 1, 3]))

    assert windows.shape == (3, 11) and contexts.shape == (3, 2) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows[1], tokens[10:21])
    np.testing.assert_array_equal(windows[2], tokens[30:41])
    np.testing.assert_array_equal(contexts[1], tokens[8:10])
    np.testing.assert_array_equal(contexts[0], [PAD, PAD])
    inputs, labels = windows[:, :-1], windows[:, 1:]
    np.testing.assert_array_equal(labels, inputs + 1)  # labels are the inputs shifted by one token
    all_windows, _ = packed.windows(np.arange(4))
    assert (all_windows[:-1, -1] == all_windows[1:, 0]).all()  # every token is a label exactly once
    with pytest.raises(IndexError, match="indices"):
        packed.windows(np.array([4]))


def test_schedule_is_a_seeded_permutation_per_epoch():
    schedule = StepSchedule(num_sequences=23, global_batch=4, seed=7)
    assert schedule.steps_per_epoch == 5
    epoch0 = np.concatenate([schedule.sequences(s) for s in range(5)])
    epoch1 = np.concatenate([schedule.sequences(s) for s in range(5, 10)])

    assert len(set(epoch0.tolist())) == 20 and len(set(epoch1.tolist())) == 20
    assert not np.array_equal(epoch0, epoch1)
    again = StepSchedule(23, 4, seed=7)
    np.testing.assert_array_equal(again.sequences(7), schedule.sequences(7))  # random access, same answer
    assert not np.array_equal(StepSchedule(23, 4, seed=8).sequences(0), schedule.sequences(0))
    np.testing.assert_array_equal(StepSchedule(23, 4, seed=7, shuffle=False).sequences(1), [4, 5, 6, 7])


def test_ranks_split_the_global_batch_in_order():
    schedule = StepSchedule(num_sequences=50, global_batch=8, seed=0)
    for step in (0, 3, 9):
        whole = schedule.sequences(step)
        halves = [schedule.sequences(step, rank, 2) for rank in range(2)]
        quarters = [schedule.sequences(step, rank, 4) for rank in range(4)]
        np.testing.assert_array_equal(np.concatenate(halves), whole)
        np.testing.assert_array_equal(np.concatenate(quarters), whole)
    with pytest.raises(ValueError, match="world_size"):
        schedule.sequences(0, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        schedule.sequences(0, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        StepSchedule(num_sequences=3, global_batch=8, seed=0)
