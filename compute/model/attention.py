"""Causal self-attention with rotary positions, on PyTorch's scaled-dot-product attention."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, head_dim // 2]`` for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of ``x [B, heads, T, head_dim]`` by position."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


@dataclasses.dataclass(frozen=True)
class CachePlacement:
    """Where one cached forward's ``T`` new tokens sit: each row continues from its own cached length."""

    positions: torch.Tensor  # [B, T] absolute positions: RoPE angles and KV-cache slots
    visible: torch.Tensor  # [B, 1, T, S] bool: query t sees cache slot s iff s <= its position
    real_tokens: torch.Tensor  # [B] each row's first real_tokens are real, the rest right padding

    @classmethod
    def after(cls, lengths: torch.Tensor, num_tokens: int, real_tokens: torch.Tensor) -> "CachePlacement":
        """Tokens appended to rows that already hold ``lengths [B]`` cached positions."""
        positions = lengths[:, None] + torch.arange(num_tokens, device=lengths.device)
        slots = torch.arange(int(positions.max()) + 1, device=lengths.device)
        return cls(positions, (slots <= positions[..., None]).unsqueeze(1), real_tokens)


class KVCache:
    """One attention layer's keys and values, preallocated ``[B, heads, capacity, head_dim]``."""

    def __init__(self, batch: int, num_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device=None):
        self.keys = torch.zeros(batch, num_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    def store(
        self, keys: torch.Tensor, values: torch.Tensor, placement: CachePlacement
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, heads, T, head_dim]`` at their positions; return all slots the queries may see."""
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
        self.keys[rows, :, placement.positions] = keys.transpose(1, 2)
        self.values[rows, :, placement.positions] = values.transpose(1, 2)
        visible_slots = placement.visible.shape[-1]
        return self.keys[:, :, :visible_slots], self.values[:, :, :visible_slots]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: ``[B, T, D] -> [B, T, D]``, over a KV cache when one is given."""

    def __init__(self, hidden_size: int, num_heads: int, max_seq_len: int, rope_theta: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        cos, sin = rotary_tables(max_seq_len, self.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, placement: CachePlacement | None = None
    ) -> torch.Tensor:
        """Without a cache, ``x`` is whole sequences from position 0; with one, tokens at ``placement``."""
        batch, seq, hidden = x.shape
        if (cache is None) != (placement is None):
            raise ValueError("placement: must be given exactly when a KV cache is")
        if seq > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len {self.rope_cos.shape[0]}")
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is None:
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:  # [B, 1, T, head_dim // 2]: every row at its own positions
            cos, sin = self.rope_cos[placement.positions].unsqueeze(1), self.rope_sin[placement.positions].unsqueeze(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.store(k, v, placement)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=placement.visible)
        return self.out(attended.transpose(1, 2).reshape(batch, seq, hidden))
