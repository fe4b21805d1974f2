"""Mixture-of-experts feed-forward: shared SwiGLU experts plus routed top-k experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * inner_size, bias=False)
        self.down = nn.Linear(inner_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """Shared experts see every token; each token also goes to its top-k routed experts.

    ``forward(x [B, T, D]) -> (y [B, T, D], load_balance_loss)``. The balance term is Switch
    Transformer's ``E * sum_e f_e * p_e`` (share of routed slots times mean router probability, 1.0 when
    routing is perfectly even), taken per sequence and averaged, as DeepSeek-V3's sequence-wise term: a
    mean over sequences splits exactly across data-parallel ranks.
    """

    def __init__(self, hidden_size: int, expert_hidden_size: int, num_routed: int, top_k: int, num_shared: int):
        super().__init__()
        self.num_routed, self.top_k = num_routed, top_k
        self.router = nn.Linear(hidden_size, num_routed, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, expert_hidden_size) for _ in range(num_routed))
        self.shared = SwiGLU(hidden_size, expert_hidden_size * num_shared) if num_shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``x [B, T, D]``: top-k expert ids ``[B*T, k]``, their renormalised weights, the balance loss."""
        probs = self.router(x).float().softmax(dim=-1)  # [B, T, E]
        weights, expert_ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        picks = torch.zeros_like(probs).scatter_(-1, expert_ids, 1.0)
        routed_share = picks.mean(dim=1) / self.top_k  # [B, E]
        balance_loss = self.num_routed * (routed_share * probs.mean(dim=1)).sum(-1).mean()
        return expert_ids.flatten(0, 1), weights.flatten(0, 1), balance_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        expert_ids, weights, balance_loss = self.route(x)
        flat_experts = expert_ids.flatten()  # slot s = token * top_k + k
        # Group the slots by expert with a stable sort and bring only the group sizes to the host: one sync
        # per layer, not one per expert (each sync stalls this thread and may hand the GIL to others).
        # (Counted by searchsorted, not bincount: CUDA's bincount syncs twice itself, for its min and max.)
        sorted_experts, order = torch.sort(flat_experts, stable=True)
        bounds = torch.searchsorted(sorted_experts, torch.arange(self.num_routed + 1, device=x.device))
        counts = bounds.diff().tolist()
        # Every gather below is an index_select by a permutation and every sum runs over a fixed axis: no
        # atomics, forward or backward (tokens[order // top_k] would accumulate its gradient over repeated
        # indices), so results are reproducible; index_select's backward is a plain index_add, where
        # indexing's (index_put with accumulate) sorts on the CPU.
        slot_inputs = tokens.unsqueeze(1).expand(-1, self.top_k, -1).flatten(0, 1)
        grouped = slot_inputs.index_select(0, order).split(counts)
        outputs = [self.experts[e](chunk) for e, chunk in enumerate(grouped) if counts[e]]
        outputs = torch.cat(outputs) if outputs else slot_inputs[:0]  # [:0]: a batch of no tokens
        outputs = outputs * weights.flatten().index_select(0, order)[:, None].to(x.dtype)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        routed = outputs.index_select(0, inverse).view(tokens.shape[0], self.top_k, tokens.shape[1]).sum(dim=1)
        out = self.shared(tokens) + routed if self.shared is not None else routed
        return out.reshape_as(x), balance_loss
