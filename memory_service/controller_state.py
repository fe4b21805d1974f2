"""The controller's state as it survives the controller: JSON in Ray's GCS key-value store.

One key per controller (its namespace and name) holds what a restarted controller recovers from:
its options and tokens, the directory's address, the routing epoch, every table's spec and slot
owners, every shard's record (each field of the record but the live actor, stub and channel), the
replica groups' size, lost groups, the last checkpoint and the failovers so far.
The controller writes it after every change and reads it back when Ray restarts it; ``stop_controller``
deletes it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from ray.experimental import internal_kv

FORMAT_VERSION = 1
KV_NAMESPACE = "engram-memory-controllers"
LIVE_FIELDS = frozenset({"actor", "stub", "channel"})  # a Shard's fields that exist only in a running process


class StateError(ValueError):
    """A stored state that this code cannot read; the message names the controller and what to do."""


@dataclasses.dataclass
class ControllerState:
    options: dict[str, Any]  # ControllerOptions as a dict (its TlsFiles nested)
    tokens: list[str]  # the current [data, admin] tokens
    replaced_tokens: list[str]  # the [data, admin] tokens a rotation replaced, while still accepted; else []
    replaced_until: float  # until when (Unix time) they are accepted
    directory: str  # host:port the DirectoryService serves on; a restarted controller binds it again
    epoch: int
    tables: list[dict[str, Any]]  # {"spec": TableSpec.to_dict(), "epoch": int, "owners": [shard per slot]}
    shards: list[dict[str, Any]]  # shard_record() of each shard, in index order
    replicas: int  # shards per replica group
    next_index: int  # the index the next new shard gets
    lost: list[dict[str, Any]]  # shard_record() of the last primary of each group with no copy left
    last_checkpoint: str | None  # relative to the data root: what a lost group is re-made from
    failovers: list[dict[str, Any]]  # what the health watch did, as `status` lists it

    def to_json(self) -> bytes:
        return json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes, what: str = "controller state") -> "ControllerState":
        """Parse ``data``; StateError (naming ``what``) if it is not JSON, of another version or lacks fields."""
        try:
            fields = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StateError(f"{what}: not valid JSON ({error})") from None
        if not isinstance(fields, dict):
            raise StateError(f"{what}: not a JSON object")
        if fields.get("version") != FORMAT_VERSION:
            raise StateError(f"{what}: format version {fields.get('version')!r}, this code reads {FORMAT_VERSION}")
        expected = {f.name for f in dataclasses.fields(cls)}
        given = set(fields) - {"version"}
        if given != expected:
            raise StateError(f"{what}: fields missing {sorted(expected - given)}, unknown {sorted(given - expected)}")
        return cls(**{name: fields[name] for name in expected})


def shard_record(shard: Any) -> dict[str, Any]:
    """Every dataclass field of ``shard`` but the live objects (LIVE_FIELDS), as JSON-ready values."""
    return {f.name: getattr(shard, f.name) for f in dataclasses.fields(shard) if f.name not in LIVE_FIELDS}


def _key(namespace: str, name: str) -> bytes:
    return json.dumps([namespace, name]).encode()


def _describe(namespace: str, name: str) -> str:
    return f"stored state of memory controller {name!r} (namespace {namespace!r})"


def save(namespace: str, name: str, state: ControllerState) -> None:
    internal_kv._internal_kv_put(_key(namespace, name), state.to_json(), overwrite=True, namespace=KV_NAMESPACE)


def load(namespace: str, name: str) -> ControllerState | None:
    """The stored state, or None if there is none; StateError if it cannot be read."""
    data = internal_kv._internal_kv_get(_key(namespace, name), namespace=KV_NAMESPACE)
    if data is None:
        return None
    what = _describe(namespace, name)
    try:
        return ControllerState.from_json(data, what)
    except StateError as error:
        raise StateError(f"{error}; `engram memory down --name {name}` discards it") from None


def delete(namespace: str, name: str) -> None:
    internal_kv._internal_kv_del(_key(namespace, name), namespace=KV_NAMESPACE)


def exists(namespace: str, name: str) -> bool:
    return internal_kv._internal_kv_exists(_key(namespace, name), namespace=KV_NAMESPACE)
