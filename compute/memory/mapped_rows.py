"""A co-located shard's table, mapped: the client reads its rows out of the shard's shared memory without a
request (the shard's side is ``memory_service/shared_table.py``, the file's layout in ``MapRowsResponse``).

Before each read the mapping checks that the file is still the table's (its header) and that the shard lives,
else the caller maps again or asks. A table that trains changes in place: a read keeps its rows only where the
shard's write count is even and the same after the read as before (a sequence lock), else the caller asks.
"""
from __future__ import annotations

import mmap
import os
import re
import warnings

import numpy as np
import torch

from memory_service.core.leftovers import is_alive
from memory_service.core.slots import slot_and_local
from protos import engram_memory_v1_pb2 as pb
from protos.wire import (SHARED_SEGMENT_DIR, SHARED_TABLE_HEADER_BYTES, SHARED_TABLE_PREFIX, WIRE_DTYPE_BY_ENUM,
                         as_row_words)

_SEGMENT = re.compile(re.escape(SHARED_TABLE_PREFIX) + r"(\d+)-[0-9a-f]+")


class MappedRows:
    """One shard's rows of one table, as ``MapRows`` described them; ValueError where the reply does
    not describe a file of this machine's shared memory, OSError where it is gone."""

    def __init__(self, reply: pb.MapRowsResponse, num_slots: int, table_rows: int):
        match = _SEGMENT.fullmatch(reply.segment)
        slot_base = np.frombuffer(reply.slot_base, dtype="<i8")
        if match is None or reply.dtype not in WIRE_DTYPE_BY_ENUM or len(slot_base) != num_slots:
            raise ValueError(f"MapRows: not a shared table: {reply.segment!r}, dtype {reply.dtype}, "
                             f"{len(slot_base)} slot bases for {num_slots} slots")
        dtype = WIRE_DTYPE_BY_ENUM[reply.dtype].torch
        nbytes = SHARED_TABLE_HEADER_BYTES + reply.rows * reply.dim * dtype.itemsize
        fd = os.open(f"{SHARED_SEGMENT_DIR}/{reply.segment}", os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != nbytes:
                raise ValueError(f"MapRows: {reply.segment} is not {reply.rows} rows of {reply.dim}")
            mapped = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.segment, self._shard_pid, self._slot_base = reply.segment, int(match[1]), slot_base
        self._table_rows = table_rows
        self._dtype = dtype
        self._header = np.frombuffer(mapped, dtype="<i8", count=2)  # retired flag, the shard's writes
        with warnings.catch_warnings():  # torch warns of any read-only buffer: these rows are only ever read
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.frombuffer(mapped, dtype=dtype, offset=SHARED_TABLE_HEADER_BYTES, count=reply.rows * reply.dim)
        # Gathered by torch, on its threads: a row as whole int64 words where it is some.
        self._rows = as_row_words(rows.view(reply.rows, reply.dim))

    def current(self) -> bool:
        """Whether the file still holds the table's rows on a live shard."""
        return not self._header[0] and is_alive(self._shard_pid)

    def read(self, row_ids: np.ndarray) -> torch.Tensor | None:
        """The rows of ``row_ids`` (int64, on this shard's slots) in their storage type; None where the file is no
        longer the table's or a row's slot is not in it (slots moved: map again, or ask the shard), or where the
        shard wrote rows meanwhile (ask the shard), or where an id is not the table's (the shard names it)."""
        writes = int(self._header[1])
        if writes % 2 or not self.current():
            return None
        if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= self._table_rows):
            return None  # else its slot's local index could reach into another slot's rows
        slots, local = slot_and_local(row_ids, len(self._slot_base))
        base = self._slot_base[slots]
        if len(base) and base.min() < 0:
            return None
        rows = self._rows.index_select(0, torch.from_numpy(base + local))
        if int(self._header[1]) != writes:
            return None
        return rows.view(self._dtype)
