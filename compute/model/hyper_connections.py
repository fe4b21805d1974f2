"""Hyper-connections: ``hc_mult`` residual branches that each sublayer reads and writes with learned weights."""
from __future__ import annotations

import torch
from torch import nn


class HyperConnection(nn.Module):
    """Wraps a sublayer ``f: [B, T, D] -> [B, T, D]`` around branches ``h [B, T, hc, D]``.

    ``x = sum_i read[i] h_i``; ``h'_j = sum_i mix[j, i] h_i + write[j] * f(x)``. Initialised so every
    branch carries the plain residual stream; with ``hc_mult == 1`` it is exactly ``h + f(h)``.
    """

    def __init__(self, hc_mult: int):
        super().__init__()
        self.hc_mult = hc_mult
        if hc_mult > 1:
            self.read = nn.Parameter(torch.full((hc_mult,), 1.0 / hc_mult))
            self.mix = nn.Parameter(torch.eye(hc_mult))
            self.write = nn.Parameter(torch.ones(hc_mult))

    def read_input(self, branches: torch.Tensor) -> torch.Tensor:
        if self.hc_mult == 1:
            return branches[:, :, 0]
        return torch.einsum("bthd,h->btd", branches, self.read.to(branches.dtype))

    def write_output(self, branches: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.hc_mult == 1:
            return branches + output.unsqueeze(2)
        mixed = torch.einsum("bthd,gh->btgd", branches, self.mix.to(branches.dtype))
        return mixed + self.write.to(output.dtype)[:, None] * output.unsqueeze(2)
