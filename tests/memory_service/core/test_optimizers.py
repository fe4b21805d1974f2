"""Sparse optimizers against torch.optim on a dense table touched at the same rows."""
from __future__ import annotations

import pytest
import torch

from memory_service.core.optimizers import make_optimizer
from memory_service.core.table_spec import OptimizerSpec

ROWS, DIM, STEPS = 40, 16, 6
TOLERANCE = dict(rtol=1e-5, atol=1e-7)


def _torch_optimizer(spec: OptimizerSpec, params):
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay, foreach=False)
    if spec.kind == "adagrad":
        return torch.optim.Adagrad(params, lr=spec.lr, eps=spec.eps, weight_decay=spec.weight_decay,
                                   initial_accumulator_value=spec.initial_accumulator, foreach=False)
    adam = torch.optim.AdamW if spec.decoupled_weight_decay else torch.optim.Adam
    return adam(params, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                weight_decay=spec.weight_decay, foreach=False)


class SparseTable:
    """A dense table updated the way shards and in-process tables are: ``apply_at`` its touched rows."""

    def __init__(self, spec: OptimizerSpec, initial: torch.Tensor):
        self.optimizer = make_optimizer(spec)
        self.rows = initial.clone()
        self.state = self.optimizer.initial_state(*initial.shape)

    def step(self, row_ids: torch.Tensor, grads: torch.Tensor) -> None:
        self.optimizer.apply_at(self.rows, self.state, row_ids, grads)


def _random_rows(generator, n, *, constant_per_row=False):
    values = torch.randn(n, DIM, generator=generator)
    return values[:, :1].expand(n, DIM).contiguous() if constant_per_row else values


SPECS = [
    OptimizerSpec(kind="sgd", lr=0.1),
    OptimizerSpec(kind="sgd", lr=0.1, weight_decay=0.01),
    OptimizerSpec(kind="adam", lr=0.01),
    OptimizerSpec(kind="adam", lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
    OptimizerSpec(kind="adam", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    # Row-wise Adagrad equals torch's element-wise Adagrad when each row and its gradient are constant.
    OptimizerSpec(kind="adagrad", lr=0.1, eps=1e-10, initial_accumulator=0.1),
    OptimizerSpec(kind="adagrad", lr=0.1, eps=1e-10, weight_decay=0.05),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-wd{s.weight_decay}-dec{s.decoupled_weight_decay}")
def test_same_rows_every_step_equals_torch(spec):
    generator = torch.Generator().manual_seed(0)
    rowwise = spec.kind == "adagrad"
    initial = _random_rows(generator, ROWS, constant_per_row=rowwise)
    touched = torch.tensor([3, 17, 0, 39, 22, 8])
    # With weight decay, torch's dense optimizer would also decay untouched rows, so touch them all.
    if spec.weight_decay:
        touched = torch.randperm(ROWS, generator=generator)
    dense = torch.nn.Parameter(initial.clone())
    reference = _torch_optimizer(spec, [dense])
    sparse = SparseTable(spec, initial)
    for _ in range(STEPS):
        grads = _random_rows(generator, len(touched), constant_per_row=rowwise)
        dense.grad = torch.zeros_like(dense).index_copy_(0, touched, grads)
        reference.step()
        sparse.step(touched, grads)
    torch.testing.assert_close(sparse.rows, dense.detach(), **TOLERANCE)
    assert not torch.equal(sparse.rows, initial)


@pytest.mark.parametrize("spec", SPECS[2:], ids=lambda s: s.kind)
def test_rows_touched_at_different_steps_follow_their_own_history(spec):
    """Per-row bias correction: each row equals a torch optimizer that only saw that row's steps."""
    generator = torch.Generator().manual_seed(1)
    rowwise = spec.kind == "adagrad"
    initial = _random_rows(generator, ROWS, constant_per_row=rowwise)
    per_row = [torch.nn.Parameter(initial[row:row + 1].clone()) for row in range(ROWS)]
    references = [_torch_optimizer(spec, [param]) for param in per_row]
    sparse = SparseTable(spec, initial)
    for _ in range(STEPS):
        touched = torch.randperm(ROWS, generator=generator)[: ROWS // 3]
        grads = _random_rows(generator, len(touched), constant_per_row=rowwise)
        for row, grad in zip(touched.tolist(), grads):
            per_row[row].grad = grad[None].clone()
            references[row].step()
        sparse.step(touched, grads)
    torch.testing.assert_close(sparse.rows, torch.cat([p.detach() for p in per_row]), **TOLERANCE)
    if spec.kind == "adam":
        steps = torch.tensor([float(references[row].state[per_row[row]].get("step", 0)) for row in range(ROWS)])
        assert torch.equal(sparse.state["step"], steps)


def test_rowwise_adagrad_uses_the_mean_squared_gradient_of_each_row():
    spec = OptimizerSpec(kind="adagrad", lr=0.5, eps=1e-8, initial_accumulator=0.25)
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    grads = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    optimizer = make_optimizer(spec)
    state = optimizer.initial_state(2, 2)
    optimizer.apply(rows, state, grads)
    accumulator = torch.tensor([0.25 + 5.0, 0.25 + 2.0])
    torch.testing.assert_close(state["accumulator"], accumulator)
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) - 0.5 * grads / (accumulator.sqrt()[:, None] + 1e-8)
    torch.testing.assert_close(rows, expected)


def test_state_shapes_match_initial_state():
    for kind, names in [("sgd", ()), ("adagrad", ("accumulator",)), ("adam", ("exp_avg", "exp_avg_sq", "step"))]:
        optimizer = make_optimizer(OptimizerSpec(kind=kind))
        assert optimizer.state_names == names
        state = optimizer.initial_state(7, 5)
        assert tuple(state) == names
        for name, shape in optimizer.state_shapes(5).items():
            assert state[name].shape == (7, *shape) and state[name].dtype == torch.float32


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_apply_at_updates_only_the_touched_rows_as_apply_does(kind):
    optimizer = make_optimizer(OptimizerSpec(kind=kind, lr=0.1))
    generator = torch.Generator().manual_seed(2)
    rows, state = torch.randn(ROWS, DIM, generator=generator), optimizer.initial_state(ROWS, DIM)
    positions, grads = torch.tensor([30, 2, 11]), torch.randn(3, DIM, generator=generator)
    expected_rows, expected_state = rows[positions], {name: values[positions] for name, values in state.items()}
    optimizer.apply(expected_rows, expected_state, grads)
    untouched = torch.ones(ROWS, dtype=torch.bool).index_fill_(0, positions, False)
    before = rows[untouched], {name: values[untouched] for name, values in state.items()}
    optimizer.apply_at(rows, state, positions, grads)
    assert torch.equal(rows[positions], expected_rows) and torch.equal(rows[untouched], before[0])
    for name, values in state.items():
        assert torch.equal(values[positions], expected_state[name]) and torch.equal(values[untouched], before[1][name])
