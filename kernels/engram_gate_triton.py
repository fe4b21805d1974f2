"""Triton context-aware gate: one pass over key, hidden and value forward, one pass back."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import programs_and_chunk, warp_choices

MIN_SCORE = 1e-6  # |score| is clamped here before its square root, as in the reference
# Programs, each a run of tokens of one branch: enough to fill the GPU, few enough that a run reuses
# its norm weights (and, backward, its row of weight-gradient partials) over many tokens.
FORWARD_PROGRAMS = 4096
BACKWARD_PROGRAMS = 1024


@triton.jit
def _branch_weights(key_w_ptr, hidden_w_ptr, branch, cols, mask, dim):
    key_w = tl.load(key_w_ptr + branch * dim + cols, mask=mask, other=0.0).to(tl.float32)
    hidden_w = tl.load(hidden_w_ptr + branch * dim + cols, mask=mask, other=0.0).to(tl.float32)
    return key_w, hidden_w


@triton.jit
def _branch_gate(key_ptr, hidden_ptr, key_w, hidden_w, row, cols, mask, dim, eps, inv_sqrt_dim,
                 MIN_SCORE: tl.constexpr):
    """One (token, branch) row: normalised key and hidden (before their weights), rstds, score, gate."""
    key = tl.load(key_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    hidden = tl.load(hidden_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    key_rstd = 1.0 / tl.sqrt(tl.sum(key * key, axis=0) / dim + eps)
    hidden_rstd = 1.0 / tl.sqrt(tl.sum(hidden * hidden, axis=0) / dim + eps)
    key_n, hidden_n = key * key_rstd, hidden * hidden_rstd
    score = tl.sum(key_n * key_w * hidden_n * hidden_w, axis=0) * inv_sqrt_dim
    magnitude = tl.sqrt(tl.maximum(tl.abs(score), MIN_SCORE))
    signed = tl.where(score > 0, magnitude, tl.where(score < 0, -magnitude, 0.0))
    gate = 1.0 / (1.0 + tl.exp(-signed))
    return key_n, hidden_n, key_rstd, hidden_rstd, score, gate


@triton.jit
def _token_run(n_tokens, tokens_per_program, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs are (run of tokens, branch), branch fastest: this one's branch, token range and columns."""
    program = tl.program_id(0)
    first = (program // HC).to(tl.int64) * tokens_per_program  # 64-bit offsets for the loop's rows
    return program % HC, first, tl.minimum(first + tokens_per_program, n_tokens), tl.arange(0, BLOCK_D)


@triton.autotune(configs=warp_choices(8, 4, 16), key=["dim"])
@triton.jit
def _gate_forward_kernel(key_ptr, hidden_ptr, value_ptr, key_w_ptr, hidden_w_ptr, out_ptr,
                         n_tokens, tokens_per_program, dim, eps, inv_sqrt_dim,
                         HC: tl.constexpr, BLOCK_D: tl.constexpr, MIN_SCORE: tl.constexpr):
    # A run of tokens per program, so the branch's norm weights are read once per run, not per row.
    branch, first, last, cols = _token_run(n_tokens, tokens_per_program, HC, BLOCK_D)
    mask = cols < dim
    key_w, hidden_w = _branch_weights(key_w_ptr, hidden_w_ptr, branch, cols, mask, dim)
    for token in range(first, last):
        row = token * HC + branch
        key_n, hidden_n, key_rstd, hidden_rstd, score, gate = _branch_gate(
            key_ptr, hidden_ptr, key_w, hidden_w, row, cols, mask, dim, eps, inv_sqrt_dim, MIN_SCORE)
        value = tl.load(value_ptr + token * dim + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (gate * value).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_backward(grad_normed, normed, rstd, dim):
    """Gradient through ``x * rstd(x)`` given the gradient of its output."""
    return rstd * (grad_normed - normed * (tl.sum(grad_normed * normed, axis=0) / dim))


@triton.autotune(configs=warp_choices(8, 4, 16), key=["dim"])
@triton.jit
def _gate_backward_kernel(key_ptr, hidden_ptr, value_ptr, key_w_ptr, hidden_w_ptr, grad_out_ptr,
                          grad_key_ptr, grad_hidden_ptr, gate_ptr, key_w_partial_ptr, hidden_w_partial_ptr,
                          n_tokens, tokens_per_program, dim, eps, inv_sqrt_dim,
                          HC: tl.constexpr, BLOCK_D: tl.constexpr, MIN_SCORE: tl.constexpr):
    # A program walks one branch over a run of tokens, keeping that branch's share of the norm-weight
    # gradients in registers; the host sums the per-program partials (no atomics). The gates go to
    # gate_ptr for the value gradient, which sums over branches.
    branch, first, last, cols = _token_run(n_tokens, tokens_per_program, HC, BLOCK_D)
    mask = cols < dim
    key_w, hidden_w = _branch_weights(key_w_ptr, hidden_w_ptr, branch, cols, mask, dim)
    key_w_grad = tl.zeros([BLOCK_D], dtype=tl.float32)
    hidden_w_grad = tl.zeros([BLOCK_D], dtype=tl.float32)
    for token in range(first, last):
        row = token * HC + branch
        key_n, hidden_n, key_rstd, hidden_rstd, score, gate = _branch_gate(
            key_ptr, hidden_ptr, key_w, hidden_w, row, cols, mask, dim, eps, inv_sqrt_dim, MIN_SCORE)
        grad_out = tl.load(grad_out_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(value_ptr + token * dim + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(gate_ptr + row, gate)
        grad_gate = tl.sum(grad_out * value, axis=0)
        # d sigmoid, then d(sign(s) sqrt(|s|))/ds = 1 / (2 sqrt|s|) above the clamp, 0 below it.
        grad_signed = grad_gate * gate * (1.0 - gate)
        abs_score = tl.abs(score)
        grad_score = tl.where(abs_score >= MIN_SCORE,
                              grad_signed * 0.5 / tl.sqrt(tl.maximum(abs_score, MIN_SCORE)), 0.0)
        grad_score = grad_score * inv_sqrt_dim
        grad_key_normed = grad_score * hidden_n * hidden_w  # gradient of rms(key) * key_w
        grad_hidden_normed = grad_score * key_n * key_w
        key_w_grad += grad_key_normed * key_n
        hidden_w_grad += grad_hidden_normed * hidden_n
        grad_key = _rms_backward(grad_key_normed * key_w, key_n, key_rstd, dim)
        grad_hidden = _rms_backward(grad_hidden_normed * hidden_w, hidden_n, hidden_rstd, dim)
        tl.store(grad_key_ptr + row * dim + cols, grad_key.to(grad_key_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_hidden_ptr + row * dim + cols, grad_hidden.to(grad_hidden_ptr.dtype.element_ty), mask=mask)
    partial = tl.program_id(0).to(tl.int64) * dim + cols  # partials are [runs, HC, D]
    tl.store(key_w_partial_ptr + partial, key_w_grad, mask=mask)
    tl.store(hidden_w_partial_ptr + partial, hidden_w_grad, mask=mask)


@triton.autotune(configs=warp_choices(8, 4, 16), key=["dim"])
@triton.jit
def _gate_value_grad_kernel(grad_out_ptr, gate_ptr, grad_value_ptr, dim, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    grad_value = tl.zeros([BLOCK_D], dtype=tl.float32)
    for branch in tl.static_range(HC):
        row = token * HC + branch
        grad_out = tl.load(grad_out_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        grad_value += tl.load(gate_ptr + row) * grad_out
    tl.store(grad_value_ptr + token * dim + cols, grad_value.to(grad_value_ptr.dtype.element_ty), mask=mask)


class EngramGate(torch.autograd.Function):
    """Differentiable Triton gate; gradients for key, hidden, value and both norm weights."""

    @staticmethod
    def forward(ctx, key, hidden, value, key_norm_w, hidden_norm_w, eps=None):
        key, hidden, value = key.contiguous(), hidden.contiguous(), value.contiguous()
        key_norm_w, hidden_norm_w = key_norm_w.contiguous(), hidden_norm_w.contiguous()
        ctx.eps = torch.finfo(key.dtype).eps if eps is None else eps
        n_tokens, hc, dim = key.shape
        out = torch.empty_like(key)
        if n_tokens:
            runs, tokens_per_run = programs_and_chunk(n_tokens, max(1, FORWARD_PROGRAMS // hc))
            _gate_forward_kernel[(runs * hc,)](
                key, hidden, value, key_norm_w, hidden_norm_w, out, n_tokens, tokens_per_run, dim, ctx.eps,
                1.0 / math.sqrt(dim), HC=hc, BLOCK_D=triton.next_power_of_2(dim), MIN_SCORE=MIN_SCORE)
        ctx.save_for_backward(key, hidden, value, key_norm_w, hidden_norm_w)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        key, hidden, value, key_norm_w, hidden_norm_w = ctx.saved_tensors
        n_tokens, hc, dim = key.shape
        runs, tokens_per_run = programs_and_chunk(n_tokens, max(1, BACKWARD_PROGRAMS // hc))
        grad_key, grad_hidden, grad_value = torch.empty_like(key), torch.empty_like(hidden), torch.empty_like(value)
        key_w_partial = torch.zeros(runs, hc, dim, dtype=torch.float32, device=key.device)
        hidden_w_partial = torch.zeros_like(key_w_partial)
        if n_tokens:
            grad_out = grad_out.contiguous()
            gates = torch.empty(n_tokens, hc, dtype=torch.float32, device=key.device)
            block_d = triton.next_power_of_2(dim)
            _gate_backward_kernel[(runs * hc,)](
                key, hidden, value, key_norm_w, hidden_norm_w, grad_out, grad_key, grad_hidden, gates,
                key_w_partial, hidden_w_partial, n_tokens, tokens_per_run, dim, ctx.eps, 1.0 / math.sqrt(dim),
                HC=hc, BLOCK_D=block_d, MIN_SCORE=MIN_SCORE)
            _gate_value_grad_kernel[(n_tokens,)](grad_out, gates, grad_value, dim, HC=hc, BLOCK_D=block_d)
        grad_key_w = key_w_partial.sum(0).to(key_norm_w.dtype)
        grad_hidden_w = hidden_w_partial.sum(0).to(hidden_norm_w.dtype)
        return grad_key, grad_hidden, grad_value, grad_key_w, grad_hidden_w, None
