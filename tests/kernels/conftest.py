"""Fixtures of the kernel tests; importing ``kernel_checks`` here decides ``TRITON_INTERPRET`` at collection."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import IMPLEMENTATIONS, Implementation


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def impl(request, monkeypatch) -> Implementation:
    """The implementation named by the case (see ``kernel_checks.cases``), its path chosen for the dispatchers."""
    implementation = IMPLEMENTATIONS[request.param]
    monkeypatch.setenv("ENGRAM_KERNELS", implementation.backend)
    return implementation
