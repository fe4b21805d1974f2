"""Where an Engram layer's rows come from: the table interface and its in-process implementation."""
from __future__ import annotations

import abc
import concurrent.futures
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from kernels import RowSegments


@dataclasses.dataclass
class EngramRows:
    """The rows a batch touches: each distinct row once, plus where every (token, head) finds its row."""

    unique_rows: torch.Tensor  # [U, dim]; differentiable when the table is trainable in-process
    inverse: torch.Tensor  # [B, T, heads] int64 indices into unique_rows
    # The entries grouped by row, built ahead for the GPU backward (``kernels.row_segments``).
    segments: RowSegments | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EngramRows":
        segments = self.segments and RowSegments(*(t.to(device, non_blocking=non_blocking) for t in self.segments))
        return EngramRows(
            self.unique_rows.to(device, non_blocking=non_blocking),
            self.inverse.to(device, non_blocking=non_blocking),
            segments,
        )


class RowTable(abc.ABC):
    """One Engram layer's table of ``num_rows`` rows of ``dim`` values."""

    num_rows: int
    dim: int

    @abc.abstractmethod
    def lookup(self, row_ids: torch.Tensor) -> EngramRows:
        """Rows for ``row_ids [B, T, heads]`` as unique rows plus an inverse index."""

    def lookup_async(self, row_ids: torch.Tensor) -> concurrent.futures.Future:
        """A future of ``lookup(row_ids)``; remote tables override it to overlap the fetch with compute."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(self.lookup(row_ids))
        return future


def check_row_ids(row_ids: torch.Tensor, num_rows: int) -> None:
    """Reject ids a table cannot serve, naming the field."""
    if row_ids.dtype != torch.int64:
        raise ValueError(f"row_ids: expected int64, got {row_ids.dtype}")
    if row_ids.numel() and (int(row_ids.min()) < 0 or int(row_ids.max()) >= num_rows):
        raise ValueError(
            f"row_ids: values must lie in [0, {num_rows}), got [{int(row_ids.min())}, {int(row_ids.max())}]"
        )


class LocalRowTable(nn.Module, RowTable):
    """An in-process table trained with sparse gradients (``torch.optim.SparseAdam`` and friends)."""

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02, seed: int = 0):
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_rows, dim, generator=generator) * init_std)

    def lookup(self, row_ids: torch.Tensor) -> EngramRows:
        check_row_ids(row_ids, self.num_rows)
        unique_ids, inverse = torch.unique(row_ids, return_inverse=True)
        unique_rows = F.embedding(unique_ids.to(self.weight.device), self.weight, sparse=True)
        return EngramRows(unique_rows, inverse.to(self.weight.device))

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}"
