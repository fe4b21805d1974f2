"""A checkpoint made ready to serve: its tables deployed once as read-only serving tables, its model loaded.

``open_serving_memory`` runs where the command runs (the driver): it restores the checkpoint's
``memory/`` folder onto a new memory service as serving tables (bfloat16 rows, no optimizer state)
and keeps its ``MemoryHandle``, which is picklable: every replica and batch worker gets it and
opens a client of its own on the one service. A run trained on in-process tables needs no service:
its rows are part of the model's weights.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray
import torch

from compute.generate import Generator
from compute.runtime import EngramRuntime, load_runtime
from compute.serve.engine import ServingEngine
from compute.train.checkpoints import load_trainer_state, memory_checkpoint, resolve_checkpoint
from compute.train.config import CacheConfig
from compute.train.job import COMPUTE_RESOURCE  # what compute nodes advertise; training workers ask for it too
from memory_service.core.table_spec import TableSpec
from memory_service.deploy import MemoryHandle, deploy_from_checkpoint, describe_table_memory, get_controller

log = logging.getLogger(__name__)



@dataclasses.dataclass
class ServingMemory:
    """The serving tables of a checkpoint (``handle`` None: in-process tables) and what they take."""

    handle: MemoryHandle | None
    specs: list[TableSpec]
    owned: bool = True

    def describe(self) -> str:
        if self.handle is None:
            return "in-process tables: the rows are part of the model's weights, in each replica"
        return f"{len(self.specs)} read-only serving tables: {describe_table_memory(self.specs)}"

    def stop(self) -> None:
        if self.handle is not None and self.owned:
            self.handle.stop()
            self.owned = False


def open_serving_memory(checkpoint: str | Path, shards: int | None = None,
                        data_root: str | Path | None = None) -> ServingMemory:
    """Deploy ``checkpoint``'s tables as read-only serving tables on ``shards`` (default: the run's) shards.

    Ray must be connected. The service's data root (default: the folder holding the checkpoint's
    ``memory/``) must contain that folder, as a restore reads only under its data root."""
    checkpoint = resolve_checkpoint(checkpoint)
    config = load_trainer_state(checkpoint).train_config()
    if config.memory.tables == "local":
        return ServingMemory(None, [], owned=False)
    tables = memory_checkpoint(checkpoint)
    if tables is None:
        raise ValueError(f"checkpoint: {checkpoint} holds no checkpoint of the memory tables (memory/)")
    handle = deploy_from_checkpoint(tables, shards or config.memory.shards,
                                    data_root=data_root or tables.resolve().parent, read_only=True)
    specs = [TableSpec.from_dict(spec)
             for spec in ray.get(get_controller(handle.controller, handle.namespace).table_specs.remote())]
    return ServingMemory(handle, specs)


def load_serving_runtime(checkpoint: str | Path, device: torch.device | str, memory: MemoryHandle | None,
                         cache: CacheConfig = CacheConfig()) -> EngramRuntime:
    """The checkpoint's model in eval mode on ``device``; remote rows come from ``memory``'s serving tables,
    through a hot-row cache on ``device`` if ``cache`` sizes one.

    Serving tables hold bfloat16 rows, so rows travel as bfloat16 whatever the run's wire dtype
    (the same values as a float32 wire would carry, in half the bytes)."""
    runtime = load_runtime(checkpoint, torch.device(device), memory, wire_dtype="bfloat16", cache=cache)
    runtime.model.eval()
    return runtime


def serving_engine(runtime: EngramRuntime) -> ServingEngine:
    return ServingEngine(Generator(runtime.model, runtime.compressor, runtime.hasher))


def placement_options(device: str, cpus: float, cluster_resources: dict[str, Any] | None = None,
                      gpus: float = 1.0) -> dict[str, Any]:
    """Ray actor options for a replica or batch worker: ``cpus`` cores, one ``engram_compute`` unit when the
    cluster advertises that resource (so the model lands on compute nodes, never on memory nodes), ``gpus``
    GPUs (a fraction lets replicas share one) when ``device`` is CUDA."""
    resources = ray.cluster_resources() if cluster_resources is None else cluster_resources
    options: dict[str, Any] = {"num_cpus": cpus}
    if resources.get(COMPUTE_RESOURCE, 0) > 0:
        options["resources"] = {COMPUTE_RESOURCE: 1}
    if str(device).startswith("cuda"):
        options["num_gpus"] = gpus
    return options
