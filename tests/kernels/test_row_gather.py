"""``gather_rows`` and ``scatter_row_grads`` on each implementation, and ``row_segments``."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import CUDA_MARKS, CUDA_SHAPES, DTYPES, TRITON, cases, gather_inputs, relative_error

import kernels

# (num_rows, dim, tokens, heads): each row used about twice.
CPU_SHAPES = [(13, 12, 7, 3)]
CUDA_GATHER_SHAPES = [(tokens * heads // 2, head_dim, tokens, heads) for tokens, _, _, heads, head_dim in CUDA_SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, num_rows, dim, tokens, heads", cases(CPU_SHAPES, CUDA_GATHER_SHAPES),
                         indirect=["impl"])
def test_gather_rows(impl, num_rows, dim, tokens, heads, dtype):
    rows, inverse = gather_inputs(num_rows, dim, tokens, heads, dtype, impl.device)
    out = kernels.gather_rows(rows, inverse, torch.float32)
    assert torch.equal(out, kernels.gather_rows_reference(rows, inverse, torch.float32))
    grad = torch.randn(tokens, heads * dim, dtype=dtype, device=impl.device)
    expected = kernels.scatter_row_grads_reference(grad.double(), inverse, num_rows)
    segments = kernels.row_segments(inverse, num_rows)
    # Segment sums (given segments, or built under deterministic mode) are bitwise reproducible.
    for deterministic, given in ((False, None), (True, None), (False, segments)):
        torch.use_deterministic_algorithms(deterministic)
        try:
            row_grads = kernels.scatter_row_grads(grad, inverse, num_rows, given)
            again = kernels.scatter_row_grads(grad, inverse, num_rows, given)
        finally:
            torch.use_deterministic_algorithms(False)
        assert row_grads.dtype == torch.float32
        assert relative_error(row_grads, expected) < 1e-6
        if deterministic or given is not None:
            assert torch.equal(row_grads, again)
    # Through autograd, with the segments built ahead as the row tables do.
    leaf = rows.detach().float().requires_grad_()
    kernels.gather_rows(leaf, inverse, torch.float32, segments).backward(grad.float())
    assert relative_error(leaf.grad, expected) < 1e-6


@pytest.mark.parametrize("impl", cases(on=TRITON), indirect=True)
def test_segment_sums_have_the_same_bits_for_every_tile(impl):
    """Each row's entries are summed in index order, a pair at a time, whatever the tile (``BLOCK_U`` rows a
    program): no autotuning choice changes the bits, so a run in another process, which may tune
    differently, sums the same. On CUDA every autotuning choice; on the interpreter three tiles."""
    import triton

    from kernels.row_gather_triton import _SEGMENT_TILES, _segment_sum_kernel

    if impl.device == "cuda":
        tiles = [dict(config.kwargs, num_warps=config.num_warps) for config in _SEGMENT_TILES]
    else:
        tiles = [dict(BLOCK_U=16), dict(BLOCK_U=4), dict(BLOCK_U=2)]
    device = impl.device
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


@pytest.mark.parametrize("device, num_rows, tokens, heads", [
    ("cpu", 9, 11, 3),
    pytest.param("cuda", 500, 333, 6, marks=CUDA_MARKS),
])
def test_row_segments_group_entries_by_row_in_index_order(device, num_rows, tokens, heads):
    """Every row's segment lists exactly its entries, in index order, in int32 (they fit)."""
    inverse = torch.randint(0, num_rows, (tokens, heads), device=device)
    order, offsets = kernels.row_segments(inverse, num_rows)
    assert order.dtype == offsets.dtype == torch.int32
    flat = inverse.reshape(-1).cpu()
    order, offsets = order.cpu(), offsets.cpu()
    for row in range(num_rows):
        expected = (flat == row).nonzero().flatten()
        assert torch.equal(order[offsets[row]:offsets[row + 1]], expected), row


@pytest.mark.parametrize("impl", cases(), indirect=True)
def test_bf16_rows_give_float32_row_grads(impl):
    rows = torch.randn(6, 4, dtype=torch.bfloat16, device=impl.device)
    inverse = torch.tensor([[0, 1], [1, 1], [5, 0]], device=impl.device)
    embeddings = kernels.gather_rows(rows, inverse, torch.float32).requires_grad_()
    (embeddings * torch.arange(24.0, device=impl.device).reshape(3, 8)).sum().backward()
    row_grads = kernels.scatter_row_grads(embeddings.grad, inverse, len(rows))
    assert row_grads.dtype == torch.float32
    assert torch.equal(row_grads, kernels.scatter_row_grads_reference(embeddings.grad, inverse, len(rows)))


@pytest.mark.parametrize("call, field", [
    (lambda: kernels.gather_rows(torch.zeros(4), torch.zeros(2, 2, dtype=torch.long), torch.float32), "unique_rows"),
    (lambda: kernels.gather_rows(torch.zeros(4, 2), torch.zeros(2, 2), torch.float32), "inverse"),
    (lambda: kernels.gather_rows(torch.zeros(4, 2), torch.zeros(2, 2, dtype=torch.long), torch.float32,
                                 kernels.row_segments(torch.zeros(3, dtype=torch.long), 4)), "segments"),
    (lambda: kernels.gather_rows(torch.zeros(4, 2), torch.zeros(2, 2, dtype=torch.long), torch.float32,
                                 kernels.RowSegments(torch.arange(4), torch.tensor([0, 1, 2, 3, 4]))), "segments"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()
