"""The machine a figure was measured on: every benchmark names its host CPU (and GPU) with its figures."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The host CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
