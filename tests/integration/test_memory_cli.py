"""Integration: the `engram memory` commands as docs/memory-service.md shows them, on the session's Ray."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.memory_deploy import process_alive

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
DATA_TOKEN = "cli-test-data-token-0001"
TABLES = """\
tables:
  - name: layer2
    rows: 5000
    dim: 16
    num_slots: 64
    optimizer: {kind: adam, lr: 0.005}
  - name: layer3
    rows: 8000
    dim: 16
    num_slots: 64
    tier: {dram_rows: 1000}
"""


def test_up_status_scale_checkpoint_restore_down(ray_cluster, tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text(TABLES)
    env = {**os.environ, "ENGRAM_HOME": str(tmp_path / "home"), "ENGRAM_MEMORY_TOKEN": DATA_TOKEN}
    common = ["--address", ray_cluster, "--name", f"cli-{uuid.uuid4().hex[:8]}"]

    def engram(*args: str) -> str:
        # The `engram` console script is compute.cli:main.
        done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args, *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    data_root, tier_dir = tmp_path / "data", tmp_path / "tier"
    up = engram("up", "--config", str(config), "--shards", "2", "--host", "127.0.0.1", "--data-root", str(data_root),
                "--step-timeout-s", "60", "--tier-dir", str(tier_dir))
    assert "on 2 shard(s)" in up
    assert "table layer2: 5,000 rows x 16 float32 + adam state = 196 B/row, 957.0 KiB over 2 shard(s)" in up
    assert "table layer3: 8,000 rows x 16" in up and "tiered: 219.7 KiB of DRAM on the fullest" in up
    assert len(list(tier_dir.iterdir())) == 2  # layer3's files on each shard
    state = json.loads((tmp_path / "home" / "memory.json").read_text())
    assert state["token"] == DATA_TOKEN and len(state["admin_token"]) >= 40  # the admin token was generated
    assert (tmp_path / "home" / "memory.json").stat().st_mode & 0o777 == 0o600
    status = engram("status")
    assert "p99 ms" in status and "pending" in status and "aborted" in status
    assert len(table_lines(status)) == 3
    tiered = [line for line in status.splitlines() if " table layer3 tiered: " in line]
    assert len(tiered) == 2 and all("of 1,000 rows cached in DRAM" in line for line in tiered), status
    assert "scaled to 3" in engram("scale", "--shards", "3")
    assert len(table_lines(engram("status"))) == 4
    assert f"{data_root / 'ckpt' / 'manifest.json'}" in engram("checkpoint", "ckpt", "--barrier-timeout-s", "10")
    assert (data_root / "ckpt" / "manifest.json").stat().st_mode & 0o777 == 0o600
    assert "restored" in engram("restore", "ckpt", "--shards", "2")
    assert "rotated" in engram("rotate-tokens", "--grace-s", "0")
    rotated = json.loads((tmp_path / "home" / "memory.json").read_text())
    assert rotated["token"] != DATA_TOKEN and rotated["admin_token"] != state["admin_token"]
    assert len(table_lines(engram("status"))) == 3  # the controller uses the new admin token
    assert "stopped" in engram("down")
    assert not (tmp_path / "home" / "memory.json").exists()
    assert list(tier_dir.iterdir()) == []  # the stopped shards removed their files


def table_lines(status: str) -> list[str]:
    """The lines of `engram memory status`'s table, its header included (the lines after it start "shard N: ")."""
    return [line for line in status.strip().splitlines() if not re.match(r"shard \d+: ", line)]


def alive_shard_pids() -> set[int]:
    """Pids of the live shard actors of the session's Ray."""
    import ray._private.state

    return {a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "ShardActor" and a["State"] == "ALIVE"}


def test_operator_mistakes_get_one_line_and_down_works_after_a_shard_died(ray_cluster, tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text(TABLES)
    env = {**os.environ, "ENGRAM_HOME": str(tmp_path / "home"), "ENGRAM_DATA_ROOT": str(tmp_path / "data")}
    common = ["--address", ray_cluster, "--name", f"cli-{uuid.uuid4().hex[:8]}"]

    def engram(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args, *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    def refused(*args: str) -> str:
        done = engram(*args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        return done.stderr.strip().splitlines()[-1]

    assert "must be at least 1" in refused("up", "--config", str(config), "--shards", "0")
    before = alive_shard_pids()
    assert engram("up", "--config", str(config), "--shards", "2", "--host", "127.0.0.1").returncode == 0
    shards = alive_shard_pids() - before
    assert len(shards) == 2
    message = refused("restore", "nope")
    assert message == f"engram memory: error: directory: no manifest.json in {tmp_path / 'data' / 'nope'}; not a checkpoint"
    for outside in ("../outside", str(tmp_path / "outside"), "/etc"):
        message = refused("checkpoint", outside)
        assert message.startswith(f"engram memory: error: directory: must lie inside the data root {tmp_path / 'data'}")
    assert not (tmp_path / "outside").exists()
    assert "must be at least 1" in refused("scale", "--shards", "0")
    assert len(table_lines(engram("status").stdout)) == 3  # the refused commands changed nothing

    os.kill(shards.pop(), signal.SIGKILL)
    down = engram("down")
    assert down.returncode == 0 and "memory service stopped" in down.stdout, down.stderr
    assert "no memory controller named" in refused("status")


def test_commands_without_a_recorded_service_say_what_to_run(tmp_path):
    env = {**os.environ, "ENGRAM_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", "status"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"engram memory: error: no running memory service recorded in "
                                   f"{tmp_path / 'home' / 'memory.json'}: run `engram memory up`, "
                                   f"or pass --address of the cluster that runs it")


def test_up_without_an_address_starts_a_ray_head_of_its_own_and_down_stops_it(tmp_path):
    """Beside the session's Ray (and any other on the machine), `up` starts and records its own head."""
    config = tmp_path / "tables.yaml"
    config.write_text(TABLES)
    env = {**os.environ, "ENGRAM_HOME": str(tmp_path / "home")}

    def engram(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    engram("up", "--config", str(config), "--shards", "1", "--host", "127.0.0.1")
    state = json.loads((tmp_path / "home" / "memory.json").read_text())
    os.kill(state["head_pid"], 0)  # the holder of our head runs
    assert len(table_lines(engram("status").stdout)) == 2
    down = engram("down").stdout
    assert "memory service stopped" in down and f"holder pid {state['head_pid']}" in down
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process_alive(state["head_pid"]):
        time.sleep(0.2)
    assert not process_alive(state["head_pid"])
    assert "nothing to stop: no running memory service recorded" in engram("down").stdout

