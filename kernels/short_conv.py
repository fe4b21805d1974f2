"""Short conv: per-branch RMSNorm, causal dilated depthwise conv, SiLU, plus the residual.

``short_conv`` checks its inputs and runs the Triton kernels of ``short_conv_triton`` or the
reference here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import check, use_triton


def short_conv_reference(value: torch.Tensor, norm_w: torch.Tensor, conv_w: torch.Tensor, dilation: int,
                         eps: float = 1e-5) -> torch.Tensor:
    """``value [B, T, hc, D]``, ``norm_w [hc, D]``, ``conv_w [hc*D, kernel]`` -> ``[B, T, hc, D]``.

    ``value + SiLU(conv(rms(value[:, :, g]) * norm_w[g] for each branch g))`` where the conv is
    depthwise and causal: ``out[t] = sum_k w[k] * x[t - (kernel-1-k) * dilation]``.
    """
    out_dtype = value.dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, seq, hc, dim = value.shape
    x = value.to(compute)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w.to(compute)
    kernel = conv_w.shape[-1]
    channels_first = normed.reshape(batch, seq, hc * dim).transpose(1, 2)
    padded = F.pad(channels_first, ((kernel - 1) * dilation, 0))
    conv = F.conv1d(padded, conv_w.to(compute).reshape(hc * dim, 1, kernel), dilation=dilation, groups=hc * dim)
    mixed = F.silu(conv).transpose(1, 2).reshape(batch, seq, hc, dim)
    return (x + mixed).to(out_dtype)


def short_conv(value: torch.Tensor, norm_w: torch.Tensor, conv_w: torch.Tensor, dilation: int,
               eps: float = 1e-5) -> torch.Tensor:
    """The short conv with residual ``[B, T, hc, D]`` of ``short_conv_reference``; differentiable."""
    check(value.dim() == 4, "value", f"expected shape [B, T, hc, D], got {list(value.shape)}")
    hc, dim = value.shape[2:]
    check(norm_w.shape == (hc, dim), "norm_w", f"expected shape {[hc, dim]}, got {list(norm_w.shape)}")
    check(conv_w.dim() >= 2 and conv_w.shape[0] == hc * dim and conv_w[0].numel() == conv_w.shape[-1],
          "conv_w", f"expected shape [{hc * dim}, kernel], got {list(conv_w.shape)}")
    check(int(dilation) == dilation and dilation >= 1, "dilation", f"expected a positive integer, got {dilation}")
    if use_triton(value):
        from kernels.short_conv_triton import ShortConv  # Triton is imported only when a Triton path runs

        return ShortConv.apply(value, norm_w, conv_w, int(dilation), eps)
    return short_conv_reference(value, norm_w, conv_w, dilation, eps)
