"""The one door from jobs and the `engram memory` CLI into the memory service's control plane.

Compute code imports this module and ``memory_service.core``, never the controller, the shards or
the servers: start or join Ray, deploy tables, join a running service, restore a checkpoint onto a
new one, operate it, take it down. What a job holds afterwards is a ``MemoryHandle``.
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import ray

from memory_service.auth import ADMIN_TOKEN_ENV, TOKEN_ENV, AccessTokens, TlsFiles
from memory_service.checkpoint import PathRefused, default_data_root, read_manifest
from memory_service.controller import (CONTROLLER_NAME, NAMESPACE, SHARD_RESOURCE, ControllerOptions, get_controller,
                                       start_controller, stop_controller)
from memory_service.core.slots import SlotMap
from memory_service.core.table_spec import TableSpec
from memory_service.ray_cluster import RayConnectError, connect
from protos.wire import ClientTls

__all__ = ["ADMIN_TOKEN_ENV", "CONTROLLER_NAME", "NAMESPACE", "SHARD_RESOURCE", "TOKEN_ENV", "AccessTokens", "ClientTls",
           "ControllerOptions", "MemoryHandle", "PathRefused", "RayConnectError", "TlsFiles", "connect",
           "default_data_root", "deploy", "deploy_from_checkpoint", "deploy_or_join", "describe_shard_memory",
           "describe_table_memory", "get_controller", "human_bytes", "join", "read_manifest", "start_controller",
           "start_local_head", "stop_controller"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MemoryHandle:
    """What a worker needs to reach a memory service (picklable, sent to Ray Train workers)."""

    directory: str  # the DirectoryService's address: routing and table specs
    token: str  # the data token: lookups and pushes, nothing that changes tables or files
    tls: ClientTls | None  # how to reach its TLS servers; None: plaintext
    controller: str  # the controller actor's name ...
    namespace: str  # ... in this Ray namespace

    def checkpoint(self, directory: str | Path) -> None:
        """Write every table, as of now, into ``directory`` (inside the service's data root; the shards
        write in parallel); a restarting controller is waited for."""
        ray.get(get_controller(self.controller, self.namespace).checkpoint.remote(str(directory)))

    def restore(self, directory: str | Path) -> None:
        """Replace every table by the checkpoint in ``directory`` (inside the service's data root)."""
        ray.get(get_controller(self.controller, self.namespace).restore.remote(str(directory)))

    def stop(self) -> None:
        """Stop the shards and the controller, even a dead or restarting controller, leaving no actor behind."""
        stop_controller(self.controller, self.namespace)


def deploy(specs: list[TableSpec], shards: int, namespace: str = NAMESPACE,
           data_root: str | Path | None = None, replicas: int = 1, tier_dir: str | None = None) -> MemoryHandle:
    """A new memory service (controller and ``shards`` groups of ``replicas`` shards) holding ``specs``'
    tables, whose checkpoints go under ``data_root`` (default: ``default_data_root()``) and whose tiered tables'
    files under ``tier_dir`` on each shard's node (default: ``engram-tier`` in its temporary folder)."""
    actor, name = _new_controller(namespace, data_root, tier_dir)
    ray.get(actor.deploy.remote([spec.to_dict() for spec in specs], shards, replicas))
    log.info("deployed %d tables on %d memory shards x %d copies (controller %s)", len(specs), shards, replicas, name)
    for spec in specs:
        log.info("%s", describe_shard_memory(spec, shards, replicas))
    return _handle(actor, name, namespace)


def join(controller: str, specs: list[TableSpec], namespace: str = NAMESPACE) -> MemoryHandle:
    """The running service of ``controller``, which must hold every table of ``specs`` (name, rows, width)."""
    actor = get_controller(controller, namespace)
    deployed = {spec["name"]: spec for spec in ray.get(actor.table_specs.remote())}
    for spec in specs:
        have = deployed.get(spec.name)
        if have is None or (have["rows"], have["dim"]) != (spec.rows, spec.dim):
            raise ValueError(f"memory: controller {controller!r} has no table {spec.name} of {spec.rows} rows x "
                             f"{spec.dim}; deployed: {sorted(deployed)}")
    return _handle(actor, controller, namespace)


def deploy_or_join(specs: list[TableSpec], shards: int, controller: str | None, namespace: str = NAMESPACE,
                   data_root: str | Path | None = None, replicas: int = 1,
                   tier_dir: str | None = None) -> tuple[MemoryHandle, bool]:
    """Join ``controller`` if named, else deploy on ``shards`` x ``replicas``; also whether this call deployed
    (and owns) it."""
    if controller is not None:
        return join(controller, specs, namespace), False
    return deploy(specs, shards, namespace, data_root, replicas, tier_dir), True


def deploy_from_checkpoint(directory: str | Path, shards: int, namespace: str = NAMESPACE,
                           data_root: str | Path | None = None, read_only: bool = False,
                           replicas: int = 1, tier_dir: str | None = None) -> MemoryHandle:
    """A new memory service holding the tables of the checkpoint in ``directory`` (inside ``data_root``),
    on ``shards`` groups of ``replicas`` shards; ``read_only``: as serving tables (bfloat16 rows, no
    optimizer state); tiered tables' files under ``tier_dir`` (as ``deploy``)."""
    actor, name = _new_controller(namespace, data_root, tier_dir)
    ray.get(actor.restore.remote(str(directory), shards, read_only, replicas))
    specs = [TableSpec.from_dict(spec) for spec in ray.get(actor.table_specs.remote())]
    log.info("restored the tables of %s onto %d memory shards (controller %s): %s", directory, shards, name,
             describe_table_memory(specs))
    return _handle(actor, name, namespace)


def describe_table_memory(specs: list[TableSpec]) -> str:
    """The shards' memory for ``specs`` in words; for serving tables, against the same tables for training."""
    held = sum(spec.rows * spec.bytes_per_row() for spec in specs)
    text = f"{held / 2**30:.2f} GiB of rows and optimizer state"
    if specs and all(spec.read_only for spec in specs):
        trained = sum(spec.rows * dataclasses.replace(spec, storage_dtype="float32").bytes_per_row() for spec in specs)
        text = (f"{held / 2**30:.2f} GiB of bfloat16 rows without optimizer state "
                f"({held / trained:.0%} of the {trained / 2**30:.2f} GiB the same tables take for training)")
    return text


def describe_shard_memory(spec: TableSpec, shards: int, replicas: int = 1) -> str:
    """One line on what ``spec`` takes deployed on ``shards`` groups of ``replicas`` shards: bytes per row (its
    values and optimizer state), in all and on the fullest shard of the controller's even split of the slots."""
    per_row = spec.bytes_per_row()
    slot_map = SlotMap.even(spec.num_slots, shards)
    fullest = max(sum(map(spec.rows_in_slot, slot_map.slots_of(shard).tolist())) for shard in range(shards))
    kind = spec.optimizer.kind
    state = ("no optimizer state (read-only)" if spec.read_only else
             f"no optimizer state ({kind})" if kind == "sgd" else f"{kind} state")
    copies = f" x {replicas} copies" if replicas > 1 else ""
    tier = (f"; tiered: {human_bytes(spec.dram_bytes(fullest))} of DRAM on the fullest, the rest on its disk"
            if spec.tier is not None else "")
    return (f"table {spec.name}: {spec.rows:,} rows x {spec.dim} {spec.storage_dtype} + {state} = {per_row:,} B/row, "
            f"{human_bytes(spec.rows * per_row)} over {shards} shard(s){copies} "
            f"({human_bytes(fullest * per_row)} on the fullest){tier}")


def human_bytes(count: int) -> str:
    """``count`` bytes in the largest binary unit that keeps a number of at least 1 (B up to TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def start_local_head() -> tuple[int, str]:
    """Start a Ray head of our own in a detached holder process that outlives the caller.

    Returns the holder's pid (SIGTERM stops the head) and the head's GCS address.
    """
    holder = subprocess.Popen([sys.executable, "-m", "memory_service.local_head"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    address = holder.stdout.readline().strip()
    if not address:
        raise RuntimeError("the local Ray head did not start (run `python -m memory_service.local_head` to see why)")
    log.info("started a local Ray head at %s (holder pid %d)", address, holder.pid)
    return holder.pid, address


def _new_controller(namespace: str, data_root: str | Path | None, tier_dir: str | None) -> tuple[Any, str]:
    """A new controller of a job's own, under a fresh name; returns it and its name."""
    name = f"engram-run-{uuid.uuid4().hex[:8]}"
    options = ControllerOptions(data_root=str(Path(data_root or default_data_root()).resolve()), tier_dir=tier_dir)
    return start_controller(options, name=name, namespace=namespace), name


def _handle(actor: Any, name: str, namespace: str) -> MemoryHandle:
    info = ray.get(actor.connection_info.remote())
    return MemoryHandle(info["directory"], info["token"], info["tls"], name, namespace)
