"""Triton short conv: RMSNorm, causal dilated depthwise conv, SiLU and residual, forward and backward.

A program owns one (sequence, branch) and one residue class ``t % dilation``: every conv tap of a
time step lies in the same class, so walking the class in order keeps the last taps in registers and
reads each input row once. The kernel has ``TAPS`` (4) taps; shorter convs are zero-padded in front.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import programs_and_chunk, warp_choices

TAPS = 4
PROGRAMS = 1024  # enough to fill the GPU; each re-reads three rows before its chunk (and after, backward)


@triton.jit
def _load_row(ptr, batch, time, branch, seq_len, dim, cols, mask, HC: tl.constexpr):
    """One row of a ``[B, T, hc, D]`` tensor as float32; zeros outside ``0 <= time < seq_len``."""
    row = ((batch * seq_len + time) * HC + branch) * dim
    inside = (time >= 0) & (time < seq_len)
    return tl.load(ptr + row + cols, mask=tl.where(inside, mask, False), other=0.0).to(tl.float32)


@triton.jit
def _normalise(x, dim, eps):
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    return x * rstd, rstd


@triton.jit
def _normed_row(x_ptr, batch, time, branch, seq_len, dim, cols, mask, eps, HC: tl.constexpr):
    """RMS-normalised row (before the weight) and its rstd; zeros outside the sequence."""
    return _normalise(_load_row(x_ptr, batch, time, branch, seq_len, dim, cols, mask, HC), dim, eps)


@triton.jit
def _program_place(steps_per_program, dim, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence, branch, residue class, first step, and its columns."""
    batch = (tl.program_id(0) // HC).to(tl.int64)
    branch = tl.program_id(0) % HC
    cols = tl.arange(0, BLOCK_D)
    return batch, branch, tl.program_id(1), tl.program_id(2) * steps_per_program, cols, cols < dim


@triton.jit
def _branch_weights(norm_w_ptr, conv_w_ptr, branch, dim, cols, mask):
    """The branch's norm weight and its 4 conv taps (conv_w is [hc*D, 4]; tap 3 is the current step)."""
    norm_w = tl.load(norm_w_ptr + branch * dim + cols, mask=mask, other=0.0).to(tl.float32)
    taps = (branch * dim + cols) * 4
    w0 = tl.load(conv_w_ptr + taps + 0, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(conv_w_ptr + taps + 1, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(conv_w_ptr + taps + 2, mask=mask, other=0.0).to(tl.float32)
    w3 = tl.load(conv_w_ptr + taps + 3, mask=mask, other=0.0).to(tl.float32)
    return norm_w, w0, w1, w2, w3


@triton.autotune(configs=warp_choices(8, 4, 16), key=["dim"])
@triton.jit
def _short_conv_forward_kernel(x_ptr, norm_w_ptr, conv_w_ptr, out_ptr,
                               seq_len, dim, dilation, steps_per_program, eps,
                               HC: tl.constexpr, BLOCK_D: tl.constexpr):
    batch, branch, residue, first, cols, mask = _program_place(steps_per_program, dim, HC, BLOCK_D)
    norm_w, w0, w1, w2, w3 = _branch_weights(norm_w_ptr, conv_w_ptr, branch, dim, cols, mask)
    # Normed rows of the three steps before the first one (zeros before the sequence starts).
    x_hat, _ = _normed_row(x_ptr, batch, residue + (first - 3) * dilation, branch, seq_len, dim, cols, mask, eps, HC)
    n0 = x_hat * norm_w
    x_hat, _ = _normed_row(x_ptr, batch, residue + (first - 2) * dilation, branch, seq_len, dim, cols, mask, eps, HC)
    n1 = x_hat * norm_w
    x_hat, _ = _normed_row(x_ptr, batch, residue + (first - 1) * dilation, branch, seq_len, dim, cols, mask, eps, HC)
    n2 = x_hat * norm_w
    x_next = _load_row(x_ptr, batch, residue + first * dilation, branch, seq_len, dim, cols, mask, HC)
    for step in range(first, first + steps_per_program):
        time = residue + step * dilation
        x = x_next
        # Issue the next row's load before this row's reductions, so it is in flight meanwhile
        # (on the H200 this took the paper-shape forward from 0.81 to 0.50 ms).
        x_next = _load_row(x_ptr, batch, time + dilation, branch, seq_len, dim, cols, mask, HC)
        x_hat, _ = _normalise(x, dim, eps)
        n3 = x_hat * norm_w
        conv = w0 * n0 + w1 * n1 + w2 * n2 + w3 * n3
        out = x + conv / (1.0 + tl.exp(-conv))
        row = ((batch * seq_len + time) * HC + branch) * dim
        tl.store(out_ptr + row + cols, out.to(out_ptr.dtype.element_ty), mask=tl.where(time < seq_len, mask, False))
        n0, n1, n2 = n1, n2, n3


@triton.autotune(configs=warp_choices(8, 4, 16), key=["dim"])
@triton.jit
def _short_conv_backward_kernel(x_ptr, norm_w_ptr, conv_w_ptr, grad_out_ptr, grad_x_ptr,
                                norm_w_partial_ptr, conv_w_partial_ptr,
                                seq_len, dim, dilation, steps_per_program, eps,
                                HC: tl.constexpr, BLOCK_D: tl.constexpr):
    # Step j computes the conv's gradient at j from the normed rows j-3..j; row i = j-3 then has the
    # gradients of every output it feeds (i..i+3) and gets its input gradient. The walk runs three
    # steps past the chunk for that; only steps inside the chunk add to the conv-weight gradient.
    program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) \
        + tl.program_id(2)
    batch, branch, residue, first, cols, mask = _program_place(steps_per_program, dim, HC, BLOCK_D)
    norm_w, w0, w1, w2, w3 = _branch_weights(norm_w_ptr, conv_w_ptr, branch, dim, cols, mask)
    last = first + steps_per_program
    xh0, r0 = _normed_row(x_ptr, batch, residue + (first - 3) * dilation, branch, seq_len, dim, cols, mask, eps, HC)
    xh1, r1 = _normed_row(x_ptr, batch, residue + (first - 2) * dilation, branch, seq_len, dim, cols, mask, eps, HC)
    xh2, r2 = _normed_row(x_ptr, batch, residue + (first - 1) * dilation, branch, seq_len, dim, cols, mask, eps, HC)
    # Conv-output gradients of steps j-3..j-1 (none before the chunk: rows there are not ours).
    g0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    g1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    g2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    cw0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    cw1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    cw2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    cw3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    norm_w_grad = tl.zeros([BLOCK_D], dtype=tl.float32)
    for step in range(first, last + 3):
        time = residue + step * dilation
        in_chunk = (step < last).to(tl.float32)
        xh3, r3 = _normed_row(x_ptr, batch, time, branch, seq_len, dim, cols, mask, eps, HC)
        conv = (w0 * xh0 + w1 * xh1 + w2 * xh2 + w3 * xh3) * norm_w
        sig = 1.0 / (1.0 + tl.exp(-conv))
        grad_out = _load_row(grad_out_ptr, batch, time, branch, seq_len, dim, cols, mask, HC)
        g3 = grad_out * sig * (1.0 + conv * (1.0 - sig))
        owned_g3 = g3 * in_chunk
        cw0 += owned_g3 * xh0
        cw1 += owned_g3 * xh1
        cw2 += owned_g3 * xh2
        cw3 += owned_g3 * xh3
        # Row i = step - 3 feeds outputs i..i+3 through taps 3..0.
        row_time = time - 3 * dilation
        grad_normed = w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3
        row_owned = (step >= first + 3) & (row_time < seq_len)
        norm_w_grad += grad_normed * xh0 * row_owned.to(tl.float32)
        grad_x_hat = grad_normed * norm_w
        grad_x = r0 * (grad_x_hat - xh0 * (tl.sum(grad_x_hat * xh0, axis=0) / dim))
        grad_x += _load_row(grad_out_ptr, batch, row_time, branch, seq_len, dim, cols, mask, HC)
        row = ((batch * seq_len + row_time) * HC + branch) * dim
        tl.store(grad_x_ptr + row + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tl.where(row_owned, mask, False))
        xh0, xh1, xh2, r0, r1, r2 = xh1, xh2, xh3, r1, r2, r3
        g0, g1, g2 = g1, g2, g3
    partial = program.to(tl.int64) * dim + cols
    tl.store(norm_w_partial_ptr + partial, norm_w_grad, mask=mask)
    conv_partial = partial * 4
    tl.store(conv_w_partial_ptr + conv_partial + 0, cw0 * norm_w, mask=mask)
    tl.store(conv_w_partial_ptr + conv_partial + 1, cw1 * norm_w, mask=mask)
    tl.store(conv_w_partial_ptr + conv_partial + 2, cw2 * norm_w, mask=mask)
    tl.store(conv_w_partial_ptr + conv_partial + 3, cw3 * norm_w, mask=mask)


def _launch(value: torch.Tensor, dilation: int) -> tuple[tuple[int, int, int], int, dict]:
    """Grid (sequence*branch, residue, chunk), steps per chunk, and the compile-time arguments."""
    batch, seq_len, hc, dim = value.shape
    steps = -(-seq_len // dilation)
    chunks, steps_per_program = programs_and_chunk(steps, max(1, PROGRAMS // (batch * hc * dilation)))
    meta = dict(HC=hc, BLOCK_D=triton.next_power_of_2(dim))
    return (batch * hc, dilation, chunks), steps_per_program, meta


def _padded_taps(conv_w: torch.Tensor) -> torch.Tensor:
    kernel = conv_w.shape[-1]
    if kernel > TAPS:
        raise ValueError(f"conv_w: the Triton short conv supports up to {TAPS} taps, got {kernel}")
    return F.pad(conv_w.reshape(conv_w.shape[0], kernel), (TAPS - kernel, 0)).contiguous()


class ShortConv(torch.autograd.Function):
    """Differentiable Triton short conv; gradients for the value, the norm weight and the conv weight."""

    @staticmethod
    def forward(ctx, value, norm_w, conv_w, dilation, eps=1e-5):
        value, norm_w, taps = value.contiguous(), norm_w.contiguous(), _padded_taps(conv_w)
        ctx.dilation, ctx.eps, ctx.conv_shape, ctx.conv_dtype = dilation, eps, conv_w.shape, conv_w.dtype
        out = torch.empty_like(value)
        if value.numel():
            grid, steps_per_program, meta = _launch(value, dilation)
            _short_conv_forward_kernel[grid](value, norm_w, taps, out, value.shape[1], value.shape[3],
                                             dilation, steps_per_program, eps, **meta)
        ctx.save_for_backward(value, norm_w, taps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, norm_w, taps = ctx.saved_tensors
        grad_value = torch.empty_like(value)
        grad_norm_w = torch.zeros_like(norm_w, dtype=torch.float32)
        grad_taps = torch.zeros_like(taps, dtype=torch.float32)
        if value.numel():
            grid, steps_per_program, meta = _launch(value, ctx.dilation)
            programs = grid[0] * grid[1] * grid[2]
            hc, dim = value.shape[2], value.shape[3]
            norm_partial = torch.empty(programs, dim, dtype=torch.float32, device=value.device)
            taps_partial = torch.empty(programs, dim, TAPS, dtype=torch.float32, device=value.device)
            _short_conv_backward_kernel[grid](value, norm_w, taps, grad_out.contiguous(), grad_value,
                                              norm_partial, taps_partial, value.shape[1], dim,
                                              ctx.dilation, steps_per_program, ctx.eps, **meta)
            # Programs are numbered (batch, branch, residue, chunk); group the partials by branch.
            grad_norm_w = norm_partial.reshape(-1, hc, grid[1] * grid[2], dim).sum((0, 2))
            grad_taps = taps_partial.reshape(-1, hc, grid[1] * grid[2], dim, TAPS).sum((0, 2))
        kernel = ctx.conv_shape[-1]
        grad_conv_w = grad_taps.reshape(-1, TAPS)[:, TAPS - kernel:].reshape(ctx.conv_shape)
        return grad_value, grad_norm_w.to(norm_w.dtype), grad_conv_w.to(ctx.conv_dtype), None, None
