"""A training run's memory service: the table specs it needs, deploying or joining it, checkpoints."""
from __future__ import annotations

import dataclasses
import logging
import uuid

import ray

from compute.memory.client import MemoryClient
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor
from compute.train.config import TrainConfig, table_name
from memory_service.controller import ControllerOptions, get_controller, start_controller
from memory_service.core.table_spec import OptimizerSpec, TableSpec

log = logging.getLogger(__name__)


def engram_table_specs(config: TrainConfig, table_rows: dict[int, int] | None = None) -> list[TableSpec]:
    """One table per Engram layer; rows train with the shards' optimizer at ``engram_lr_mult`` x lr.

    ``table_rows`` (layer -> rows) comes from the run's ``NgramHasher``; without it one is built.
    """
    if table_rows is None:
        compressor = TokenizerCompressor.from_file(config.data.tokenizer_path)
        hasher = NgramHasher.from_compressor(config.engram, compressor)
        table_rows = {layer: hasher.table_rows(layer) for layer in config.engram.layer_ids}
    optimizer = OptimizerSpec(kind=config.optim.engram_optimizer, lr=config.optim.lr * config.optim.engram_lr_mult,
                              beta1=config.optim.beta1, beta2=config.optim.beta2, weight_decay=0.0)
    return [
        TableSpec(name=table_name(layer), rows=rows, dim=config.engram.row_dim, optimizer=optimizer,
                  init_std=config.memory.init_std, seed=config.seed + layer, num_slots=config.memory.num_slots)
        for layer, rows in sorted(table_rows.items())
    ]


@dataclasses.dataclass(frozen=True)
class MemoryHandle:
    """What a worker needs to reach the run's memory service (picklable, sent to Ray Train workers)."""

    directory: str
    token: str
    tls_cert_file: str | None
    controller: str
    namespace: str

    def client(self) -> MemoryClient:
        return MemoryClient(self.directory, self.token, tls_cert_file=self.tls_cert_file)

    def checkpoint(self, directory: str) -> None:
        """Write every table, as of now, into ``directory`` (the shards write in parallel)."""
        ray.get(get_controller(self.controller, self.namespace).checkpoint.remote(directory))


def deploy_or_join(specs: list[TableSpec], shards: int, controller: str | None, namespace: str) -> tuple[MemoryHandle, bool]:
    """Join the controller named ``controller`` (its tables must match), or deploy a new one on ``shards``.

    Returns the handle and whether this call deployed it (and so should take it down).
    """
    if controller is not None:
        actor = get_controller(controller, namespace)
        deployed = {spec["name"]: spec for spec in ray.get(actor.table_specs.remote())}
        for spec in specs:
            have = deployed.get(spec.name)
            if have is None or (have["rows"], have["dim"]) != (spec.rows, spec.dim):
                raise ValueError(f"memory: controller {controller!r} has no table {spec.name} of {spec.rows} rows x "
                                 f"{spec.dim}; deployed: {sorted(deployed)}")
        return _handle(actor, controller, namespace), False
    name = f"engram-run-{uuid.uuid4().hex[:8]}"
    actor = start_controller(ControllerOptions(), name=name, namespace=namespace)
    ray.get(actor.deploy.remote([spec.to_dict() for spec in specs], shards))
    log.info("deployed %d Engram tables on %d memory shards (controller %s)", len(specs), shards, name)
    return _handle(actor, name, namespace), True


def deploy_from_checkpoint(directory: str, shards: int, namespace: str) -> MemoryHandle:
    """A new memory service holding the tables of a checkpoint, on ``shards`` shards."""
    name = f"engram-run-{uuid.uuid4().hex[:8]}"
    actor = start_controller(ControllerOptions(), name=name, namespace=namespace)
    ray.get(actor.restore.remote(directory, shards))
    log.info("restored the Engram tables of %s onto %d memory shards (controller %s)", directory, shards, name)
    return _handle(actor, name, namespace)


def _handle(actor, name: str, namespace: str) -> MemoryHandle:
    info = ray.get(actor.connection_info.remote())
    return MemoryHandle(info["directory"], info["token"], info["tls_cert_file"], name, namespace)
