"""A remote table with its most looked-up rows kept on the compute device, coherent with training."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import threading
from typing import Callable, Iterable, Iterator

import torch

from compute.memory.client import MemoryClient
from compute.memory.futures import settled
from compute.memory.remote_table import RemoteRowTable, _PulledAcrossUpdate
from compute.memory.row_table import EngramRows, RowsAcrossUpdate, RowTable
from memory_service.core.optimizers import make_optimizer
from memory_service.core.slots import ShardSplit
from memory_service.core.table_spec import TableSpec

@dataclasses.dataclass(frozen=True)
class _CachedRows:
    """One choice of cached rows: sorted, distinct ``ids`` [k] (host); on the device their ``rows`` [k, dim] (a
    serving table: the values a lookup gives; a table that trains: float32, as the shards hold them) and, for a
    table that trains, each optimizer ``state`` [k, ...]. A serving table's choice holds its admitted rows once a
    lookup has fetched them: ``held`` (host, bool [k]) says which rows are in. ``slot_of_row`` (host, int32 [table
    rows]) is each table row's index into ``ids``, -1 where it is not chosen: a lookup finds its rows with one
    gather (a binary search of 100K ids among 320K took 2.6 ms on two cores, on the training thread, twice a step).
    A new choice is a new ``_CachedRows``; a training step, or a serving row's first fetch, changes the values of
    the current one in place."""

    ids: torch.Tensor
    rows: torch.Tensor
    state: dict[str, torch.Tensor]
    held: torch.Tensor
    slot_of_row: torch.Tensor

    def slots_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Each of ``row_ids``' index into ``ids``, or -1 where it is not chosen."""
        return self.slot_of_row.index_select(0, row_ids).to(torch.int64)

    def held_slots_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Each of ``row_ids``' index into ``ids``, or -1 where the cache does not hold its row."""
        slots = self.slots_of(row_ids)
        return torch.where(self.held[slots.clamp(min=0)], slots, -1) if len(self.ids) else slots


@dataclasses.dataclass
class CacheStats:
    """What the cache did since the table was opened: rows looked up, rows served from the device, the bytes
    those would have taken on the wire, and the bytes fetching the rows it admitted took."""

    rows: int = 0
    hits: int = 0
    bytes_saved: int = 0
    bytes_admitted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.rows if self.rows else 0.0

    @classmethod
    def of_tables(cls, tables: Iterable[RowTable]) -> CacheStats | None:
        """The stats of the cached ones among ``tables``, summed; None where none is cached."""
        caches = [table.stats for table in tables if isinstance(table, CachedRowTable)]
        if not caches:
            return None
        return cls(*(sum(getattr(stats, field.name) for stats in caches) for field in dataclasses.fields(cls)))


class CachedRowTable(RemoteRowTable):
    """A table on the memory service whose ``capacity`` most looked-up rows stay on the device: a lookup fetches
    only the rows the cache misses, and takes the others from the device.

    The cached rows are chosen by lookup counts (LFU; the counts are halved at each choice, so that they follow
    traffic that drifts) after 2, 4, 8, ... lookups and then every ``readmit_every``, and a new choice replaces the
    old one whole: a lookup reads one choice from start to end. A row the cache lacks is admitted only where it
    pays its admission back: looked up twice or more, at a rate that would serve it from the device, before the
    next choice, as many times as fetching it costs in looked-up rows (``payback_lookups``). Costs 8 bytes a table
    row on the host, for the counts and the choice's row -> slot map (12 while a choice is being swapped in).

    A serving table's rows never change: a choice fetches nothing, the rows it admits are taken from the next
    lookup that fetches them anyway (so admissions cost no bytes on the wire, and the bytes fetched drop by the
    hit rate exactly). A table that trains is written through: the cache holds its rows in float32 with their optimizer state,
    each step applies the step's gradient to the cached rows with the shards' own optimizer, as the shards do
    (on a CPU bit for bit; on a GPU within the rounding of its arithmetic), and still pushes every row's gradient,
    so the shards stay authoritative; a lookup serves cached rows as the wire would carry them. A choice waits
    for the table's pushes and fetches the admitted rows with their state (``MemoryClient.lookup_state``).
    Lookups of cached rows cross no wire, neither to fetch nor to refresh them. Choices are made at the step's end
    (``step_applied_everywhere``). With several workers (staleness 0), each steps its cached rows with its own share
    of the gradient, and at the step's end, after the barrier, drops those that another worker updated too.
    """

    def __init__(self, client: MemoryClient, table: str, capacity: int, readmit_every: int = 64,
                 device: torch.device | str = "cpu", wire_dtype: torch.dtype = torch.bfloat16,
                 compute_dtype: torch.dtype = torch.float32, grad_wire_dtype: torch.dtype = torch.float32):
        super().__init__(client, table, device, wire_dtype, compute_dtype, grad_wire_dtype)
        if capacity < 1 or readmit_every < 1:
            self.close()
            raise ValueError(f"memory.cache: capacity and readmit_every must be >= 1, got {capacity} and "
                             f"{readmit_every}")
        info = {spec.name: spec for spec in client.tables()}[table]
        spec = TableSpec.from_dict(json.loads(info.spec_json))
        self.trains = not spec.read_only
        self._optimizer = make_optimizer(spec.optimizer) if self.trains else None
        self._state_shapes = self._optimizer.state_shapes(self.dim) if self.trains else {}
        self._admitted_row_bytes = spec.bytes_per_row() if self.trains else 0
        self.capacity, self.readmit_every = min(capacity, self.num_rows), readmit_every
        self.stats = CacheStats()
        self._cache = self._cached_rows(torch.empty(0, dtype=torch.int64))
        self._counts = torch.zeros(self.num_rows, dtype=torch.int32)
        self._counting = threading.Lock()  # counts, stats and the choice in progress
        self._lookups_counted = 0.0  # the counts' window: lookups since the start, halved with the counts
        self._lookups_since_choice = 0
        self._next_choice_after = min(2, readmit_every)  # lookups; doubled up to readmit_every
        self._choosing = False
        self._cache_lock = threading.Lock()  # reads and writes of the cached values
        self._pushes: list[concurrent.futures.Future] = []  # this table's pushes not known to have settled

    @property
    def payback_lookups(self) -> float:
        """What admitting a row costs on the wire, in lookups of that row: nothing for a serving table (a lookup
        brings it), about 6 for a table that trains (its row and optimizer state in float32; Adam, dim 64)."""
        return self._admitted_row_bytes / self._wire.row_bytes(self.dim)

    @property
    def cached_ids(self) -> torch.Tensor:
        """The row ids the cache holds now, sorted."""
        cache = self._cache
        return cache.ids[cache.held]

    def describe(self) -> dict:
        """The cache in figures, for a health or status report."""
        stats = self.stats
        return {"capacity": self.capacity, "cached_rows": len(self.cached_ids), "hit_rate": round(stats.hit_rate, 4),
                "bytes_saved": stats.bytes_saved, "bytes_admitted": stats.bytes_admitted}

    # ----- lookups -----

    def prefetch(self, unique_ids: torch.Tensor, inverse: torch.Tensor,
                 shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        cache, hit, hit_slots = self._look_up_in_cache(unique_ids)
        # The loader's shard split is of all of ``unique_ids``: the misses are split afresh.
        missed_ids = unique_ids[~hit]
        missed = self._fetch(missed_ids) if len(missed_ids) else settled(self._no_rows())

        def assembled() -> torch.Tensor:
            rows = self._assembled(cache, hit, hit_slots, missed.result())
            if not self.trains:
                self._hold_admitted(missed_ids, rows, torch.nonzero(~hit)[:, 0])
            return rows

        return self._copier.submit(lambda: self._engram_rows(assembled, inverse))

    def prefetch_across_update(self, unique_ids: torch.Tensor, inverse: torch.Tensor, updated_ids: torch.Tensor,
                               shard_split: ShardSplit | None = None) -> RowsAcrossUpdate:
        """Push-and-pull for the rows the cache misses (``RemoteRowTable.prefetch_across_update``); the cached
        ones are read once the update is in, which has stepped them here too."""
        cache, hit, hit_slots = self._look_up_in_cache(unique_ids)

        def to_rows(across: _PulledAcrossUpdate, pushed: concurrent.futures.Future) -> EngramRows:
            return self._engram_rows(lambda: self._assembled(cache, hit, hit_slots, self._merged_rows(across, pushed)),
                                     inverse)

        return self._pulled_across_update(unique_ids[~hit], updated_ids, inverse, to_rows)

    def _look_up_in_cache(self, unique_ids: torch.Tensor) -> tuple[_CachedRows, torch.Tensor, torch.Tensor]:
        """The current cache, which of ``unique_ids`` it holds and where; counts the lookup, and for a serving
        table starts a new choice of rows when one is due."""
        cache = self._cache
        slots = cache.held_slots_of(unique_ids)
        hit = slots >= 0
        if self._count(unique_ids, int(hit.sum())) and not self.trains:
            self._copier.submit(self._choose_serving_rows)
        return cache, hit, slots[hit]

    def _hold_admitted(self, row_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """On the copier thread: of a lookup's missed ``row_ids`` (at ``positions`` of its ``rows`` on the device),
        those that the current choice admitted and does not hold yet go into it."""
        cache = self._cache  # only the copier thread swaps a serving table's caches in
        if not len(cache.ids):
            return
        slots = cache.slots_of(row_ids)
        wanted = slots >= 0
        wanted &= ~cache.held[slots.clamp(min=0)]
        if bool(wanted.any()):
            with self._cache_stream():
                cache.rows.index_copy_(0, slots[wanted].to(self.device),
                                       rows.index_select(0, positions[wanted].to(self.device)))
            cache.held[slots[wanted]] = True  # after the copy was queued on the stream that lookups read on

    def _assembled(self, cache: _CachedRows, hit: torch.Tensor, hit_slots: torch.Tensor,
                   missed_rows: torch.Tensor) -> torch.Tensor:
        """A lookup's unique rows on the device: the misses from their wire rows, the hits from ``cache``."""
        rows = torch.empty((len(hit), self.dim), dtype=self.compute_dtype, device=self.device)
        rows.index_copy_(0, torch.nonzero(~hit)[:, 0].to(self.device), self._on_device(missed_rows))
        with self._cache_lock:
            cached = cache.rows.index_select(0, hit_slots.to(self.device))
        rows.index_copy_(0, torch.nonzero(hit)[:, 0].to(self.device), self._served(cached))
        return rows

    def _served(self, cached: torch.Tensor) -> torch.Tensor:
        """Cached rows as a lookup gives them: a training table's float32 rows as the wire would carry them."""
        if not self.trains:
            return cached
        return self._wire.values(self._wire.encode(cached), self.compute_dtype)

    def _no_rows(self) -> torch.Tensor:
        element, width = self._wire.row_layout(self.dim)
        return torch.empty((0, width), dtype=element)

    # ----- training -----

    def apply_gradients(self, unique_ids: torch.Tensor, rows: EngramRows, step: int, rank: int = 0,
                        world_size: int = 1, next_rows: RowsAcrossUpdate | None = None) -> concurrent.futures.Future:
        """Step the cached rows of ``unique_ids`` here as the shards will, then push every row's gradient (the
        cached rows are chosen afresh at the step's end, ``step_applied_everywhere``)."""
        if not self.trains:
            raise ValueError(f"table {self.table!r}: a serving table takes no updates")
        cache = self._cache
        slots = cache.slots_of(unique_ids)
        hit = slots >= 0
        if bool(hit.any()):
            # This worker's gradient as the shards receive it: divided by the workers, rounded to the wire's dtype,
            # applied in float32. (A row other workers also stepped is forgotten at the step's end.)
            # Hit positions from the host: a boolean mask on the device would wait for the GPU to catch up.
            hit_positions = torch.nonzero(hit)[:, 0].to(self.device, non_blocking=True)
            grads = (rows.unique_rows.grad.index_select(0, hit_positions) / world_size).to(self.grad_wire_dtype).float()
            with self._cache_stream():
                self._optimizer.apply_at(cache.rows, cache.state, slots[hit].to(self.device), grads)
        pushed = super().apply_gradients(unique_ids, rows, step, rank, world_size, next_rows)
        pushed.add_done_callback(self._forget_cache_if_lost)
        self._pushes = [push for push in self._pushes if not push.done()] + [pushed]
        return pushed

    def _choice_due(self) -> bool:
        with self._counting:
            return self._lookups_since_choice >= self._next_choice_after

    @property
    def keeps_row_copies(self) -> bool:
        return self.trains

    def step_applied_everywhere(self, updated_elsewhere: torch.Tensor) -> None:
        """Drop the cached rows that other workers updated this step (the shards applied the workers' summed
        gradient, this cache only its own worker's): lookups fetch them until a choice admits them again, with the
        shards' values. Then make a choice if one is due: with several workers, only now are the step's rows final
        on the shards (a push is answered before the other workers' pushes of its step have arrived); with one, the
        step's end keeps the choice's waits out of its backward."""
        cache = self._cache
        stale = torch.isin(cache.ids, updated_elsewhere)
        if bool(stale.any()):
            self._cache = self._merged_cache(cache, cache.ids[~stale], torch.empty(0, dtype=torch.int64), dict)
        if self._choice_due():
            self._choose_training_rows()

    def _forget_cache_if_lost(self, pushed: concurrent.futures.Future) -> None:
        """A push the shards did not take leaves the cached rows a step ahead of theirs: drop them."""
        if pushed.exception() is not None:
            self._cache = self._cached_rows(torch.empty(0, dtype=torch.int64))

    @contextlib.contextmanager
    def _cache_stream(self) -> Iterator[None]:
        """Change the cached values one at a time, on a GPU on the copy stream (where lookups read them), after
        the work the calling thread queued (the gradients)."""
        with self._cache_lock:
            if self._copy_stream is None:
                yield
                return
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                yield

    # ----- choosing the cached rows -----

    def _count(self, unique_ids: torch.Tensor, hits: int) -> bool:
        """Count a lookup's rows; whether a new choice of cached rows is due (and not already under way)."""
        with self._counting:
            self._counts.index_add_(0, unique_ids, torch.ones(len(unique_ids), dtype=torch.int32))
            self.stats.rows += len(unique_ids)
            self.stats.hits += hits
            self.stats.bytes_saved += hits * self._wire.row_bytes(self.dim)
            self._lookups_since_choice += 1
            self._lookups_counted += 1
            if self._choosing or self._lookups_since_choice < self._next_choice_after:
                return False
            if not self.trains:
                self._choosing, self._lookups_since_choice = True, 0
            return True

    def _chosen_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``capacity`` most looked-up rows among those cached or worth admitting, sorted, and those of them the
        cache lacks; halves the counts. A cached row keeps its place against a row looked up as often."""
        with self._counting:
            # Only rows with a count are candidates: a pass over the table's counts, then work on the few looked up
            # lately (a top-k over every row of a 3.2M-row table took 63-64 ms, on the thread that makes lookups).
            candidates = torch.nonzero(self._counts)[:, 0]
            counts = self._counts[candidates]
            self._counts[candidates] = counts >> 1
            window, self._lookups_counted = self._lookups_counted, self._lookups_counted / 2
            self._lookups_since_choice = 0
            self._next_choice_after = min(2 * self._next_choice_after, self.readmit_every)
        cached = self._cache.slots_of(candidates) >= 0
        # Looked up `counts` times in the last `window` lookups: the hits it would give before the next choice.
        pays_back = (counts >= 2) & (counts * self._next_choice_after >= self.payback_lookups * window)
        candidates, counts, cached = (values[cached | pays_back] for values in (candidates, counts, cached))
        score = counts.to(torch.int64) * 2 + cached  # a cached row wins a tie
        chosen = candidates[score.topk(min(self.capacity, len(candidates))).indices].sort().values
        admitted = chosen[self._cache.slots_of(chosen) < 0]
        with self._counting:
            self.stats.bytes_admitted += len(admitted) * self._admitted_row_bytes
        return chosen, admitted

    def _choose_serving_rows(self) -> None:
        """On the copier thread: choose, and swap in the cache of the chosen rows, holding those it held; the
        admitted ones come with the lookups that fetch them next (``_hold_admitted``)."""
        try:
            chosen, admitted = self._chosen_ids()
            self._cache = self._merged_cache(self._cache, chosen, admitted, None)
        finally:
            self._done_choosing()

    def _choose_training_rows(self) -> None:
        """At the step's end, once the table's pushes are in: choose, fetch the admitted rows with their optimizer
        state, and swap the new cache in."""
        for push in self._pushes:
            push.result()
        self._pushes = []
        cache = self._cache
        chosen, admitted = self._chosen_ids()
        fetched = self.client.lookup_state(self.table, admitted).result() if len(admitted) else {}

        def on_device() -> dict[str, torch.Tensor]:
            return {key: values.to(self.device).view(len(admitted), *self._shape_of(key))
                    for key, values in fetched.items()}

        self._cache = self._merged_cache(cache, chosen, admitted, on_device)

    def _merged_cache(self, cache: _CachedRows, chosen: torch.Tensor, admitted: torch.Tensor,
                      admitted_values: Callable[[], dict[str, torch.Tensor]] | None) -> _CachedRows:
        """The cache of ``chosen``: what ``cache`` holds of them, and ``admitted_values()`` (the admitted rows' values
        by key, on the device) for the rest; without ``admitted_values``, those are not held yet."""
        new = self._cached_rows(chosen)
        held = cache.held_slots_of(chosen)
        kept = held >= 0
        old = self._tensors(cache)
        with self._cache_stream():
            incoming = admitted_values() if len(admitted) and admitted_values else {}
            for key, target in self._tensors(new).items():
                target.index_copy_(0, torch.nonzero(kept)[:, 0].to(self.device),
                                   old[key].index_select(0, held[kept].to(self.device)))
                if incoming:
                    target.index_copy_(0, new.slots_of(admitted).to(self.device), incoming[key])
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        if admitted_values is None:
            new.held.copy_(kept)
        return new

    def _cached_rows(self, ids: torch.Tensor) -> _CachedRows:
        """An empty-valued cache for ``ids``, every row held: rows (and, for a table that trains, each state) on the
        device."""
        rows_dtype = torch.float32 if self.trains else self.compute_dtype
        rows = torch.empty((len(ids), self.dim), dtype=rows_dtype, device=self.device)
        state = {name: torch.empty((len(ids), *shape), dtype=torch.float32, device=self.device)
                 for name, shape in self._state_shapes.items()}
        slot_of_row = torch.full((self.num_rows,), -1, dtype=torch.int32)
        slot_of_row[ids] = torch.arange(len(ids), dtype=torch.int32)
        return _CachedRows(ids, rows, state, torch.ones(len(ids), dtype=torch.bool), slot_of_row)

    def _shape_of(self, key: str) -> tuple[int, ...]:
        return (self.dim,) if key == "rows" else self._state_shapes[key[len("state."):]]

    @staticmethod
    def _tensors(cache: _CachedRows) -> dict[str, torch.Tensor]:
        return {"rows": cache.rows, **{f"state.{name}": values for name, values in cache.state.items()}}

    def _done_choosing(self) -> None:
        with self._counting:
            self._choosing = False
