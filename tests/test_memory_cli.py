"""Integration: the `engram memory` commands as docs/memory-service.md shows them, on the session's Ray."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TABLES = """\
tables:
  - name: layer2
    rows: 5000
    dim: 16
    num_slots: 64
    optimizer: {kind: adam, lr: 0.005}
"""


def test_up_status_scale_checkpoint_restore_down(ray_cluster, tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text(TABLES)
    env = {**os.environ, "ENGRAM_HOME": str(tmp_path / "home"), "ENGRAM_MEMORY_TOKEN": "cli-test-token"}
    common = ["--address", ray_cluster, "--name", f"cli-{uuid.uuid4().hex[:8]}"]

    def engram(*args: str) -> str:
        # The `engram` console script is compute.cli:main.
        done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args, *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "on 2 shard(s)" in engram("up", "--config", str(config), "--shards", "2", "--host", "127.0.0.1")
    status = engram("status")
    assert "p99 ms" in status and len(status.strip().splitlines()) == 3
    assert "scaled to 3" in engram("scale", "--shards", "3")
    assert len(engram("status").strip().splitlines()) == 4
    assert "manifest.json" in engram("checkpoint", str(tmp_path / "ckpt"))
    assert "restored" in engram("restore", str(tmp_path / "ckpt"), "--shards", "2")
    assert "stopped" in engram("down")
    assert not (tmp_path / "home" / "memory.json").exists()
