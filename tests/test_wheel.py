"""The wheel works: built from the tree, it carries every package, the shipped configs and the generated protos (and
no tests/ or bench/), and its installed copy, run from outside the checkout, hashes a text with `engram_demo` and
resolves `demo_train` by name. Nothing here needs the network or starts Ray."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Only Alexander the Great could tame the horse Bucephalus."
# What a clean clone lacks: local state and build outputs. The wheel is built from a copy without them, because
# setuptools never prunes build/lib: a stale copy of a file there ends up in the wheel even when nothing ships it.
NOT_SOURCE = shutil.ignore_patterns(".*", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", "runs")
# Runs at start-up of the subprocesses (it is first on their PYTHONPATH) and reports, at exit, the file of every
# project module the command imported.
PROBE = """\
import atexit, json, os, sys

def _report():
    top = set(os.environ["ENGRAM_TEST_PACKAGES"].split(","))
    files = {name: getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
             for name, module in list(sys.modules.items()) if name.split(".")[0] in top}
    sys.stderr.write("ENGRAM_TEST_MODULES " + json.dumps(files) + "\\n")

atexit.register(_report)
"""


def top_level_packages(tree: Path) -> list[str]:
    """The tree's top-level packages: its folders with an ``__init__.py`` (tests/ and bench/ have none)."""
    return sorted(d.name for d in tree.iterdir() if (d / "__init__.py").is_file())


def package_files(tree: Path) -> set[str]:
    """Every file under the top-level packages, as wheel paths: modules, subpackages and the data beside them."""
    return {
        path.relative_to(tree).as_posix()
        for top in top_level_packages(tree)
        for path in (tree / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc")
    }


def pip(*args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the source tree, the wheel built from it) without build isolation, so without the network."""
    # setuptools>=70.1 builds wheels itself (no `wheel` package); >=77 reads the SPDX `license` of pyproject.toml.
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel offline needs setuptools>=77")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(work / "dist"), str(src))
    (wheel,) = (work / "dist").glob("engram_memory-*.whl")
    return src, wheel


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the folder the wheel is installed into, a work folder outside the checkout, the environment to run in)."""
    src, wheel = built
    work = tmp_path_factory.mktemp("installed")
    site, probe = work / "site", work / "probe"
    pip("install", "--no-deps", "--no-compile", "--no-index", "--target", str(site), str(wheel))
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    # The installed copy comes first on the path, before the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe), str(site)]),
           "ENGRAM_TEST_PACKAGES": ",".join(top_level_packages(src))}
    return site, work, env


def run_installed(installed, *args: str) -> str:
    """Run ``python -m compute.cli ARGS`` from outside the checkout; check it used only the installed copy."""
    site, work, env = installed
    result = subprocess.run([sys.executable, "-m", "compute.cli", *args], cwd=work, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"engram {' '.join(args)} failed:\n{result.stderr}"
    (report,) = [line for line in result.stderr.splitlines() if line.startswith("ENGRAM_TEST_MODULES ")]
    modules = json.loads(report.split(" ", 1)[1])
    assert "compute" in modules and "compute.config" in modules
    elsewhere = {name: file for name, file in modules.items()
                 if not (file and Path(file).resolve().is_relative_to(site.resolve()))}
    assert not elsewhere, f"modules imported from outside the installed wheel ({site}): {elsewhere}"
    return result.stdout


def test_wheel_contents(built):
    src, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = top_level_packages(src)
    assert {"compute", "memory_service", "protos", "kernels"} <= set(packages)
    subpackages = sorted(init.parent.relative_to(src).as_posix() for top in packages
                         for init in (src / top).rglob("__init__.py"))
    missing = [package for package in subpackages if f"{package}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    configs = {path.relative_to(src).as_posix() for path in (src / "compute" / "configs").glob("*.yaml")}
    assert configs, "no compute/configs/*.yaml in the tree"
    assert not configs - names, f"shipped configs missing from the wheel: {sorted(configs - names)}"
    protos = {path.relative_to(src).as_posix() for path in (src / "protos").glob("*_pb2*.py*")}
    assert protos, "no generated protos/*_pb2* in the tree"
    assert not protos - names, f"generated protos missing from the wheel: {sorted(protos - names)}"
    # Exactly the packages' files (no stale extras), and outside them only the wheel's own metadata.
    shipped, expected = {name for name in names if name.split("/")[0] in packages}, package_files(src)
    assert not expected - shipped, f"package files missing from the wheel: {sorted(expected - shipped)}"
    assert not shipped - expected, f"files in the wheel that the tree lacks: {sorted(shipped - expected)}"
    others = sorted(name for name in names - shipped if not name.split("/")[0].endswith(".dist-info"))
    assert not others, f"the wheel ships files outside the packages: {others}"
    assert not [name for name in names if name.split("/")[0] in ("tests", "bench")]


def test_installed_hash_command(installed, golden_dir):
    out = run_installed(installed, "hash", "--config", "engram_demo", "--text", TEXT)
    golden = json.loads((golden_dir / "hash_demo_config.json").read_text())
    (case,) = [case for case in golden["cases"] if case["text"] == TEXT]
    assert json.loads(out) == {key: case[key] for key in ("input_ids", "compressed_ids", "layers")}


def test_installed_resolves_demo_train(installed):
    """`engram tables` loads the run YAML by its shipped name and prints the tables it implies."""
    config = yaml.safe_load((ROOT / "compute" / "configs" / "demo_train.yaml").read_text())["engram"]
    tables = yaml.safe_load(run_installed(installed, "tables", "--config", "demo_train"))["tables"]
    assert [table["name"] for table in tables] == [f"engram_layer_{i}" for i in config["layer_ids"]]
    assert {table["dim"] for table in tables} == {config["n_embed_per_ngram"] // config["n_head_per_ngram"]}
