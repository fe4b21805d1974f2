"""Where the benchmarks put what they measured: ``bench/results/<name>.json`` and ``<name>.png``.

Run every benchmark from the repository root as a module (``python -m bench.hashing``), so that
``import kernels`` finds the project's package, not ``bench/kernels.py``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(name: str, payload: Any) -> Path:
    """Write ``payload`` to ``bench/results/<name>.json``; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


@contextlib.contextmanager
def figure(name: str, nrows: int = 1, ncols: int = 1, figsize=(8, 4)) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure (headless) and its axes, saved to ``bench/results/<name>.png`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize)
    yield fig, axes
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)
