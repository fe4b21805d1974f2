"""Shared fixtures: the golden vectors beside the checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("ENGRAM_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "hash_demo_config.json").exists():
        pytest.fail(f"golden vectors not found in {GOLDEN_DIR}; set ENGRAM_GOLDEN_DIR")
    return GOLDEN_DIR
