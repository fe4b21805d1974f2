"""Shared fixtures: the golden vectors beside the checkout, and one local Ray for the session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.local_ray_nodes import RAY_TRAIN_POLLING

# For every Ray Train run of the session: in this process, and in the `engram` commands the tests start.
os.environ.update(RAY_TRAIN_POLLING)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("ENGRAM_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "hash_demo_config.json").exists():
        pytest.fail(f"golden vectors not found in {GOLDEN_DIR}; set ENGRAM_GOLDEN_DIR")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; the local node can host memory shards.

    Yields the cluster's GCS address (for CLI subprocesses, which join it with ``--address``).
    """
    import ray

    if not ray.is_initialized():  # a cluster of our own, whatever other Ray runs or ran on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 resources={"engram_memory": 16}, namespace="engram-tests")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """Every test that uses the session's Ray carries the ``ray`` marker, so ``-m "not ray"`` skips it."""
    for item in items:
        if "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
