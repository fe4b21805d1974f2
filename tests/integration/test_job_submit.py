"""`engram train` and `engram generate` as Ray jobs, submitted to a head with Ray's token authentication on.

The head is `ray start --head` with its dashboard (jobs are submitted through its HTTP API) and a token
in its $HOME/.ray/auth_token, $RAY_AUTH_MODE unset: Ray 2.60 turns token authentication on by default when
it finds a token. A job's entrypoint gets $RAY_ADDRESS from Ray, and our commands, given `--address auto`,
join that cluster (the training workers and shards appear in the head's actor table). Submitting
without the token, or with another one, is refused. The head is stopped by the process group it runs in.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.local_ray_nodes import RAY, RAY_TRAIN_POLLING, LocalRayNodes
from tests.integration.tiny_runs import TINY_RUN_YAML

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = {**TINY_RUN_YAML, "steps": 3}
ACTORS_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps(sorted({a["ActorClassName"] for a in ray._private.state.actors().values()})))
"""


@pytest.fixture(scope="module")
def token_head():
    """A head with the dashboard on and Ray's token auth on by default (a token in its home), and its token."""
    home = Path(tempfile.mkdtemp(prefix="engram-job-home-"))
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    head = LocalRayNodes(home, token=token, env=RAY_TRAIN_POLLING)  # the jobs' runs poll as the session's
    try:
        head.start_head(num_cpus=2, resources={"engram_memory": 4}, dashboard=True)
        head.wait_for_nodes(1)
        deadline = time.monotonic() + 90
        while not _dashboard_answers(head.dashboard_url, token):
            assert time.monotonic() < deadline, "the dashboard did not come up in 90 s"
            time.sleep(0.5)
        yield head
    finally:
        head.stop()
        shutil.rmtree(home, ignore_errors=True)


def _dashboard_answers(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def submit(head: LocalRayNodes, tmp_path: Path, *entrypoint: str, **auth: str) -> subprocess.CompletedProcess:
    """`ray job submit` (waiting for the job's end) as a user whose home holds no token; ``auth``: RAY_ env."""
    client_home = tmp_path / "client-home"
    client_home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(client_home), **auth)
    return subprocess.run([str(RAY), "job", "submit", "--address", head.dashboard_url, "--", *entrypoint],
                          env=env, capture_output=True, text=True, timeout=300)


def engram_job(*args: str) -> tuple[str, ...]:
    """An entrypoint running `engram ... --address auto` (the job's cluster) with this interpreter (the project
    is installed in its environment)."""
    return (sys.executable, "-m", "compute.cli", *args, "--address", "auto")


@pytest.mark.timeout(400)
def test_train_then_generate_as_jobs_with_the_token(token_head, tmp_path):
    with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_head.token}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    run = tmp_path / "run"

    train = submit(token_head, tmp_path, *engram_job("train", "--config", str(config), "--output-dir", str(run)),
                   **with_token)
    assert train.returncode == 0 and "succeeded" in train.stdout, train.stdout[-4000:] + train.stderr[-4000:]
    summary = json.loads(train.stdout[train.stdout.index("\n{") + 1:train.stdout.index("\n}") + 2])
    assert summary["step"] == 3 and summary["rows_looked_up"] > 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "checkpoints" / "step_000003" / "memory").is_dir()

    generate = submit(token_head, tmp_path, *engram_job("generate", "--checkpoint", str(run), "--prompt", "import os",
                                                        "--max-new-tokens", "4", "--device", "cpu"), **with_token)
    assert generate.returncode == 0 and "succeeded" in generate.stdout, generate.stdout[-4000:] + generate.stderr[-4000:]
    assert "import os" in generate.stdout and "[4 tokens, length]" in generate.stdout, generate.stdout[-4000:]

    # Both jobs ran in the head's cluster, not in an embedded Ray of their own: its actors are theirs.
    actors = subprocess.run([sys.executable, "-c", ACTORS_SCRIPT, token_head.address], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True,
                            env={**token_head.environ(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_head.token})
    classes = json.loads(actors.stdout.strip().splitlines()[-1])
    assert {"RayTrainWorker", "ShardActor", "MemoryController"} <= set(classes), classes


@pytest.mark.parametrize("auth, refusal", [
    ({}, "Unauthorized: Missing authentication token"),  # HTTP 401
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "Forbidden: Invalid authentication token"),  # 403
], ids=["no-token", "wrong-token"])
def test_a_submission_without_the_token_is_refused(token_head, tmp_path, auth, refusal):
    marker = tmp_path / "ran"
    refused = submit(token_head, tmp_path, "touch", str(marker), **auth)
    assert refused.returncode != 0, refused.stdout
    assert refusal in refused.stdout + refused.stderr, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert not marker.exists()
