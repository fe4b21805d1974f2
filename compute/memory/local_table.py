"""In-process Engram tables (the local ``RowTable``) that train exactly as the memory service's tables do.

They start from the service's deterministic rows and step with its sparse optimizers (pure torch and
numpy modules of ``memory_service``, no Ray, no gRPC), so a run on in-process tables and a run on
remote tables take the same steps. Only rows a step touched change, and Adam's bias correction follows
each row's own step count.
"""
from __future__ import annotations

import concurrent.futures
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compute.memory.futures import settled
from compute.memory.row_table import EngramRows, RowsAcrossUpdate, RowTable
from memory_service.core.optimizers import make_optimizer
from memory_service.core.row_init import init_rows
from memory_service.core.slots import ShardSplit
from memory_service.core.table_spec import OptimizerSpec, TableSpec


class LocalRowTable(nn.Module, RowTable):
    """A table whose rows are a parameter of the model, with sparse gradients.

    Given an ``optimizer``, ``apply_gradients`` steps it as the memory service would; its state is made
    on first use, on the rows' device, so a table that only serves (generation) holds none.
    ``layer`` keys that state in checkpoints.
    """

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02, seed: int = 0, layer: int = 0,
                 optimizer: OptimizerSpec | None = None):
        super().__init__()
        self.num_rows, self.dim, self.layer = num_rows, dim, layer
        self.optimizer_spec = optimizer
        self._optimizer: LocalTableOptimizer | None = None
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_rows, dim, generator=generator) * init_std)

    def prefetch(self, unique_ids: torch.Tensor, inverse: torch.Tensor,
                 shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        """The rows, read now: gradients reach ``weight`` as a sparse gradient of the touched rows."""
        device = self.weight.device
        return settled(EngramRows(F.embedding(unique_ids.to(device), self.weight, sparse=True), inverse.to(device)))

    def apply_gradients(self, unique_ids: torch.Tensor, rows: EngramRows, step: int, rank: int = 0,
                        world_size: int = 1, next_rows: RowsAcrossUpdate | None = None) -> concurrent.futures.Future:
        """The sparse optimizer step on the rows backward left a gradient for in ``weight.grad``."""
        self._trained_by().step()
        if next_rows is not None:
            next_rows.after(settled())
        return settled()

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return self._trained_by().state_dict() if self.optimizer_spec is not None else {}

    def load_optimizer_state(self, state: Mapping[str, dict[str, torch.Tensor]]) -> None:
        if self.optimizer_spec is not None:
            self._trained_by().load_state_dict(state)

    def _trained_by(self) -> LocalTableOptimizer:
        if self.optimizer_spec is None:
            raise RuntimeError("apply_gradients: this in-process table was built without an optimizer")
        if self._optimizer is None:
            self._optimizer = LocalTableOptimizer({self.layer: self}, self.optimizer_spec)
        return self._optimizer

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}"


def service_initialised_table(spec: TableSpec, layer: int) -> LocalRowTable:
    """Layer ``layer``'s in-process table: the rows the memory service would start ``spec`` with, trained
    by ``spec``'s optimizer."""
    table = LocalRowTable(spec.rows, spec.dim, layer=layer, optimizer=spec.optimizer)
    with torch.no_grad():
        table.weight.copy_(torch.from_numpy(init_rows(spec.seed, np.arange(spec.rows), spec.dim, spec.init_std)))
    return table


def build_local_tables(table_rows: Mapping[int, int], row_dim: int, seed: int = 0) -> dict[int, LocalRowTable]:
    """One randomly initialised in-process table per Engram layer, ``table_rows[layer]`` rows each, no optimizer."""
    return {layer: LocalRowTable(rows, row_dim, seed=seed + layer, layer=layer) for layer, rows in table_rows.items()}


class LocalTableOptimizer:
    """``step()`` applies each table's sparse gradient to its touched rows, then clears it."""

    def __init__(self, tables: Mapping[int, LocalRowTable], spec: OptimizerSpec):
        self.tables = dict(tables)
        self.optimizer = make_optimizer(spec)
        self.state = {
            layer: {name: values.to(table.weight.device)
                    for name, values in self.optimizer.initial_state(table.num_rows, table.dim).items()}
            for layer, table in self.tables.items()
        }

    @torch.no_grad()
    def step(self) -> None:
        for layer, table in self.tables.items():
            grad = table.weight.grad
            if grad is None:
                continue
            grad = grad.coalesce()
            self.optimizer.apply_at(table.weight, self.state[layer], grad.indices()[0], grad.values().float())
            table.weight.grad = None

    def state_dict(self) -> dict:
        return {str(layer): {name: t.clone() for name, t in state.items()} for layer, state in self.state.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for layer in self.state:
            for name, values in state_dict[str(layer)].items():
                self.state[layer][name].copy_(values)
