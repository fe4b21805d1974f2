"""A model together with where its Engram rows live: what training, evaluation and generation share."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from compute.config import EngramModelConfig
from compute.hashing.ngram_hash import NgramHasher
from compute.hashing.tokenizer_compression import TokenizerCompressor
from compute.memory.cached_table import CachedRowTable
from compute.memory.client import MemoryClient
from compute.memory.local_table import service_initialised_table
from compute.memory.remote_table import RemoteRowTable
from compute.memory.row_table import RowTable
from compute.memory.service import open_client
from compute.model.engram_moe import EngramMoEModel
from compute.train.config import CacheConfig, MemoryConfig, TrainConfig, table_name
from compute.train.tables import engram_table_specs
from memory_service.deploy import MemoryHandle


@dataclasses.dataclass
class EngramRuntime:
    config: TrainConfig
    model: EngramMoEModel
    tables: dict[int, RowTable]
    compressor: TokenizerCompressor
    hasher: NgramHasher
    client: MemoryClient | None  # set when the rows are remote

    def table_optimizer_state(self) -> dict | None:
        """The tables' optimizer state kept in this process, by layer; None when all of it lives on the shards."""
        state = {}
        for table in self.tables.values():
            state.update(table.optimizer_state())
        return state or None

    def load_table_optimizer_state(self, state: dict | None) -> None:
        """Continue from a checkpoint's ``table_optimizer_state()``."""
        for table in self.tables.values():
            table.load_optimizer_state(state or {})

    def loader_routing(self) -> tuple[int, dict[int, np.ndarray]] | None:
        """The routing epoch and each Engram layer's slot owners under it, so that the loader splits rows
        by shard ahead of the step; None with in-process tables."""
        if self.client is None:
            return None
        epoch, owners = self.client.slot_owners()
        return epoch, {layer: owners[table_name(layer)] for layer in self.config.engram.layer_ids}

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
        if self.client is not None:
            self.client.close()


def remote_table(client: MemoryClient, name: str, memory: MemoryConfig, device: torch.device) -> RemoteRowTable:
    """The table ``name`` on the memory service, behind a hot-row cache on ``device`` if ``memory.cache`` asks."""
    if memory.cache.enabled:
        return CachedRowTable(client, name, memory.cache.capacity(client.table_dim(name)), memory.cache.readmit_every,
                              device, memory.wire_torch_dtype, grad_wire_dtype=memory.grad_wire_torch_dtype)
    return RemoteRowTable(client, name, device, memory.wire_torch_dtype, grad_wire_dtype=memory.grad_wire_torch_dtype)


def build_runtime(config: TrainConfig, device: torch.device, memory: MemoryHandle | None) -> EngramRuntime:
    """The model (seeded by ``config.seed``) on remote tables through ``memory``, or on in-process ones."""
    torch.manual_seed(config.seed)
    compressor = TokenizerCompressor.from_file(config.data.tokenizer_path)
    hasher = NgramHasher.from_compressor(config.engram, compressor)
    client = None
    if config.memory.tables == "remote":
        if memory is None:
            raise ValueError("memory: remote tables need a memory service (deploy one or use memory.tables: local)")
        client = open_client(memory, read_shared_rows=config.memory.read_shared_rows)
        tables = {layer: remote_table(client, table_name(layer), config.memory, device)
                  for layer in config.engram.layer_ids}
    else:
        specs = engram_table_specs(config, {layer: hasher.table_rows(layer) for layer in config.engram.layer_ids})
        by_name = {spec.name: spec for spec in specs}
        tables = {layer: service_initialised_table(by_name[table_name(layer)], layer)
                  for layer in config.engram.layer_ids}
    model = EngramMoEModel(EngramModelConfig(model=config.model, engram=config.engram), tables).to(device)
    return EngramRuntime(config, model, tables, compressor, hasher, client)


def load_runtime(checkpoint: str | Path, device: torch.device, memory: MemoryHandle | None,
                 wire_dtype: str | None = None, cache: CacheConfig | None = None) -> EngramRuntime:
    """The model of a training checkpoint, its weights loaded (remote tables: restored by the caller);
    ``wire_dtype`` and ``cache`` replace the run's dtype of remote rows on the wire and its hot-row cache."""
    from compute.train.checkpoints import load_trainer_state

    state = load_trainer_state(checkpoint, map_location=device)
    config = state.train_config()
    if wire_dtype is not None and config.memory.tables == "remote":
        config = config.replace(memory__wire_dtype=wire_dtype)
    if cache is not None and config.memory.tables == "remote":
        config = config.replace(memory__cache=cache)
    runtime = build_runtime(config, device, memory)
    runtime.model.load_state_dict(state.model)
    return runtime
