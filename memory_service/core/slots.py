"""Slot arithmetic and the slot -> shard routing table.

A row lives in slot ``row % num_slots`` at local index ``row // num_slots`` of that slot. Shards
are numbered ``0..num_shards-1``; scaling down removes the highest-numbered shards. A fresh map
has epoch 1, so a protobuf default of 0 can mean "no routing seen yet".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

Move = tuple[int, int, int]  # (slot, from_shard, to_shard)


def slot_of(row_ids, num_slots: int) -> np.ndarray:
    """The slot of each row id (as ``slot_and_local`` finds it)."""
    return slot_and_local(np.asarray(row_ids, dtype=np.int64), num_slots)[0]


def slot_and_local(row_ids, num_slots: int):
    """Each of ``row_ids``' slot and index inside its slot's storage (int64 numpy arrays or torch tensors alike);
    a power-of-two slot count (the default) takes a mask and a shift, which beat division."""
    if num_slots & (num_slots - 1) == 0:
        return row_ids & (num_slots - 1), row_ids >> (num_slots.bit_length() - 1)
    return row_ids % num_slots, row_ids // num_slots


def slot_row_ids(slot: int, rows_in_slot: int, num_slots: int) -> np.ndarray:
    """The row ids of ``slot`` in local-index order."""
    return slot + num_slots * np.arange(rows_in_slot, dtype=np.int64)


def split_by_shard(row_ids, owners: np.ndarray) -> dict[int, np.ndarray]:
    """Positions into ``row_ids`` grouped by the shard owning each row's slot (``owners[slot]``),
    ascending within a shard; only shards that get rows appear.

    Small integer ``owners`` (int16, say) sort by radix, several times faster than int64.
    """
    shards = np.asarray(owners)[slot_of(row_ids, len(owners))]
    order = np.argsort(shards, kind="stable")
    counts = np.bincount(shards)
    return {shard: order[end - count:end] for shard, (count, end) in
            enumerate(zip(counts.tolist(), np.cumsum(counts).tolist())) if count}


@dataclasses.dataclass(frozen=True)
class ShardSplit:
    """Row ids split by owning shard (``split_by_shard``'s positions) under the routing of ``epoch``:
    made ahead (by a data loader, say), it is good for as long as ``epoch`` is current."""

    epoch: int
    positions: Mapping[int, np.ndarray]


@dataclasses.dataclass
class SlotMap:
    """Which shard owns each slot, versioned by ``epoch``."""

    epoch: int
    owners: np.ndarray  # int32 [num_slots]: owning shard index

    def __post_init__(self):
        self.owners = np.asarray(self.owners, dtype=np.int32)
        if self.owners.ndim != 1 or self.owners.size == 0:
            raise ValueError(f"owners must be a non-empty 1-D array, got shape {self.owners.shape}")
        if self.owners.min() < 0:
            raise ValueError(f"owners must be shard indices >= 0, got {int(self.owners.min())}")

    @property
    def num_slots(self) -> int:
        return int(self.owners.size)

    @property
    def num_shards(self) -> int:
        """One more than the highest shard index that owns a slot."""
        return int(self.owners.max()) + 1

    @classmethod
    def even(cls, num_slots: int, num_shards: int) -> "SlotMap":
        """Contiguous, equal-as-possible blocks of slots per shard, at epoch 1."""
        if num_shards < 1 or num_shards > num_slots:
            raise ValueError(f"num_shards must be in [1, num_slots={num_slots}], got {num_shards}")
        owners = np.arange(num_slots, dtype=np.int64) * num_shards // num_slots
        return cls(epoch=1, owners=owners)

    def slots_of(self, shard: int) -> np.ndarray:
        """The slots ``shard`` owns, ascending."""
        return np.flatnonzero(self.owners == shard)

    def split(self, row_ids) -> dict[int, np.ndarray]:
        """Positions into ``row_ids`` grouped by owning shard, as ``split_by_shard`` groups them."""
        return split_by_shard(row_ids, self.owners)

    def rebalanced(self, num_shards: int) -> tuple["SlotMap", list[Move]]:
        """A balanced map over ``num_shards`` shards reached by moving as few slots as possible.

        Each shard ends with floor or ceil of ``num_slots / num_shards`` slots; the larger quotas go to
        the shards already holding most, and a shard gives away its highest-numbered slots.
        """
        if num_shards < 1 or num_shards > self.num_slots:
            raise ValueError(f"num_shards must be in [1, num_slots={self.num_slots}], got {num_shards}")
        held = np.bincount(self.owners, minlength=num_shards)[:num_shards]
        base, extra = divmod(self.num_slots, num_shards)
        quota = np.full(num_shards, base, dtype=np.int64)
        quota[np.argsort(-held, kind="stable")[:extra]] += 1

        freed: list[tuple[int, int]] = []  # (slot, from_shard)
        for slot in range(self.num_slots - 1, -1, -1):
            shard = int(self.owners[slot])
            if shard >= num_shards or held[shard] > quota[shard]:
                freed.append((slot, shard))
                if shard < num_shards:
                    held[shard] -= 1
        owners = self.owners.copy()
        moves: list[Move] = []
        receivers = (shard for shard in range(num_shards) for _ in range(quota[shard] - held[shard]))
        for (slot, source), target in zip(sorted(freed), receivers):
            owners[slot] = target
            moves.append((slot, source, target))
        return SlotMap(epoch=self.epoch + 1, owners=owners), moves

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "owners": self.owners.tolist()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SlotMap":
        return cls(epoch=int(values["epoch"]), owners=np.asarray(values["owners"], dtype=np.int32))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotMap):
            return NotImplemented
        return self.epoch == other.epoch and np.array_equal(self.owners, other.owners)
