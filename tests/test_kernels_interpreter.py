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
    check_conv, check_gate, check_gather, check_model_matches_reference, relative_error, seeded,
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
@pytest.mark.parametrize("dtype", DTYPES)
def test_engram_gate(dtype):
    check_gate(tokens=5, hc=3, dim=24, dtype=dtype, device="cpu")


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, dilation", [(4, 3), (3, 1)])
def test_short_conv(dtype, kernel, dilation):
    # 11 steps at dilation 3 with chunks of a few steps: rows cross chunk and sequence edges.
    check_conv(batch=2, seq=11, hc=3, dim=20, kernel=kernel, dilation=dilation, dtype=dtype, device="cpu")


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
