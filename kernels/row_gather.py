"""Row gather: unique table rows plus an inverse index -> each token's concatenated head rows.

``gather_rows`` and ``scatter_row_grads`` (its backward on its own) check their inputs and run the
Triton kernels of ``row_gather_triton`` or the references here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.dispatch import check, use_triton


class RowSegments(NamedTuple):
    """The inverse index grouped by row (CSR): entries ``order[offsets[u]:offsets[u+1]]`` use row ``u``.

    Within a row the entries keep their index order, so a sum over a segment is the same on every
    run. Row addresses are known before the forward pass, so a caller can build these ahead
    (``row_segments`` on a side stream) and spare the backward its sort.
    """

    order: torch.Tensor  # [N*H] int32: flat entry positions, sorted by row
    offsets: torch.Tensor  # [num_rows + 1] int32


def row_segments(inverse: torch.Tensor, num_rows: int) -> RowSegments:
    """Group the flat entries of ``inverse`` (indices into ``num_rows`` rows) by row, in int32 (half the
    bytes of int64 for the backward to read; a batch's 2^31 entries would take more memory than a GPU has)."""
    flat = inverse.reshape(-1)
    if max(flat.numel(), num_rows) >= 2**31:
        raise ValueError(f"inverse: row segments index entries and rows in int32, got {flat.numel()} entries "
                         f"of {num_rows} rows")
    sorted_rows, order = torch.sort(flat.to(torch.int32), stable=True)
    bounds = torch.arange(num_rows + 1, dtype=torch.int32, device=flat.device)
    return RowSegments(order.to(torch.int32), torch.searchsorted(sorted_rows, bounds, out_int32=True))


def gather_rows_reference(
    unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype, segments: RowSegments | None = None
) -> torch.Tensor:
    """``unique_rows [U, d]``, ``inverse [N, H]`` (indices into U) -> ``[N, H*d]`` in ``out_dtype``.

    ``segments`` (unused here) is the Triton path's precomputed backward grouping.
    """
    return unique_rows[inverse].flatten(-2).to(out_dtype)


def scatter_row_grads_reference(
    grad_embeddings: torch.Tensor, inverse: torch.Tensor, num_rows: int, segments: RowSegments | None = None
) -> torch.Tensor:
    """``grad_embeddings [N, H*d]`` summed into float32 unique-row gradients ``[num_rows, d]``."""
    dim = grad_embeddings.shape[-1] // inverse.shape[-1]
    row_grads = torch.zeros(num_rows, dim, dtype=torch.float32, device=grad_embeddings.device)
    return row_grads.index_add_(0, inverse.reshape(-1), grad_embeddings.reshape(-1, dim).float())


def _check_index(inverse: torch.Tensor, field: str) -> None:
    check(not inverse.is_floating_point() and not inverse.is_complex() and inverse.dtype != torch.bool,
          field, f"expected an integer index tensor, got {inverse.dtype}")
    check(inverse.dim() >= 1, field, "expected shape [..., H]")


def _check_segments(segments: RowSegments | None, inverse: torch.Tensor, num_rows: int) -> None:
    if segments is None:
        return
    check(isinstance(segments, RowSegments), "segments", f"expected RowSegments, got {type(segments).__name__}")
    check(segments.order.shape == (inverse.numel(),) and segments.offsets.shape == (num_rows + 1,), "segments",
          f"expected order [{inverse.numel()}] and offsets [{num_rows + 1}], got {list(segments.order.shape)} and "
          f"{list(segments.offsets.shape)}: build them with row_segments(inverse, num_rows)")
    check(segments.order.dtype == segments.offsets.dtype == torch.int32, "segments",
          f"expected int32 order and offsets, got {segments.order.dtype} and {segments.offsets.dtype}: build them "
          "with row_segments(inverse, num_rows)")


def gather_rows(unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype,
                segments: RowSegments | None = None) -> torch.Tensor:
    """``unique_rows [U, d]``, ``inverse [N, H]`` -> ``[N, H*d]`` in ``out_dtype``; differentiable.

    ``segments``: ``row_segments(inverse, U)`` built ahead, which makes the backward a sort-free,
    reproducible segment sum.
    """
    check(unique_rows.dim() == 2, "unique_rows", f"expected shape [U, d], got {list(unique_rows.shape)}")
    _check_index(inverse, "inverse")
    _check_segments(segments, inverse, unique_rows.shape[0])
    if use_triton(unique_rows):
        from kernels.row_gather_triton import GatherRows  # Triton is imported only when a Triton path runs

        return GatherRows.apply(unique_rows, inverse, out_dtype, segments)
    return gather_rows_reference(unique_rows, inverse, out_dtype, segments)


def scatter_row_grads(grad_embeddings: torch.Tensor, inverse: torch.Tensor, num_rows: int,
                      segments: RowSegments | None = None) -> torch.Tensor:
    """Gradient of ``gather_rows``' output -> float32 unique-row gradients ``[num_rows, d]``."""
    _check_index(inverse, "inverse")
    check(grad_embeddings.shape[:-1] == inverse.shape[:-1] and grad_embeddings.shape[-1] % inverse.shape[-1] == 0,
          "grad_embeddings", f"shape {list(grad_embeddings.shape)} does not match inverse {list(inverse.shape)}")
    _check_segments(segments, inverse, num_rows)
    if use_triton(grad_embeddings):
        from kernels.row_gather_triton import scatter_row_grads_triton

        return scatter_row_grads_triton(grad_embeddings, inverse, num_rows, segments)
    return scatter_row_grads_reference(grad_embeddings, inverse, num_rows, segments)
