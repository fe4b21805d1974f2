"""Checkpoint files: one ``.npz`` per (table, shard) written in parallel, and one manifest.

A shard file holds ``ShardStore.export_slots`` of every slot the shard owned, so restoring onto a
different shard count means picking slots out of whichever files hold them. The manifest also holds
each table's step counters (the newest synchronous step applied, and each rank's newest
asynchronous one). Every path a request names is resolved inside the service's data root
(``inside_root``) and refused otherwise; files and folders are created readable by their owner only.

A checkpoint is written into a hidden sibling folder (``staging_folder``), its files and folders
fsynced, the manifest last, then ``publish``ed by one rename (an atomic exchange when it replaces an
earlier checkpoint): a half-written checkpoint is never visible under its name, and a replaced one
is there until the new one is.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from memory_service.core.table_spec import TableSpec
from memory_service.row_store import ShardStore, as_serving_export

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: step counters in the manifest; 1 (without them) is still read
READABLE_VERSIONS = (1, 2)
DATA_ROOT_ENV = "ENGRAM_DATA_ROOT"
MAX_PATH_CHARS, MAX_NAME_CHARS = 1024, 255  # what common file systems take


class PathRefused(ValueError):
    """A path a request named lies outside the data root or is not a checkpoint file; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # raised in an actor, it reaches the caller whole
        return type(self), (self.field, self.message)


def default_data_root() -> Path:
    """``$ENGRAM_DATA_ROOT``, else ``~/.engram/data``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or Path.home() / ".engram" / "data")


def inside_root(root: Path, path: str, field: str) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, symbolic links included; PathRefused if
    it is not strictly inside ``root``. The refusal reads the same whether or not the path exists."""
    root = Path(root).resolve()
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PathRefused(field, f"must name a folder inside the data root {root}")
    if len(path) > MAX_PATH_CHARS or any(len(part) > MAX_NAME_CHARS for part in Path(path).parts):
        raise PathRefused(field, f"must be at most {MAX_PATH_CHARS} characters, each name at most {MAX_NAME_CHARS}")
    resolved = (root / path).resolve()
    if root not in resolved.parents:
        raise PathRefused(field, f"must lie inside the data root {root}; {path!r} does not")
    return resolved


def _private_folder(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


def _atomic_write(path: Path, write) -> None:
    """Write an owner-only file through a temporary sibling and rename: a crash never leaves half a file."""
    _private_folder(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard_file(directory: Path, table: str, shard_index: int, arrays: dict[str, np.ndarray]) -> str:
    """Save one shard's slots of ``table``; return the path relative to ``directory``. PathRefused when
    the path cannot be a folder of files (a file is in the way, a name is too long)."""
    relative = f"{table}/shard-{shard_index:04d}.npz"
    try:
        _atomic_write(directory / relative, lambda f: np.savez(f, **arrays))
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as error:
        raise PathRefused("directory", f"cannot hold checkpoint files ({error.strerror})") from None
    return relative


def read_slots(directory: Path, spec: TableSpec, paths: list[str], slots: list[int]) -> list[dict[str, np.ndarray]]:
    """The export dicts holding ``slots`` of ``spec``'s table, read from the shard files ``paths``."""
    wanted = set(slots)
    parts = []
    for index, relative in enumerate(paths):
        arrays = _read_shard_file(directory, relative, f"paths[{index}]")
        # A scratch store holds the whole file (as saved: a training table's float32 rows and state, or
        # a serving table's bfloat16 rows) so that only the wanted slots are exported from it; in DRAM, where
        # the file's arrays already are, whatever the table's tier.
        saved = dataclasses.replace(spec, storage_dtype="bfloat16" if arrays.get("rows", np.empty(0)).dtype ==
                                    np.uint16 else "float32", tier=None)
        scratch = ShardStore()
        scratch.add_table(saved, [])
        scratch.import_slots(spec.name, arrays)
        present = sorted(wanted.intersection(scratch.owned_slots(spec.name)))
        if present:
            part = scratch.export_slots(spec.name, present)
            parts.append(as_serving_export(part) if spec.read_only and not saved.read_only else part)
    return parts


def _read_shard_file(directory: Path, relative: str, field: str) -> dict[str, np.ndarray]:
    path = inside_root(directory, relative, field)
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}
    except FileNotFoundError:
        raise PathRefused(field, f"{relative!r} is not in the checkpoint") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError):
        raise PathRefused(field, f"{relative!r} is not a checkpoint shard file") from None


def write_manifest(directory: Path, specs: list[TableSpec], files: dict[str, list[dict[str, Any]]], epoch: int,
                   counters: dict[str, dict[str, Any]]) -> None:
    """The manifest: every table's spec, its shard files with the slots each holds, and its step counters."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "tables": [{"spec": spec.to_dict(), "files": files[spec.name], "steps": counters[spec.name]}
                   for spec in specs],
    }
    _atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def read_manifest(directory: Path) -> list[tuple[TableSpec, list[dict[str, Any]]]]:
    """(spec, files) per table of the checkpoint in ``directory``."""
    return [(spec, files) for spec, files, _ in read_tables(directory)]


def read_tables(directory: Path) -> list[tuple[TableSpec, list[dict[str, Any]], dict[str, Any]]]:
    """(spec, files, step counters) per table of the checkpoint in ``directory``; ValueError naming the
    manifest when it is not one."""
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"directory: no {MANIFEST} in {directory}; not a checkpoint")
    try:
        manifest = json.loads(path.read_text())
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"format_version: {path} has {version!r}, expected one of {READABLE_VERSIONS}")
        return [(TableSpec.from_dict(entry["spec"]), entry["files"], step_counters(entry.get("steps", {})))
                for entry in manifest["tables"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{MANIFEST}: {path} is not a checkpoint manifest ({type(error).__name__}: {error})") from None


def step_counters(raw: dict[str, Any]) -> dict[str, Any]:
    """A table's step counters, checked: {"synchronous": step or -1, "ranks": {rank: step}}; ValueError if not."""
    synchronous = raw.get("synchronous", -1)
    ranks = raw.get("ranks", {})
    if not isinstance(synchronous, int) or not isinstance(ranks, dict):
        raise ValueError(f"steps: {raw!r} are not step counters")
    try:
        return {"synchronous": synchronous, "ranks": {int(rank): int(step) for rank, step in ranks.items()}}
    except (TypeError, ValueError):
        raise ValueError(f"steps: {raw!r} are not step counters") from None


def staging_folder(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` to write its checkpoint into before ``publish``; PathRefused when
    ``path`` exists and is not a checkpoint (its files are never replaced)."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).exists())):
        raise PathRefused("directory", f"{path} exists and is not a checkpoint; name a new folder")
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    _private_folder(staging)
    return staging


def publish(staging: Path, path: Path) -> None:
    """Make the complete checkpoint in ``staging`` visible as ``path`` in one rename, fsynced first."""
    for folder, _, names in os.walk(staging):
        for name in names:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
    if path.exists():
        _exchange(staging, path)  # now `staging` holds the replaced checkpoint
        shutil.rmtree(staging)
    else:
        os.rename(staging, path)
    _fsync(path.parent)


def discard(staging: Path) -> None:
    """Remove a staging folder whose checkpoint failed."""
    shutil.rmtree(staging, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); where the file system cannot, move
    ``b`` aside first (a crash in between leaves the replaced checkpoint as the hidden ``a``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                           _RENAME_EXCHANGE) == 0:
        return
    code = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(code, os.strerror(code), str(b))
    aside = a.with_name(a.name + ".replaced")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
