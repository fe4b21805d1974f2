"""The client's side of the co-located transport: POSIX shared-memory segments that shards on this
machine write looked-up rows into and read pushed gradients from, a pool reusing them across calls,
and a sweeper for the segments of clients that died before removing theirs.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import uuid
import weakref

import torch

from protos.wire import SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX

log = logging.getLogger(__name__)


class SharedRowSegment:
    """A POSIX shared-memory segment (``/dev/shm/<name>``) of this process, removed by ``close()``,
    else when collected or at exit: a client never closed leaves no file behind."""

    def __init__(self, nbytes: int):
        self.name = f"{SHARED_SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
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


_ORPHAN_CANDIDATE = re.compile(re.escape(SHARED_SEGMENT_PREFIX) + r"(\d+)-[0-9a-f]+")


def remove_orphaned_segments(directory: str = SHARED_SEGMENT_DIR) -> list[str]:
    """Unlink this user's ``engram-rows-<pid>-*`` segments whose process is gone (a client killed
    before it could remove them, by SIGKILL say); return their names. Live processes' stay."""
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _ORPHAN_CANDIDATE.fullmatch(entry.name)
            if not match or entry.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(int(match[1])):
                continue
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:  # another client swept it first
                pass
    if removed:
        log.info("removed %d shared-memory segments left by ended processes: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
