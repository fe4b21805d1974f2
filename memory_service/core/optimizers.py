"""Sparse optimizers for the rows a step touched: SGD, row-wise Adagrad, Adam.

``apply`` updates gathered rows and their state with the same arithmetic as ``torch.optim``;
``apply_at`` does the gather, ``apply`` and write-back on a whole table, so a shard's table and an
in-process one step alike, and both equal PyTorch's optimizer on a dense table whose untouched rows
get no gradient. Adam keeps a step count per row (float32, as torch keeps its ``step``), so bias
correction follows each row's own history. The Engram paper trains its tables with Adam at 5x the
dense learning rate and no weight decay.
"""
from __future__ import annotations

import numpy as np
import torch

from memory_service.core.table_spec import OptimizerSpec


class SparseOptimizer:
    """Updates touched rows and their per-row state in place; subclasses name their state."""

    state_names: tuple[str, ...] = ()

    def __init__(self, spec: OptimizerSpec):
        self.spec = spec

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each state tensor: ``(dim,)`` for element-wise state, ``()`` for one value a row."""
        return {}

    def initial_state(self, num_rows: int, dim: int) -> dict[str, torch.Tensor]:
        """Fresh float32 state for ``num_rows`` rows: zeros that take no time and no memory until rows are
        stepped (calloc'd pages, which the OS zeroes on first touch; ``torch.zeros`` writes them all)."""
        return {name: torch.from_numpy(np.zeros((num_rows, *shape), dtype=np.float32))
                for name, shape in self.state_shapes(dim).items()}

    def apply(self, rows: torch.Tensor, state: dict[str, torch.Tensor], grads: torch.Tensor) -> None:
        """Update ``rows`` [n, dim] and ``state`` in place with ``grads`` [n, dim] (float32)."""
        raise NotImplementedError

    def apply_at(self, rows: torch.Tensor, state: dict[str, torch.Tensor], positions: torch.Tensor,
                 grads: torch.Tensor) -> None:
        """Update a whole table's ``rows`` [N, dim] and ``state`` in place at the unique ``positions`` [n]
        with their ``grads`` [n, dim]; the other rows and their state stay as they are."""
        touched = rows.index_select(0, positions)
        touched_state = {name: values.index_select(0, positions) for name, values in state.items()}
        self.apply(touched, touched_state, grads)
        rows.index_copy_(0, positions, touched)
        for name, values in touched_state.items():
            state[name].index_copy_(0, positions, values)

    def _with_l2(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """torch.optim's coupled weight decay: the L2 term joins the gradient."""
        weight_decay = self.spec.weight_decay
        return grads.add(rows, alpha=weight_decay) if weight_decay else grads


class SGD(SparseOptimizer):
    """Plain SGD (torch.optim.SGD without momentum)."""

    def apply(self, rows, state, grads):
        rows.add_(self._with_l2(rows, grads), alpha=-self.spec.lr)


class RowwiseAdagrad(SparseOptimizer):
    """Adagrad with one accumulator per row: the mean of the squared gradient over the row (as FBGEMM)."""

    state_names = ("accumulator",)

    def state_shapes(self, dim):
        return {"accumulator": ()}

    def initial_state(self, num_rows, dim):
        return {"accumulator": torch.full((num_rows,), float(self.spec.initial_accumulator))}

    def apply(self, rows, state, grads):
        grads = self._with_l2(rows, grads)
        accumulator = state["accumulator"]
        accumulator.add_(grads.square().mean(dim=1))
        scale = accumulator.sqrt().add_(self.spec.eps)
        rows.addcdiv_(grads, scale[:, None], value=-self.spec.lr)


class Adam(SparseOptimizer):
    """Adam (torch.optim.Adam, or AdamW with ``decoupled_weight_decay``) with a step count per row."""

    state_names = ("exp_avg", "exp_avg_sq", "step")

    def state_shapes(self, dim):
        return {"exp_avg": (dim,), "exp_avg_sq": (dim,), "step": ()}

    def apply(self, rows, state, grads):
        spec = self.spec
        if spec.decoupled_weight_decay:
            rows.mul_(1 - spec.lr * spec.weight_decay)
        else:
            grads = self._with_l2(rows, grads)
        step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step.add_(1)
        exp_avg.lerp_(grads, 1 - spec.beta1)
        exp_avg_sq.mul_(spec.beta2).addcmul_(grads, grads, value=1 - spec.beta2)
        # Bias corrections in float64 like torch's Python-float arithmetic, then float32 per row.
        steps = step.double()
        step_size = (spec.lr / (1 - spec.beta1**steps)).float()[:, None]
        correction2_sqrt = (1 - spec.beta2**steps).sqrt().float()[:, None]
        denominator = (exp_avg_sq.sqrt() / correction2_sqrt).add_(spec.eps)
        rows.sub_(exp_avg * step_size / denominator)


_OPTIMIZERS = {"sgd": SGD, "adagrad": RowwiseAdagrad, "adam": Adam}


def make_optimizer(spec: OptimizerSpec) -> SparseOptimizer:
    """The sparse optimizer ``spec.kind`` names."""
    return _OPTIMIZERS[spec.kind](spec)
