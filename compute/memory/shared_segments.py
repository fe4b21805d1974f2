"""The client's side of the co-located transport: POSIX shared-memory segments that shards on this
machine write looked-up rows into and read pushed gradients from, and a pool reusing them across calls.
Their names carry the client's process id: ``remove_leftovers`` sweeps those of clients that died.
"""
from __future__ import annotations

import mmap
import os
import uuid
import weakref

import torch

from memory_service.core.leftovers import pid_tagged
from protos.wire import SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX


class SharedRowSegment:
    """A POSIX shared-memory segment (``/dev/shm/<name>``) of this process, removed by ``close()``,
    else when collected or at exit: a client never closed leaves no file behind."""

    def __init__(self, nbytes: int):
        self.name = f"{pid_tagged(SHARED_SEGMENT_PREFIX)}{uuid.uuid4().hex[:12]}"
        fd = os.open(f"{SHARED_SEGMENT_DIR}/{self.name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._unlink = weakref.finalize(self, os.unlink, f"{SHARED_SEGMENT_DIR}/{self.name}")
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.bytes.zero_()  # fault every page in once, not on each lookup

    def rows(self, count: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The segment's first ``count`` rows of ``dim`` elements of ``dtype``, as a view."""
        return self.bytes[:count * dim * dtype.itemsize].view(dtype).view(count, dim)

    def close(self) -> None:
        self._unlink()
        del self.bytes  # the map closes once no tensor views it
        self._map = None


class SharedSegmentPool:
    """Segments reused across calls, one per lookup or push in flight; used from one thread only."""

    def __init__(self):
        self._free: list[SharedRowSegment] = []

    @property
    def names(self) -> list[str]:
        """The names of the idle segments (those of calls in flight are not listed)."""
        return [segment.name for segment in self._free]

    def acquire(self, nbytes: int) -> SharedRowSegment:
        """The smallest idle segment of at least ``nbytes``, else a new one (a power of two, >= 1 MiB)."""
        fitting = [segment for segment in self._free if segment.bytes.numel() >= nbytes]
        if fitting:
            segment = min(fitting, key=lambda segment: segment.bytes.numel())
            self._free.remove(segment)
            return segment
        return SharedRowSegment(max(1 << 20, 1 << (nbytes - 1).bit_length()))

    def release(self, segment: SharedRowSegment) -> None:
        """Hand ``segment`` back for the next call, once no shard can still touch it."""
        self._free.append(segment)

    def close(self) -> None:
        for segment in self._free:
            segment.close()
        self._free.clear()
