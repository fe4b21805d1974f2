"""memory_service.core stays pure: importing all of it loads no Ray, no gRPC and no other memory_service module."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[3] / "memory_service" / "core"


def test_core_imports_neither_ray_nor_grpc_nor_the_rest_of_memory_service():
    modules = sorted(f"memory_service.core.{path.stem}" for path in CORE.glob("*.py") if path.stem != "__init__")
    script = "; ".join([f"import {module}" for module in modules] +
                       ["import sys, json", "print(json.dumps(sorted(sys.modules)))"])
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], cwd=CORE.parents[1], check=True,
                                       capture_output=True, text=True, timeout=120).stdout)
    assert set(modules) <= set(loaded)
    offending = [name for name in loaded if name.split(".")[0] in ("ray", "grpc")
                 or (name.startswith("memory_service.") and not name.startswith("memory_service.core"))]
    assert offending == []
