"""In-process Engram tables that train exactly as the memory service's tables do.

They start from the service's deterministic rows and step with its sparse optimizers (pure torch and
numpy modules of ``memory_service``, no Ray, no gRPC), so a run on in-process tables and a run on
remote tables take the same steps. Only rows a step touched change, and Adam's bias correction follows
each row's own step count.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from compute.memory.row_table import LocalRowTable
from memory_service.core.optimizers import make_optimizer
from memory_service.core.row_init import init_rows
from memory_service.core.table_spec import OptimizerSpec, TableSpec


def service_initialised_table(spec: TableSpec) -> LocalRowTable:
    """An in-process table holding the rows the memory service would start ``spec`` with."""
    table = LocalRowTable(spec.rows, spec.dim)
    with torch.no_grad():
        table.weight.copy_(torch.from_numpy(init_rows(spec.seed, np.arange(spec.rows), spec.dim, spec.init_std)))
    return table


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
