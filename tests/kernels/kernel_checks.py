"""What the kernel tests share: the implementations each case runs on, the inputs, and the comparison
with a float64 evaluation of the reference.

An op's tests take ``impl`` (the conftest fixture, parametrised indirectly through ``cases``): the
PyTorch reference on CPU, the Triton kernels under ``TRITON_INTERPRET=1`` on CPU (tiny shapes), or
the Triton kernels compiled for a CUDA GPU (the paper's and the demo's shapes). Triton picks
interpreter or compiler when its own library is decorated, at ``import triton``, so the variable is set
here, when the conftest imports this module at collection, before any test runs. Should something in
this process have imported Triton earlier, the interpreter cases run in a fresh interpreter instead
(``test_in_a_fresh_interpreter``). On a CUDA machine the CUDA cases run the same kernels compiled, and
the interpreter cases step aside.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

ON_GPU = torch.cuda.is_available()
TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@dataclass(frozen=True)
class Implementation:
    """Where a case runs: its tensors' device and the ``ENGRAM_KERNELS`` path the dispatchers take."""

    name: str
    device: str
    backend: str


IMPLEMENTATIONS = {
    "reference": Implementation("reference", "cpu", "reference"),
    "interpreter": Implementation("interpreter", "cpu", "triton"),
    "cuda": Implementation("cuda", "cuda", "triton"),
}
TRITON = ("interpreter", "cuda")
CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]
_MARKS = {
    "reference": [],
    "interpreter": [
        pytest.mark.skipif(ON_GPU, reason="on a CUDA machine the CUDA cases run these kernels compiled"),
        pytest.mark.skipif(TRITON_PREIMPORTED, reason="Triton was imported before; see test_in_a_fresh_interpreter"),
    ],
    "cuda": CUDA_MARKS,
}

# (tokens, hc, D, heads, head dim): the paper's model, the demo's, and an odd small one.
CUDA_SHAPES = [(16384, 4, 2560, 16, 80), (16384, 4, 1024, 16, 64), (333, 3, 200, 6, 24)]
DTYPES = [torch.float32, torch.bfloat16]
# Relative error against a float64 evaluation of the reference: float32 math lands near 1e-7, bf16
# outputs near 4e-3 (the CPU interpreter truncates to bf16 instead of rounding, doubling that).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def cases(cpu=((),), cuda=((),), on=tuple(IMPLEMENTATIONS)) -> list:
    """Parameters ``(implementation name, *shape)`` for ``parametrize(..., indirect=["impl"])``: each
    implementation in ``on``, the CPU ones at each of the ``cpu`` shapes, CUDA at each of the ``cuda`` shapes."""
    return [pytest.param(name, *shape, marks=_MARKS[name])
            for name in on for shape in (cuda if name == "cuda" else cpu)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_matches_reference(fast, reference, inputs: list[torch.Tensor], *args, **kwargs) -> None:
    """``fast(*inputs, *args)`` is as close to the float64 reference as the reference run at the inputs'
    precision is (or within ``TOLERANCE``), forward and every input gradient.

    The gate's gradient holds ``1/sqrt|score|``: near a zero score any float32 evaluation, the
    reference's included, drifts from float64, so the bar is the reference's own error.
    """
    dtype = inputs[0].dtype
    grad_out = None
    results = {}
    for name, fn, cast in (("fast", fast, None), ("reference", reference, None), ("exact", reference, torch.float64)):
        leaves = [(t.to(cast) if cast else t).detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves, *args, **kwargs)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out.to(out.dtype))
        results[name] = (out, *grads)
    assert results["fast"][0].dtype == dtype
    names = ["output"] + [f"grad of input {i}" for i, t in enumerate(inputs) if t.is_floating_point()]
    for name, got, ours, exact in zip(names, results["fast"], results["reference"], results["exact"]):
        error, bar = relative_error(got, exact), max(TOLERANCE[dtype], 2 * relative_error(ours, exact))
        assert error < bar, f"{name}: relative error {error:.2e} > {bar:.2e} ({dtype})"


def gather_inputs(num_rows, dim, tokens, heads, dtype, device):
    rows = torch.randn(num_rows, dim, dtype=dtype, device=device)
    inverse = torch.randint(0, num_rows, (tokens, heads), device=device)
    inverse[0, :] = 0  # a row used many times: the scatter-add must sum, not overwrite
    return rows, inverse


def gate_inputs(tokens, hc, dim, dtype, device):
    key = torch.randn(tokens, hc, dim, dtype=dtype, device=device)
    hidden = torch.randn(tokens, hc, dim, dtype=dtype, device=device)
    value = torch.randn(tokens, dim, dtype=dtype, device=device)
    key_w = 1 + 0.3 * torch.randn(hc, dim, device=device)
    hidden_w = 1 + 0.3 * torch.randn(hc, dim, device=device)
    # The gate's gradient jumps from 0 to 1/(2 sqrt(1e-6)) where |score| crosses its clamp at 1e-6;
    # float32 rounding of a 2560-term score (~1e-7) can land either side, so keep scores clear of 0
    # by letting such rows' hidden state equal their key (score ~ sqrt(D)).
    normed = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w  # noqa: E731
    score = (normed(key.double(), key_w.double()) * normed(hidden.double(), hidden_w.double())).sum(-1)
    near_zero = score.abs() < 1e-3 * dim**0.5
    hidden[near_zero] = key[near_zero]
    return [key, hidden, value, key_w, hidden_w]


def conv_inputs(batch, seq, hc, dim, kernel, dtype, device):
    value = torch.randn(batch, seq, hc, dim, dtype=dtype, device=device)
    norm_w = 1 + 0.3 * torch.randn(hc, dim, device=device)
    conv_w = 0.5 * torch.randn(hc * dim, kernel, device=device)
    return [value, norm_w, conv_w]
