"""Each Triton kernel against its reference on CPU, through TRITON_INTERPRET=1 (tiny shapes).

Triton picks interpreter or compiler when its own library is decorated, at ``import triton``, so
the variable is set here at collection, before any test runs. Should something in this process have
imported Triton earlier, the module re-runs itself in a fresh interpreter instead. On a CUDA machine
the GPU tests cover the same kernels compiled, and this module steps aside.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ON_GPU = torch.cuda.is_available()
TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kernels  # noqa: E402
from test_kernels_common import (  # noqa: E402, F401  (seeded is an autouse fixture)
    check_conv, check_gate, check_gather, check_model_matches_reference,
    check_segment_sums_have_the_same_bits_for_every_tile, gate_inputs, relative_error, seeded,
)

pytestmark = pytest.mark.skipif(ON_GPU, reason="on a CUDA machine the GPU tests run these kernels compiled")
in_this_process = pytest.mark.skipif(TRITON_PREIMPORTED, reason="Triton was imported before; see the subprocess")


@pytest.mark.skipif(not TRITON_PREIMPORTED, reason="this process runs the interpreter tests itself")
def test_in_a_fresh_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


DTYPES = [torch.float32, torch.bfloat16]


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows(dtype):
    check_gather(num_rows=13, dim=12, tokens=7, heads=3, dtype=dtype, device="cpu")


@in_this_process
def test_segment_sums_have_the_same_bits_for_every_tile():
    check_segment_sums_have_the_same_bits_for_every_tile(
        [dict(BLOCK_U=16), dict(BLOCK_U=4), dict(BLOCK_U=2)], "cpu")


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hc, dim", [(5, 3, 24), (1, 3, 300), (11, 4, 300), (7, 1, 200)])
def test_engram_gate(dtype, tokens, hc, dim):
    # The interpreter's tiles are 2 or 4 tokens x 256 columns: D=300 takes a full and a masked chunk,
    # D=24 one masked chunk; 1, 5, 7 and 11 tokens end in a part-filled tile; hc=3 pads branches to 4.
    check_gate(tokens=tokens, hc=hc, dim=dim, dtype=dtype, device="cpu")


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_engram_gate_backward_runs_of_several_tiles(dtype, monkeypatch):
    """Two runs of 6 and 5 tokens: each sums its weight gradients over a full and a part-filled tile."""
    import kernels.engram_gate_triton as gate_triton

    monkeypatch.setattr(gate_triton, "BACKWARD_RUNS", 2)
    check_gate(tokens=11, hc=3, dim=300, dtype=dtype, device="cpu")


@in_this_process
def test_engram_gate_clamped_rows_pass_gradient_to_value_only():
    """A row whose |score| is under the 1e-6 clamp (here 0: a zero hidden state) has a constant gate."""
    key, hidden, value, key_w, hidden_w = gate_inputs(6, 3, 40, torch.float32, "cpu")
    hidden[1] = 0
    hidden[4, 2] = 0
    grad_out = torch.randn(6, 3, 40)
    grads = {}
    for name, fn in (("triton", kernels.EngramGate.apply), ("reference", kernels.engram_gate_reference)):
        leaves = [t.clone().requires_grad_() for t in (key, hidden, value, key_w, hidden_w)]
        grads[name] = torch.autograd.grad(fn(*leaves), leaves, grad_out)
    grad_key, grad_hidden = grads["triton"][:2]
    for grad in (grad_key, grad_hidden):
        assert not grad[1].any() and not grad[4, 2].any()
        assert grad[0].abs().min() > 0
    for got, expected in zip(grads["triton"], grads["reference"]):
        assert relative_error(got, expected) < 1e-5


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, seq, dim, kernel, dilation, programs", [
    (2, 11, 20, 4, 3, 4),  # 6 chains of 4 steps a branch, 6 steps a program: ranges cross chains; D = 16 + 4
    (2, 17, 20, 3, 1, 3),  # ranges start and end inside chains, with halos on both sides
    (1, 40, 200, 4, 3, 1),  # one program walks every chain; D = 128 + 72 of a 128-column tail (ragged)
    (1, 9, 16, 4, 2, 2),  # D a power of two: two pieces of 8
    (2, 2, 136, 2, 3, 8),  # shorter than the halo; class 2 has no step at all; idle programs
    (2, 1, 20, 1, 1, 64),  # more programs than steps: the idle ones still write their (zero) sums
])
def test_short_conv(dtype, batch, seq, dim, kernel, dilation, programs, monkeypatch):
    import kernels.short_conv_triton as conv_triton

    monkeypatch.setattr(conv_triton, "INTERPRETER_PROGRAMS", programs)
    check_conv(batch=batch, seq=seq, hc=3, dim=dim, kernel=kernel, dilation=dilation, dtype=dtype, device="cpu")


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_conv_with_64_bit_row_offsets(dtype, monkeypatch):
    """The path that tensors of 2^31 values or more take (here forced at a tiny shape)."""
    import kernels.short_conv_triton as conv_triton

    monkeypatch.setattr(conv_triton, "INDEX_LIMIT", 0)
    monkeypatch.setattr(conv_triton, "INTERPRETER_PROGRAMS", 3)
    check_conv(batch=2, seq=17, hc=3, dim=20, kernel=4, dilation=3, dtype=dtype, device="cpu")


@in_this_process
def test_short_conv_rejects_more_taps_than_the_kernel_has():
    value, norm_w, conv_w = torch.randn(1, 4, 1, 8), torch.ones(1, 8), torch.ones(8, 5)
    with pytest.raises(ValueError, match="conv_w"):
        kernels.ShortConv.apply(value, norm_w, conv_w, 1)


@in_this_process
def test_bf16_rows_give_float32_row_grads(monkeypatch):
    monkeypatch.setenv("ENGRAM_KERNELS", "triton")
    rows = torch.randn(6, 4, dtype=torch.bfloat16)
    inverse = torch.tensor([[0, 1], [1, 1], [5, 0]])
    embeddings = kernels.gather_rows(rows, inverse, torch.float32).requires_grad_()
    (embeddings * torch.arange(24.0).reshape(3, 8)).sum().backward()
    row_grads = kernels.scatter_row_grads(embeddings.grad, inverse, len(rows))
    assert row_grads.dtype == torch.float32
    assert torch.equal(row_grads, kernels.scatter_row_grads_reference(embeddings.grad, inverse, len(rows)))


@in_this_process
def test_golden_forward_through_the_kernels(golden_dir, monkeypatch):
    """The demo's Engram forward, in float32 through the Triton path, equals the golden output."""
    monkeypatch.setenv("ENGRAM_KERNELS", "triton")
    g = {k: torch.from_numpy(v).float() for k, v in np.load(golden_dir / "engram_forward.npz").items()}
    batch, seq, hc, dim = g["hidden"].shape
    unique_rows, inverse = torch.unique(g["embeddings"].reshape(-1, 16), dim=0, return_inverse=True)
    embeddings = kernels.gather_rows(unique_rows, inverse.reshape(batch * seq, -1), torch.float32)
    key = torch.einsum("gdk,nk->ngd", g["key_w"], embeddings) + g["key_b"]
    value = embeddings @ g["value_w"].T + g["value_b"]
    gated = kernels.engram_gate(key, g["hidden"].reshape(-1, hc, dim), value, g["norm1_w"], g["norm2_w"],
                                eps=torch.finfo(torch.float64).eps)
    out = kernels.short_conv(gated.reshape(batch, seq, hc, dim), g["conv_norm_w"], g["conv_w"], dilation=3)
    assert relative_error(out, g["output"]) < 1e-5


@in_this_process
def test_model_forward_and_backward_through_the_kernels_equal_the_reference_path(monkeypatch):
    check_model_matches_reference(monkeypatch, "cpu")
