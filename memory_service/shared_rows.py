"""Co-located clients' shared-memory segments, which a shard writes looked-up rows into.

A client on the shard's machine names a segment (``/dev/shm/<name>``) and an offset in its lookup;
the shard writes the reply's row bytes there instead of sending them through the socket. Mappings
stay open between lookups: mapping a segment anew would page-fault every row of every reply.
"""
from __future__ import annotations

import mmap
import os
import re

import torch

SEGMENT_NAME = re.compile(r"engram-rows-[A-Za-z0-9_.-]+")
SHM_DIR = "/dev/shm"


class SegmentError(ValueError):
    """A lookup's ``shared_rows`` that cannot be written; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class SharedRowSegments:
    """Open mappings of clients' segments by name; a segment deleted by its client is unmapped here."""

    def __init__(self):
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}  # name -> (inode, mapping)

    def rows(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """The ``nbytes`` bytes at ``offset`` of segment ``name`` as a writable uint8 tensor.

        SegmentError when the name is not a client segment's, or the segment is gone or too small.
        """
        if not SEGMENT_NAME.fullmatch(name):
            raise SegmentError("shared_rows.name", f"{name!r} is not an engram-rows-* segment name")
        self._forget_deleted()
        try:
            inode = os.stat(f"{SHM_DIR}/{name}").st_ino
            if name not in self._maps or self._maps[name][0] != inode:
                self._maps[name] = (inode, self._map(name))
        except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
            raise SegmentError("shared_rows.name", f"cannot map segment {name!r} ({error})") from None
        mapping = self._maps[name][1]
        if offset < 0 or offset + nbytes > len(mapping):
            raise SegmentError("shared_rows.offset", f"{nbytes} bytes at offset {offset} overrun the "
                                                      f"{len(mapping)}-byte segment {name!r}")
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)

    @staticmethod
    def _map(name: str) -> mmap.mmap:
        fd = os.open(f"{SHM_DIR}/{name}", os.O_RDWR)
        try:
            return mmap.mmap(fd, 0)
        finally:
            os.close(fd)

    def _forget_deleted(self) -> None:
        for name in [name for name in self._maps if not os.path.exists(f"{SHM_DIR}/{name}")]:
            del self._maps[name]
