"""Triton short conv: RMSNorm, causal dilated depthwise conv, SiLU and residual, forward and backward.

The taps of time step t all lie in its residue class t % dilation, so the work is cut into tiles:
consecutive steps of one class of one (sequence, branch), plus the halo steps the taps reach. The
only coupling across D is the RMSNorm (a row's rstd; in the backward also s = sum_D dL/dx_hat *
x_hat), so a tile makes two passes over D in column chunks: the first reads its rows from DRAM, the
second finds them in L2. A program walks a run of consecutive tiles (a tile's halo before is the
previous tile's end), few programs an SM, so that the rows awaiting their second pass (80 KB or more a
program at D=2560) stay in L2. Nothing is padded to a whole row: registers are constant in D.

Taps are combined by walking a tile's steps four at a time with [BLOCK_D] vectors, carrying the
previous three steps in registers: each element is loaded, and each sigmoid evaluated, once a pass.
One software-pipelined loop runs over all (column chunk, group of four steps), so loads stay in
flight across chunk edges.

- Forward, tiles of ROWS - 3 steps plus 3 before: pass 1 sums x^2 over [ROWS, columns] blocks and
  saves rstd (for pass 2 and the backward); pass 2 walks the conv and writes x + SiLU(conv).
- Backward, tiles of STEPS steps plus 3 before and 3 after: pass 1 walks the conv gradient gc, then
  dL/dx_hat[t] = sum_k norm_w w_k gc[t + (3-k) d], the row sums s and, per column,
  P_k = sum_t gc[t] x_hat[t - (3-k) d]; it stashes grad_out + rstd * dL/dx_hat in grad_x, and
  pass 2 subtracts x rstd^2 s / D (so a 16-bit grad_x is rounded twice). dL/dconv_w[k] = norm_w P_k
  and dL/dnorm_w = sum_k w_k P_k: each run adds its P into its own partial rows and the host sums
  the runs' partials (no atomics, deterministic).

The kernels take the taps times norm_w, [hc, 4, D] float32; convs shorter than TAPS (4) are
zero-padded in front.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import config_choices, interpreting

TAPS = 4
# A branch's tiles are split into runs of consecutive tiles, *_RUNS_PER_SM * SMs / hc of them; a program
# walks RUNS (autotuned) runs. Each program's current tile awaits its second pass in L2 (16 rows x
# D=2560 in bfloat16: 80 KB; in the backward x and the stash, 160 KB), and on the H200 the second pass
# finds them there only while all programs' tiles take up to ~25 MB: the forward's L2 hit rate fell from
# 64% to 37% at four 80 KB tiles an SM (Nsight Compute). The backward's partials are [hc, runs, 4, D]
# float32 (~11 MB at D=2560 on 132 SMs).
FORWARD_RUNS_PER_SM = 12  # RUNS = 3, 4, 6, 12: four, three, two or one program an SM
BACKWARD_RUNS_PER_SM = 2
INTERPRETER_RUNS = 8  # runs per branch on the CPU interpreter (tests vary it)


# Shapes to autotune. The first of each list is the CPU interpreter's: small tiles and 128 columns, so
# that small tests cover several tiles, runs and chunks. The kernels are close to bound by instruction
# issue, so most choices give a thread 4 or 8 values of a row (BLOCK_D = 128 or 256 * num_warps: the
# row's index and mask work is shared by them); the walk's loads are software-pipelined (cp.async) only
# with >= 4 bytes a thread (BLOCK_D >= 64 * num_warps for 16-bit dtypes). Compiled for sm_90
# (D % 16 == 0) none spills: the forward needs 110-170 registers, the backward 160-200.
_FORWARD_TILES = config_choices(
    {"RUNS": 2, "ROWS": 16, "BLOCK_D": 128, "STAGES": 2, "num_warps": 2},
    {"RUNS": 3, "ROWS": 16, "BLOCK_D": 512, "STAGES": 3, "num_warps": 2},
    {"RUNS": 4, "ROWS": 16, "BLOCK_D": 512, "STAGES": 3, "num_warps": 2},
    {"RUNS": 6, "ROWS": 16, "BLOCK_D": 512, "STAGES": 4, "num_warps": 2},
    {"RUNS": 4, "ROWS": 16, "BLOCK_D": 1024, "STAGES": 3, "num_warps": 4},
    {"RUNS": 6, "ROWS": 16, "BLOCK_D": 1024, "STAGES": 3, "num_warps": 4},
    {"RUNS": 12, "ROWS": 32, "BLOCK_D": 1024, "STAGES": 3, "num_warps": 4},
    {"RUNS": 6, "ROWS": 16, "BLOCK_D": 512, "STAGES": 4, "num_warps": 8},
)
_BACKWARD_TILES = config_choices(
    {"RUNS": 2, "STEPS": 8, "BLOCK_D": 128, "STAGES": 2, "num_warps": 2},
    {"RUNS": 1, "STEPS": 16, "BLOCK_D": 512, "STAGES": 3, "num_warps": 4},
    {"RUNS": 1, "STEPS": 32, "BLOCK_D": 512, "STAGES": 3, "num_warps": 4},
    {"RUNS": 1, "STEPS": 8, "BLOCK_D": 512, "STAGES": 3, "num_warps": 4},
    {"RUNS": 2, "STEPS": 16, "BLOCK_D": 1024, "STAGES": 3, "num_warps": 8},
    {"RUNS": 2, "STEPS": 32, "BLOCK_D": 1024, "STAGES": 3, "num_warps": 8},
    {"RUNS": 2, "STEPS": 16, "BLOCK_D": 512, "STAGES": 4, "num_warps": 8},
)
_MAX_ROWS = max(c.kwargs["ROWS"] for c in _FORWARD_TILES)


# On the GPU the sigmoid takes the hardware's approximate exp2 and reciprocal (flush-to-zero, about 2 ulp):
# the range-checked forms cost twice the instructions, and these kernels are close to bound by issue.
# The CPU interpreter cannot run inline PTX and takes the plain form.
_FAST_SIGMOID = tl.constexpr(not interpreting())
_LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sigmoid(x):
    if _FAST_SIGMOID:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * -_LOG2_E], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load(ptr, mask):
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _only_if(condition, mask):
    """``mask & condition`` for a scalar condition (written so because the CPU interpreter's ``&`` may
    turn a broadcast scalar condition into an integer mask, which ``tl.load`` rejects)."""
    return tl.where(condition, mask, False)


@triton.jit
def _row_index(batch, step, residue, branch, seq_len, dilation, HC: tl.constexpr):
    """Row of ``[B, T, hc]`` (64-bit) at ``step`` of the residue class, and whether it is in the sequence."""
    time = residue + step * dilation
    return (batch * seq_len + time).to(tl.int64) * HC + branch, (step >= 0) & (time < seq_len)


@triton.jit
def _tile_place(tile, tiles_per_class, dilation):
    """A tile's sequence, residue class and index within the class (tiles run over batch, class, index)."""
    return tile // (dilation * tiles_per_class), (tile // tiles_per_class) % dilation, tile % tiles_per_class


@triton.jit
def _run(run, tiles, runs):
    """Run ``run``'s tiles ``[begin, end)``: an even share of its branch's ``tiles``."""
    return run * tiles // runs, (run + 1) * tiles // runs


@triton.jit
def _weights(weights_ptr, branch, dim, cols, cmask):
    """The chunk's tap weights times norm_w (``weights`` is [hc, 4, D]; tap 3 is the current step)."""
    base = weights_ptr + branch * 4 * dim + cols
    return (_load(base, cmask), _load(base + dim, cmask), _load(base + 2 * dim, cmask),
            _load(base + 3 * dim, cmask))


@triton.jit
def _forward_step(x_ptr, scratch, batch, first, row, residue, branch, seq_len, dim, dilation, cols, cmask,
                  HC: tl.constexpr):
    """Tile row ``row`` (step ``first + row``): x, its normalised value, offset, and whether it is ours."""
    index, inside = _row_index(batch, first + row, residue, branch, seq_len, dilation, HC)
    x = _load(x_ptr + index * dim + cols, _only_if(inside, cmask))
    return x, x * tl.load(scratch + row), index * dim, inside & (row >= 3)


@triton.jit
def _forward_out(out_ptr, offset, ours, x, conv, cols, cmask):
    out = x + conv * _sigmoid(conv)
    tl.store(out_ptr + offset + cols, out.to(out_ptr.dtype.element_ty), mask=_only_if(ours, cmask))


@triton.autotune(configs=_FORWARD_TILES, key=["dim", "HC"])
@triton.jit
def _short_conv_forward_kernel(x_ptr, weights_ptr, out_ptr, rstd_ptr, scratch_ptr,
                               batch, seq_len, dim, dilation, runs, eps,
                               HC: tl.constexpr, RUNS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                               STAGES: tl.constexpr):
    # Tile row r is step first + r of the class; rows 0..2 are the halo, rows 3.. are this tile's.
    STEPS: tl.constexpr = ROWS - 3
    GROUPS: tl.constexpr = ROWS // 4
    SUM_D: tl.constexpr = BLOCK_D * 4 // ROWS  # pass 1's blocks hold as many elements as a group of walk rows
    branch = tl.program_id(0)
    tiles_per_class = tl.cdiv(tl.cdiv(seq_len, dilation), STEPS)
    tiles = batch * dilation * tiles_per_class
    first_run = tl.program_id(1) * RUNS
    begin = _run(first_run, tiles, runs)[0]
    end = _run(tl.minimum(first_run + RUNS, runs) - 1, tiles, runs)[1]  # this program's runs are one
    scratch = scratch_ptr + (branch * tl.num_programs(1) + tl.program_id(1)) * ROWS  # the tile's rstd
    rows = tl.arange(0, ROWS)
    chunk = tl.arange(0, BLOCK_D)
    chunks = tl.cdiv(dim, BLOCK_D)
    for tile in range(begin, end):
        b, residue, index = _tile_place(tile, tiles_per_class, dilation)
        first = index * STEPS - 3
        row_index, inside = _row_index(b, first + rows, residue, branch, seq_len, dilation, HC)
        # Pass 1: rstd of every tile row, over [ROWS, SUM_D] blocks (many rows in flight).
        squares = tl.zeros([ROWS], dtype=tl.float32)
        for start in tl.range(0, dim, SUM_D, num_stages=STAGES):
            cols = start + tl.arange(0, SUM_D)
            x = _load(x_ptr + row_index[:, None] * dim + cols[None, :], inside[:, None] & (cols < dim)[None, :])
            squares += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(squares / dim + eps)
        tl.debug_barrier()  # all threads are done with the previous tile's scratch
        tl.store(scratch + rows, rstd)
        tl.store(rstd_ptr + row_index, rstd, mask=inside & (rows >= 3))
        tl.debug_barrier()  # and see this tile's
        # Pass 2: walk rows 4g..4g+3 (h4..h7 normed) per (chunk, g), carrying rows 4g-3..4g-1 (h1..h3).
        # Group 0 needs no carried rows: its outputs (rows 0..2) are the halo.
        w0 = tl.zeros([BLOCK_D], dtype=tl.float32)
        w1 = w0
        w2 = w0
        w3 = w0
        h1 = w0
        h2 = w0
        h3 = w0
        for step in tl.range(0, chunks * GROUPS, num_stages=STAGES):
            group = step % GROUPS
            cols = (step // GROUPS) * BLOCK_D + chunk
            cmask = cols < dim
            if group == 0:  # a new chunk
                w0, w1, w2, w3 = _weights(weights_ptr, branch, dim, cols, cmask)
            row = group * 4
            x4, h4, off4, ours4 = _forward_step(x_ptr, scratch, b, first, row, residue, branch, seq_len, dim,
                                                dilation, cols, cmask, HC)
            x5, h5, off5, ours5 = _forward_step(x_ptr, scratch, b, first, row + 1, residue, branch, seq_len, dim,
                                                dilation, cols, cmask, HC)
            x6, h6, off6, ours6 = _forward_step(x_ptr, scratch, b, first, row + 2, residue, branch, seq_len, dim,
                                                dilation, cols, cmask, HC)
            x7, h7, off7, ours7 = _forward_step(x_ptr, scratch, b, first, row + 3, residue, branch, seq_len, dim,
                                                dilation, cols, cmask, HC)
            _forward_out(out_ptr, off4, ours4, x4, w0 * h1 + w1 * h2 + w2 * h3 + w3 * h4, cols, cmask)
            _forward_out(out_ptr, off5, ours5, x5, w0 * h2 + w1 * h3 + w2 * h4 + w3 * h5, cols, cmask)
            _forward_out(out_ptr, off6, ours6, x6, w0 * h3 + w1 * h4 + w2 * h5 + w3 * h6, cols, cmask)
            _forward_out(out_ptr, off7, ours7, x7, w0 * h4 + w1 * h5 + w2 * h6 + w3 * h7, cols, cmask)
            h1, h2, h3 = h5, h6, h7


@triton.jit
def _backward_step(x_ptr, grad_out_ptr, rstd_ptr, batch, first, row, residue, branch, seq_len, dim,
                   dilation, cols, cmask, HC: tl.constexpr):
    """Tile row ``row`` (step ``first + row``): normalised x, grad_out and rstd; grad_out only from row 5
    (the first owned step: the conv gradient before it is not needed), x from row 2."""
    index, inside = _row_index(batch, first + row, residue, branch, seq_len, dilation, HC)
    rstd = tl.load(rstd_ptr + index, mask=inside & (row >= 2), other=0.0)
    x_hat = _load(x_ptr + index * dim + cols, _only_if(inside & (row >= 2), cmask)) * rstd
    return x_hat, _load(grad_out_ptr + index * dim + cols, _only_if(inside & (row >= 5), cmask)), rstd


@triton.jit
def _conv_grad(grad_out, conv):
    """dL/dconv from dL/dout: the derivative of SiLU."""
    sig = _sigmoid(conv)
    return grad_out * sig * (1.0 + conv * (1.0 - sig))


@triton.jit
def _owned(grad, row, STEPS: tl.constexpr):
    """``grad`` where tile row ``row`` is one of the tile's own steps (rows 5..STEPS+4), else 0."""
    return tl.where((row >= 5) & (row < STEPS + 5), grad, 0.0)


@triton.jit
def _stash(grad_x_ptr, batch, first, row, residue, branch, seq_len, dim, dilation, cols, cmask,
           grad_out, rstd, grad_x_hat, HC: tl.constexpr, STEPS: tl.constexpr):
    """grad_x without its row-sum term, for pass 2 to finish."""
    index, inside = _row_index(batch, first + row, residue, branch, seq_len, dilation, HC)
    ours = inside & (row >= 5) & (row < STEPS + 5)
    tl.store(grad_x_ptr + index * dim + cols, (grad_out + rstd * grad_x_hat).to(grad_x_ptr.dtype.element_ty),
             mask=_only_if(ours, cmask))


@triton.jit
def _backward_tile(x_ptr, grad_out_ptr, weights_ptr, rstd_ptr, grad_x_ptr, partial, tile, first_tile, branch,
                   seq_len, dim, dilation, tiles_per_class,
                   HC: tl.constexpr, STEPS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    # Tile row r is step first + r: rows 2..4 are the halo before, 5..STEPS+4 the tile's own steps,
    # STEPS+5..STEPS+7 the halo after (rows 0 and 1 align the groups and are never loaded). Group g
    # loads rows 4g..4g+3 and computes their conv gradient gc; rows 4g-3..4g then have all of
    # theirs (rows t..t+3), so the group finishes those: the tile's steps 4(g-2)..4(g-2)+3.
    GROUPS: tl.constexpr = STEPS // 4 + 2
    TILE_D: tl.constexpr = BLOCK_D * 8 // STEPS  # pass 2's blocks hold as many elements as 8 walk rows
    chunk = tl.arange(0, BLOCK_D)
    quads = tl.arange(0, STEPS // 4)[:, None]
    b, residue, index = _tile_place(tile, tiles_per_class, dilation)
    first = index * STEPS - 5
    # Pass 1. Carried from group to group: normed x (h), conv gradient (g), grad_out (o) and rstd (r)
    # of rows 4g-3..4g-1; P_k (p) over the chunk's tile rows.
    row_sums = tl.zeros([STEPS // 4, 4], dtype=tl.float32)  # s of the tile's steps; step = 4 * row + col
    w0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    w1 = w0
    w2 = w0
    w3 = w0
    p0 = w0
    p1 = w0
    p2 = w0
    p3 = w0
    h1 = w0
    h2 = w0
    h3 = w0
    g1 = w0
    g2 = w0
    g3 = w0
    o1 = w0
    o2 = w0
    o3 = w0
    r1 = 0.0
    r2 = 0.0
    r3 = 0.0
    for step in tl.range(0, tl.cdiv(dim, BLOCK_D) * GROUPS, num_stages=STAGES):
        group = step % GROUPS
        cols = (step // GROUPS) * BLOCK_D + chunk
        cmask = cols < dim
        if group == 0:  # a new chunk
            w0, w1, w2, w3 = _weights(weights_ptr, branch, dim, cols, cmask)
            p0 = tl.zeros([BLOCK_D], dtype=tl.float32)
            p1 = p0
            p2 = p0
            p3 = p0
        # Rows 4g-4+k for k = 4..7 are loaded now (h: normed x, o: grad_out, r: rstd); k = 1..3 are carried.
        row = group * 4
        h4, o4, r4 = _backward_step(x_ptr, grad_out_ptr, rstd_ptr, b, first, row, residue, branch, seq_len,
                                    dim, dilation, cols, cmask, HC)
        h5, o5, r5 = _backward_step(x_ptr, grad_out_ptr, rstd_ptr, b, first, row + 1, residue, branch, seq_len,
                                    dim, dilation, cols, cmask, HC)
        h6, o6, r6 = _backward_step(x_ptr, grad_out_ptr, rstd_ptr, b, first, row + 2, residue, branch, seq_len,
                                    dim, dilation, cols, cmask, HC)
        h7, o7, r7 = _backward_step(x_ptr, grad_out_ptr, rstd_ptr, b, first, row + 3, residue, branch, seq_len,
                                    dim, dilation, cols, cmask, HC)
        # Conv gradients g4..g7 (zero before row 5, where grad_out is not loaded).
        g4 = _conv_grad(o4, w0 * h1 + w1 * h2 + w2 * h3 + w3 * h4)
        g5 = _conv_grad(o5, w0 * h2 + w1 * h3 + w2 * h4 + w3 * h5)
        g6 = _conv_grad(o6, w0 * h3 + w1 * h4 + w2 * h5 + w3 * h6)
        g7 = _conv_grad(o7, w0 * h4 + w1 * h5 + w2 * h6 + w3 * h7)
        # P_k += gc[t] * x_hat[t - lag] over the tile's own rows t (those after it are the next tile's).
        q4 = _owned(g4, row, STEPS)
        q5 = _owned(g5, row + 1, STEPS)
        q6 = _owned(g6, row + 2, STEPS)
        q7 = _owned(g7, row + 3, STEPS)
        p3 += q4 * h4 + q5 * h5 + q6 * h6 + q7 * h7
        p2 += q4 * h3 + q5 * h4 + q6 * h5 + q7 * h6
        p1 += q4 * h2 + q5 * h3 + q6 * h4 + q7 * h5
        p0 += q4 * h1 + q5 * h2 + q6 * h3 + q7 * h4
        # Rows 4g-3..4g: dL/dx_hat = sum_k norm_w w_k gc[t + 3 - k]; stash grad_x without its s term.
        d1 = w3 * g1 + w2 * g2 + w1 * g3 + w0 * g4
        d2 = w3 * g2 + w2 * g3 + w1 * g4 + w0 * g5
        d3 = w3 * g3 + w2 * g4 + w1 * g5 + w0 * g6
        d4 = w3 * g4 + w2 * g5 + w1 * g6 + w0 * g7
        _stash(grad_x_ptr, b, first, row - 3, residue, branch, seq_len, dim, dilation, cols, cmask, o1, r1, d1,
               HC, STEPS)
        _stash(grad_x_ptr, b, first, row - 2, residue, branch, seq_len, dim, dilation, cols, cmask, o2, r2, d2,
               HC, STEPS)
        _stash(grad_x_ptr, b, first, row - 1, residue, branch, seq_len, dim, dilation, cols, cmask, o3, r3, d3,
               HC, STEPS)
        _stash(grad_x_ptr, b, first, row, residue, branch, seq_len, dim, dilation, cols, cmask, o4, r4, d4,
               HC, STEPS)
        # Their row sums s, one reduction for all four: (i, j) of the joined pairs is row 4g-3 + 2i + j.
        pairs = tl.join(tl.join(d1 * h1, d3 * h3), tl.join(d2 * h2, d4 * h4))
        row_sums += tl.where(quads == group - 2, tl.sum(tl.reshape(pairs, [BLOCK_D, 4]), axis=0)[None, :], 0.0)
        if group == GROUPS - 1:  # the chunk's last group: add its P to the run's sums
            keep = _only_if(tile > first_tile, cmask)
            tl.store(partial + cols, p0 + _load(partial + cols, keep), mask=cmask)
            tl.store(partial + dim + cols, p1 + _load(partial + dim + cols, keep), mask=cmask)
            tl.store(partial + 2 * dim + cols, p2 + _load(partial + 2 * dim + cols, keep), mask=cmask)
            tl.store(partial + 3 * dim + cols, p3 + _load(partial + 3 * dim + cols, keep), mask=cmask)
        h1, h2, h3 = h5, h6, h7
        g1, g2, g3 = g5, g6, g7
        o1, o2, o3 = o5, o6, o7
        r1, r2, r3 = r5, r6, r7
    tl.debug_barrier()  # the stashes are visible to every thread
    # Pass 2: grad_x = stash - x * rstd^2 * s / D over [STEPS, TILE_D] blocks of the tile's steps.
    row_index, inside = _row_index(b, first + 5 + tl.arange(0, STEPS), residue, branch, seq_len, dilation, HC)
    rstd = tl.load(rstd_ptr + row_index, mask=inside, other=0.0)
    coef = (rstd * rstd * tl.reshape(row_sums, [STEPS]) / dim)[:, None]
    offsets = row_index[:, None] * dim
    for start in tl.range(0, dim, TILE_D, num_stages=STAGES):
        cols = (start + tl.arange(0, TILE_D))[None, :]
        mask = inside[:, None] & (cols < dim)
        grad_x = _load(grad_x_ptr + offsets + cols, mask) - _load(x_ptr + offsets + cols, mask) * coef
        tl.store(grad_x_ptr + offsets + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_BACKWARD_TILES, key=["dim", "HC"])
@triton.jit
def _short_conv_backward_kernel(x_ptr, grad_out_ptr, weights_ptr, rstd_ptr, grad_x_ptr, partial_ptr,
                                batch, seq_len, dim, dilation, runs,
                                HC: tl.constexpr, RUNS: tl.constexpr, STEPS: tl.constexpr,
                                BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    branch = tl.program_id(0)
    tiles_per_class = tl.cdiv(tl.cdiv(seq_len, dilation), STEPS)
    tiles = batch * dilation * tiles_per_class
    first_run = tl.program_id(1) * RUNS
    for run in range(first_run, tl.minimum(first_run + RUNS, runs)):
        begin, end = _run(run, tiles, runs)
        # The run's sums P_k over its tiles, [4, D] (k = tap; the lag is 3 - k).
        partial = partial_ptr + (branch * runs + run).to(tl.int64) * 4 * dim
        if begin == end:  # more runs than tiles: the host sums every run's partials
            for start in range(0, dim, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                for tap in range(4):
                    tl.store(partial + tap * dim + cols, tl.zeros([BLOCK_D], dtype=tl.float32), mask=cols < dim)
        for tile in range(begin, end):
            _backward_tile(x_ptr, grad_out_ptr, weights_ptr, rstd_ptr, grad_x_ptr, partial, tile, begin, branch,
                           seq_len, dim, dilation, tiles_per_class, HC, STEPS, BLOCK_D, STAGES)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(value: torch.Tensor, runs_per_sm: int) -> tuple[int, object]:
    """Runs per branch, and the grid: (branch, program), a program taking ``RUNS`` runs."""
    runs = runs_per_sm * _sm_count(value.device.index) if value.is_cuda else INTERPRETER_RUNS
    runs = max(1, -(-runs // value.shape[2]))
    return runs, lambda meta: (value.shape[2], triton.cdiv(runs, meta["RUNS"]))


def _padded_taps(conv_w: torch.Tensor) -> torch.Tensor:
    kernel = conv_w.shape[-1]
    if kernel > TAPS:
        raise ValueError(f"conv_w: the Triton short conv supports up to {TAPS} taps, got {kernel}")
    return F.pad(conv_w.reshape(conv_w.shape[0], kernel), (TAPS - kernel, 0))


class ShortConv(torch.autograd.Function):
    """Differentiable Triton short conv; gradients for the value, the norm weight and the conv weight."""

    @staticmethod
    def forward(ctx, value, norm_w, conv_w, dilation, eps=1e-5):
        value, norm_w = value.contiguous(), norm_w.contiguous()
        batch, seq_len, hc, dim = value.shape
        # [hc, 4, D] float32, a tap's weights over D contiguous; the kernels take them times norm_w.
        taps = _padded_taps(conv_w).float().reshape(hc, dim, TAPS).transpose(1, 2).contiguous()
        weights = taps * norm_w.float()[:, None, :]
        ctx.dilation, ctx.conv_shape, ctx.conv_dtype = dilation, conv_w.shape, conv_w.dtype
        out = torch.empty_like(value)
        rstd = torch.empty(batch, seq_len, hc, dtype=torch.float32, device=value.device)
        if value.numel():
            runs, grid = _launch(value, FORWARD_RUNS_PER_SM)
            scratch = torch.empty(hc * runs * _MAX_ROWS, dtype=torch.float32, device=value.device)  # rstd of a tile
            _short_conv_forward_kernel[grid](value, weights, out, rstd, scratch, batch, seq_len, dim, dilation, runs,
                                             eps, HC=hc)
        ctx.save_for_backward(value, norm_w, taps, weights, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, norm_w, taps, weights, rstd = ctx.saved_tensors
        batch, seq_len, hc, dim = value.shape
        grad_value = torch.empty_like(value)
        if value.numel():
            runs, grid = _launch(value, BACKWARD_RUNS_PER_SM)
            partial = torch.empty(hc, runs, TAPS, dim, dtype=torch.float32, device=value.device)
            _short_conv_backward_kernel[grid](value, grad_out.contiguous(), weights, rstd, grad_value, partial,
                                              batch, seq_len, dim, ctx.dilation, runs, HC=hc)
            sums = partial.sum(1)  # P_k per branch, [hc, 4, D]
        else:
            sums = torch.zeros(hc, TAPS, dim, dtype=torch.float32, device=value.device)
        grad_norm_w = (sums * taps).sum(1)
        grad_taps = (sums * norm_w.float()[:, None, :]).transpose(1, 2).reshape(hc * dim, TAPS)
        kernel = ctx.conv_shape[-1]
        grad_conv_w = grad_taps[:, TAPS - kernel:].reshape(ctx.conv_shape)
        return grad_value, grad_norm_w.to(norm_w.dtype), grad_conv_w.to(ctx.conv_dtype), None, None
