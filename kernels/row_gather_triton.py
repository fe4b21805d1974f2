"""Triton row gather: forward copies rows by inverse index, backward sums float32 row gradients.

The backward has two forms. Given the entries grouped by row (``RowSegments``, built ahead by the
caller or here under deterministic mode), each program sums whole rows' segments: no atomics, no
zero fill, and the same bits on every run. Without them it scatter-adds with float32 atomics, which
needs no sort but is bound by the atomic units and not reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import config_choices, graph_timed, written_in_full
from kernels.row_gather import RowSegments, row_segments

# Rows are short (64-80 values), so a program takes several (token, head) entries. These kernels run
# for ~20 us, less than it takes the host to launch them, so they are tuned on CUDA-graph replays.
_ENTRY_TILES = config_choices(dict(BLOCK_R=16, num_warps=4), dict(BLOCK_R=32, num_warps=4),
                              dict(BLOCK_R=64, num_warps=8), dict(BLOCK_R=8, num_warps=2))
# Segment sums: rows per program (a row is used ~4 times in a training batch, so most rows finish in two
# or three rounds of two entries). The kernel is bound by the latency of its dependent loads (offsets,
# then order, then gradients), so the smaller tiles (fewer registers, more programs an SM) are there to
# keep more of them in flight.
_SEGMENT_TILES = config_choices(dict(BLOCK_U=8, num_warps=4), dict(BLOCK_U=8, num_warps=2),
                                dict(BLOCK_U=16, num_warps=4), dict(BLOCK_U=16, num_warps=8),
                                dict(BLOCK_U=32, num_warps=4), dict(BLOCK_U=32, num_warps=8),
                                dict(BLOCK_U=64, num_warps=8), dict(BLOCK_U=4, num_warps=2))


@triton.jit
def _entry_tile(inverse_ptr, n_entries, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (token, head) entries: their flat offsets, their unique-row offsets, the mask."""
    entries = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    entry_ok = entries < n_entries
    row = tl.load(inverse_ptr + entries, mask=entry_ok, other=0).to(tl.int64)
    mask = entry_ok[:, None] & (cols[None, :] < dim)
    return entries[:, None].to(tl.int64) * dim + cols[None, :], row[:, None] * dim + cols[None, :], mask


@triton.autotune(configs=_ENTRY_TILES, key=["dim"], do_bench=graph_timed)
@triton.jit
def _gather_kernel(rows_ptr, inverse_ptr, out_ptr, n_entries, dim,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    entry_offsets, row_offsets, mask = _entry_tile(inverse_ptr, n_entries, dim, BLOCK_R, BLOCK_D)
    rows = tl.load(rows_ptr + row_offsets, mask=mask)
    tl.store(out_ptr + entry_offsets, rows.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_ENTRY_TILES, key=["dim"], do_bench=graph_timed, reset_to_zero=["row_grads_ptr"])
@triton.jit
def _scatter_add_kernel(grad_ptr, inverse_ptr, row_grads_ptr, n_entries, dim,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    entry_offsets, row_offsets, mask = _entry_tile(inverse_ptr, n_entries, dim, BLOCK_R, BLOCK_D)
    grads = tl.load(grad_ptr + entry_offsets, mask=mask).to(tl.float32)
    tl.atomic_add(row_grads_ptr + row_offsets, grads, mask=mask, sem="relaxed")


@triton.autotune(configs=_SEGMENT_TILES, key=["dim"], do_bench=graph_timed)
@triton.jit
def _segment_sum_kernel(grad_ptr, order_ptr, offsets_ptr, row_grads_ptr, num_rows, dim,
                        BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    # BLOCK_U rows side by side; each round loads the next two entries of every row as one [U, 2, D] tile
    # and adds their sum. Entries are summed in index order, a pair at a time (a + b has the same bits
    # as b + a): every run, and every tile choice, gives the same bits.
    rows = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    cols = tl.arange(0, BLOCK_D)
    pair = tl.arange(0, 2)
    row_ok = rows < num_rows
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    count = tl.load(offsets_ptr + rows + 1, mask=row_ok, other=0) - start
    col_ok = cols[None, None, :] < dim
    total = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
    for first in range(0, tl.max(count, axis=0), 2):
        live = (first + pair[None, :]) < count[:, None]
        entry = tl.load(order_ptr + start[:, None] + first + pair[None, :], mask=live, other=0).to(tl.int64)
        grads = tl.load(grad_ptr + entry[:, :, None] * dim + cols[None, None, :], mask=live[:, :, None] & col_ok,
                        other=0.0)
        total += tl.sum(grads.to(tl.float32), axis=1)
    tl.store(row_grads_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :], total,
             mask=row_ok[:, None] & (cols[None, :] < dim))


def gather_rows_triton(unique_rows: torch.Tensor, inverse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Forward only: ``[U, d]`` rows at ``inverse [..., H]`` -> ``[..., H*d]`` in ``out_dtype``."""
    unique_rows, flat_inverse = unique_rows.contiguous(), inverse.reshape(-1).contiguous()
    n_entries, dim = flat_inverse.numel(), unique_rows.shape[1]
    with written_in_full():
        out = torch.empty(n_entries, dim, dtype=out_dtype, device=unique_rows.device)
    if n_entries:
        grid = lambda meta: (triton.cdiv(n_entries, meta["BLOCK_R"]),)  # noqa: E731
        _gather_kernel[grid](unique_rows, flat_inverse, out, n_entries, dim, BLOCK_D=triton.next_power_of_2(dim))
    return out.reshape(*inverse.shape[:-1], inverse.shape[-1] * dim)


def scatter_row_grads_triton(grad_embeddings: torch.Tensor, inverse: torch.Tensor, num_rows: int,
                             segments: RowSegments | None = None) -> torch.Tensor:
    """``grad [..., H*d]`` -> float32 ``[num_rows, d]``: segment sums when ``segments`` is given or
    deterministic algorithms are on (bitwise reproducible), float32 atomics otherwise."""
    flat_inverse = inverse.reshape(-1).contiguous()
    dim = grad_embeddings.shape[-1] // inverse.shape[-1]
    grads = grad_embeddings.contiguous()
    block_d = triton.next_power_of_2(dim)
    if segments is None and torch.are_deterministic_algorithms_enabled():
        segments = row_segments(flat_inverse, num_rows)
    if segments is not None:
        with written_in_full():
            row_grads = torch.empty(num_rows, dim, dtype=torch.float32, device=grads.device)
        if num_rows:
            grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_U"]),)  # noqa: E731
            _segment_sum_kernel[grid](grads, segments.order, segments.offsets, row_grads, num_rows, dim,
                                      BLOCK_D=block_d)
        return row_grads
    row_grads = torch.zeros(num_rows, dim, dtype=torch.float32, device=grads.device)
    n_entries = flat_inverse.numel()
    if n_entries:
        grid = lambda meta: (triton.cdiv(n_entries, meta["BLOCK_R"]),)  # noqa: E731
        _scatter_add_kernel[grid](grads, flat_inverse, row_grads, n_entries, dim, BLOCK_D=block_d)
    return row_grads


class GatherRows(torch.autograd.Function):
    """Differentiable Triton row gather; the rows' gradient is computed in float32."""

    @staticmethod
    def forward(ctx, unique_rows, inverse, out_dtype, segments=None):
        ctx.save_for_backward(inverse, *(segments or ()))
        ctx.num_rows = unique_rows.shape[0]
        return gather_rows_triton(unique_rows, inverse, out_dtype)

    @staticmethod
    def backward(ctx, grad_embeddings):
        inverse, *segments = ctx.saved_tensors
        segments = RowSegments(*segments) if segments else None
        return scatter_row_grads_triton(grad_embeddings, inverse, ctx.num_rows, segments), None, None, None
