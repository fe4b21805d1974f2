"""Triton row gather: forward copies rows by inverse index, backward scatter-adds float32 row gradients."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows are short (64-80 values), so a program takes several. Fixed rather than autotuned: on the
# H200 autotuning these ~20 us kernels picked configurations up to 4x slower than this one.
ENTRIES_PER_PROGRAM = 16
ROWS_PER_SEGMENT_PROGRAM = 16


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
def _segment_sum_kernel(grad_ptr, order_ptr, starts_ptr, row_grads_ptr, num_rows, dim,
                        BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    # Each unique row sums its entries in index order: the same bits on every run. A program takes
    # BLOCK_U rows and walks their entry lists side by side.
    rows = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    start = tl.load(starts_ptr + rows, mask=row_ok, other=0)
    count = tl.load(starts_ptr + rows + 1, mask=row_ok, other=0) - start
    col_ok = cols[None, :] < dim
    total = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
    for i in range(0, tl.max(count, axis=0)):
        live = i < count
        entry = tl.load(order_ptr + start + i, mask=live, other=0).to(tl.int64)
        total += tl.load(grad_ptr + entry[:, None] * dim + cols[None, :], mask=live[:, None] & col_ok,
                         other=0.0).to(tl.float32)
    tl.store(row_grads_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :], total, mask=row_ok[:, None] & col_ok)


def gather_rows_triton(unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Forward only: ``[U, d]`` rows at ``inverse [..., H]`` -> ``[..., H*d]`` in ``out_dtype``."""
    unique_rows, flat_inverse = unique_rows.contiguous(), inverse.reshape(-1).contiguous()
    n_entries, dim = flat_inverse.numel(), unique_rows.shape[1]
    out = torch.empty(n_entries, dim, dtype=out_dtype, device=unique_rows.device)
    if n_entries:
        _gather_kernel[(triton.cdiv(n_entries, ENTRIES_PER_PROGRAM),)](
            unique_rows, flat_inverse, out, n_entries, dim,
            BLOCK_R=ENTRIES_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(dim), num_warps=4)
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
            grid = (triton.cdiv(num_rows, ROWS_PER_SEGMENT_PROGRAM),)
            _segment_sum_kernel[grid](grads, order, starts, row_grads, num_rows, dim,
                                      BLOCK_U=ROWS_PER_SEGMENT_PROGRAM, BLOCK_D=block_d)
        return row_grads
    row_grads = torch.zeros(num_rows, dim, dtype=torch.float32, device=grads.device)
    if n_entries:
        _scatter_add_kernel[(triton.cdiv(n_entries, ENTRIES_PER_PROGRAM),)](
            grads, flat_inverse, row_grads, n_entries, dim, BLOCK_R=ENTRIES_PER_PROGRAM, BLOCK_D=block_d, num_warps=4)
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
