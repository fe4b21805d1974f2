"""``short_conv`` on each implementation against a float64 evaluation of the reference."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import CUDA_SHAPES, DTYPES, TRITON, assert_matches_reference, cases, conv_inputs

import kernels

# (batch, seq, hc, D, kernel, dilation, programs a branch on the CPU interpreter).
CPU_SHAPES = [
    (2, 11, 3, 20, 4, 3, 4),  # 6 chains of 4 steps a branch, 6 steps a program: ranges cross chains; D = 16 + 4
    (2, 17, 3, 20, 3, 1, 3),  # ranges start and end inside chains, with halos on both sides
    (1, 40, 3, 200, 4, 3, 1),  # one program walks every chain; D = 128 + 72 of a 128-column tail (ragged)
    (1, 9, 3, 16, 4, 2, 2),  # D a power of two: two pieces of 8
    (2, 2, 3, 136, 2, 3, 8),  # shorter than the halo; class 2 has no step at all; idle programs
    (2, 1, 3, 20, 1, 1, 64),  # more programs than steps: the idle ones still write their (zero) sums
]
# The CUDA shapes' tokens as 4 sequences where they split evenly, else one; the model's 4 taps at
# dilation 3; programs as the card's SMs give them.
CUDA_CONV_SHAPES = [(4, tokens // 4, hc, dim, 4, 3, None) if tokens % 4 == 0 else (1, tokens, hc, dim, 4, 3, None)
                    for tokens, hc, dim, _, _ in CUDA_SHAPES]


def interpreter_programs(monkeypatch, programs: int) -> None:
    """Set the CPU interpreter's programs a branch (on CUDA the grid follows the card's SMs)."""
    import kernels.short_conv_triton as conv_triton

    monkeypatch.setattr(conv_triton, "INTERPRETER_PROGRAMS", programs)


def check_conv(batch, seq, hc, dim, kernel, dilation, dtype, device) -> None:
    assert_matches_reference(kernels.short_conv, kernels.short_conv_reference,
                             conv_inputs(batch, seq, hc, dim, kernel, dtype, device), dilation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, batch, seq, hc, dim, kernel, dilation, programs",
                         cases(CPU_SHAPES, CUDA_CONV_SHAPES), indirect=["impl"])
def test_short_conv(impl, batch, seq, hc, dim, kernel, dilation, programs, dtype, monkeypatch):
    if impl.name == "interpreter":
        interpreter_programs(monkeypatch, programs)
    check_conv(batch=batch, seq=seq, hc=hc, dim=dim, kernel=kernel, dilation=dilation, dtype=dtype, device=impl.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", cases(on=TRITON), indirect=True)
def test_short_conv_with_64_bit_row_offsets(impl, dtype, monkeypatch):
    """The path that tensors of 2^31 values or more take (here forced at a tiny shape)."""
    import kernels.short_conv_triton as conv_triton

    monkeypatch.setattr(conv_triton, "INDEX_LIMIT", 0)
    interpreter_programs(monkeypatch, 3)
    check_conv(batch=2, seq=17, hc=3, dim=20, kernel=4, dilation=3, dtype=dtype, device=impl.device)


@pytest.mark.parametrize("impl", cases(on=TRITON), indirect=True)
def test_short_conv_rejects_more_taps_than_the_kernel_has(impl):
    value = torch.randn(1, 4, 1, 8, device=impl.device)
    norm_w, conv_w = torch.ones(1, 8, device=impl.device), torch.ones(8, 5, device=impl.device)
    with pytest.raises(ValueError, match="conv_w"):
        kernels.short_conv(value, norm_w, conv_w, 1)


@pytest.mark.parametrize("call, field", [
    (lambda: kernels.short_conv(torch.zeros(1, 3, 2, 4), torch.ones(2, 4), torch.ones(7, 4), 1), "conv_w"),
    (lambda: kernels.short_conv(torch.zeros(1, 3, 2, 4), torch.ones(2, 4), torch.ones(8, 4), 0), "dilation"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()
