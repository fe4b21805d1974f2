"""A table's rows in a POSIX shared-memory file that clients on the shard's machine map and read without a
request (``MapRows``; the client's side is ``compute/memory/mapped_rows.py``).

The file (``/dev/shm/engram-table-<shard pid>-<hex>``, mode 0600) is a header of ``SHARED_TABLE_HEADER_BYTES``
whose first int64 is 0 while the file holds the table's rows and whose second counts the shard's writes of
them (odd while one is under way), then the rows as the shard stores them. A read-only table's rows never
change; a table that trains changes in place, inside ``writing``, so a reader that sees the count odd or moved
over its read asks the shard instead. A slot move puts the table's rows in a new file: ``retire`` sets the
header's flag to 1 and removes the name; readers that mapped it see the flag and map the new one. The file of
a shard that died stays until the next shard on the machine starts (``remove_leftovers``).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import uuid
import weakref
from typing import Iterator

import numpy as np
import torch

from memory_service.core.leftovers import pid_tagged
from protos.wire import SHARED_SEGMENT_DIR, SHARED_TABLE_HEADER_BYTES, SHARED_TABLE_PREFIX


class SharedTableRows:
    """Storage for ``[num_rows, dim]`` rows of ``dtype`` in a new shared-memory file; OSError (no room in
    ``/dev/shm``) leaves no file behind."""

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype):
        self.name = f"{pid_tagged(SHARED_TABLE_PREFIX)}{uuid.uuid4().hex[:12]}"
        path = f"{SHARED_SEGMENT_DIR}/{self.name}"
        nbytes = SHARED_TABLE_HEADER_BYTES + num_rows * dim * dtype.itemsize
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the pages exist now: no SIGBUS when a full /dev/shm is written
            self._map = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._remove = weakref.finalize(self, _remove, path)
        self._header = np.frombuffer(self._map, dtype="<i8", count=2)  # retired flag, writes
        self.rows = torch.frombuffer(self._map, dtype=dtype, offset=SHARED_TABLE_HEADER_BYTES,
                                     count=num_rows * dim).view(num_rows, dim)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Change rows in place inside this: readers see the write count odd, or moved, and ask the shard."""
        self._header[1] += 1
        try:
            yield
        finally:
            self._header[1] += 1

    def retire(self) -> None:
        """Tell readers these are no longer the table's rows, and remove the file's name (mappings stay valid)."""
        self._header[0] = 1
        self._remove()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
