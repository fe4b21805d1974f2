"""Our commands against a Ray head started by `ray start --head` with Ray's token authentication on.

The head runs in its own temp dir and home; `--address` with the right token works, a missing or
wrong one fails within seconds with one line that says how to fix it. The head is stopped by pid.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
TABLES = "tables:\n  - {name: auth_table, rows: 1000, dim: 8, num_slots: 8, optimizer: {kind: sgd, lr: 0.1}}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_head():
    """A Ray head with token auth on, its token, and its address; killed (with its children) afterwards."""
    home = Path(tempfile.mkdtemp(prefix="engram-head-home-"))
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths must stay short
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    port = free_port()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             '--resources={"engram_memory": 4}'],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(address, token):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up in 60 s"
            time.sleep(0.5)
        yield address, token
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(address: str, token: str) -> bool:
    from memory_service.ray_cluster import RayConnectError, _probe_head

    try:
        _probe_head(address, token)
    except RayConnectError:
        return False
    return True


def engram_memory(*args: str, home: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`engram memory ...` as a user without the head's token file in their home; returns it and its seconds."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environ.update(HOME=str(home), ENGRAM_HOME=str(home / ".engram"), **env)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=180)
    return done, time.monotonic() - start


@pytest.mark.parametrize("token_env, problem", [({}, "requires a token"),
                                                ({"RAY_AUTH_TOKEN": "not-the-token"}, "not this cluster's")])
def test_a_missing_or_wrong_token_fails_fast_with_one_line(token_head, tmp_path, token_env, problem):
    address, _ = token_head
    (tmp_path / "tables.yaml").write_text(TABLES)
    done, seconds = engram_memory("up", "--config", str(tmp_path / "tables.yaml"), "--address", address,
                                  home=tmp_path, **token_env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and "--ray-token" in lines[0], done.stderr
    assert seconds < 15, f"took {seconds:.1f} s to fail"


def test_the_right_token_deploys_operates_and_stops_the_service(token_head, tmp_path):
    address, token = token_head
    (tmp_path / "tables.yaml").write_text(TABLES)
    common = ("--address", address, "--ray-token", token, "--name", "auth-test")
    up, _ = engram_memory("up", "--config", str(tmp_path / "tables.yaml"), "--shards", "2", "--host", "127.0.0.1",
                          *common, home=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "on 2 shard(s)" in up.stdout
    # The token may also come from the environment, as Ray's own CLI takes it.
    status, _ = engram_memory("status", "--address", address, "--name", "auth-test", home=tmp_path,
                              RAY_AUTH_TOKEN=token)
    assert status.returncode == 0 and len(status.stdout.strip().splitlines()) == 3, status.stderr
    down, _ = engram_memory("down", *common, home=tmp_path)
    assert down.returncode == 0 and "memory service stopped" in down.stdout, down.stderr


def test_the_embedded_default_never_joins_the_ray_that_the_machine_points_to(token_head):
    """With another head running and named as the machine's current cluster, no --address still starts our own."""
    address, _ = token_head
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(address)
    script = ("from memory_service.ray_cluster import connect; import ray; connect(None); "
              "print(ray.get_runtime_context().gcs_address); ray.shutdown()")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": address})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    ours = done.stdout.strip().splitlines()[-1]
    assert ours.rsplit(":", 1)[1] != address.rsplit(":", 1)[1], f"joined the stranger at {address}"
