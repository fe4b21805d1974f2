"""The layering contracts of pyproject.toml hold, cover every module, and catch a forbidden import."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compute", "memory_service", "kernels", "protos")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copies under root shadow the installed project
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_compute_may_import_no_memory_service_module_but_core_and_deploy():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["source_modules"] == ["compute"]]
    modules = {f"memory_service.{p.stem}" for p in (ROOT / "memory_service").glob("*.py") if p.stem != "__init__"}
    modules |= {f"memory_service.{p.name}" for p in (ROOT / "memory_service").iterdir() if (p / "__init__.py").exists()}
    assert set(contract["forbidden_modules"]) == modules - {"memory_service.core", "memory_service.deploy"}


@pytest.mark.parametrize("importer, forbidden, contract", [
    ("memory_service/metrics.py", "compute.memory.client", "memory_service never imports compute"),
    ("compute/generate.py", "memory_service.controller",
     "compute reaches memory_service only through memory_service.core and memory_service.deploy"),
    ("kernels/row_gather.py", "memory_service.core.slots", "kernels import neither compute nor memory_service"),
    ("protos/wire.py", "compute.config", "protos import nothing of the project's"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, importer, forbidden, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / importer, "a") as f:
        f.write(f"\nimport {forbidden}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    report = " ".join(done.stdout.split())  # long contract names wrap
    assert f"{contract} BROKEN" in report, done.stdout
