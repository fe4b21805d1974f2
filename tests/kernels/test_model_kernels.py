"""The three ops together: the demo's Engram forward against its golden output, and the EngramMoE model
through the Triton path against the reference path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_checks import TRITON, cases, relative_error

import kernels

MODEL_TESTS = Path(__file__).resolve().parents[1] / "compute" / "model"  # test_model's tiny model and batch


@pytest.mark.parametrize("impl", cases(), indirect=True)
def test_golden_forward_through_the_kernels(impl, golden_dir):
    """The demo's Engram forward, in float32 through each path, equals the golden output."""
    g = {k: torch.from_numpy(v).float().to(impl.device) for k, v in np.load(golden_dir / "engram_forward.npz").items()}
    batch, seq, hc, dim = g["hidden"].shape
    unique_rows, inverse = torch.unique(g["embeddings"].reshape(-1, 16), dim=0, return_inverse=True)
    embeddings = kernels.gather_rows(unique_rows, inverse.reshape(batch * seq, -1), torch.float32)
    key = torch.einsum("gdk,nk->ngd", g["key_w"], embeddings) + g["key_b"]
    value = embeddings @ g["value_w"].T + g["value_b"]
    gated = kernels.engram_gate(key, g["hidden"].reshape(-1, hc, dim), value, g["norm1_w"], g["norm2_w"],
                                eps=torch.finfo(torch.float64).eps)
    out = kernels.short_conv(gated.reshape(batch, seq, hc, dim), g["conv_norm_w"], g["conv_w"], dilation=3)
    assert relative_error(out, g["output"]) < 1e-5


@pytest.mark.parametrize("impl", cases(on=TRITON), indirect=True)
def test_model_forward_and_backward_through_the_kernels_equal_the_reference_path(impl, monkeypatch):
    """The EngramMoE model's logits and every parameter gradient: Triton path == reference path."""
    monkeypatch.syspath_prepend(str(MODEL_TESTS))
    from test_model import random_batch, tiny_model

    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ENGRAM_KERNELS", backend)
        torch.manual_seed(0)
        model = tiny_model().to(impl.device)
        input_ids, row_ids = random_batch(model)
        output = model(input_ids.to(impl.device), engram_row_ids=row_ids, labels=input_ids.to(impl.device))
        output.loss.backward()
        # A routed expert that no token picked has no gradient, on both paths alike.
        grads = {name: p.grad.to_dense() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (output.logits.detach(), grads)
    (expected_logits, expected_grads), (logits, grads) = results["reference"], results["triton"]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
