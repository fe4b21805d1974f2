"""Each Triton kernel against its reference on an NVIDIA GPU, at the paper's and the demo's shapes."""
from __future__ import annotations

import pytest
import torch

import kernels
from test_kernels_common import (  # noqa: F401  (seeded is an autouse fixture)
    check_conv, check_gate, check_gather, check_model_matches_reference, check_row_segments,
    check_segment_sums_have_the_same_bits_for_every_tile, seeded,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16]
# (tokens, hc, D, heads, head dim): the paper's model, the demo's, and an odd small one.
SHAPES = [(16384, 4, 2560, 16, 80), (16384, 4, 1024, 16, 64), (333, 3, 200, 6, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hc, dim, heads, head_dim", SHAPES)
def test_gather_rows(dtype, tokens, hc, dim, heads, head_dim):
    check_gather(num_rows=tokens * heads // 2, dim=head_dim, tokens=tokens, heads=heads, dtype=dtype, device="cuda")


def test_segment_sums_have_the_same_bits_for_every_autotuning_choice():
    from kernels.row_gather_triton import _SEGMENT_TILES

    tiles = [dict(config.kwargs, num_warps=config.num_warps) for config in _SEGMENT_TILES]
    check_segment_sums_have_the_same_bits_for_every_tile(tiles, "cuda")


def test_row_segments_on_the_gpu():
    check_row_segments(num_rows=500, tokens=333, heads=6, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hc, dim, heads, head_dim", SHAPES)
def test_engram_gate(dtype, tokens, hc, dim, heads, head_dim):
    check_gate(tokens=tokens, hc=hc, dim=dim, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hc, dim, heads, head_dim", SHAPES)
def test_short_conv(dtype, tokens, hc, dim, heads, head_dim):
    batch = 4 if tokens % 4 == 0 else 1
    check_conv(batch=batch, seq=tokens // batch, hc=hc, dim=dim, kernel=4, dilation=3, dtype=dtype, device="cuda")


def test_public_functions_take_the_triton_path_on_cuda(monkeypatch):
    monkeypatch.delenv("ENGRAM_KERNELS", raising=False)
    rows = torch.randn(10, 8, device="cuda", requires_grad=True)
    out = kernels.gather_rows(rows, torch.randint(0, 10, (4, 2), device="cuda"), torch.bfloat16)
    assert type(out.grad_fn).__name__ == "GatherRowsBackward"


def test_model_forward_and_backward_through_the_kernels_equal_the_reference_path(monkeypatch):
    check_model_matches_reference(monkeypatch, "cuda")
