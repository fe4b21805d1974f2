"""Co-located clients' shared-memory segments: a shard writes looked-up rows into them and reads
pushed gradients out of them.

A client on the shard's machine names a segment (``/dev/shm/<name>``), an offset and each row's
place; the shard writes a lookup's rows there instead of sending them through the socket, already in
the order the client keeps them, and reads an update's gradients from there. Mappings
stay open between lookups: mapping a segment anew would page-fault every row of every reply.
"""
from __future__ import annotations

import mmap
import os
import re

import torch

from protos.wire import SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX, as_row_words

SEGMENT_NAME = re.compile(re.escape(SHARED_SEGMENT_PREFIX) + r"[A-Za-z0-9_.-]+")


class SegmentError(ValueError):
    """A lookup's ``shared_rows`` that cannot be written, or an update's ``shared_grads`` that cannot be
    read; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class SharedRowSegments:
    """Open mappings of clients' segments by name; a segment deleted by its client is unmapped here."""

    def __init__(self):
        self._maps: dict[str, tuple[tuple[int, int], mmap.mmap]] = {}  # name -> ((inode, size), mapping)

    def write(self, name: str, offset: int, rows: torch.Tensor, positions: bytes = b"") -> None:
        """Write ``rows`` [n, dim] into segment ``name`` from byte ``offset``: row i at row ``positions[i]``
        (int64 little-endian bytes), or one after another when ``positions`` is empty.

        SegmentError naming the field, with nothing written, when the segment is not a client's, is
        gone, or the rows would not fit.
        """
        row_bytes = rows.shape[1] * rows.element_size()
        slots, where = self._slots(name, offset, row_bytes, len(rows), positions, "shared_rows")
        if not len(rows):
            return
        source = rows.contiguous().view(torch.uint8).view(len(rows), row_bytes)
        source = as_row_words(source) if slots.dtype == torch.int64 else source
        if where is not None:
            slots.index_copy_(0, where, source)
        else:
            slots[:len(rows)].copy_(source)

    def read(self, name: str, offset: int, count: int, row_bytes: int, positions: bytes = b"") -> torch.Tensor:
        """Copy ``count`` rows of ``row_bytes`` out of segment ``name``, laid out as ``write`` lays them:
        ``[count, row_bytes]`` uint8. SegmentError naming the (``shared_grads``) field when they are not all there."""
        slots, where = self._slots(name, offset, row_bytes, count, positions, "shared_grads")
        rows = slots.index_select(0, where) if where is not None else slots[:count].clone()
        return rows.view(torch.uint8).view(count, row_bytes)

    def _slots(self, name: str, offset: int, row_bytes: int, count: int, positions: bytes, field: str):
        """The segment from ``offset`` as rows of ``row_bytes`` (int64 words when aligned), and the
        row of each of ``count`` rows (None: one after another), checked to lie inside it; errors
        name ``field`` (the request's message holding the segment)."""
        mapping = self._mapping(name, field)
        if not 0 <= offset <= len(mapping):
            raise SegmentError(f"{field}.offset", f"{offset} is outside the {len(mapping)}-byte segment {name!r}")
        capacity = (len(mapping) - offset) // row_bytes
        where = None
        if positions:
            where = torch.frombuffer(positions, dtype=torch.int64) if len(positions) % 8 == 0 else None
            if where is None or len(where) != count:
                raise SegmentError(f"{field}.positions", f"{len(positions)} bytes for {count} row ids; "
                                                            "expected one int64 per id")
            low, high = (int(value) for value in torch.aminmax(where)) if len(where) else (0, 0)
            if low < 0 or high >= capacity:
                raise SegmentError(f"{field}.positions", f"row {low if low < 0 else high} is outside the "
                                                            f"{capacity} rows of segment {name!r} from offset {offset}")
        elif count > capacity:
            raise SegmentError(f"{field}.offset", f"{count} rows of {row_bytes} bytes at offset {offset} "
                                                     f"overrun the {len(mapping)}-byte segment {name!r}")
        slots = torch.frombuffer(mapping, dtype=torch.uint8)[offset:offset + capacity * row_bytes].view(capacity, row_bytes)
        return (as_row_words(slots) if offset % 8 == 0 else slots), where  # int64 views need aligned words

    def _mapping(self, name: str, field: str) -> mmap.mmap:
        if not SEGMENT_NAME.fullmatch(name):
            raise SegmentError(f"{field}.name", f"{name!r} is not an engram-rows-* segment name")
        self._forget_deleted()
        try:
            # A segment replaced or resized since it was mapped is mapped again: writing past the
            # end of a shrunk file would kill this process with SIGBUS.
            stat = os.stat(f"{SHARED_SEGMENT_DIR}/{name}")
            if name not in self._maps or self._maps[name][0] != (stat.st_ino, stat.st_size):
                self._maps[name] = ((stat.st_ino, stat.st_size), self._map(name))
        except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
            raise SegmentError(f"{field}.name", f"cannot map segment {name!r} ({error})") from None
        return self._maps[name][1]

    @staticmethod
    def _map(name: str) -> mmap.mmap:
        fd = os.open(f"{SHARED_SEGMENT_DIR}/{name}", os.O_RDWR)
        try:
            return mmap.mmap(fd, 0)
        finally:
            os.close(fd)

    def _forget_deleted(self) -> None:
        for name in [name for name in self._maps if not os.path.exists(f"{SHARED_SEGMENT_DIR}/{name}")]:
            del self._maps[name]
