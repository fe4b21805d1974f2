"""The in-process RowTable: lookup dedups raw ids once, prefetch takes the loader's, apply_gradients steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compute.memory.local_table import LocalRowTable, service_initialised_table
from memory_service.core.table_spec import OptimizerSpec, TableSpec

SPEC = TableSpec(name="engram_layer_3", rows=50, dim=4, optimizer=OptimizerSpec(kind="adam", lr=0.1), seed=7)


def raw_ids() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, SPEC.rows, size=(2, 5, 3)))


def train_step(table: LocalRowTable, row_ids: torch.Tensor, step: int) -> None:
    unique, inverse = np.unique(row_ids.numpy(), return_inverse=True)
    unique, inverse = torch.from_numpy(unique), torch.from_numpy(inverse.reshape(row_ids.shape))
    rows = table.prefetch(unique, inverse).result()
    (rows.unique_rows[rows.inverse] ** 2).sum().backward()
    table.apply_gradients(unique, rows, step).result()


def test_lookup_of_raw_ids_equals_prefetch_of_the_loaders_unique_ids():
    table = service_initialised_table(SPEC, layer=3)
    row_ids = raw_ids()
    unique, inverse = np.unique(row_ids.numpy(), return_inverse=True)
    looked_up = table.lookup(row_ids).result()
    prefetched = table.prefetch(torch.from_numpy(unique), torch.from_numpy(inverse.reshape(row_ids.shape))).result()
    assert torch.equal(looked_up.unique_rows, prefetched.unique_rows)
    assert torch.equal(looked_up.inverse, prefetched.inverse)
    assert torch.equal(looked_up.unique_rows[looked_up.inverse], table.weight.detach()[row_ids])


def test_lookup_rejects_ids_outside_the_table():
    table = service_initialised_table(SPEC, layer=3)
    with pytest.raises(ValueError, match="row_ids"):
        table.lookup(torch.tensor([[[0, SPEC.rows]]]))


def test_apply_gradients_steps_only_the_touched_rows():
    table = service_initialised_table(SPEC, layer=3)
    before = table.weight.detach().clone()
    row_ids = raw_ids()
    train_step(table, row_ids, step=0)
    touched = torch.zeros(SPEC.rows, dtype=torch.bool)
    touched[row_ids.flatten()] = True
    changed = (table.weight.detach() != before).any(dim=1)
    assert torch.equal(changed, touched)
    assert table.weight.grad is None


def test_optimizer_state_is_keyed_by_layer_and_resumes_exactly():
    straight, resumed = service_initialised_table(SPEC, layer=3), service_initialised_table(SPEC, layer=3)
    first, second = raw_ids(), raw_ids() % 20
    train_step(straight, first, step=0)
    state = straight.optimizer_state()
    assert set(state) == {"3"}
    with torch.no_grad():
        resumed.weight.copy_(straight.weight)
    resumed.load_optimizer_state(state)
    train_step(straight, second, step=1)
    train_step(resumed, second, step=1)
    assert torch.equal(straight.weight, resumed.weight)


def test_a_table_without_an_optimizer_serves_but_does_not_train():
    table = LocalRowTable(SPEC.rows, SPEC.dim)
    assert table.optimizer_state() == {}
    with pytest.raises(RuntimeError, match="without an optimizer"):
        train_step(table, raw_ids(), step=0)
