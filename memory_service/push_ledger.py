"""Which (step, rank) pushes each slot has already applied, so a retried push is applied once.

Kept per slot, not per shard, because a push that races a slot move is split again by the client:
part of it may land on a shard that already applied another part of the same (step, rank). The
ledger of a slot travels with the slot when it moves.
"""
from __future__ import annotations

import numpy as np

# Steps older than the newest seen minus this are forgotten: retries come within seconds, not epochs.
DEFAULT_WINDOW_STEPS = 4096


class PushLedger:
    """Per-slot memory of applied (step, rank) pairs, bounded to a window of recent steps."""

    def __init__(self, window_steps: int = DEFAULT_WINDOW_STEPS):
        self._window_steps = window_steps
        self._applied: dict[int, set[tuple[int, int]]] = {}
        self._newest_step = 0

    def applied(self, slots: np.ndarray, step: int, rank: int) -> np.ndarray:
        """A bool per slot: has (step, rank) already been applied there?"""
        key = (step, rank)
        return np.fromiter((key in self._applied.get(int(s), ()) for s in slots), dtype=bool, count=len(slots))

    def mark(self, slots: np.ndarray, step: int, rank: int) -> None:
        key = (step, rank)
        for slot in slots:
            self._applied.setdefault(int(slot), set()).add(key)
        if step > self._newest_step:
            self._newest_step = step
            self._forget_before(step - self._window_steps)

    def _forget_before(self, oldest_step: int) -> None:
        for keys in self._applied.values():
            stale = [key for key in keys if key[0] < oldest_step]
            keys.difference_update(stale)

    def export(self, slots) -> dict[str, np.ndarray]:
        """The entries of ``slots`` as three parallel int64 arrays."""
        entries = [(slot, step, rank) for slot in map(int, slots) for step, rank in self._applied.get(slot, ())]
        table = np.asarray(entries, dtype=np.int64).reshape(-1, 3)
        return {"slot": table[:, 0], "step": table[:, 1], "rank": table[:, 2]}

    def import_(self, arrays: dict[str, np.ndarray]) -> None:
        for slot, step, rank in zip(arrays["slot"].tolist(), arrays["step"].tolist(), arrays["rank"].tolist()):
            self._applied.setdefault(slot, set()).add((step, rank))
            self._newest_step = max(self._newest_step, step)

    def release(self, slots) -> None:
        for slot in slots:
            self._applied.pop(int(slot), None)
