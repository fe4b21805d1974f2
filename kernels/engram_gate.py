"""Context-aware gate: per branch, how well a token's memory key agrees with its hidden state.

``engram_gate`` checks its inputs and runs the Triton kernels of ``engram_gate_triton`` or the
reference here.
"""
from __future__ import annotations

import math

import torch

from kernels.dispatch import check, use_triton


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def engram_gate_reference(key: torch.Tensor, hidden: torch.Tensor, value: torch.Tensor, key_norm_w: torch.Tensor,
                          hidden_norm_w: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``key, hidden [N, hc, D]``, ``value [N, D]``, norm weights ``[hc, D]`` -> ``[N, hc, D]``.

    ``s = <rms(key)*w_k, rms(hidden)*w_h> / sqrt(D)``; ``gate = sigmoid(sign(s) sqrt(max(|s|, 1e-6)))``;
    the output is ``gate * value``. Math runs in float32 (float64 stays float64); ``eps`` defaults to
    the input dtype's machine epsilon, as ``nn.RMSNorm`` does.
    """
    out_dtype = key.dtype
    eps = torch.finfo(out_dtype).eps if eps is None else eps
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    key, hidden, value = key.to(compute), hidden.to(compute), value.to(compute)
    dim = key.shape[-1]
    normed_key = _rms_norm(key, key_norm_w.to(compute), eps)
    normed_hidden = _rms_norm(hidden, hidden_norm_w.to(compute), eps)
    score = (normed_key * normed_hidden).sum(-1) / math.sqrt(dim)
    gate = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
    return (gate.unsqueeze(-1) * value.unsqueeze(-2)).to(out_dtype)


def engram_gate(key: torch.Tensor, hidden: torch.Tensor, value: torch.Tensor, key_norm_w: torch.Tensor,
                hidden_norm_w: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """The gate ``[N, hc, D]`` of ``engram_gate_reference``; differentiable."""
    check(key.dim() == 3, "key", f"expected shape [N, hc, D], got {list(key.shape)}")
    check(hidden.shape == key.shape, "hidden", f"expected shape {list(key.shape)}, got {list(hidden.shape)}")
    check(value.shape == (key.shape[0], key.shape[2]), "value",
          f"expected shape {[key.shape[0], key.shape[2]]}, got {list(value.shape)}")
    for name, weight in (("key_norm_w", key_norm_w), ("hidden_norm_w", hidden_norm_w)):
        check(weight.shape == key.shape[1:], name, f"expected shape {list(key.shape[1:])}, got {list(weight.shape)}")
    if use_triton(key, hidden, value):
        from kernels.engram_gate_triton import EngramGate  # Triton is imported only when a Triton path runs

        return EngramGate.apply(key, hidden, value, key_norm_w, hidden_norm_w, eps)
    return engram_gate_reference(key, hidden, value, key_norm_w, hidden_norm_w, eps)
