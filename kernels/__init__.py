"""Fused GPU kernels for the Engram branch, each beside a plain-PyTorch reference of the same signature.

``gather_rows``, ``engram_gate`` and ``short_conv`` run the Triton autograd Functions on CUDA tensors
and the references elsewhere; ``ENGRAM_KERNELS=triton|reference|auto`` forces a path (``triton`` on
CPU tensors needs ``TRITON_INTERPRET=1``). Triton itself is imported only when a Triton path runs.

Float32 gradients for bfloat16 rows: autograd hands a leaf its gradient in the leaf's dtype, so a
caller holding bf16 unique rows gathers them without grad, marks the result as the leaf
(``emb = gather_rows(rows, inverse, dtype).requires_grad_()``) and after backward calls
``scatter_row_grads(emb.grad, inverse, len(rows))``: float32 ``[U, d]``, no float32 copy of the rows.

The row-gradient sum is fastest given the entries grouped by row: pass ``segments=row_segments(
inverse, len(rows))``, built ahead (row addresses are known before the forward pass) on a side stream.
"""
from __future__ import annotations

import importlib

import torch

from kernels.dispatch import use_triton
from kernels.engram_gate import engram_gate_reference
from kernels.row_gather import RowSegments, gather_rows_reference, row_segments, scatter_row_grads_reference
from kernels.short_conv import short_conv_reference

# Public name -> module that defines it; loaded on first use so that importing ``kernels`` never
# imports Triton (TRITON_INTERPRET must be decided before the kernels are compiled).
_TRITON_EXPORTS = {
    "GatherRows": "kernels.row_gather_triton",
    "scatter_row_grads_triton": "kernels.row_gather_triton",
    "EngramGate": "kernels.engram_gate_triton",
    "ShortConv": "kernels.short_conv_triton",
}


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        return getattr(importlib.import_module(_TRITON_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def _check_index(inverse: torch.Tensor, field: str) -> None:
    _check(not inverse.is_floating_point() and not inverse.is_complex() and inverse.dtype != torch.bool,
           field, f"expected an integer index tensor, got {inverse.dtype}")
    _check(inverse.dim() >= 1, field, "expected shape [..., H]")


def _check_segments(segments: RowSegments | None, inverse: torch.Tensor, num_rows: int) -> None:
    if segments is None:
        return
    _check(isinstance(segments, RowSegments), "segments", f"expected RowSegments, got {type(segments).__name__}")
    _check(segments.order.shape == (inverse.numel(),) and segments.offsets.shape == (num_rows + 1,), "segments",
           f"expected order [{inverse.numel()}] and offsets [{num_rows + 1}], got "
           f"{list(segments.order.shape)} and {list(segments.offsets.shape)}: build them with row_segments(inverse, num_rows)")
    _check(segments.order.dtype == segments.offsets.dtype == torch.int32, "segments",
           f"expected int32 order and offsets, got {segments.order.dtype} and {segments.offsets.dtype}: build them "
           "with row_segments(inverse, num_rows)")


def gather_rows(unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype,
                segments: RowSegments | None = None) -> torch.Tensor:
    """``unique_rows [U, d]``, ``inverse [N, H]`` -> ``[N, H*d]`` in ``out_dtype``; differentiable.

    ``segments``: ``row_segments(inverse, U)`` built ahead, which makes the backward a sort-free,
    reproducible segment sum.
    """
    _check(unique_rows.dim() == 2, "unique_rows", f"expected shape [U, d], got {list(unique_rows.shape)}")
    _check_index(inverse, "inverse")
    _check_segments(segments, inverse, unique_rows.shape[0])
    if use_triton(unique_rows):
        return __getattr__("GatherRows").apply(unique_rows, inverse, out_dtype, segments)
    return gather_rows_reference(unique_rows, inverse, out_dtype, segments)


def scatter_row_grads(grad_embeddings: torch.Tensor, inverse: torch.Tensor, num_rows: int,
                      segments: RowSegments | None = None) -> torch.Tensor:
    """Gradient of ``gather_rows``' output -> float32 unique-row gradients ``[num_rows, d]``."""
    _check_index(inverse, "inverse")
    _check(grad_embeddings.shape[:-1] == inverse.shape[:-1] and grad_embeddings.shape[-1] % inverse.shape[-1] == 0,
           "grad_embeddings", f"shape {list(grad_embeddings.shape)} does not match inverse {list(inverse.shape)}")
    _check_segments(segments, inverse, num_rows)
    if use_triton(grad_embeddings):
        return __getattr__("scatter_row_grads_triton")(grad_embeddings, inverse, num_rows, segments)
    return scatter_row_grads_reference(grad_embeddings, inverse, num_rows, segments)


def engram_gate(
    key: torch.Tensor,
    hidden: torch.Tensor,
    value: torch.Tensor,
    key_norm_w: torch.Tensor,
    hidden_norm_w: torch.Tensor,
    eps: float | None = None,
) -> torch.Tensor:
    """Context-aware gate ``[N, hc, D]`` (see ``engram_gate_reference``); differentiable."""
    _check(key.dim() == 3, "key", f"expected shape [N, hc, D], got {list(key.shape)}")
    _check(hidden.shape == key.shape, "hidden", f"expected shape {list(key.shape)}, got {list(hidden.shape)}")
    _check(value.shape == (key.shape[0], key.shape[2]), "value",
           f"expected shape {[key.shape[0], key.shape[2]]}, got {list(value.shape)}")
    for name, weight in (("key_norm_w", key_norm_w), ("hidden_norm_w", hidden_norm_w)):
        _check(weight.shape == key.shape[1:], name, f"expected shape {list(key.shape[1:])}, got {list(weight.shape)}")
    if use_triton(key, hidden, value):
        return __getattr__("EngramGate").apply(key, hidden, value, key_norm_w, hidden_norm_w, eps)
    return engram_gate_reference(key, hidden, value, key_norm_w, hidden_norm_w, eps)


def short_conv(
    value: torch.Tensor, norm_w: torch.Tensor, conv_w: torch.Tensor, dilation: int, eps: float = 1e-5
) -> torch.Tensor:
    """Short conv with residual ``[B, T, hc, D]`` (see ``short_conv_reference``); differentiable."""
    _check(value.dim() == 4, "value", f"expected shape [B, T, hc, D], got {list(value.shape)}")
    hc, dim = value.shape[2:]
    _check(norm_w.shape == (hc, dim), "norm_w", f"expected shape {[hc, dim]}, got {list(norm_w.shape)}")
    _check(conv_w.dim() >= 2 and conv_w.shape[0] == hc * dim and conv_w[0].numel() == conv_w.shape[-1],
           "conv_w", f"expected shape [{hc * dim}, kernel], got {list(conv_w.shape)}")
    _check(int(dilation) == dilation and dilation >= 1, "dilation", f"expected a positive integer, got {dilation}")
    if use_triton(value):
        return __getattr__("ShortConv").apply(value, norm_w, conv_w, int(dilation), eps)
    return short_conv_reference(value, norm_w, conv_w, dilation, eps)


__all__ = [
    "gather_rows", "engram_gate", "short_conv", "scatter_row_grads", "RowSegments", "row_segments",
    "gather_rows_reference", "engram_gate_reference", "short_conv_reference", "scatter_row_grads_reference",
    "GatherRows", "EngramGate", "ShortConv", "use_triton",
]
