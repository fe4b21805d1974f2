"""StepAggregator: synchronous sums equal one big batch, retries apply once, slot moves carry pending sums."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memory_service.core.table_spec import TableSpec
from memory_service.row_store import RowStoreError, RowUpdate, ShardStore
from memory_service.step_aggregator import StepAggregator

DIM = 4
STORE = ShardStore()  # validates pushes, as the servicer has it do before they reach an aggregator
STORE.add_table(TableSpec("t", rows=64, dim=DIM, num_slots=4), range(4))


def _check(row_ids, grads) -> RowUpdate:
    return STORE.check_update("t", row_ids, grads)


def _push(row_ids, seed=0) -> RowUpdate:
    row_ids = torch.tensor(row_ids, dtype=torch.int64)
    return _check(row_ids, torch.from_numpy(np.random.default_rng(seed).standard_normal((len(row_ids), DIM))
                                            .astype(np.float32)))


def _dense(updates, rows=64):
    """Sum a list of updates into a dense [rows, DIM] table of gradients."""
    total = torch.zeros(rows, DIM)
    for update in updates:
        total.index_add_(0, update.row_ids, update.grads)
    return total


def test_synchronous_step_waits_for_every_rank_then_sums():
    aggregator = StepAggregator()
    first, second = _push([1, 5, 9], seed=1), _push([5, 7], seed=2)
    assert aggregator.add(0, 1, 2, second) == []
    assert aggregator.pending_steps() == [0]
    [released] = aggregator.add(0, 0, 2, first)
    assert released.row_ids.tolist() == [1, 5, 7, 9]
    torch.testing.assert_close(_dense([released]), _dense([first, second]))
    assert aggregator.pending_steps() == []


def test_two_half_batches_equal_one_whole_batch():
    whole = _push(list(range(0, 40, 2)), seed=3)
    halves = StepAggregator()
    assert halves.add(7, 0, 2, whole.select(slice(None, 10))) == []
    [summed] = halves.add(7, 1, 2, whole.select(slice(10, None)))
    [single] = StepAggregator().add(7, 0, 1, whole)
    assert torch.equal(summed.row_ids, single.row_ids) and torch.equal(summed.grads, single.grads)


def test_sum_does_not_depend_on_arrival_order():
    pushes = [_push([1, 2, 3], seed=rank) for rank in range(3)]
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        aggregator = StepAggregator()
        for rank in order:
            released = aggregator.add(0, rank, 3, pushes[rank])
        results.append(released[0])
    assert torch.equal(results[0].grads, results[1].grads)


def test_empty_push_counts_as_reporting():
    aggregator = StepAggregator()
    assert aggregator.add(3, 0, 2, _push([4])) == []
    [released] = aggregator.add(3, 1, 2, _push([]))
    assert released.row_ids.tolist() == [4]
    everyone_empty = StepAggregator()
    assert everyone_empty.add(0, 0, 1, _push([])) == []
    assert everyone_empty.pending_steps() == []


@pytest.mark.parametrize("synchronous", [True, False])
def test_retried_push_is_applied_once(synchronous):
    aggregator = StepAggregator(synchronous=synchronous)
    push = _push([3, 8])
    released = aggregator.add(0, 0, 1, push)
    assert len(released) == 1
    assert aggregator.add(0, 0, 1, push) == []
    # A re-split push after a slot move brings new rows for the same (step, rank): only those apply.
    [released] = aggregator.add(0, 0, 1, _push([3, 11, 8], seed=5))
    assert released.row_ids.tolist() == [11] and torch.equal(released.grads, _push([3, 11, 8], seed=5).grads[1:2])


def test_a_rank_split_into_parts_reports_with_its_last_part():
    aggregator = StepAggregator()
    part_1, part_2, other = _push([1, 2], seed=1), _push([7, 9], seed=2), _push([2, 3], seed=3)
    assert aggregator.add(0, 0, 2, part_1, last_part=False) == []
    assert aggregator.add(0, 1, 2, other) == []  # rank 0 has not finished: still pending
    assert aggregator.add(0, 0, 2, part_1, last_part=False) == []  # a retried part adds nothing
    [released] = aggregator.add(0, 0, 2, part_2)
    torch.testing.assert_close(_dense([released]), _dense([part_1, part_2, other]))
    assert aggregator.add(0, 0, 2, part_2) == []  # a retried last part after the release: dropped


def test_a_rank_whose_last_part_already_arrived_counts_even_if_its_retry_carries_no_new_rows():
    aggregator = StepAggregator()
    part_1, part_2 = _push([1], seed=1), _push([4], seed=2)
    assert aggregator.add(0, 0, 2, part_1, last_part=False) == []
    assert aggregator.add(0, 0, 2, part_1) == []  # the last part repeats rows already taken
    [released] = aggregator.add(0, 1, 2, part_2)  # rank 0 reported all the same
    torch.testing.assert_close(_dense([released]), _dense([part_1, part_2]))


def test_retry_before_the_step_completes_is_applied_once():
    aggregator = StepAggregator()
    push = _push([2, 6], seed=4)
    aggregator.add(5, 0, 2, push)
    assert aggregator.add(5, 0, 2, push) == []
    [released] = aggregator.add(5, 1, 2, _push([6], seed=9))
    torch.testing.assert_close(_dense([released]), _dense([push, _push([6], seed=9)]))


def test_asynchronous_mode_releases_on_arrival_per_rank():
    aggregator = StepAggregator(synchronous=False, remembered_steps=2)
    assert len(aggregator.add(0, 0, 2, _push([1]))) == 1
    assert len(aggregator.add(0, 1, 2, _push([1]))) == 1  # another rank's push of the same step
    for step in range(1, 6):
        assert len(aggregator.add(step, 0, 2, _push([1]))) == 1
    # Rank 1 lags behind rank 0 without being dropped: lanes are per rank.
    assert len(aggregator.add(1, 1, 2, _push([1]))) == 1
    assert aggregator.pending_steps() == []


@pytest.mark.parametrize("synchronous", [True, False])
def test_a_push_older_than_the_remembered_steps_is_refused_not_dropped(synchronous):
    aggregator = StepAggregator(synchronous=synchronous, remembered_steps=3)
    for step in range(10):
        aggregator.add(step, 0, 1, _push([step]))
    with pytest.raises(RowStoreError) as caught:
        aggregator.add(2, 0, 1, _push([50]))
    assert caught.value.code == "FAILED_PRECONDITION" and caught.value.field == "step"
    assert "step 2" in str(caught.value) and "newest applied: 9" in str(caught.value)
    assert "restore the service from a checkpoint" in str(caught.value)
    assert aggregator.add(8, 0, 1, _push([8])) == []  # a retry of a remembered step: an idempotent duplicate
    assert len(aggregator.add(9, 0, 1, _push([50]))) == 1  # still remembered, new row


def test_memory_stays_bounded_over_many_steps():
    aggregator = StepAggregator(remembered_steps=4)
    for step in range(0, 4000, 2):
        aggregator.add(step, step % 4 // 2, 2, _push([step % 64]))
        aggregator.add(step, 1 - step % 4 // 2, 2, _push([]))
        if step % 7 == 0:  # now and then a step whose rank 1 never reports
            aggregator.add(step + 1, 0, 2, _push([1]))
            aggregator.abort(step + 1)
    assert len(aggregator._steps) <= 4 and len(aggregator._released[0]) <= 4
    assert aggregator.newest_steps() == {0: 3998}


def test_abort_drops_the_partial_sums_and_later_pushes_get_an_explicit_error():
    aggregator = StepAggregator()
    assert aggregator.add(4, 0, 3, _push([1, 2])) == []
    assert aggregator.pending_info(now=aggregator._steps[(0, 4)].started + 2.5) == [(4, 3, [0], 2.5)]
    assert aggregator.abort(4) == [1, 2]
    assert aggregator.pending_steps() == [] and aggregator.aborted_total == 1 and aggregator.step_state(4) == "aborted"
    with pytest.raises(RowStoreError) as caught:
        aggregator.add(4, 1, 3, _push([3]))
    assert caught.value.code == "ABORTED" and "step 4" in str(caught.value) and "[1, 2]" in str(caught.value)
    assert aggregator.abort(4) == [1, 2] and aggregator.aborted_total == 1  # aborting again changes nothing
    # The next step is not held back by the aborted one.
    [released] = aggregator.add(5, 0, 1, _push([7]))
    assert released.row_ids.tolist() == [7]
    assert aggregator.abort(5) is None  # applied here already: nothing to abort


def test_a_step_aborted_before_any_push_arrived_refuses_its_pushes():
    aggregator = StepAggregator()
    assert aggregator.abort(3, world_size=2) == [0, 1]
    with pytest.raises(RowStoreError, match="aborted"):
        aggregator.add(3, 0, 2, _push([1]))


def test_expired_steps_are_aborted_and_fresh_ones_kept():
    aggregator = StepAggregator()
    aggregator.add(0, 0, 2, _push([1]))
    aggregator.add(1, 1, 2, _push([2]))
    aggregator._steps[(0, 1)].started = aggregator._steps[(0, 0)].started + 10
    now = aggregator._steps[(0, 0)].started + 11
    assert aggregator.abort_expired(now, timeout_s=5) == {0: [1]}
    assert aggregator.pending_steps() == [1] and aggregator.step_state(0) == "aborted"
    assert aggregator.abort_expired(now, timeout_s=5) == {}


def test_start_after_refuses_steps_a_restored_checkpoint_holds():
    aggregator = StepAggregator()
    aggregator.start_after({0: 10})
    with pytest.raises(RowStoreError, match="newest applied: 10"):
        aggregator.add(10, 0, 1, _push([1]))
    assert len(aggregator.add(11, 0, 1, _push([1]))) == 1


@pytest.mark.parametrize(
    "step, rank, world_size, field",
    [(-1, 0, 1, "step"), (0, 2, 2, "rank"), (0, -1, 2, "rank"), (0, 0, 0, "world_size")],
)
def test_bad_pushes_name_their_field(step, rank, world_size, field):
    with pytest.raises(RowStoreError) as caught:
        StepAggregator().add(step, rank, world_size, _push([1]))
    assert caught.value.field == field and caught.value.code == "INVALID_ARGUMENT"


def test_world_size_must_agree_within_a_step():
    aggregator = StepAggregator()
    aggregator.add(0, 0, 3, _push([1]))
    with pytest.raises(RowStoreError) as caught:
        aggregator.add(0, 1, 2, _push([2]))
    assert caught.value.field == "world_size"
    assert aggregator.pending_steps() == [0]


def test_pending_sums_follow_moved_slots():
    """Rank 0 pushed to the old shard; the slot moves; rank 1 pushes to the new one: nothing is lost."""
    num_slots = 4
    old, new = StepAggregator(), StepAggregator()
    rank0_old = _push([0, 1, 5], seed=1)  # slots 0, 1, 1
    rank0_new = _push([2], seed=2)  # slot 2, already on the new shard
    assert old.add(0, 0, 2, rank0_old) == [] and new.add(0, 0, 2, rank0_new) == []
    moved = old.export_pending([1], num_slots)
    assert [record["step"] for record in moved] == [0] and moved[0]["ranks"] == [0]
    assert new.import_pending(moved, _check) == []
    # Rank 1 now pushes its rows of slots 1 and 2 to the new shard, and of slot 0 to the old one.
    rank1_new, rank1_old = _push([2, 9], seed=3), _push([4], seed=4)
    [on_new] = new.add(0, 1, 2, rank1_new)
    [on_old] = old.add(0, 1, 2, rank1_old)
    assert on_new.row_ids.tolist() == [1, 2, 5, 9] and on_old.row_ids.tolist() == [0, 4]
    everything = [rank0_old, rank0_new, rank1_new, rank1_old]
    torch.testing.assert_close(_dense([on_new, on_old]), _dense(everything))


def test_imported_pending_sum_completes_the_step_when_ranks_are_covered():
    old, new = StepAggregator(), StepAggregator()
    rank0, rank1 = _push([1, 2], seed=1), _push([3], seed=2)
    assert old.add(0, 0, 2, rank0) == []  # rank 0 reported to the old shard only
    assert new.add(0, 1, 2, rank1) == []  # rank 1 reported to the new shard only
    [released] = new.import_pending(old.export_pending([1, 2, 3], 4), _check)
    torch.testing.assert_close(_dense([released]), _dense([rank0, rank1]))
    assert new.pending_steps() == [] and old.pending_steps() == [0]  # the old one still waits for rank 1
    assert old.add(0, 1, 2, _push([])) == []


def test_a_rank_midway_through_its_parts_is_not_reported_where_its_slots_move():
    old, new = StepAggregator(), StepAggregator()
    first_part, last_part, rank1 = _push([1], seed=1), _push([5], seed=2), _push([3], seed=3)
    assert old.add(0, 0, 2, first_part, last_part=False) == []
    assert new.add(0, 1, 2, rank1) == []
    moved = old.export_pending([1], 4)
    assert moved[0]["ranks"] == []  # rank 0's rows travel, but it has not reported
    assert new.import_pending(moved, _check) == []
    [released] = new.add(0, 0, 2, last_part)
    torch.testing.assert_close(_dense([released]), _dense([first_part, last_part, rank1]))


@pytest.mark.parametrize("synchronous", [True, False])
def test_applied_rows_follow_moved_slots_so_retries_stay_dropped(synchronous):
    num_slots = 4
    old, new = StepAggregator(synchronous=synchronous), StepAggregator(synchronous=synchronous)
    push = _push([1, 2, 5], seed=1)  # slots 1, 2, 1
    assert len(old.add(0, 0, 1, push)) == 1
    moved = old.export_applied([1], num_slots)
    assert moved["row_ids"].tolist() == [1, 5] and moved["row_count"].tolist() == [2]
    new.import_applied({key: np.frombuffer(value.tobytes(), dtype=value.dtype) for key, value in moved.items()})
    # The client's retry, re-split after the move, sends the slot-1 rows to the new shard: dropped.
    assert new.add(0, 0, 1, push.select([0, 2])) == []
    [released] = new.add(0, 0, 1, _push([9], seed=2))  # a row this rank never sent: applied
    assert released.row_ids.tolist() == [9]


def test_applied_rows_leave_a_step_pending_here_alone():
    old, new = StepAggregator(), StepAggregator()
    old.add(0, 0, 2, _push([1], seed=1))
    old.add(0, 1, 2, _push([5], seed=2))  # released on the old shard
    new.add(0, 0, 2, _push([2], seed=3))  # still waiting for rank 1 here
    new.import_applied(old.export_applied([1], 4))
    assert new.pending_steps() == [0]
    assert len(new.add(0, 1, 2, _push([6], seed=4))) == 1


def test_released_updates_carry_the_stores_positions_while_they_hold():
    aggregator = StepAggregator()
    first = _push([1, 5, 9], seed=1)
    assert aggregator.add(0, 0, 2, first) == []
    [summed] = aggregator.add(0, 1, 2, _push([5, 7], seed=2))
    resolved = _push(summed.row_ids.tolist())
    assert torch.equal(summed.positions, resolved.positions) and summed.layout == resolved.layout
    # A part checked under another storage layout (slots moved meanwhile): the store resolves them again.
    mixed = StepAggregator()
    assert mixed.add(0, 0, 2, dataclasses.replace(first, layout=-1)) == []
    [released] = mixed.add(0, 1, 2, _push([5, 7], seed=2))
    assert released.layout is None and torch.equal(released.grads, summed.grads)


def _applied() -> dict[str, np.ndarray]:
    old = StepAggregator(synchronous=True)
    old.add(0, 0, 1, _push([1, 2, 5], seed=1))
    return old.export_applied([1], 4)


@pytest.mark.parametrize("mutate, field", [
    (lambda a: a.pop("row_ids"), "row_ids"),  # KeyError before: ImportSlots answered INTERNAL (the RPC fuzzer)
    (lambda a: a.pop("lane"), "lane"),
    (lambda a: a.update(row_count=np.asarray([3])), "row_count"),  # more rows than row_ids holds
    (lambda a: a.update(row_count=np.asarray([-1])), "row_count"),
    (lambda a: a.update(step=np.asarray([0, 1])), "row_count"),  # columns of different lengths
    (lambda a: a.update(rank=np.asarray([0.5])), "rank"),
    (lambda a: a.update(row_ids=np.asarray([[1, 5]])), "row_ids"),
    (lambda a: a.update(world_size=np.asarray([0])), "world_size"),
    (lambda a: a.update(extra=np.asarray([1])), "extra"),
])
def test_malformed_applied_pushes_are_refused_naming_the_array_and_change_nothing(mutate, field):
    arrays = _applied()
    mutate(arrays)
    new = StepAggregator(synchronous=True)
    with pytest.raises(RowStoreError) as caught:
        new.import_applied(arrays)
    assert (caught.value.code, caught.value.field) == ("INVALID_ARGUMENT", field)
    with pytest.raises(RowStoreError):
        StepAggregator.check_applied(arrays)
    assert new.pending_steps() == [] and new.export_applied([0, 1, 2, 3], 4)["row_ids"].tolist() == []
    StepAggregator.check_applied(_applied())  # what export_applied writes passes
