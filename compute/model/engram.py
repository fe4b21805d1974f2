"""The Engram module: a token's memory rows, gated by its context, mixed by a short causal conv."""
from __future__ import annotations

import math

import torch
from torch import nn

import kernels
from compute.config import EngramConfig
from compute.memory.row_table import EngramRows


class ConvHistory:
    """The short conv's decode state: each row's gated values at its last ``span`` positions.

    The conv normalises each position on its own, so keeping the gated values (not their normalised
    form) is equivalent; zeros stand for positions before the start, as RMSNorm maps them to zeros.
    """

    def __init__(self, batch: int, span: int, hc_mult: int, hidden_size: int, dtype: torch.dtype, device=None):
        self.values = torch.zeros(batch, span, hc_mult, hidden_size, dtype=dtype, device=device)

    def extend(self, gated: torch.Tensor, real_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, span + T, hc, D]``: the history, then ``gated``; keeps the span before each row's padding."""
        window = torch.cat([self.values, gated], dim=1)
        span = self.values.shape[1]
        kept = real_tokens[:, None] + torch.arange(span, device=window.device)
        self.values = window.gather(1, kept[:, :, None, None].expand(-1, -1, *window.shape[2:]))
        return window


class Engram(nn.Module):
    """The demo's Engram forward with the key and value projections fused into one GEMM.

    ``forward(hidden [B, T, hc, D], rows) -> [B, T, hc, D]``, the branch output that the block adds to
    its hidden state. The kernels run as Triton on CUDA and as their PyTorch references elsewhere.
    """

    def __init__(self, config: EngramConfig, hidden_size: int, hc_mult: int, zero_init_conv: bool = False):
        super().__init__()
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.heads, self.dilation = config.heads_per_layer, config.max_ngram_size
        embedding_dim = config.embedding_dim
        # Rows [0, hc*D) are the hc key projections, the last D rows the shared value projection.
        self.key_value_proj = nn.Linear(embedding_dim, (hc_mult + 1) * hidden_size)
        self.key_norm_w = nn.Parameter(torch.ones(hc_mult, hidden_size))
        self.hidden_norm_w = nn.Parameter(torch.ones(hc_mult, hidden_size))
        self.conv_norm_w = nn.Parameter(torch.ones(hc_mult, hidden_size))
        self.conv_w = nn.Parameter(torch.empty(hc_mult * hidden_size, config.kernel_size))
        if zero_init_conv:  # the paper's choice: the conv starts as an identity path
            nn.init.zeros_(self.conv_w)
        else:  # nn.Conv1d's default for a depthwise conv (fan-in = kernel size)
            bound = 1 / math.sqrt(config.kernel_size)
            nn.init.uniform_(self.conv_w, -bound, bound)

    @property
    def conv_span(self) -> int:
        """Past positions the causal short conv reads: ``(kernel - 1) * dilation``."""
        return (self.conv_w.shape[-1] - 1) * self.dilation

    def new_history(self, batch: int, dtype: torch.dtype, device=None) -> ConvHistory:
        """An empty decode state for ``batch`` sequences."""
        return ConvHistory(batch, self.conv_span, self.hc_mult, self.hidden_size, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        rows: EngramRows,
        history: ConvHistory | None = None,
        real_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With a ``history``, ``hidden`` continues each row's sequence (its first ``real_tokens [B]`` real)."""
        batch, seq, hc, dim = hidden.shape
        tokens = batch * seq
        embeddings = kernels.gather_rows(rows.unique_rows, rows.inverse.reshape(tokens, self.heads), hidden.dtype,
                                         rows.segments)
        key_value = self.key_value_proj(embeddings)
        key = key_value[:, : hc * dim].reshape(tokens, hc, dim)
        value = key_value[:, hc * dim :]
        gated = kernels.engram_gate(
            key, hidden.reshape(tokens, hc, dim), value, self.key_norm_w, self.hidden_norm_w
        )
        gated = gated.reshape(batch, seq, hc, dim)
        if history is not None:  # the conv reads earlier positions too; their outputs came out before
            gated = history.extend(gated, real_tokens)
        return kernels.short_conv(gated, self.conv_norm_w, self.conv_w, self.dilation)[:, -seq:]

    @torch.no_grad()
    def load_demo_weights(self, key_w, key_b, value_w, value_b, norm1_w, norm2_w, conv_norm_w, conv_w) -> None:
        """Copy weights laid out as the official demo's modules (per-branch key Linear, Conv1d weight)."""
        hc, dim = self.hc_mult, self.hidden_size
        self.key_value_proj.weight.copy_(torch.cat([key_w.reshape(hc * dim, -1), value_w]))
        self.key_value_proj.bias.copy_(torch.cat([key_b.reshape(hc * dim), value_b]))
        self.key_norm_w.copy_(norm1_w)
        self.hidden_norm_w.copy_(norm2_w)
        self.conv_norm_w.copy_(conv_norm_w)
        self.conv_w.copy_(conv_w.reshape(hc * dim, -1))
