"""Slot arithmetic, the split by shard, and SlotMap: even layout, minimal rebalancing."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.core.slots import SlotMap, slot_and_local, slot_of, slot_row_ids, split_by_shard


@pytest.mark.parametrize("num_slots", [64, 48])
def test_slot_math_inverts(num_slots):
    rows = np.arange(10_000, dtype=np.int64)
    slots, local = slot_and_local(rows, num_slots)
    assert np.array_equal(slots, slot_of(rows, num_slots))
    assert np.array_equal(slots + num_slots * local, rows)
    assert np.array_equal(slot_row_ids(5, 4, 64), [5, 69, 133, 197])


def test_even_map_is_balanced_and_starts_at_epoch_1():
    slot_map = SlotMap.even(1024, 3)
    assert slot_map.epoch == 1 and slot_map.owners.dtype == np.int32
    counts = [len(slot_map.slots_of(shard)) for shard in range(3)]
    assert sorted(counts) == [341, 341, 342] and slot_map.num_shards == 3
    with pytest.raises(ValueError, match="num_shards"):
        SlotMap.even(4, 5)


def test_split_groups_positions_by_owner():
    slot_map = SlotMap.even(16, 4)
    row_ids = np.array([0, 15, 4, 31, 8, 3, 100], dtype=np.int64)
    groups = slot_map.split(row_ids)
    assert sorted(groups) == [0, 1, 2, 3]
    for shard, positions in groups.items():
        assert np.all(slot_map.owners[row_ids[positions] % 16] == shard)
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(row_ids)))
    assert np.array_equal(groups[0], [0, 5])  # caller order kept inside a shard


def test_split_by_shard_leaves_out_shards_without_rows():
    owners = np.array([0, 2, 2, 0])
    split = split_by_shard(np.array([1, 2, 4, 5, 8]), owners)
    assert split.keys() == {0, 2}
    np.testing.assert_array_equal(split[0], [2, 4])
    np.testing.assert_array_equal(split[2], [0, 1, 3])


def test_slot_of_masks_power_of_two_counts_like_the_modulo():
    row_ids = np.array([-5, -1, 0, 1, 63, 64, 2**40 + 7], dtype=np.int64)
    for num_slots in (1, 64, 48):
        np.testing.assert_array_equal(slot_of(row_ids, num_slots), row_ids % num_slots)


def _minimum_moves(before: SlotMap, num_shards: int) -> int:
    """A lower bound: every slot of a removed shard, plus each kept shard's excess over its best quota."""
    held = np.bincount(before.owners, minlength=max(num_shards, before.num_shards))
    base, extra = divmod(before.num_slots, num_shards)
    quotas = np.array([base + 1] * extra + [base] * (num_shards - extra))
    kept = np.sort(held[:num_shards])[::-1]  # the largest holders keep the larger quotas
    return int(held[num_shards:].sum() + np.maximum(kept - quotas, 0).sum())


def _check_rebalance(before: SlotMap, num_shards: int) -> SlotMap:
    after, moves = before.rebalanced(num_shards)
    assert after.epoch == before.epoch + 1
    counts = np.bincount(after.owners, minlength=num_shards)
    assert len(counts) == num_shards and counts.max() - counts.min() <= 1
    assert len(moves) == _minimum_moves(before, num_shards)
    for slot, source, target in moves:
        assert before.owners[slot] == source and after.owners[slot] == target and source != target
    changed = np.flatnonzero(before.owners != after.owners)
    assert sorted(slot for slot, _, _ in moves) == changed.tolist()
    return after


@pytest.mark.parametrize("path", [[2, 3, 1], [1, 4, 7, 2], [5, 5, 6], [3, 8, 1, 8]])
def test_rebalance_moves_the_minimum(path):
    slot_map = SlotMap.even(1024, path[0])
    for num_shards in path[1:]:
        slot_map = _check_rebalance(slot_map, num_shards)


def test_rebalance_is_minimal_from_random_layouts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_slots = int(rng.integers(1, 200))
        slot_map = SlotMap(epoch=int(rng.integers(1, 9)),
                           owners=rng.integers(0, min(num_slots, 6), num_slots))  # unbalanced, maybe gaps
        for num_shards in rng.integers(1, min(num_slots, 9) + 1, 3):
            slot_map = _check_rebalance(slot_map, int(num_shards))


def test_rebalance_to_same_count_moves_nothing():
    slot_map = SlotMap.even(100, 7)
    rebalanced, moves = slot_map.rebalanced(7)
    assert moves == [] and np.array_equal(rebalanced.owners, slot_map.owners)


def test_dict_round_trip():
    slot_map, _ = SlotMap.even(32, 2).rebalanced(3)
    assert SlotMap.from_dict(slot_map.to_dict()) == slot_map
