"""Gradient pushes of one table on one shard, turned into the updates to apply.

Pushes arrive validated, as the store's ``RowUpdate``s, and leave as ``RowUpdate``s for the store to
apply; their storage positions travel with their rows.

Synchronous mode sums a step's contributions and releases them once every rank of the step has
reported (an empty push counts: in this mode a rank pushes to every shard owning slots of the
table, each step; a push split across requests counts with its last part). Asynchronous mode
releases each push on arrival. Either way, rows a rank has already contributed to a step are
dropped, so a retried push is applied once, and a push re-split after a slot move still lands.
Released steps are remembered per lane (the whole table when synchronous, each rank when
asynchronous) for the latest ``remembered_steps`` steps, so a retry of one stays an idempotent
duplicate; a push for an older step than those is refused (FAILED_PRECONDITION naming the step and
the newest applied one), never dropped as if applied: a trainer restarted against a running service
learns it has to continue from a later step or restore the service from a checkpoint.

A pending synchronous step whose ranks never all report is aborted (``abort``, or ``abort_expired``
once it is older than a timeout): its partial sums are dropped and the step is remembered like a
released one, so that a later push for it is refused with ABORTED, naming the ranks that never
reported.

When slots move, ``export_pending``/``import_pending`` carry the pending partial sums of those slots
to their new shard; the reported ranks travel with them, so the step completes where it now lives.
``export_applied``/``import_applied`` carry the rows already applied in remembered steps, so a retry
that follows its slot to the new shard is still dropped.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from memory_service.core import push_checks
from memory_service.row_store import RowStoreError, RowUpdate, refused_as_invalid, to_tensor

log = logging.getLogger(__name__)

# The per-(step, rank) columns of export_applied; its ``row_ids`` holds their rows one after another.
APPLIED_COLUMNS = ("lane", "step", "world_size", "rank", "row_count")

# Validates exported rows and gradients of this table into a RowUpdate (the store's check_update).
CheckUpdate = Callable[[np.ndarray, np.ndarray], RowUpdate]


@dataclasses.dataclass
class _Step:
    """One step of one lane: who reported which rows, and what is not yet released."""

    world_size: int
    released: bool  # released or aborted: takes no more rows
    started: float = dataclasses.field(default_factory=time.monotonic)  # when its first push arrived
    missing: list[int] | None = None  # aborted: the ranks that had not reported, else None
    seen: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # rank -> sorted row ids
    reported: set[int] = dataclasses.field(default_factory=set)  # ranks whose last part has arrived
    parts: list[tuple[int, RowUpdate]] = dataclasses.field(default_factory=list)  # (rank, rows)

    def take_new_rows(self, rank: int, update: RowUpdate) -> RowUpdate | None:
        """Record ``rank``'s push; the rows it had not contributed yet, or None if nothing is new."""
        known = self.seen.get(rank)
        if known is not None:
            fresh = ~torch.isin(update.row_ids, known)
            if not fresh.any():
                return None
            update = update.select(fresh)
        self.mark_seen(rank, update.row_ids)
        return update

    def mark_seen(self, rank: int, row_ids: torch.Tensor) -> None:
        """Count ``row_ids`` among ``rank``'s contributed rows."""
        known = self.seen.get(rank)
        self.seen[rank] = (row_ids if known is None else torch.cat([known, row_ids])).sort().values

    @property
    def complete(self) -> bool:
        return len(self.reported) >= self.world_size

    @property
    def pending(self) -> bool:
        return not self.released

    def abort(self) -> list[int]:
        """Drop the partial sums and the rows seen; return (and keep) the ranks that never reported."""
        self.missing = sorted(set(range(self.world_size)) - self.reported)
        self.parts, self.seen, self.released = [], {}, True
        return self.missing


def _sum_by_row(parts: list[tuple[int, RowUpdate]]) -> RowUpdate:
    """Sum the (non-empty list of) parts' gradients per row, in rank order so every replay sums alike.
    The positions hold if all parts' positions held in the same layout."""
    updates = [update for _, update in sorted(parts, key=lambda part: part[0])]
    if len(updates) == 1:
        return updates[0]
    unique, inverse = torch.unique(torch.cat([update.row_ids for update in updates]), return_inverse=True)
    grads = torch.cat([update.grads for update in updates])
    summed = torch.zeros(len(unique), grads.shape[1]).index_add_(0, inverse, grads)
    positions = torch.empty_like(unique).index_copy_(0, inverse, torch.cat([update.positions for update in updates]))
    layouts = {update.layout for update in updates}
    return RowUpdate(unique, summed, positions, layouts.pop() if len(layouts) == 1 else None)


class StepAggregator:
    """Turns one table's pushes into updates: summed per step (synchronous) or on arrival."""

    def __init__(self, synchronous: bool = True, remembered_steps: int = 8, table: str = ""):
        if remembered_steps < 1:
            raise ValueError(f"remembered_steps must be >= 1, got {remembered_steps}")
        self.synchronous = synchronous
        self.table = table  # named in refusals
        self.remembered_steps = remembered_steps
        self._steps: dict[tuple[int, int], _Step] = {}  # (lane, step)
        self._released: dict[int, list[int]] = {}  # lane -> heap of remembered released steps
        self._forgotten_up_to: dict[int, int] = {}  # lane -> newest step no longer remembered
        self.aborted_total = 0  # steps aborted since this aggregator was made

    def add(self, step: int, rank: int, world_size: int, update: RowUpdate, last_part: bool = True) -> list[RowUpdate]:
        """Take one push, or one part of a push split across requests; return the updates to apply now.
        A rank counts as reported with its last part."""
        self._check_push(step, rank, world_size)
        lane = 0 if self.synchronous else rank
        self._refuse_stale(lane, step, rank)
        entry = self._steps.get((lane, step))
        if entry is not None and entry.missing is not None:
            raise RowStoreError("ABORTED", "step", f"step {step} of table '{self.table}' was aborted: ranks "
                                f"{entry.missing} never reported (or the job aborted it), and its partial sums were "
                                "dropped; no rank's push for it will be applied: fail the job or continue from a later "
                                "step")
        if entry is None:
            entry = self._steps[(lane, step)] = _Step(world_size, released=not self.synchronous)
            if entry.released:  # asynchronous: the step is open for this rank's pushes from now on
                self._remember_released(lane, step)
        elif entry.world_size != world_size:
            raise RowStoreError("INVALID_ARGUMENT", "world_size",
                                f"step {step} has world size {entry.world_size}, this push says {world_size}")
        new_rows = entry.take_new_rows(rank, update)
        newly_reported = last_part and rank not in entry.reported
        if last_part:
            entry.reported.add(rank)
        if new_rows is None and not newly_reported:
            return []
        return self._collect(lane, step, entry, [(rank, new_rows)] if new_rows is not None else [])

    def pending_steps(self) -> list[int]:
        """Steps still waiting for ranks (synchronous mode), ascending."""
        return sorted(step for (_, step), entry in self._steps.items() if entry.pending)

    def pending_info(self, now: float | None = None) -> list[tuple[int, int, list[int], float]]:
        """(step, world size, reported ranks, age in seconds) of each pending step, ascending."""
        now = time.monotonic() if now is None else now
        return [(step, entry.world_size, sorted(entry.reported), now - entry.started)
                for (_, step), entry in sorted(self._steps.items()) if entry.pending]

    def is_pending(self, step: int) -> bool:
        """Whether synchronous ``step`` has some ranks' pushes here and waits for the others."""
        entry = self._steps.get((0, step))
        return self.synchronous and entry is not None and entry.pending

    def step_state(self, step: int) -> str:
        """Synchronous ``step`` here: 'pending', 'released', 'aborted', 'forgotten' (released or aborted
        before the remembered steps) or 'unknown' (no push for it arrived here)."""
        entry = self._steps.get((0, step))
        if entry is None:
            return "forgotten" if step <= self._forgotten_up_to.get(0, -1) else "unknown"
        return "pending" if entry.pending else "released" if entry.missing is None else "aborted"

    def abort(self, step: int, world_size: int = 0) -> list[int] | None:
        """Abort synchronous ``step``: drop its partial sums and refuse its pushes from now on. Returns the
        ranks that had not reported (all of ``world_size``'s if no push arrived here yet), or None if the
        step was already released (applied) here or is older than the remembered steps."""
        if step <= self._forgotten_up_to.get(0, -1):
            return None
        entry = self._steps.get((0, step))
        if entry is None:  # aborted before any push reached this shard: its pushes are refused here too
            entry = self._steps[(0, step)] = _Step(world_size, released=False)
        elif not entry.pending:
            return entry.missing
        missing = entry.abort()
        self.aborted_total += 1
        self._remember_released(0, step)
        log.warning("aborted synchronous step %d: ranks %s never reported; its partial sums were dropped",
                    step, missing)
        return missing

    def abort_expired(self, now: float, timeout_s: float) -> dict[int, list[int]]:
        """Abort every pending step whose first push is more than ``timeout_s`` old; step -> missing ranks."""
        expired = [step for (_, step), entry in self._steps.items()
                   if entry.pending and now - entry.started > timeout_s]
        return {step: self.abort(step) for step in sorted(expired)}

    def newest_steps(self) -> dict[int, int]:
        """Per lane (0 when synchronous, else each rank) the newest step released or forgotten here."""
        newest = dict(self._forgotten_up_to)
        for (lane, step), entry in self._steps.items():
            if entry.released and entry.missing is None:
                newest[lane] = max(newest.get(lane, -1), step)
        return newest

    def start_after(self, newest: dict[int, int]) -> None:
        """Take pushes only for steps after ``newest`` (per lane, as ``newest_steps`` gives them): what a
        restored checkpoint holds counts as applied, and a push for it is refused as stale."""
        for lane, step in newest.items():
            self._forgotten_up_to[int(lane)] = max(self._forgotten_up_to.get(int(lane), -1), int(step))

    def has_pending_rows(self, slots: Iterable[int], num_slots: int) -> bool:
        """Whether a pending step holds contributions to rows of ``slots``."""
        moving = torch.as_tensor(sorted(int(slot) for slot in slots), dtype=torch.int64)
        return any(bool(torch.isin(update.row_ids % num_slots, moving).any())
                   for entry in self._steps.values() if not entry.released for _, update in entry.parts)

    def export_pending(self, slots: Iterable[int], num_slots: int) -> list[dict[str, Any]]:
        """Remove and return the pending contributions to rows of ``slots``, with each step's reported ranks."""
        moving = torch.as_tensor(sorted(int(slot) for slot in slots), dtype=torch.int64)
        exported = []
        for (_, step), entry in sorted(self._steps.items()):
            if entry.released:
                continue
            kept, parts = [], []
            for rank, update in entry.parts:
                leaving = torch.isin(update.row_ids % num_slots, moving)
                kept.append((rank, update.select(~leaving)))
                parts.append({"rank": rank, "row_ids": update.row_ids[leaving].numpy(),
                              "grads": update.grads[leaving].numpy()})
            entry.parts = kept
            exported.append({"step": step, "world_size": entry.world_size, "ranks": sorted(entry.reported),
                             "parts": parts})
        return exported

    def import_pending(self, exported: list[dict[str, Any]], check: CheckUpdate) -> list[RowUpdate]:
        """Merge another shard's ``export_pending``, its rows validated by ``check`` before anything
        changes; return the updates of steps this completes."""
        records = []
        for record in exported:
            step, world_size = int(record["step"]), int(record["world_size"])
            self._check_push(step, 0, world_size)
            parts = [(int(p["rank"]), check(p["row_ids"], p["grads"])) for p in record["parts"]]
            records.append((step, world_size, record["ranks"], parts))
        ready = []
        for step, world_size, ranks, parts in records:
            if step <= self._forgotten_up_to.get(0, -1):
                if parts:  # released here long ago: apply the late rows now
                    ready.append(_sum_by_row(parts))
                continue
            entry = self._steps.setdefault((0, step), _Step(world_size, released=False))
            if entry.missing is not None:
                continue  # aborted here: its partial sums are dropped wherever they were
            entry.reported.update(int(rank) for rank in ranks)
            for rank, update in parts:
                entry.mark_seen(rank, update.row_ids)
            ready.extend(self._collect(0, step, entry, parts))
        return [update for update in ready if len(update.row_ids)]

    def export_applied(self, slots: Iterable[int], num_slots: int) -> dict[str, np.ndarray]:
        """Rows of ``slots`` that each rank contributed to remembered released steps, as flat arrays.

        ``lane``, ``step``, ``world_size``, ``rank`` and ``row_count`` have one entry per (step, rank);
        ``row_ids`` holds their rows one after another.
        """
        moving = torch.as_tensor(sorted(int(slot) for slot in slots), dtype=torch.int64)
        columns = {name: [] for name in ("lane", "step", "world_size", "rank", "row_count")}
        row_ids = []
        for (lane, step), entry in sorted(self._steps.items()):
            if not entry.released:
                continue  # pending rows travel with export_pending
            for rank, known in sorted(entry.seen.items()):
                rows = known[torch.isin(known % num_slots, moving)]
                if len(rows):
                    for name, value in zip(columns, (lane, step, entry.world_size, rank, len(rows))):
                        columns[name].append(value)
                    row_ids.append(rows)
        arrays = {name: np.asarray(values, dtype=np.int64) for name, values in columns.items()}
        arrays["row_ids"] = torch.cat(row_ids).numpy() if row_ids else np.empty(0, dtype=np.int64)
        return arrays

    def import_applied(self, arrays: dict[str, np.ndarray]) -> None:
        """Merge another shard's ``export_applied`` so retries of those pushes are dropped here too.

        A step still pending here is left alone: counting the exporter's ranks as reported to it
        would release it early.
        """
        self.check_applied(arrays)
        row_ids = torch.split(to_tensor(arrays["row_ids"]), np.asarray(arrays["row_count"]).tolist())
        for lane, step, world_size, rank, rows in zip(*(np.asarray(arrays[name]).tolist() for name in
                                                        ("lane", "step", "world_size", "rank")), row_ids):
            if step <= self._forgotten_up_to.get(lane, -1):
                continue
            entry = self._steps.get((lane, step))
            if entry is None:
                entry = self._steps[(lane, step)] = _Step(world_size, released=True)
                self._remember_released(lane, step)
            if entry.released and entry.missing is None:
                entry.mark_seen(rank, rows)

    @staticmethod
    def check_applied(arrays: dict[str, np.ndarray]) -> None:
        """RowStoreError (INVALID_ARGUMENT, naming the array) unless ``arrays`` is what ``export_applied``
        writes: one-dimensional integer columns ``lane``, ``step``, ``world_size``, ``rank`` and
        ``row_count`` of one length, counts >= 0 and world sizes >= 1 that add up to ``row_ids``'s length.
        Changes nothing: callers check before they import anything."""
        for name in APPLIED_COLUMNS + ("row_ids",):
            array = arrays.get(name)
            if array is None:
                raise RowStoreError("INVALID_ARGUMENT", name, "missing from the applied pushes")
            array = np.asarray(array)
            if array.dtype.kind not in "iu" or array.ndim != 1:
                raise RowStoreError("INVALID_ARGUMENT", name, f"must be a one-dimensional integer array, got "
                                                              f"{array.dtype} of shape {array.shape}")
        unknown = sorted(set(arrays) - set(APPLIED_COLUMNS) - {"row_ids"})
        if unknown:
            raise RowStoreError("INVALID_ARGUMENT", unknown[0], "not a column of the applied pushes")
        lengths = {len(arrays[name]) for name in APPLIED_COLUMNS}
        if len(lengths) != 1:
            raise RowStoreError("INVALID_ARGUMENT", "row_count", f"columns {list(APPLIED_COLUMNS)} differ in length")
        counts = np.asarray(arrays["row_count"])
        if (counts < 0).any() or int(counts.sum()) != len(arrays["row_ids"]):
            raise RowStoreError("INVALID_ARGUMENT", "row_count",
                                f"counts must be >= 0 and add up to the {len(arrays['row_ids'])} row ids")
        if (np.asarray(arrays["world_size"]) < 1).any():
            raise RowStoreError("INVALID_ARGUMENT", "world_size", "must be >= 1")

    def _collect(self, lane: int, step: int, entry: _Step, parts) -> list[RowUpdate]:
        """Queue ``parts`` on a pending step, or release them (and the step, once complete)."""
        if not entry.released:
            entry.parts.extend(parts)
            if not entry.complete:
                return []
            parts, entry.parts, entry.released = entry.parts, [], True
            self._remember_released(lane, step)
        update = _sum_by_row(parts) if parts else None
        return [update] if update is not None and len(update.row_ids) else []

    def _remember_released(self, lane: int, step: int) -> None:
        heap = self._released.setdefault(lane, [])
        heapq.heappush(heap, step)
        if len(heap) > self.remembered_steps:
            oldest = heapq.heappop(heap)
            self._forgotten_up_to[lane] = max(self._forgotten_up_to.get(lane, -1), oldest)
            del self._steps[(lane, oldest)]

    def _refuse_stale(self, lane: int, step: int, rank: int) -> None:
        """FAILED_PRECONDITION for a push older than the remembered steps: it may never have been applied."""
        forgotten = self._forgotten_up_to.get(lane, -1)
        if step <= forgotten:
            newest = max(self.newest_steps().get(lane, -1), forgotten)
            whose = (f"the synchronous steps of table '{self.table}'" if self.synchronous
                     else f"rank {rank}'s asynchronous pushes to table '{self.table}'")
            raise RowStoreError("FAILED_PRECONDITION", "step",
                                f"step {step} is older than the steps this shard remembers of {whose} (newest "
                                f"applied: {newest}; steps up to {forgotten} are no longer tracked), so it cannot "
                                "tell whether it was applied and refuses it: continue from a step after "
                                f"{newest}, or restore the service from a checkpoint and resume from that")

    @staticmethod
    def _check_push(step: int, rank: int, world_size: int) -> None:
        refused_as_invalid(push_checks.check_push_header, step, rank, world_size)
