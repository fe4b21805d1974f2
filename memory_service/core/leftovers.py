"""What a killed process leaves behind: files and folders it named after its process id and had no chance to
remove (SIGKILL, a crashed node). A name made with ``pid_tagged`` is swept by ``remove_leftovers`` once its
process is gone: a shard's socket folder and shared rows, a tiered table's files, a client's shared-memory segments."""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def pid_tagged(prefix: str) -> str:
    """``prefix``, this process's id and a dash: the start of a name that ``remove_leftovers(.., prefix)`` sweeps."""
    return f"{prefix}{os.getpid()}-"


def remove_leftovers(directory: str | Path, prefix: str) -> list[str]:
    """Remove this user's entries of ``directory`` named ``<prefix><pid>-...`` whose process is gone, files or
    folders; return their names. Live processes' entries, other users' and other names stay."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-.+")
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        try:
            if not match or entry.stat(follow_symlinks=False).st_uid != os.getuid() or is_alive(int(match[1])):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:  # another process swept it first
            pass
    if removed:
        log.info("removed %d entries of %s left by ended processes: %s", len(removed), directory, removed)
    return removed


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
