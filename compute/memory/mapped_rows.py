"""A co-located shard's read-only table, mapped: the client reads its rows out of the shard's shared memory
without a request (the shard's side is ``memory_service/shared_table.py``, the file's layout in ``MapRowsResponse``).

The rows of a published file never change, so a read needs no lock; before each read the mapping checks that
the file is still the table's (its header) and that the shard lives, else the caller maps again or asks.
"""
from __future__ import annotations

import mmap
import os
import re

import numpy as np
import torch

from memory_service.core.leftovers import is_alive
from memory_service.core.slots import slot_and_local
from protos import engram_memory_v1_pb2 as pb
from protos.wire import SHARED_SEGMENT_DIR, SHARED_TABLE_HEADER_BYTES, SHARED_TABLE_PREFIX, WIRE_DTYPE_BY_ENUM

_SEGMENT = re.compile(re.escape(SHARED_TABLE_PREFIX) + r"(\d+)-[0-9a-f]+")


class MappedRows:
    """One shard's rows of one read-only table, as ``MapRows`` described them; ValueError where the reply does
    not describe a file of this machine's shared memory, OSError where it is gone."""

    def __init__(self, reply: pb.MapRowsResponse, num_slots: int):
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
        self._dtype = dtype
        self._header = np.frombuffer(mapped, dtype="<i8", count=1)
        # One opaque record a row (see protos.wire.as_row_records), read-only.
        self._records = np.frombuffer(mapped, dtype=np.dtype((np.void, reply.dim * dtype.itemsize)),
                                      count=reply.rows, offset=SHARED_TABLE_HEADER_BYTES)

    def current(self) -> bool:
        """Whether the file still holds the table's rows on a live shard."""
        return not self._header[0] and is_alive(self._shard_pid)

    def read(self, row_ids: np.ndarray) -> torch.Tensor | None:
        """The rows of ``row_ids`` (int64, on this shard's slots) in their storage type; None where the file is no
        longer the table's or a row's slot is not in it (slots moved): map again, or ask the shard."""
        if not self.current():
            return None
        slots, local = slot_and_local(row_ids, len(self._slot_base))
        base = self._slot_base[slots]
        if len(base) and base.min() < 0:
            return None
        records = np.take(self._records, base + local)
        return torch.from_numpy(records.view(np.uint8).reshape(len(records), self._records.itemsize)).view(self._dtype)
