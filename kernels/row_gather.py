"""Row gather: unique table rows plus an inverse index -> each token's concatenated head rows."""
from __future__ import annotations

from typing import NamedTuple

import torch


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
