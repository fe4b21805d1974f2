"""Triton short conv: RMSNorm, causal dilated depthwise conv, SiLU and residual, forward and backward.

The taps of time step t all lie in its residue class t % dilation, so each (sequence, class) is a
chain of steps that a program walks in order, holding whole rows of D in registers: a row is read
from DRAM once and written once, with no second pass. The only coupling across D is the RMSNorm (a
row's rstd; in the backward also s = sum_D dL/dx_hat * x_hat), one reduction over the row a step.

- A branch's chains, laid end to end, are cut into equal ranges, one a program (a few programs an
  SM, all resident at once); a range that starts or ends inside a chain walks its 3 halo steps too.
- A row is held as two power-of-two pieces, ``HEAD`` and ``TAIL`` columns (D = 2560: 2048 + 512),
  so that non-power-of-two D wastes few lanes.
- Forward: per step, load x, reduce x^2 to rstd (saved for the backward), and write x + SiLU(conv),
  the conv in transposed form: the new row completes its own conv and adds to the partial convs of
  the next three steps, carried in registers.
- Backward, walking four steps ahead of the row it finishes: per step, load x and grad_out, form
  the conv gradient gc (SiLU's derivative) from the three previous x_hat rows, add gc[t] x_hat[t -
  (3-k) d] into the per-column sums P_k (for the range's own steps; the four after it, which only
  finish its last rows, walk in a loop of their own), and let gc complete dL/dx_hat of row t - 3
  (transposed form again). Then finish row t - 4, completed a step earlier: s, and grad_x =
  grad_out + rstd (dL/dx_hat - x_hat s / D), its grad_out read again (from L2) rather than carried.
  Finishing the row completed a step earlier, not the one this step completes, lets the reduction
  for s run alongside the step's arithmetic instead of after it.
  dL/dconv_w[k] = norm_w P_k and dL/dnorm_w = sum_k w_k P_k: each program writes its own partial P
  and the host sums them (no atomics; the same bits on every run with the same autotuned PER_SM,
  which sets the ranges).

The kernels take the taps times norm_w, [hc, 4, D] float32; convs shorter than TAPS (4) are
zero-padded in front.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import config_choices, interpreting, written_in_full

TAPS = 4
_HALO = tl.constexpr(TAPS - 1)  # steps before a row that its conv reads
_LAG = tl.constexpr(TAPS)  # steps from taking a row into the backward's walk to finishing it
# Programs a branch: PER_SM (autotuned) * SMs / hc, each walking at least MIN_STEPS_PER_PROGRAM steps
# (its halo costs 3 of them).
MIN_STEPS_PER_PROGRAM = 64
INTERPRETER_PROGRAMS = 4  # programs a branch on the CPU interpreter (tests vary it)
INDEX_LIMIT = 2**31  # tensors with this many values or more take 64-bit row offsets (tests lower it)

# Choices to autotune (the first is the CPU interpreter's). A thread holds (HEAD + TAIL) / (32 *
# num_warps) values of each row it carries: the forward 3 partial convs and the 4 taps, the backward
# 3 rows of x_hat, 3 partial dL/dx_hat, the 4 taps, the 4 sums P_k and the row to finish (2 values).
# On the H200 (sm_90, Triton 3.6) that is 220 to 250 registers at D = 2560 (4 warps forward, 8
# backward): one or two programs an SM, whose loads the deep software pipeline (STAGES rows in
# flight) keeps coming. 16 warps would halve the registers but not all loads then pipeline (1.6x
# slower).
_FORWARD_CHOICES = config_choices(
    {"PER_SM": 1, "STAGES": 2, "num_warps": 2},
    {"PER_SM": 2, "STAGES": 6, "num_warps": 4},
    {"PER_SM": 2, "STAGES": 8, "num_warps": 4},
    {"PER_SM": 4, "STAGES": 8, "num_warps": 4},
    {"PER_SM": 5, "STAGES": 4, "num_warps": 4},
    {"PER_SM": 5, "STAGES": 6, "num_warps": 4},
    {"PER_SM": 7, "STAGES": 6, "num_warps": 4},
    {"PER_SM": 4, "STAGES": 3, "num_warps": 2},
)
_BACKWARD_CHOICES = config_choices(
    {"PER_SM": 1, "STAGES": 2, "num_warps": 2},
    {"PER_SM": 1, "STAGES": 3, "num_warps": 8},
    {"PER_SM": 1, "STAGES": 6, "num_warps": 8},
    {"PER_SM": 2, "STAGES": 3, "num_warps": 8},
    {"PER_SM": 2, "STAGES": 5, "num_warps": 8},
    {"PER_SM": 2, "STAGES": 4, "num_warps": 4},
    {"PER_SM": 2, "STAGES": 6, "num_warps": 4},
    {"PER_SM": 3, "STAGES": 4, "num_warps": 4},
    # D = 1024 at 4 warps takes ~215 registers, two programs an SM; capped at 168, three fit without
    # spilling (0.164 against 0.181 ms on the H200; capped at 128, four spill and take 0.222).
    {"PER_SM": 3, "STAGES": 4, "num_warps": 4, "maxnreg": 168},
)
_MAX_BACKWARD_PER_SM = max(c.kwargs["PER_SM"] for c in _BACKWARD_CHOICES)


# Inline PTX, on the GPU only (the CPU interpreter cannot run it): the sigmoid takes the hardware's
# approximate exp2 and reciprocal (flush-to-zero, about 2 ulp), as the range-checked forms cost twice the
# instructions, or for bfloat16 values its approximate tanh (one instruction instead of two, within 2^-11
# relative, far below bfloat16's 2^-8); a carried row takes a plain move.
_PTX = tl.constexpr(not interpreting())
_LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sigmoid(x, BFLOAT16: tl.constexpr):
    if _PTX and BFLOAT16:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return 0.5 + 0.5 * t
    elif _PTX:
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
def _program_range(seq_len, batch, dilation):
    """This program's share of its branch's steps, chains (sequence, class) end to end: ``[lo, hi)``,
    and the chain length."""
    steps = tl.cdiv(seq_len, dilation)
    total = (batch * dilation * steps).to(tl.int64)
    programs = tl.num_programs(1)
    return tl.program_id(1) * total // programs, (tl.program_id(1) + 1) * total // programs, steps


@triton.jit
def _chain(chain, lo, hi, steps, seq_len, dilation, branch, HC: tl.constexpr, WIDE: tl.constexpr):
    """Chain ``chain``'s steps ``[begin, end)`` in ``[lo, hi)``, how many steps it has inside the sequence,
    and the row of ``[B, T, hc]`` at its step 0 (64-bit if ``WIDE``: the tensor has 2^31 values or more)."""
    begin = tl.maximum(lo - chain * steps, 0).to(tl.int32)
    end = tl.minimum(hi - chain * steps, steps).to(tl.int32)
    sequence, residue = (chain // dilation).to(tl.int32), (chain % dilation).to(tl.int32)
    first = sequence * seq_len + residue
    if WIDE:
        first = first.to(tl.int64)
    first = first * HC + branch
    return begin, end, tl.cdiv(seq_len - residue, dilation), first


@triton.jit
def _row(first, step, length, dilation, HC: tl.constexpr):
    """The chain's row at ``step`` (rows ``dilation * hc`` apart), and whether it is in the sequence."""
    return first + step * (dilation * HC), (step >= 0) & (step < length)


@triton.jit
def _zeros3(SIZE: tl.constexpr):
    """Three rows to carry through a walk, each its own value: Triton finds a loop's carried variables
    by comparing values before and after the body, so a shift ``r1, r2 = r2, r3`` of rows that start
    as one value would be dropped from the loop."""
    return tl.zeros([SIZE], dtype=tl.float32), tl.zeros([SIZE], dtype=tl.float32), tl.zeros([SIZE], dtype=tl.float32)


@triton.jit
def _piece(dim, START: tl.constexpr, SIZE: tl.constexpr, RAGGED: tl.constexpr):
    """One of a row's two pieces: its columns, and which of them are inside D (all, known at compile
    time, unless the piece is ``RAGGED``: no masks to compute a step)."""
    cols = START + tl.arange(0, SIZE)
    if RAGGED:
        return cols, cols < dim
    else:
        return cols, tl.full([SIZE], True, tl.int1)


@triton.jit
def _row_total(head, tail, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """Sum of a row held as its two pieces, in one reduction across the program: each thread first folds
    its head values onto its tail columns (a reshape that keeps them in the thread)."""
    return tl.sum(tl.sum(tl.reshape(head, [TAIL, HEAD // TAIL]), axis=1) + tail, axis=0)


@triton.jit
def _taps(weights_ptr, branch, dim, cols, mask):
    """The columns' tap weights times norm_w (``weights`` is [hc, 4, D]; tap 3 is the current step)."""
    base = weights_ptr + branch * 4 * dim + cols
    return _load(base, mask), _load(base + dim, mask), _load(base + 2 * dim, mask), _load(base + 3 * dim, mask)


@triton.jit
def _conv(w0, w1, w2, w3, r1, r2, r3, r4):
    """sum_k w_k r_{k+1}: the conv of the newest row r4 from it and the three rows before."""
    return w0 * r1 + w1 * r2 + w2 * r3 + w3 * r4


@triton.jit
def _conv_push(w0, w1, w2, w3, c1, c2, c3, h):
    """The conv in transposed form: row ``h`` completes its own step's conv (returned first) and adds
    to the next three steps' partial convs ``c1..c3`` (returned updated, shifted by one)."""
    return c1 + w3 * h, c2 + w2 * h, c3 + w1 * h, w0 * h


@triton.jit
def _forward_store(out_ptr, offset, ours, x, conv, cols, mask):
    out = x + conv * _sigmoid(conv, out_ptr.dtype.element_ty == tl.bfloat16)
    tl.store(out_ptr + offset + cols, out.to(out_ptr.dtype.element_ty), mask=_only_if(ours, mask))


@triton.autotune(configs=_FORWARD_CHOICES, key=["dim", "HC", "HEAD", "TAIL"])
@triton.jit
def _short_conv_forward_kernel(x_ptr, weights_ptr, out_ptr, rstd_ptr, batch, seq_len, dim, dilation, eps,
                               HC: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, RAGGED: tl.constexpr,
                               WIDE: tl.constexpr, PER_SM: tl.constexpr, STAGES: tl.constexpr):
    branch = tl.program_id(0)
    lo, hi, steps = _program_range(seq_len, batch, dilation)
    a, a_mask = _piece(dim, 0, HEAD, False)  # the row's two pieces: a (HEAD columns) and b (TAIL)
    b, b_mask = _piece(dim, HEAD, TAIL, RAGGED)
    per_dim = 1.0 / dim  # a row's mean: its sum times this (a division a step costs ~10 instructions)
    wa0, wa1, wa2, wa3 = _taps(weights_ptr, branch, dim, a, a_mask)
    wb0, wb1, wb2, wb3 = _taps(weights_ptr, branch, dim, b, b_mask)
    for chain in range(lo // steps, tl.cdiv(hi, steps)):
        begin, end, length, first = _chain(chain, lo, hi, steps, seq_len, dilation, branch, HC, WIDE)
        # The next three steps' partial convs (zero before the chain's start: the conv is causal).
        ca1, ca2, ca3 = _zeros3(HEAD)
        cb1, cb2, cb3 = _zeros3(TAIL)
        for step in tl.range(begin - _HALO, end, num_stages=STAGES):
            index, inside = _row(first, step, length, dilation, HC)
            offset = index * dim
            xa = _load(x_ptr + offset + a, _only_if(inside, a_mask))
            xb = _load(x_ptr + offset + b, _only_if(inside, b_mask))
            rstd = tl.math.rsqrt(_row_total(xa * xa, xb * xb, HEAD, TAIL) * per_dim + eps)
            ours = inside & (step >= begin)  # not a halo step
            tl.store(rstd_ptr + index, rstd, mask=ours)
            conv_a, ca1, ca2, ca3 = _conv_push(wa0, wa1, wa2, wa3, ca1, ca2, ca3, xa * rstd)
            conv_b, cb1, cb2, cb3 = _conv_push(wb0, wb1, wb2, wb3, cb1, cb2, cb3, xb * rstd)
            _forward_store(out_ptr, offset, ours, xa, conv_a, a, a_mask)
            _forward_store(out_ptr, offset, ours, xb, conv_b, b, b_mask)


@triton.jit
def _carried(row):
    """``row`` as a new value, to carry one step further. Triton does not software-pipeline a loop in which
    a loaded value passes unchanged from one carried variable to another (a shift ``r1, r2 = r2, r3``):
    an opaque copy makes each carry distance one, at no cost beyond the move the shift needs anyway (on
    the GPU a ``mov`` in inline PTX; the interpreter adds 0.0)."""
    if _PTX:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [row], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return row + 0.0


@triton.jit
def _conv_grad(grad_out, conv, BFLOAT16: tl.constexpr):
    """dL/dconv from dL/dout: the derivative of SiLU."""
    sig = _sigmoid(conv, BFLOAT16)
    return grad_out * sig * (1.0 + conv * (1.0 - sig))


@triton.jit
def _newest_row(x_ptr, grad_out_ptr, offset, rstd, has_grad, cols, mask, w, h, e, p, OWNED: tl.constexpr):
    """Take in a piece of the newest row: its x_hat and conv gradient gc. gc completes dL/dx_hat of the row
    three steps back (returned second) and adds to the partial ones ``e`` of the rows after it; if the row is
    the program's (``OWNED``), gc x_hat[lag] adds into the sums ``p`` (P_k)."""
    w0, w1, w2, w3 = w
    h1, h2, h3 = h
    h4 = _load(x_ptr + offset + cols, mask) * rstd
    g4 = _conv_grad(_load(grad_out_ptr + offset + cols, _only_if(has_grad, mask)), _conv(w0, w1, w2, w3, h1, h2, h3, h4),
                    x_ptr.dtype.element_ty == tl.bfloat16)
    grad_x_hat, e1, e2, e3 = _conv_push(w3, w2, w1, w0, e[0], e[1], e[2], g4)
    if OWNED:
        p = (p[0] + g4 * h1, p[1] + g4 * h2, p[2] + g4 * h3, p[3] + g4 * h4)
    return h4, grad_x_hat, (e1, e2, e3), p


@triton.jit
def _grad_x_store(grad_x_ptr, grad_out_ptr, offset, done, rstd, x_hat, grad_x_hat, row_sum, cols, mask):
    """grad_x = grad_out + rstd (dL/dx_hat - x_hat s / D); grad_out is loaded again (from L2), not carried."""
    mask = _only_if(done, mask)
    grad_x = _load(grad_out_ptr + offset + cols, mask) + rstd * (grad_x_hat - x_hat * row_sum)
    tl.store(grad_x_ptr + offset + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_step(x_ptr, grad_out_ptr, rstd_ptr, grad_x_ptr, step, begin, first, length, dim, dilation, per_dim,
                   a, a_mask, b, b_mask, wa, wb, carried, HC: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
                   OWNED: tl.constexpr):
    """One step of the walk: take in row ``step``, which completes dL/dx_hat of row ``step - 3``, and finish
    row ``step - 4``. ``carried`` is, for each piece (a, then b), the x_hat of the last three rows, their
    partial dL/dx_hat, the sums P_k, and the (dL/dx_hat, x_hat) of the row to finish.

    That row's s needs a reduction across the program, whose shuffles and barriers would stall every warp
    if they waited on this step's conv gradients; its inputs are ready when the step starts, so the
    compiler runs it alongside the step's arithmetic (H200, paper shape: 0.450 to 0.405 ms)."""
    ha, ea, pa, fa, hb, eb, pb, fb = carried
    index, inside = _row(first, step, length, dilation, HC)
    offset = index * dim
    rstd = tl.load(rstd_ptr + index, mask=inside, other=0.0)
    has_grad = inside & (step >= begin)
    ha4, da, ea, pa = _newest_row(x_ptr, grad_out_ptr, offset, rstd, has_grad, a, _only_if(inside, a_mask), wa,
                                  ha, ea, pa, OWNED)
    hb4, db, eb, pb = _newest_row(x_ptr, grad_out_ptr, offset, rstd, has_grad, b, _only_if(inside, b_mask), wb,
                                  hb, eb, pb, OWNED)
    row_sum = _row_total(fa[0] * fa[1], fb[0] * fb[1], HEAD, TAIL) * per_dim
    done_index, done_inside = _row(first, step - _LAG, length, dilation, HC)
    done = done_inside & (step - _LAG >= begin)
    # Loaded again, not carried: a loaded value carried to later steps stops Triton pipelining the loads.
    done_rstd = tl.load(rstd_ptr + done_index, mask=done, other=0.0)
    _grad_x_store(grad_x_ptr, grad_out_ptr, done_index * dim, done, done_rstd, fa[1], fa[0], row_sum, a, a_mask)
    _grad_x_store(grad_x_ptr, grad_out_ptr, done_index * dim, done, done_rstd, fb[1], fb[0], row_sum, b, b_mask)
    fa, fb = (da, _carried(ha[0])), (db, _carried(hb[0]))
    ha = (_carried(ha[1]), _carried(ha[2]), ha4)
    hb = (_carried(hb[1]), _carried(hb[2]), hb4)
    return ha, ea, pa, fa, hb, eb, pb, fb


@triton.jit
def _store_sums(partial, cols, mask, dim, p):
    for k in tl.static_range(4):
        tl.store(partial + k * dim + cols, p[k], mask=mask)


@triton.autotune(configs=_BACKWARD_CHOICES, key=["dim", "HC", "HEAD", "TAIL"])
@triton.jit
def _short_conv_backward_kernel(x_ptr, grad_out_ptr, weights_ptr, rstd_ptr, grad_x_ptr, partial_ptr, partial_rows,
                                batch, seq_len, dim, dilation,
                                HC: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, RAGGED: tl.constexpr,
                                WIDE: tl.constexpr, PER_SM: tl.constexpr, STAGES: tl.constexpr):
    branch = tl.program_id(0)
    lo, hi, steps = _program_range(seq_len, batch, dilation)
    a, a_mask = _piece(dim, 0, HEAD, False)
    b, b_mask = _piece(dim, HEAD, TAIL, RAGGED)
    per_dim = 1.0 / dim
    wa = _taps(weights_ptr, branch, dim, a, a_mask)
    wb = _taps(weights_ptr, branch, dim, b, b_mask)
    # The program's sums P_k over its steps, per column (k = tap; the lag is 3 - k).
    pa = (tl.zeros([HEAD], dtype=tl.float32),) * 4
    pb = (tl.zeros([TAIL], dtype=tl.float32),) * 4
    for chain in range(lo // steps, tl.cdiv(hi, steps)):
        begin, end, length, first = _chain(chain, lo, hi, steps, seq_len, dilation, branch, HC, WIDE)
        # Carried: x_hat of rows step-3..step-1 (h), their dL/dx_hat so far (e: each still lacks the conv
        # gradients of the steps from this one on), and the row step-4 to finish (f).
        fa, fb = _zeros3(HEAD)[:2], _zeros3(TAIL)[:2]
        carried = (_zeros3(HEAD), _zeros3(HEAD), pa, fa, _zeros3(TAIL), _zeros3(TAIL), pb, fb)
        # x from 3 steps before the range (their x_hat feed its convs), grad_out from its start (gc
        # before it is not needed), both until 3 steps after it (their gc feed its last rows' dL/dx_hat),
        # and a fourth step to finish its last row: the steps after the range are not the program's own,
        # so they add nothing to P_k.
        for step in tl.range(begin - _HALO, end, num_stages=STAGES):
            carried = _backward_step(x_ptr, grad_out_ptr, rstd_ptr, grad_x_ptr, step, begin, first, length, dim,
                                     dilation, per_dim, a, a_mask, b, b_mask, wa, wb, carried, HC, HEAD, TAIL, True)
        for step in tl.range(end, end + _LAG, num_stages=STAGES):
            carried = _backward_step(x_ptr, grad_out_ptr, rstd_ptr, grad_x_ptr, step, begin, first, length, dim,
                                     dilation, per_dim, a, a_mask, b, b_mask, wa, wb, carried, HC, HEAD, TAIL, False)
        pa, pb = carried[2], carried[6]
    partial = partial_ptr + (branch * partial_rows + tl.program_id(1)).to(tl.int64) * 4 * dim
    _store_sums(partial, a, a_mask, dim, pa)
    _store_sums(partial, b, b_mask, dim, pb)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(value: torch.Tensor, dilation: int, programs_per_sm: int) -> int:
    """Programs a branch: all resident at once, each with at least MIN_STEPS_PER_PROGRAM steps."""
    if not value.is_cuda:
        return INTERPRETER_PROGRAMS
    batch, seq_len, hc, _ = value.shape
    steps = batch * dilation * -(-seq_len // dilation)
    return max(1, min(programs_per_sm * _sm_count(value.device.index) // hc, steps // MIN_STEPS_PER_PROGRAM))


def _layout(value: torch.Tensor) -> dict:
    """The kernels' compile-time layout of ``value [B, T, hc, D]``: a row's two power-of-two pieces, ``HEAD``
    and ``TAIL`` columns, that cover D with little waste (``RAGGED`` when the tail reaches past D; the head
    never does), and ``WIDE`` when row offsets need 64 bits."""
    dim = value.shape[-1]
    head = max(1, triton.next_power_of_2(dim) // 2)
    tail = triton.next_power_of_2(max(1, dim - head))
    return {"HEAD": head, "TAIL": tail, "RAGGED": head + tail != dim, "WIDE": value.numel() >= INDEX_LIMIT}


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
        with written_in_full():
            out = torch.empty_like(value)
            rstd = torch.empty(batch, seq_len, hc, dtype=torch.float32, device=value.device)
        if value.numel():
            grid = lambda meta: (hc, _programs(value, dilation, meta["PER_SM"]))  # noqa: E731
            _short_conv_forward_kernel[grid](value, weights, out, rstd, batch, seq_len, dim, dilation, eps, HC=hc,
                                             **_layout(value))
        ctx.save_for_backward(value, norm_w, taps, weights, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, norm_w, taps, weights, rstd = ctx.saved_tensors
        batch, seq_len, hc, dim = value.shape
        with written_in_full():
            grad_value = torch.empty_like(value)
            # Each program's sums P_k, [hc, programs, 4, D]: sized for the most programs autotuning may pick
            # (only the rows of the programs launched are written, and read).
            partial = torch.empty(hc, _programs(value, ctx.dilation, _MAX_BACKWARD_PER_SM), TAPS, dim,
                                  dtype=torch.float32, device=value.device)
        if value.numel():
            grid = lambda meta: (hc, _programs(value, ctx.dilation, meta["PER_SM"]))  # noqa: E731
            kernel = _short_conv_backward_kernel
            kernel[grid](value, grad_out.contiguous(), weights, rstd, grad_value, partial, partial.shape[1],
                         batch, seq_len, dim,
                         ctx.dilation, HC=hc, **_layout(value))
            programs = _programs(value, ctx.dilation, kernel.best_config.kwargs["PER_SM"])
            sums = partial[:, :programs].sum(1)  # P_k per branch, [hc, 4, D]
        else:
            sums = torch.zeros(hc, TAPS, dim, dtype=torch.float32, device=value.device)
        grad_norm_w = (sums * taps).sum(1)
        grad_taps = (sums * norm_w.float()[:, None, :]).transpose(1, 2).reshape(hc * dim, TAPS)
        kernel = ctx.conv_shape[-1]
        grad_conv_w = grad_taps[:, TAPS - kernel:].reshape(ctx.conv_shape)
        return grad_value, grad_norm_w.to(norm_w.dtype), grad_conv_w.to(ctx.conv_dtype), None, None
