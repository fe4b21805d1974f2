"""Shared checks of each Triton kernel against its PyTorch reference, used on CPU and on the GPU.

Also tests the dispatcher itself (which path runs, bad input named, outputs allocated without deterministic
mode's fill), which needs no Triton.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.dispatch import written_in_full

# Relative error against a float64 evaluation of the reference: float32 math lands near 1e-7, bf16
# outputs near 4e-3 (the CPU interpreter truncates to bf16 instead of rounding, doubling that).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


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


def check_gather(num_rows, dim, tokens, heads, dtype, device) -> None:
    rows, inverse = gather_inputs(num_rows, dim, tokens, heads, dtype, device)
    out = kernels.GatherRows.apply(rows, inverse, torch.float32)
    assert torch.equal(out, kernels.gather_rows_reference(rows, inverse, torch.float32))
    grad = torch.randn(tokens, heads * dim, dtype=dtype, device=device)
    expected = kernels.scatter_row_grads_reference(grad.double(), inverse, num_rows)
    segments = kernels.row_segments(inverse, num_rows)
    # Segment sums (given segments, or built under deterministic mode) are bitwise reproducible.
    for deterministic, given in ((False, None), (True, None), (False, segments)):
        torch.use_deterministic_algorithms(deterministic)
        try:
            row_grads = kernels.scatter_row_grads_triton(grad, inverse, num_rows, given)
            again = kernels.scatter_row_grads_triton(grad, inverse, num_rows, given)
        finally:
            torch.use_deterministic_algorithms(False)
        assert row_grads.dtype == torch.float32
        assert relative_error(row_grads, expected) < 1e-6
        if deterministic or given is not None:
            assert torch.equal(row_grads, again)
    # Through autograd, with the segments built ahead as the row tables do.
    leaf = rows.detach().float().requires_grad_()
    kernels.GatherRows.apply(leaf, inverse, torch.float32, segments).backward(grad.float())
    assert relative_error(leaf.grad, expected) < 1e-6


def check_segment_sums_have_the_same_bits_for_every_tile(tiles, device) -> None:
    """Each row's entries are summed in index order, a pair at a time, whatever the tile (``BLOCK_U`` rows a
    program): no autotuning choice changes the bits, so a run in another process, which may tune
    differently, sums the same."""
    import triton

    from kernels.row_gather_triton import _segment_sum_kernel

    num_rows, dim, tokens, heads = 9, 12, 40, 3
    inverse = torch.randint(0, num_rows, (tokens, heads), device=device)
    inverse[:13, 0] = 4  # one row of 13+ entries: several rounds
    grad = torch.randn(tokens * heads, dim, device=device)
    order, offsets = kernels.row_segments(inverse, num_rows)
    in_pairs = torch.zeros(num_rows, dim, device=device)
    for row in range(num_rows):
        entries = order[offsets[row]:offsets[row + 1]].tolist()
        for first in range(0, len(entries), 2):
            in_pairs[row] += grad[entries[first:first + 2]].sum(0)
    for tile in tiles:
        row_grads = torch.full((num_rows, dim), float("nan"), device=device)
        _segment_sum_kernel.fn[(triton.cdiv(num_rows, tile["BLOCK_U"]),)](
            grad, order, offsets, row_grads, num_rows, dim, BLOCK_D=16, **tile)
        assert torch.equal(row_grads, in_pairs), tile


def check_row_segments(num_rows, tokens, heads, device) -> None:
    """Every row's segment lists exactly its entries, in index order, in int32 (they fit)."""
    inverse = torch.randint(0, num_rows, (tokens, heads), device=device)
    order, offsets = kernels.row_segments(inverse, num_rows)
    assert order.dtype == offsets.dtype == torch.int32
    flat = inverse.reshape(-1).cpu()
    order, offsets = order.cpu(), offsets.cpu()
    for row in range(num_rows):
        expected = (flat == row).nonzero().flatten()
        assert torch.equal(order[offsets[row]:offsets[row + 1]], expected), row


def check_gate(tokens, hc, dim, dtype, device) -> None:
    assert_matches_reference(kernels.EngramGate.apply, kernels.engram_gate_reference,
                             gate_inputs(tokens, hc, dim, dtype, device), torch.finfo(dtype).eps)


def check_conv(batch, seq, hc, dim, kernel, dilation, dtype, device) -> None:
    assert_matches_reference(kernels.ShortConv.apply, kernels.short_conv_reference,
                             conv_inputs(batch, seq, hc, dim, kernel, dtype, device), dilation)


def check_model_matches_reference(monkeypatch, device) -> None:
    """The EngramMoE model's logits and every parameter gradient: Triton path == reference path."""
    from test_model import random_batch, tiny_model

    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ENGRAM_KERNELS", backend)
        torch.manual_seed(0)
        model = tiny_model().to(device)
        input_ids, row_ids = random_batch(model)
        output = model(input_ids.to(device), engram_row_ids=row_ids, labels=input_ids.to(device))
        output.loss.backward()
        # A routed expert that no token picked has no gradient, on both paths alike.
        grads = {name: p.grad.to_dense() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (output.logits.detach(), grads)
    (expected_logits, expected_grads), (logits, grads) = results["reference"], results["triton"]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# The dispatcher: pure Python, no Triton involved.

def test_reference_path_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("ENGRAM_KERNELS", raising=False)
    rows, inverse = gather_inputs(5, 4, 3, 2, torch.float32, "cpu")
    assert not kernels.use_triton(rows)
    assert torch.equal(kernels.gather_rows(rows, inverse, torch.float32), rows[inverse].reshape(3, 8))


def test_row_segments_group_entries_by_row_in_index_order():
    check_row_segments(num_rows=9, tokens=11, heads=3, device="cpu")


def test_forced_backends(monkeypatch):
    rows = torch.zeros(2, 2)
    monkeypatch.setenv("ENGRAM_KERNELS", "triton")
    assert kernels.use_triton(rows)
    assert not kernels.use_triton(rows.double()), "float64 keeps the reference's float64 math"
    monkeypatch.setenv("ENGRAM_KERNELS", "reference")
    assert not kernels.use_triton(rows)
    monkeypatch.setenv("ENGRAM_KERNELS", "fast")
    with pytest.raises(ValueError, match="ENGRAM_KERNELS"):
        kernels.use_triton(rows)


@pytest.mark.parametrize("call, field", [
    (lambda: kernels.gather_rows(torch.zeros(4), torch.zeros(2, 2, dtype=torch.long), torch.float32), "unique_rows"),
    (lambda: kernels.gather_rows(torch.zeros(4, 2), torch.zeros(2, 2), torch.float32), "inverse"),
    (lambda: kernels.gather_rows(torch.zeros(4, 2), torch.zeros(2, 2, dtype=torch.long), torch.float32,
                                 kernels.row_segments(torch.zeros(3, dtype=torch.long), 4)), "segments"),
    (lambda: kernels.gather_rows(torch.zeros(4, 2), torch.zeros(2, 2, dtype=torch.long), torch.float32,
                                 kernels.RowSegments(torch.arange(4), torch.tensor([0, 1, 2, 3, 4]))), "segments"),
    (lambda: kernels.engram_gate(*gate_inputs(3, 2, 4, torch.float32, "cpu")[:2], torch.zeros(3, 5),
                                 torch.ones(2, 4), torch.ones(2, 4)), "value"),
    (lambda: kernels.engram_gate(*gate_inputs(3, 2, 4, torch.float32, "cpu")[:3], torch.ones(4), torch.ones(2, 4)),
     "key_norm_w"),
    (lambda: kernels.short_conv(torch.zeros(1, 3, 2, 4), torch.ones(2, 4), torch.ones(7, 4), 1), "conv_w"),
    (lambda: kernels.short_conv(torch.zeros(1, 3, 2, 4), torch.ones(2, 4), torch.ones(8, 4), 0), "dilation"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_written_in_full_skips_deterministic_modes_nan_fill_only_inside():
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(64).isnan().all(), "deterministic mode fills new tensors with NaN"
        with written_in_full():
            assert not torch.utils.deterministic.fill_uninitialized_memory
        assert torch.utils.deterministic.fill_uninitialized_memory
        with pytest.raises(RuntimeError, match="launch failed"), written_in_full():
            raise RuntimeError("launch failed")
        assert torch.utils.deterministic.fill_uninitialized_memory, "restored after an error too"
    finally:
        torch.use_deterministic_algorithms(False)
