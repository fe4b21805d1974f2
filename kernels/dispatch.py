"""What the op modules share: choosing the Triton kernel or the PyTorch reference per call, naming the
input a dispatcher rejects, and sizing and allocating the Triton launches."""
from __future__ import annotations

import contextlib
import os

import torch

BACKEND_ENV = "ENGRAM_KERNELS"
BACKENDS = ("auto", "triton", "reference")


def kernel_backend() -> str:
    """The backend named by ``ENGRAM_KERNELS`` (``auto`` when unset)."""
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors (or when forced); float64 always takes the reference, whose math it keeps."""
    backend = kernel_backend()
    if backend == "reference" or any(t.dtype == torch.float64 for t in tensors):
        return False
    return backend == "triton" or all(t.is_cuda for t in tensors)


def check(condition: bool, field: str, message: str) -> None:
    """A dispatcher's input check: ``ValueError`` naming the argument ``field`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field}: {message}")


def programs_and_chunk(total: int, target_programs: int = 512) -> tuple[int, int]:
    """Split ``total`` work items into about ``target_programs`` contiguous chunks: (programs, chunk)."""
    chunk = max(1, -(-total // target_programs))
    return -(-total // chunk), chunk


@contextlib.contextmanager
def written_in_full():
    """Allocate, inside, tensors that a kernel writes in full: without the NaN fill that deterministic mode
    gives new tensors (``torch.utils.deterministic.fill_uninitialized_memory``), a wasted pass over them."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill


def interpreting() -> bool:
    """Whether Triton runs on the CPU interpreter (``TRITON_INTERPRET=1``), where no GPU code runs."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def config_choices(*choices: dict) -> list:
    """Autotuning choices, each its meta-parameters plus ``num_warps`` (and optionally ``maxnreg``, a cap on
    registers a thread); only the first under the CPU interpreter."""
    import triton  # here, not at module level: importing ``kernels`` must not import Triton

    if interpreting():
        choices = choices[:1]
    launch = ("num_warps", "maxnreg")
    return [triton.Config({k: v for k, v in c.items() if k not in launch}, num_warps=c["num_warps"],
                          maxnreg=c.get("maxnreg")) for c in choices]


def graph_timed(kernel_call, quantiles):
    """Autotuning timer that replays the launch from a CUDA graph: kernels of ~20 us finish before
    the host can launch the next one, so host-timed runs would measure the launcher."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(kernel_call, rep=100, quantiles=quantiles)
