"""Checkpoint files: one ``.npz`` per (table, shard) written in parallel, and one manifest.

A shard file holds ``ShardStore.export_slots`` of every slot the shard owned, so restoring onto a
different shard count means picking slots out of whichever files hold them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from memory_service.core.table_spec import TableSpec
from memory_service.row_store import ShardStore

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary sibling and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard_file(directory: Path, table: str, shard_index: int, arrays: dict[str, np.ndarray]) -> str:
    """Save one shard's slots of ``table``; return the path relative to ``directory``."""
    relative = f"{table}/shard-{shard_index:04d}.npz"
    _atomic_write(directory / relative, lambda f: np.savez(f, **arrays))
    return relative


def read_slots(directory: Path, spec: TableSpec, paths: list[str], slots: list[int]) -> list[dict[str, np.ndarray]]:
    """The export dicts holding ``slots`` of ``spec``'s table, read from the shard files ``paths``."""
    wanted = set(slots)
    parts = []
    for relative in paths:
        with np.load(directory / relative) as saved:
            arrays = {name: saved[name] for name in saved.files}
        # A scratch store holds the whole file so that only the wanted slots are exported from it.
        scratch = ShardStore()
        scratch.add_table(spec, [])
        scratch.import_slots(spec.name, arrays)
        present = sorted(wanted.intersection(scratch.owned_slots(spec.name)))
        if present:
            parts.append(scratch.export_slots(spec.name, present))
    return parts


def write_manifest(directory: Path, specs: list[TableSpec], files: dict[str, list[dict[str, Any]]], epoch: int) -> None:
    """The manifest: every table's spec and its shard files with the slots each holds."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "tables": [{"spec": spec.to_dict(), "files": files[spec.name]} for spec in specs],
    }
    _atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def read_manifest(directory: Path) -> list[tuple[TableSpec, list[dict[str, Any]]]]:
    """(spec, files) per table of the checkpoint in ``directory``."""
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"directory: no {MANIFEST} in {directory}; not a checkpoint")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version: {path} has {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return [(TableSpec.from_dict(entry["spec"]), entry["files"]) for entry in manifest["tables"]]
