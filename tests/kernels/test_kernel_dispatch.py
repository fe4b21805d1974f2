"""The dispatch machinery: which path runs, and outputs allocated without deterministic mode's fill."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import CUDA_MARKS, gather_inputs

import kernels
from kernels.dispatch import written_in_full


def test_reference_path_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("ENGRAM_KERNELS", raising=False)
    rows, inverse = gather_inputs(5, 4, 3, 2, torch.float32, "cpu")
    assert not kernels.use_triton(rows)
    assert torch.equal(kernels.gather_rows(rows, inverse, torch.float32), rows[inverse].reshape(3, 8))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_public_functions_take_the_triton_path_on_cuda(device, monkeypatch):
    monkeypatch.delenv("ENGRAM_KERNELS", raising=False)
    rows = torch.randn(10, 8, device=device, requires_grad=True)
    out = kernels.gather_rows(rows, torch.randint(0, 10, (4, 2), device=device), torch.bfloat16)
    assert type(out.grad_fn).__name__ == "GatherRowsBackward"


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
