"""A table's rows and optimizer state in files on local disk, with a bounded DRAM cache of the hot rows.

Each tensor (``rows``, ``state.<name>``) is one memory-mapped file of ``[num_rows, ...]`` in storage
position order, its disk space allocated when it is made. The cache holds at most ``capacity`` rows (each
with all of its tensors) in DRAM tensors; ``_entry_of[position]`` (int32, -1: not cached) says which cache
entry holds a position.
Lookups and updates go through the cache: a missing row is read from its file into a free or evicted
entry, an updated entry is marked dirty and written back to the files when it is evicted or on
``flush``. Eviction is least-frequently-used with aging: each entry counts its accesses, and the
counts halve each time ``capacity`` accesses have gone by, so rows that were hot once cool off.

A batch with more distinct rows than the cache holds is processed ``capacity`` rows at a time; the
optimizer steps each row on its own, so the result equals one pass over the whole batch.

The files go through the OS page cache, which the kernel may keep in otherwise free memory and
reclaims under pressure; the cap is on the memory this process allocates. Not thread-safe: the
caller serialises calls (``ShardStore`` holds its lock).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from memory_service.core.leftovers import pid_tagged, remove_leftovers

TABLE_DIR_PREFIX = "table-"  # a table's folder under the tier's directory: table-<pid>-<name>-<random>
COPY_BATCH_ROWS = 1 << 16  # rows copied at a time when the files are rewritten


@dataclasses.dataclass
class TierStats:
    """What the cache holds now, and what it did since the table was created."""

    capacity: int = 0        # rows the cache may hold
    cached_rows: int = 0     # rows it holds now
    hits: int = 0            # looked-up or updated ids whose row was in the cache when the call came
    misses: int = 0          # those whose row was not
    rows_read: int = 0       # rows read from the files into the cache
    evictions: int = 0       # cached rows dropped for others
    written_back: int = 0    # dirty rows written to the files (on eviction or flush)


def numpy_storage_dtype(dtype: torch.dtype) -> np.dtype:
    """How a storage dtype is held as numpy (files, exports): bfloat16 as its uint16 bit patterns (numpy has no
    bfloat16), float32 as itself."""
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else np.dtype(np.float32)


class TieredRows:
    """Rows and state of ``num_rows`` storage positions in files under ``directory`` (a private folder made
    inside it, removed with the table), ``capacity`` of them cached in DRAM.

    ``layout`` maps each key (``rows``, ``state.<name>``) to its dtype and per-row shape.
    """

    def __init__(self, directory: str | Path, prefix: str, num_rows: int, capacity: int,
                 layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.layout = dict(layout)
        remove_leftovers(directory, TABLE_DIR_PREFIX)  # the files of tables whose shard was killed
        self.directory = Path(tempfile.mkdtemp(prefix=f"{pid_tagged(TABLE_DIR_PREFIX)}{prefix}-", dir=directory))
        # The files go with the table: on close, or once nothing refers to it (a store replaced by a restore).
        self._remove_files = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.capacity = capacity
        self.counters = TierStats()
        self._generation = 0
        try:
            self._files = self._new_files(num_rows, self._generation)
        except OSError:
            self._remove_files()
            raise
        self._empty_cache(num_rows)

    # ----- whole-table views -----

    def files(self) -> dict[str, torch.Tensor]:
        """Every row as tensors over the files, keyed as ``layout``; current once ``flush`` wrote the cache back.
        Writing into them bypasses the cache: only for rows not cached (right after ``relayout``)."""
        return self._files

    def dram_bytes(self) -> int:
        """DRAM this tier allocated: the cache, its bookkeeping and the position index (``TableSpec.dram_bytes``)."""
        cache = sum(tensor.nbytes for tensor in self._cache.values())
        return cache + self._entry_of.nbytes + self._owner.nbytes + self._counts.nbytes + self._dirty.nbytes

    def stats(self) -> TierStats:
        return dataclasses.replace(self.counters, capacity=len(self._owner), cached_rows=int((self._owner >= 0).sum()))

    # ----- lookup and update -----

    def gather(self, key: str, positions: torch.Tensor) -> torch.Tensor:
        """The values of ``key`` at ``positions`` [n] (any order, repeats allowed), read through the cache."""
        entries = self._counted_entries(positions)
        missing = entries < 0
        if not missing.any():
            self._touch(entries)
            return self._cache[key].index_select(0, entries)
        loaded, where = torch.unique(positions[missing], return_inverse=True)
        if len(loaded) + len(positions) - len(where) <= len(self._owner):  # room for them all at once
            entries[missing] = self._load(loaded, pinned=entries[~missing])[where]
            self._touch(entries)
            return self._cache[key].index_select(0, entries)
        return self._gather_in_parts(key, positions)

    def _gather_in_parts(self, key: str, positions: torch.Tensor) -> torch.Tensor:
        """``gather`` of more distinct rows than the cache holds, ``capacity`` of them at a time."""
        unique, inverse = torch.unique(positions, return_inverse=True)
        dtype, shape = self.layout[key]
        values = torch.empty((len(unique), *shape), dtype=dtype)
        for start in range(0, len(unique), self.capacity):
            entries = self._admit(unique[start:start + self.capacity])
            values[start:start + len(entries)] = self._cache[key].index_select(0, entries)
        return values.index_select(0, inverse)

    def update(self, positions: torch.Tensor, apply: Callable[[dict[str, torch.Tensor], torch.Tensor, slice], None]
               ) -> None:
        """Change the rows at unique ``positions`` [n] in the cache: ``apply(cache, entries, part)`` updates the
        cache's tensors at ``entries``, the cache entries of ``positions[part]``; those entries become dirty."""
        self._counted_entries(positions)
        for start in range(0, len(positions), self.capacity):
            part = slice(start, start + self.capacity)
            entries = self._admit(positions[part])
            apply(self._cache, entries, part)
            self._dirty[entries] = True

    def flush(self) -> None:
        """Write every dirty cached row back to the files; the cache keeps its rows, now clean."""
        self._write_back(torch.nonzero(self._dirty).flatten())

    def relayout(self, kept: torch.Tensor, incoming: Mapping[str, torch.Tensor]) -> None:
        """New files holding the rows at positions ``kept`` (in that order), then the ``incoming`` rows (a tensor
        per key, all of one length); the cache starts empty. OSError (no disk left for the new files) changes
        nothing but writing the cache back."""
        self.flush()
        num_rows = len(kept) + (len(next(iter(incoming.values()))) if incoming else 0)
        files = self._new_files(num_rows, self._generation + 1)
        for start in range(0, len(kept), COPY_BATCH_ROWS):
            chunk = kept[start:start + COPY_BATCH_ROWS]
            for key, tensor in self._files.items():
                files[key][start:start + len(chunk)] = tensor.index_select(0, chunk)
        for key, tensor in incoming.items():
            files[key][len(kept):] = tensor
        old_paths = [self._path(key, self._generation) for key in self.layout]
        self._files, self._generation = files, self._generation + 1
        self._empty_cache(num_rows)
        for path in old_paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the files; the tier is unusable afterwards."""
        self._files, self._cache = {}, {}
        self._remove_files()

    # ----- the cache -----

    def _new_files(self, num_rows: int, generation: int) -> dict[str, torch.Tensor]:
        """Zero-filled files for ``num_rows`` rows, their disk space allocated up front (so that writing rows
        through the mapping never finds the disk full, which would kill the process); OSError (none left) leaves
        no file behind."""
        files, paths = {}, []
        try:
            for key, (dtype, shape) in self.layout.items():
                if num_rows == 0:  # an empty file cannot be mapped
                    array = np.zeros((0, *shape), dtype=numpy_storage_dtype(dtype))
                else:
                    paths.append(self._path(key, generation))
                    with open(paths[-1], "wb") as file:
                        size = num_rows * int(np.prod(shape, dtype=np.int64)) * numpy_storage_dtype(dtype).itemsize
                        os.posix_fallocate(file.fileno(), 0, size)
                    array = np.memmap(paths[-1], dtype=numpy_storage_dtype(dtype), mode="r+", shape=(num_rows, *shape))
                tensor = torch.from_numpy(array)
                files[key] = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
        except OSError:
            files.clear()
            for path in paths:
                path.unlink(missing_ok=True)
            raise
        return files

    def _empty_cache(self, num_rows: int) -> None:
        """A cache of ``min(capacity, num_rows)`` free entries for a table of ``num_rows`` rows."""
        capacity = min(self.capacity, num_rows)
        self._cache = {key: torch.empty((capacity, *shape), dtype=dtype) for key, (dtype, shape) in self.layout.items()}
        self._entry_of = torch.full((num_rows,), -1, dtype=torch.int32)
        self._owner = torch.full((capacity,), -1, dtype=torch.int64)  # position each entry holds; -1: free
        self._counts = torch.zeros(capacity, dtype=torch.int32)
        self._dirty = torch.zeros(capacity, dtype=torch.bool)
        self._accesses_since_aging = 0

    def _path(self, key: str, generation: int) -> Path:
        return self.directory / f"{key}.{generation}"

    def _counted_entries(self, positions: torch.Tensor) -> torch.Tensor:
        """The cache entries of ``positions`` now (-1: not cached), counted as hits and misses."""
        entries = self._entry_of.index_select(0, positions).long()
        num_missing = int((entries < 0).sum())
        self.counters.hits += len(positions) - num_missing
        self.counters.misses += num_missing
        return entries

    def _admit(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache entries [n] holding the unique ``positions`` [n] (at most ``capacity``), reading the missing ones
        in; counted as accesses."""
        entries = self._entry_of.index_select(0, positions).long()
        missing = entries < 0
        if missing.any():
            entries[missing] = self._load(positions[missing], pinned=entries[~missing])
        self._touch(entries)
        return entries

    def _load(self, positions: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
        """Read the unique, uncached ``positions`` into free or least-used entries other than ``pinned`` (entries
        the caller is using; repeats allowed); return those entries."""
        score = self._counts.clone()
        score[self._owner < 0] = -1  # free entries first
        score[pinned] = torch.iinfo(torch.int32).max
        victims = torch.topk(score, len(positions), largest=False, sorted=False).indices
        self._evict(victims)
        for key, tensor in self._files.items():
            self._cache[key][victims] = tensor.index_select(0, positions)
        self._owner[victims] = positions
        self._entry_of[positions] = victims.int()
        self._counts[victims] = 0
        self.counters.rows_read += len(positions)
        return victims

    def _touch(self, entries: torch.Tensor) -> None:
        """Count an access of each of ``entries`` (once per call, repeats or not); age all counts every
        ``capacity`` accesses."""
        self._counts[entries] += 1
        self._accesses_since_aging += len(entries)
        if self._accesses_since_aging >= len(self._owner):
            self._counts >>= 1
            self._accesses_since_aging = 0

    def _evict(self, entries: torch.Tensor) -> None:
        """Free ``entries``: write their dirty rows back and forget which positions they held."""
        held = entries[self._owner[entries] >= 0]
        self._write_back(held[self._dirty[held]])
        self._entry_of[self._owner[held]] = -1
        self._owner[held] = -1
        self.counters.evictions += len(held)

    def _write_back(self, entries: torch.Tensor) -> None:
        """Copy the rows of dirty ``entries`` to the files, in position order; they become clean."""
        if not len(entries):
            return
        positions, order = torch.sort(self._owner[entries])
        entries = entries[order]
        for key, tensor in self._files.items():
            tensor.index_copy_(0, positions, self._cache[key].index_select(0, entries))
        self._dirty[entries] = False
        self.counters.written_back += len(entries)
