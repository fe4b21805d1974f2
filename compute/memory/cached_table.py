"""A remote serving table with its most looked-up rows kept on the compute device."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading

import torch

from compute.memory.client import MemoryClient
from compute.memory.remote_table import RemoteRowTable
from compute.memory.row_table import EngramRows, RowsAcrossUpdate, settled
from memory_service.core.slots import ShardSplit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _CachedRows:
    """One choice of cached rows: sorted, distinct ``ids`` [k] (host) and their values ``rows`` [k, dim] on the
    device. Never changed once made: a new choice is a new ``_CachedRows``."""

    ids: torch.Tensor
    rows: torch.Tensor

    def slots_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Each of ``row_ids``' index into ``ids``, or -1 where it is not cached."""
        if not len(self.ids):
            return torch.full(row_ids.shape, -1, dtype=torch.int64)
        slots = torch.searchsorted(self.ids, row_ids).clamp_(max=len(self.ids) - 1)
        return torch.where(self.ids[slots] == row_ids, slots, -1)


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


class CachedRowTable(RemoteRowTable):
    """A read-only (serving) table on the memory service whose ``capacity`` most looked-up rows stay on the
    device: a lookup fetches only the rows the cache misses, and takes the others from the device.

    The cached rows are chosen by lookup counts (LFU; the counts are halved at each choice, so that they follow
    traffic that drifts) every ``readmit_every`` lookups. A choice fetches the rows it admits in the background
    and then swaps the new cache in whole: a lookup reads one choice from start to end. A serving table's rows
    never change, so a cached row is always the shard's; a table that trains is refused (a cache coherent with
    training is not built yet). Costs 4 bytes a table row on the host for the counts.
    """

    def __init__(self, client: MemoryClient, table: str, capacity: int, readmit_every: int = 64,
                 device: torch.device | str = "cpu", wire_dtype: torch.dtype = torch.bfloat16,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(client, table, device, wire_dtype, compute_dtype)
        storage = {spec.name: spec.storage_dtype for spec in client.tables()}[table]
        if storage == "float32":
            self.close()
            raise ValueError(f"memory.cache: table {table!r} trains (float32 rows with optimizer state); the hot-row "
                             f"cache serves read-only serving tables only, as a cache coherent with training is "
                             f"not built yet")
        if capacity < 1 or readmit_every < 1:
            self.close()
            raise ValueError(f"memory.cache: capacity and readmit_every must be >= 1, got {capacity} and "
                             f"{readmit_every}")
        self.capacity, self.readmit_every = min(capacity, self.num_rows), readmit_every
        self.stats = CacheStats()
        self._cache = _CachedRows(torch.empty(0, dtype=torch.int64),
                                  torch.empty((0, self.dim), dtype=compute_dtype, device=self.device))
        self._counts = torch.zeros(self.num_rows, dtype=torch.int32)
        self._counting = threading.Lock()  # counts, stats and the choice in progress
        self._lookups_since_choice = 0
        self._choosing = False

    @property
    def cached_ids(self) -> torch.Tensor:
        """The row ids the cache holds now, sorted."""
        return self._cache.ids

    def describe(self) -> dict:
        """The cache in figures, for a health or status report."""
        stats = self.stats
        return {"capacity": self.capacity, "cached_rows": len(self._cache.ids), "hit_rate": round(stats.hit_rate, 4),
                "bytes_saved": stats.bytes_saved, "bytes_admitted": stats.bytes_admitted}

    def prefetch(self, unique_ids: torch.Tensor, inverse: torch.Tensor,
                 shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        cache = self._cache
        slots = cache.slots_of(unique_ids)
        hit = slots >= 0
        self._count(unique_ids, int(hit.sum()))
        # The loader's shard split is of all of ``unique_ids``: the misses are split afresh.
        missed = self._fetch(unique_ids[~hit]) if not bool(hit.all()) else settled(self._no_rows())
        return self._copier.submit(self._assemble, cache, hit, slots[hit], missed, inverse)

    def prefetch_across_update(self, unique_ids: torch.Tensor, inverse: torch.Tensor, updated_ids: torch.Tensor,
                               shard_split: ShardSplit | None = None) -> RowsAcrossUpdate:
        raise ValueError(f"table {self.table!r}: a cached serving table takes no updates")

    def apply_gradients(self, unique_ids: torch.Tensor, rows: EngramRows, step: int, rank: int = 0,
                        world_size: int = 1, next_rows: RowsAcrossUpdate | None = None) -> concurrent.futures.Future:
        raise ValueError(f"table {self.table!r}: a cached serving table takes no updates")

    def _fetch(self, row_ids: torch.Tensor) -> concurrent.futures.Future:
        return self.client.lookup(self.table, row_ids, dtype=self.wire_dtype, pin_memory=self._copy_stream is not None)

    def _no_rows(self) -> torch.Tensor:
        element, width = self._wire.row_layout(self.dim)
        return torch.empty((0, width), dtype=element)

    def _assemble(self, cache: _CachedRows, hit: torch.Tensor, hit_slots: torch.Tensor,
                  missed: concurrent.futures.Future, inverse: torch.Tensor) -> EngramRows:
        """The lookup's unique rows: the misses as fetched, the hits from ``cache`` (the choice it looked in)."""
        fetched = missed.result()

        def build() -> torch.Tensor:
            rows = torch.empty((len(hit), self.dim), dtype=self.compute_dtype, device=self.device)
            rows.index_copy_(0, torch.nonzero(~hit)[:, 0].to(self.device), self._on_device(fetched))
            rows.index_copy_(0, torch.nonzero(hit)[:, 0].to(self.device),
                             cache.rows.index_select(0, hit_slots.to(self.device)))
            return rows

        return self._engram_rows(build, inverse)

    def _count(self, unique_ids: torch.Tensor, hits: int) -> None:
        """Count a lookup's rows; every ``readmit_every`` lookups, choose the cached rows afresh (off this thread)."""
        with self._counting:
            self._counts.index_add_(0, unique_ids, torch.ones(len(unique_ids), dtype=torch.int32))
            self.stats.rows += len(unique_ids)
            self.stats.hits += hits
            self.stats.bytes_saved += hits * self._wire.row_bytes(self.dim)
            self._lookups_since_choice += 1
            if self._choosing or self._lookups_since_choice < self.readmit_every:
                return
            self._choosing, self._lookups_since_choice = True, 0
        self._copier.submit(self._choose)

    def _choose(self) -> None:
        """Pick the ``capacity`` most looked-up rows, halve the counts, and fetch the rows the cache lacks; the new
        cache is swapped in once they are here."""
        try:
            with self._counting:
                counts, chosen = self._counts.topk(self.capacity)
                self._counts.bitwise_right_shift_(1)
            chosen = chosen[counts > 0].sort().values
            cache = self._cache  # only the copier thread swaps caches in: this one stays until the swap
            admitted = chosen[cache.slots_of(chosen) < 0]
            with self._counting:
                self.stats.bytes_admitted += len(admitted) * self._wire.row_bytes(self.dim)
            fetched = self._fetch(admitted) if len(admitted) else settled(self._no_rows())
        except BaseException:
            self._chosen()
            raise
        fetched.add_done_callback(lambda _: self._swap_in_later(cache, chosen, admitted, fetched))

    def _swap_in_later(self, *args) -> None:
        try:
            self._copier.submit(self._swap_in, *args)
        except RuntimeError:  # the table was closed meanwhile
            pass

    def _swap_in(self, cache: _CachedRows, chosen: torch.Tensor, admitted: torch.Tensor,
                 fetched: concurrent.futures.Future) -> None:
        """Make the cache of ``chosen`` from the rows ``cache`` holds and the ``admitted`` ones fetched; a failed
        fetch keeps the cache as it is."""
        try:
            new_rows = fetched.result()
        except Exception as error:  # the lookups go on with the cache they have
            log.warning("table %s: the hot-row cache keeps its rows: fetching %d admitted rows failed: %s",
                        self.table, len(admitted), error)
            self._chosen()
            return
        try:
            def build() -> tuple[torch.Tensor]:
                rows = torch.empty((len(chosen), self.dim), dtype=self.compute_dtype, device=self.device)
                held = cache.slots_of(chosen)
                kept = held >= 0
                rows.index_copy_(0, torch.nonzero(kept)[:, 0].to(self.device),
                                 cache.rows.index_select(0, held[kept].to(self.device)))
                rows.index_copy_(0, torch.searchsorted(chosen, admitted).to(self.device), self._on_device(new_rows))
                return (rows,)

            rows, = build() if self._copy_stream is None else self._on_copy_stream(build)
            self._cache = _CachedRows(chosen, rows)
        finally:
            self._chosen()

    def _chosen(self) -> None:
        with self._counting:
            self._choosing = False
