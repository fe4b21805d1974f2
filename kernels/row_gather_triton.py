"""Triton row gather: forward copies rows by inverse index, backward scatter-adds float32 row gradients."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ENTRIES_PER_PROGRAM = 16


@triton.jit
def _entry_tile(inverse_ptr, n_entries, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (token, head) entries: their flat offsets, their unique-row offsets, the mask."""
    entries = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    entry_ok = entries < n_entries
    row = tl.load(inverse_ptr + entries, mask=entry_ok, other=0).to(tl.int64)
    mask = entry_ok[:, None] & (cols[None, :] < dim)
    return entries[:, None].to(tl.int64) * dim + cols[None, :], row[:, None] * dim + cols[None, :], mask


@triton.jit
def _gather_kernel(rows_ptr, inverse_ptr, out_ptr, n_entries, dim,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    entry_offsets, row_offsets, mask = _entry_tile(inverse_ptr, n_entries, dim, BLOCK_R, BLOCK_D)
    rows = tl.load(rows_ptr + row_offsets, mask=mask)
    tl.store(out_ptr + entry_offsets, rows.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_add_kernel(grad_ptr, inverse_ptr, row_grads_ptr, n_entries, dim,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    entry_offsets, row_offsets, mask = _entry_tile(inverse_ptr, n_entries, dim, BLOCK_R, BLOCK_D)
    grads = tl.load(grad_ptr + entry_offsets, mask=mask).to(tl.float32)
    tl.atomic_add(row_grads_ptr + row_offsets, grads, mask=mask, sem="relaxed")


@triton.jit
def _segment_sum_kernel(grad_ptr, order_ptr, starts_ptr, row_grads_ptr, dim, BLOCK_D: tl.constexpr):
    # One program per unique row sums its entries in index order: the same bits on every run.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(tl.load(starts_ptr + row), tl.load(starts_ptr + row + 1)):
        entry = tl.load(order_ptr + i).to(tl.int64)
        total += tl.load(grad_ptr + entry * dim + cols, mask=mask).to(tl.float32)
    tl.store(row_grads_ptr + row * dim + cols, total, mask=mask)


def gather_rows_triton(unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Forward only: ``[U, d]`` rows at ``inverse [..., H]`` -> ``[..., H*d]`` in ``out_dtype``."""
    unique_rows, flat_inverse = unique_rows.contiguous(), inverse.reshape(-1).contiguous()
    n_entries, dim = flat_inverse.numel(), unique_rows.shape[1]
    out = torch.empty(n_entries, dim, dtype=out_dtype, device=unique_rows.device)
    if n_entries:
        grid = (triton.cdiv(n_entries, ENTRIES_PER_PROGRAM),)
        _gather_kernel[grid](unique_rows, flat_inverse, out, n_entries, dim,
                             BLOCK_R=ENTRIES_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(dim))
    return out.reshape(*inverse.shape[:-1], inverse.shape[-1] * dim)


def scatter_row_grads_triton(grad_embeddings: torch.Tensor, inverse: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``grad [..., H*d]`` -> float32 ``[num_rows, d]``; bitwise reproducible under deterministic mode."""
    flat_inverse = inverse.reshape(-1).contiguous()
    n_entries = flat_inverse.numel()
    dim = grad_embeddings.shape[-1] // inverse.shape[-1]
    grads = grad_embeddings.contiguous()
    block_d = triton.next_power_of_2(dim)
    if torch.are_deterministic_algorithms_enabled():
        row_grads = torch.empty(num_rows, dim, dtype=torch.float32, device=grads.device)
        order = torch.argsort(flat_inverse, stable=True)
        starts = torch.zeros(num_rows + 1, dtype=torch.int64, device=grads.device)
        torch.cumsum(torch.bincount(flat_inverse, minlength=num_rows), 0, out=starts[1:])
        if num_rows:
            _segment_sum_kernel[(num_rows,)](grads, order, starts, row_grads, dim, BLOCK_D=block_d)
        return row_grads
    row_grads = torch.zeros(num_rows, dim, dtype=torch.float32, device=grads.device)
    if n_entries:
        grid = (triton.cdiv(n_entries, ENTRIES_PER_PROGRAM),)
        _scatter_add_kernel[grid](grads, flat_inverse, row_grads, n_entries, dim,
                                  BLOCK_R=ENTRIES_PER_PROGRAM, BLOCK_D=block_d)
    return row_grads


class GatherRows(torch.autograd.Function):
    """Differentiable Triton row gather; the rows' gradient is computed in float32."""

    @staticmethod
    def forward(ctx, unique_rows, inverse, out_dtype):
        ctx.save_for_backward(inverse)
        ctx.num_rows = unique_rows.shape[0]
        return gather_rows_triton(unique_rows, inverse, out_dtype)

    @staticmethod
    def backward(ctx, grad_embeddings):
        (inverse,) = ctx.saved_tensors
        return scatter_row_grads_triton(grad_embeddings, inverse, ctx.num_rows), None, None
