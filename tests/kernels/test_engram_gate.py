"""``engram_gate`` on each implementation against a float64 evaluation of the reference."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import CUDA_SHAPES, DTYPES, TRITON, assert_matches_reference, cases, gate_inputs, relative_error

import kernels

# (tokens, hc, D). The interpreter's tiles are 2 or 4 tokens x 256 columns: D=300 takes a full and a
# masked chunk, D=24 one masked chunk; 1, 5, 7 and 11 tokens end in a part-filled tile; hc=3 pads
# branches to 4.
CPU_SHAPES = [(5, 3, 24), (1, 3, 300), (11, 4, 300), (7, 1, 200)]
CUDA_GATE_SHAPES = [(tokens, hc, dim) for tokens, hc, dim, _, _ in CUDA_SHAPES]


def check_gate(tokens, hc, dim, dtype, device) -> None:
    assert_matches_reference(kernels.engram_gate, kernels.engram_gate_reference,
                             gate_inputs(tokens, hc, dim, dtype, device), torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, tokens, hc, dim", cases(CPU_SHAPES, CUDA_GATE_SHAPES), indirect=["impl"])
def test_engram_gate(impl, tokens, hc, dim, dtype):
    check_gate(tokens=tokens, hc=hc, dim=dim, dtype=dtype, device=impl.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", cases(on=TRITON), indirect=True)
def test_engram_gate_backward_runs_of_several_tiles(impl, dtype, monkeypatch):
    """Two runs of 6 and 5 tokens: each sums its weight gradients over a full and a part-filled tile."""
    import kernels.engram_gate_triton as gate_triton

    monkeypatch.setattr(gate_triton, "BACKWARD_RUNS", 2)
    check_gate(tokens=11, hc=3, dim=300, dtype=dtype, device=impl.device)


@pytest.mark.parametrize("impl", cases(), indirect=True)
def test_engram_gate_clamped_rows_pass_gradient_to_value_only(impl):
    """A row whose |score| is under the 1e-6 clamp (here 0: a zero hidden state) has a constant gate."""
    key, hidden, value, key_w, hidden_w = gate_inputs(6, 3, 40, torch.float32, impl.device)
    hidden[1] = 0
    hidden[4, 2] = 0
    grad_out = torch.randn(6, 3, 40, device=impl.device)
    grads = {}
    for name, fn in (("dispatched", kernels.engram_gate), ("reference", kernels.engram_gate_reference)):
        leaves = [t.clone().requires_grad_() for t in (key, hidden, value, key_w, hidden_w)]
        grads[name] = torch.autograd.grad(fn(*leaves), leaves, grad_out)
    grad_key, grad_hidden = grads["dispatched"][:2]
    for grad in (grad_key, grad_hidden):
        assert not grad[1].any() and not grad[4, 2].any()
        assert grad[0].abs().min() > 0
    for got, expected in zip(grads["dispatched"], grads["reference"]):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("call, field", [
    (lambda: kernels.engram_gate(*gate_inputs(3, 2, 4, torch.float32, "cpu")[:2], torch.zeros(3, 5),
                                 torch.ones(2, 4), torch.ones(2, 4)), "value"),
    (lambda: kernels.engram_gate(*gate_inputs(3, 2, 4, torch.float32, "cpu")[:3], torch.ones(4), torch.ones(2, 4)),
     "key_norm_w"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()
