"""Triton context-aware gate: tiles of [tokens, branches, columns] that stream over D in chunks.

Nothing is padded to a whole row, so registers stay small and constant in D, and every loop is
software-pipelined (``tl.range(num_stages=...)``: asynchronous copies into shared memory), which
keeps the next tiles' loads in flight while one is computed. Each [N, hc, D] or [N, D] tensor is
read or written once, the minimum. Branches pad to the power of two ``HC_P``; row = token * hc + branch.

- ``_gate_forward_kernel`` (a few tokens per program): pass 1 sums k^2, h^2 and k w_k h w_h per row
  over D; pass 2 writes gate * value, reading value once for all branches. It saves 16 bytes a row:
  the gate and three coefficients that make the RMSNorm backward elementwise.
- ``_gate_value_grad_kernel`` (a few tokens per program): grad_value = sum over branches of
  gate * grad_out, and dL/dgate = <grad_out, value> per row; reads grad_out and value.
- ``_gate_norm_grad_kernel`` (a run of tokens x one D chunk per program): grad_key and grad_hidden,
  and the run's share of the norm-weight gradients, summed in registers and added over runs on the
  host (no atomics); reads key and hidden.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import config_choices, programs_and_chunk, written_in_full

MIN_SCORE = 1e-6  # |score| is clamped here before its square root, as in the reference
STAGES = 3  # chunks in flight per loop: the one computed and two loading
# Runs of tokens in the backward; a program is a run and a D chunk (2560 programs at D=2560 in
# 256-column chunks), and the weight-gradient partials (runs x hc x D float32) stay ~1% of the bytes.
BACKWARD_RUNS = 256
# Tile shapes to autotune, each with its elements per thread and tensor at hc=4. The first is the
# CPU interpreter's: more than one token, and 256 columns, so that the tests' D=300 takes two chunks.
# Left out: shapes that need over ~160 registers a thread, or that spread a branch sum across warps.
_FORWARD_TILES = config_choices(
    {"BLOCK_T": 2, "BLOCK_D": 256, "num_warps": 4},  # 16
    {"BLOCK_T": 1, "BLOCK_D": 256, "num_warps": 4},  # 8
    {"BLOCK_T": 1, "BLOCK_D": 512, "num_warps": 4},  # 16
    {"BLOCK_T": 1, "BLOCK_D": 1024, "num_warps": 4},  # 32
    {"BLOCK_T": 4, "BLOCK_D": 256, "num_warps": 4},  # 32
    {"BLOCK_T": 4, "BLOCK_D": 256, "num_warps": 8},  # 16
)
_VALUE_GRAD_TILES = config_choices(
    {"BLOCK_T": 4, "BLOCK_D": 256, "num_warps": 4},  # 32
    {"BLOCK_T": 2, "BLOCK_D": 512, "num_warps": 4},  # 32
    {"BLOCK_T": 4, "BLOCK_D": 256, "num_warps": 8},  # 16
    {"BLOCK_T": 2, "BLOCK_D": 512, "num_warps": 8},  # 16
    {"BLOCK_T": 1, "BLOCK_D": 1024, "num_warps": 4},  # 32
)
_NORM_GRAD_TILES = config_choices(
    {"BLOCK_T": 2, "BLOCK_D": 256, "num_warps": 4},  # 16
    {"BLOCK_T": 1, "BLOCK_D": 256, "num_warps": 4},  # 8
    {"BLOCK_T": 1, "BLOCK_D": 512, "num_warps": 4},  # 16
    {"BLOCK_T": 2, "BLOCK_D": 512, "num_warps": 8},  # 16
    {"BLOCK_T": 4, "BLOCK_D": 256, "num_warps": 8},  # 16
)


@triton.jit
def _load(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weights(weights_ptr, branches, cols, dim, HC: tl.constexpr):
    """``w_k * w_h`` (the product, float32 ``[hc, D]``) at ``branches * dim + cols``."""
    return _load(weights_ptr, branches * dim + cols, (branches < HC) & (cols < dim))


@triton.autotune(configs=_FORWARD_TILES, key=["dim", "HC"])
@triton.jit
def _gate_forward_kernel(key_ptr, hidden_ptr, value_ptr, weights_ptr, out_ptr, stats_ptr, n_tokens, dim, eps,
                         inv_sqrt_dim, HC: tl.constexpr, HC_P: tl.constexpr, MIN_SCORE: tl.constexpr,
                         STAGES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Tiles [token, branch, column]. The norm weights' tile has the data's shape when BLOCK_T is 1;
    # more tokens share it, at the price of some shuffling to match layouts (autotuning weighs both).
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]  # 64-bit offsets
    branches = tl.arange(0, HC_P)[None, :, None]
    rows, row_mask = tokens * HC + branches, (tokens < n_tokens) & (branches < HC)
    chunk = tl.arange(0, BLOCK_D)[None, None, :]
    key_sq = tl.zeros([BLOCK_T, HC_P, 1], dtype=tl.float32)
    hidden_sq = tl.zeros([BLOCK_T, HC_P, 1], dtype=tl.float32)
    dot = tl.zeros([BLOCK_T, HC_P, 1], dtype=tl.float32)  # sum(k w_k h w_h)
    for start in tl.range(0, dim, BLOCK_D, num_stages=STAGES):
        cols = start + chunk
        mask = row_mask & (cols < dim)
        key = _load(key_ptr, rows * dim + cols, mask)
        hidden = _load(hidden_ptr, rows * dim + cols, mask)
        key_sq += tl.sum(key * key, axis=2, keep_dims=True)
        hidden_sq += tl.sum(hidden * hidden, axis=2, keep_dims=True)
        dot += tl.sum(key * hidden * _weights(weights_ptr, branches, cols, dim, HC), axis=2, keep_dims=True)
    key_rstd = 1.0 / tl.sqrt(key_sq / dim + eps)
    hidden_rstd = 1.0 / tl.sqrt(hidden_sq / dim + eps)
    score = dot * key_rstd * hidden_rstd * inv_sqrt_dim
    magnitude = tl.sqrt(tl.maximum(tl.abs(score), MIN_SCORE))
    signed = tl.where(score > 0, magnitude, tl.where(score < 0, -magnitude, 0.0))
    gate = 1.0 / (1.0 + tl.exp(-signed))
    # slope = d gate / d <rms(k) w_k, rms(h) w_h> = sigmoid' / (2 sqrt|s|) / sqrt(D), 0 under the clamp.
    # With g = dL/dgate * slope, the RMSNorm backward's inner product <g h_n w_h w_k, k_n> / D equals
    # g * s / sqrt(D), so grad_key = dL/dgate * (cross * w_k w_h * h - key_self * k) with
    # cross = slope rstd_k rstd_h and key_self = slope rstd_k^2 s / sqrt(D); grad_hidden alike.
    slope = tl.where(tl.abs(score) >= MIN_SCORE, gate * (1.0 - gate) * 0.5 / magnitude, 0.0) * inv_sqrt_dim
    self_term = slope * score * inv_sqrt_dim
    tl.store(stats_ptr + rows * 4, gate, mask=row_mask)
    tl.store(stats_ptr + rows * 4 + 1, slope * key_rstd * hidden_rstd, mask=row_mask)
    tl.store(stats_ptr + rows * 4 + 2, self_term * key_rstd * key_rstd, mask=row_mask)
    tl.store(stats_ptr + rows * 4 + 3, self_term * hidden_rstd * hidden_rstd, mask=row_mask)
    for start in tl.range(0, dim, BLOCK_D, num_stages=STAGES):
        cols = start + chunk
        mask = row_mask & (cols < dim)
        value = _load(value_ptr, tokens * dim + cols, (tokens < n_tokens) & (cols < dim))  # once for all branches
        tl.store(out_ptr + rows * dim + cols, (gate * value).to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_VALUE_GRAD_TILES, key=["dim", "HC"])
@triton.jit
def _gate_value_grad_kernel(grad_out_ptr, value_ptr, stats_ptr, grad_value_ptr, grad_gate_ptr, n_tokens, dim,
                            HC: tl.constexpr, HC_P: tl.constexpr, STAGES: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Tiles [branch, token, column]: warps take tokens (or columns), so the branch sum stays in threads.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[None, :, None]
    branches = tl.arange(0, HC_P)[:, None, None]
    rows, row_mask = tokens * HC + branches, (tokens < n_tokens) & (branches < HC)
    gate = _load(stats_ptr, rows * 4, row_mask)
    chunk = tl.arange(0, BLOCK_D)[None, None, :]
    grad_gate = tl.zeros([HC_P, BLOCK_T, BLOCK_D], dtype=tl.float32)  # summed over D after the loop
    for start in tl.range(0, dim, BLOCK_D, num_stages=STAGES):
        cols = start + chunk
        token_mask = (tokens < n_tokens) & (cols < dim)
        grad_out = _load(grad_out_ptr, rows * dim + cols, row_mask & (cols < dim))
        value = _load(value_ptr, tokens * dim + cols, token_mask)
        grad_gate += grad_out * value
        grad_value = tl.sum(gate * grad_out, axis=0, keep_dims=True)
        tl.store(grad_value_ptr + tokens * dim + cols, grad_value.to(grad_value_ptr.dtype.element_ty),
                 mask=token_mask)
    tl.store(grad_gate_ptr + rows, tl.sum(grad_gate, axis=2, keep_dims=True), mask=row_mask)


@triton.autotune(configs=_NORM_GRAD_TILES, key=["dim", "HC"])
@triton.jit
def _gate_norm_grad_kernel(key_ptr, hidden_ptr, weights_ptr, stats_ptr, grad_gate_ptr,
                           grad_key_ptr, grad_hidden_ptr, partial_ptr, n_tokens, tokens_per_run, dim,
                           HC: tl.constexpr, HC_P: tl.constexpr, STAGES: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program = (run of tokens, D chunk), chunk fastest; the chunk's norm weights are loaded once, for
    # the whole tile's shape so that they take the data's layout. Tiles [token, branch, column]: warps
    # take branches, so the sum over tokens stays in threads.
    chunks = tl.cdiv(dim, BLOCK_D)
    run = tl.program_id(0) // chunks
    cols = (tl.program_id(0) % chunks) * BLOCK_D + tl.arange(0, BLOCK_D)[None, None, :]
    first = run.to(tl.int64) * tokens_per_run  # 64-bit offsets
    last = tl.minimum(first + tokens_per_run, n_tokens)
    block = tl.arange(0, BLOCK_T)[:, None, None]
    branches = tl.arange(0, HC_P)[None, :, None]
    weights = _weights(weights_ptr, branches + 0 * block, cols, dim, HC)
    # sum over the run of cross * k * h: the key weight's gradient is w_h times it, the hidden's w_k times it.
    weight_grad = tl.zeros([1, HC_P, BLOCK_D], dtype=tl.float32)
    for start in tl.range(first, last, BLOCK_T, num_stages=STAGES):
        tokens = start + block
        rows, row_mask = tokens * HC + branches, (tokens < last) & (branches < HC)
        grad_gate = _load(grad_gate_ptr, rows, row_mask)
        cross = grad_gate * _load(stats_ptr, rows * 4 + 1, row_mask)
        key_self = grad_gate * _load(stats_ptr, rows * 4 + 2, row_mask)
        hidden_self = grad_gate * _load(stats_ptr, rows * 4 + 3, row_mask)
        mask = row_mask & (cols < dim)
        key = _load(key_ptr, rows * dim + cols, mask)
        hidden = _load(hidden_ptr, rows * dim + cols, mask)
        grad_key = cross * weights * hidden - key_self * key
        grad_hidden = cross * weights * key - hidden_self * hidden
        tl.store(grad_key_ptr + rows * dim + cols, grad_key.to(grad_key_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_hidden_ptr + rows * dim + cols, grad_hidden.to(grad_hidden_ptr.dtype.element_ty), mask=mask)
        weight_grad += tl.sum(cross * key * hidden, axis=0, keep_dims=True)
    tl.store(partial_ptr + (run * HC + branches) * dim + cols, weight_grad, mask=(branches < HC) & (cols < dim))


class EngramGate(torch.autograd.Function):
    """Differentiable Triton gate; gradients for key, hidden, value and both norm weights."""

    @staticmethod
    def forward(ctx, key, hidden, value, key_norm_w, hidden_norm_w, eps=None):
        key, hidden, value = key.contiguous(), hidden.contiguous(), value.contiguous()
        key_norm_w, hidden_norm_w = key_norm_w.contiguous(), hidden_norm_w.contiguous()
        ctx.eps = torch.finfo(key.dtype).eps if eps is None else eps
        n_tokens, hc, dim = key.shape
        with written_in_full():
            out = torch.empty_like(key)
            stats = torch.empty(n_tokens, hc, 4, dtype=torch.float32, device=key.device)  # gate, cross, key/hidden_self
        weights = key_norm_w.float() * hidden_norm_w.float()  # one [hc, D] load per tile instead of two
        if n_tokens:
            _gate_forward_kernel[lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]),)](
                key, hidden, value, weights, out, stats, n_tokens, dim, ctx.eps, 1.0 / math.sqrt(dim),
                HC=hc, HC_P=triton.next_power_of_2(hc), MIN_SCORE=MIN_SCORE, STAGES=STAGES)
        ctx.save_for_backward(key, hidden, value, key_norm_w, hidden_norm_w, weights, stats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        key, hidden, value, key_norm_w, hidden_norm_w, weights, stats = ctx.saved_tensors
        n_tokens, hc, dim = key.shape
        runs, tokens_per_run = programs_and_chunk(n_tokens, BACKWARD_RUNS)
        with written_in_full():
            grad_key, grad_hidden, grad_value = torch.empty_like(key), torch.empty_like(hidden), torch.empty_like(value)
            partial = torch.empty(runs, hc, dim, dtype=torch.float32, device=key.device)
            grad_gate = torch.empty(n_tokens, hc, dtype=torch.float32, device=key.device)
        if n_tokens:
            grad_out = grad_out.contiguous()
            shape = {"HC": hc, "HC_P": triton.next_power_of_2(hc), "STAGES": STAGES}
            _gate_value_grad_kernel[lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]),)](
                grad_out, value, stats, grad_value, grad_gate, n_tokens, dim, **shape)
            _gate_norm_grad_kernel[lambda meta: (runs * triton.cdiv(dim, meta["BLOCK_D"]),)](
                key, hidden, weights, stats, grad_gate, grad_key, grad_hidden, partial,
                n_tokens, tokens_per_run, dim, **shape)
        weight_grad = partial.sum(0)
        grad_key_w = (weight_grad * hidden_norm_w).to(key_norm_w.dtype)
        grad_hidden_w = (weight_grad * key_norm_w).to(hidden_norm_w.dtype)
        return grad_key, grad_hidden, grad_value, grad_key_w, grad_hidden_w, None
