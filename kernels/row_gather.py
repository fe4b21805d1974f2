"""Row gather: unique table rows plus an inverse index -> each token's concatenated head rows."""
from __future__ import annotations

import torch


def gather_rows_reference(
    unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``unique_rows [U, d]``, ``inverse [N, H]`` (indices into U) -> ``[N, H*d]`` in ``out_dtype``."""
    return unique_rows[inverse].flatten(-2).to(out_dtype)
