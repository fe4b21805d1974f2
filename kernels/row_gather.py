"""Row gather: unique table rows plus an inverse index -> each token's concatenated head rows."""
from __future__ import annotations

import torch


def gather_rows_reference(
    unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``unique_rows [U, d]``, ``inverse [N, H]`` (indices into U) -> ``[N, H*d]`` in ``out_dtype``."""
    return unique_rows[inverse].flatten(-2).to(out_dtype)


def scatter_row_grads_reference(
    grad_embeddings: torch.Tensor, inverse: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """``grad_embeddings [N, H*d]`` summed into float32 unique-row gradients ``[num_rows, d]``."""
    dim = grad_embeddings.shape[-1] // inverse.shape[-1]
    row_grads = torch.zeros(num_rows, dim, dtype=torch.float32, device=grad_embeddings.device)
    return row_grads.index_add_(0, inverse.reshape(-1), grad_embeddings.reshape(-1, dim).float())
