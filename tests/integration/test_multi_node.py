"""A cluster of several Ray nodes on this machine: shards on memory nodes, training workers on compute nodes.

The test starts its own head (no engram resources), two memory nodes ({"engram_memory": 2}) and two
compute nodes ({"engram_compute": 1}), one core each, like cluster/local.yaml's hosts. On them:
`engram memory up`, a two-worker `engram train` joined to that service while `engram memory scale`
moves the slots onto 3 shards and back onto 2, then the same job against a fresh service left alone.
Both jobs must log the same losses, step by step and bit for bit, and
every shard and training worker that ever ran must have run on a node of its kind (Ray's actor table).
All nodes are stopped by the process groups the test started.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from compute.train.config import TrainConfig
from compute.train.tables import engram_table_specs
from tests.integration.local_ray_nodes import RAY_TRAIN_POLLING, LocalRayNodes
from tests.integration.tiny_runs import TINY_RUN_YAML

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
MEMORY_NODE = {"engram_memory": 2}
COMPUTE_NODE = {"engram_compute": 1}
# Enough for the two scalings (each a CLI process that joins the cluster) to land mid-job (by step 6 here): the
# scaled job runs at Ray Train's default polling, which paces its steps ~2 s apart; the plain one at the tests'.
STEPS = 20
TINY_RUN = {**TINY_RUN_YAML, "steps": STEPS, "num_workers": 2}
# What a node's state lists, per class of actor, and the resource its node must advertise.
PLACEMENT = {"ShardActor": "engram_memory", "RayTrainWorker": "engram_compute"}
ACTORS_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
                  for a in ray._private.state.actors().values()]))
"""


@pytest.fixture
def cluster(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="engram-mn-home-"))  # no Ray token in it: token auth stays off
    nodes = LocalRayNodes(home)
    try:
        nodes.start_head(num_cpus=1, resources={})
        nodes.wait_for_nodes(1)
        for resources in (MEMORY_NODE, MEMORY_NODE, COMPUTE_NODE, COMPUTE_NODE):
            nodes.add_node(num_cpus=1, resources=resources)
        nodes.wait_for_nodes(5)
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(home, ignore_errors=True)


def engram_env(cluster: LocalRayNodes, tmp_path: Path) -> dict[str, str]:
    return {**cluster.environ(), "ENGRAM_HOME": str(tmp_path / "engram-home")}


def engram(cluster: LocalRayNodes, tmp_path: Path, *args: str, timeout: int = 120) -> str:
    done = subprocess.run([sys.executable, "-m", "compute.cli", *args], cwd=ROOT, env=engram_env(cluster, tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"engram {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def start_train(cluster: LocalRayNodes, tmp_path: Path, controller: str, output_dir: Path,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """`engram train` of the two-worker job on ``controller``'s tables; ``env``: more environment for it."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "compute.cli", "train", "--address", cluster.address,
                             "--controller", controller, "--workers", "2", "--config", str(tmp_path / "run.yaml"),
                             "--output-dir", str(output_dir)],
                            cwd=ROOT, env={**engram_env(cluster, tmp_path), **(env or {})},
                            stdout=open(f"{output_dir}.log", "w"), stderr=subprocess.STDOUT)


def finish(job: subprocess.Popen, output_dir: Path, timeout: int = 180) -> None:
    try:
        returncode = job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert returncode == 0, f"engram train failed:\n{Path(f'{output_dir}.log').read_text()[-4000:]}"


def logged_step(output_dir: Path) -> int:
    """The last step the job's rank 0 logged (0 before the first)."""
    metrics = output_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def losses(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


def memory(cluster: LocalRayNodes, tmp_path: Path, command: str, name: str, *args: str) -> str:
    return engram(cluster, tmp_path, "memory", command, "--address", cluster.address, "--name", name, *args)


@pytest.mark.timeout(540)
def test_shards_on_memory_nodes_workers_on_compute_nodes_and_scaling_mid_job_keeps_the_losses(cluster, tmp_path):
    started = time.monotonic()
    nodes = {node["node_id"]: node["resources"] for node in cluster.alive_nodes()}
    memory_nodes = {n for n, r in nodes.items() if "engram_memory" in r}
    assert len(nodes) == 5 and len(memory_nodes) == 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY_RUN))
    specs = engram_table_specs(TrainConfig.from_yaml(tmp_path / "run.yaml"))  # what `engram tables` prints
    (tmp_path / "tables.yaml").write_text(yaml.safe_dump({"tables": [spec.to_dict() for spec in specs]}))
    up = ("--config", str(tmp_path / "tables.yaml"), "--shards", "2", "--host", "127.0.0.1",
          "--data-root", str(tmp_path))

    # The job on a service that scales 2 -> 3 -> 2 shards while it trains.
    assert "on 2 shard(s)" in memory(cluster, tmp_path, "up", "scaled", *up)
    scaled_dir = tmp_path / "runs" / "scaled"
    job = start_train(cluster, tmp_path, "scaled", scaled_dir)
    try:
        deadline = time.monotonic() + 150
        while logged_step(scaled_dir) < 1:
            assert job.poll() is None, Path(f"{scaled_dir}.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the job logged no step in 150 s"
            time.sleep(0.2)
        scaled_at = [logged_step(scaled_dir)]
        assert "scaled to 3 shard(s)" in memory(cluster, tmp_path, "scale", "scaled", "--shards", "3")
        scaled_at.append(logged_step(scaled_dir))
        assert "scaled to 2 shard(s)" in memory(cluster, tmp_path, "scale", "scaled", "--shards", "2")
        scaled_at.append(logged_step(scaled_dir))
        print(f"scaled to 3 shards after step {scaled_at[0]}, to 2 after step {scaled_at[1]}; "
              f"step {scaled_at[2]} logged when that was done")
        assert job.poll() is None and scaled_at[-1] < STEPS, f"the job ended before the scaling did: {scaled_at}"
    finally:
        finish(job, scaled_dir)
    memory(cluster, tmp_path, "down", "scaled")

    # The same job on a fresh service that nobody scales.
    memory(cluster, tmp_path, "up", "plain", *up)
    plain_dir = tmp_path / "runs" / "plain"
    finish(start_train(cluster, tmp_path, "plain", plain_dir, RAY_TRAIN_POLLING), plain_dir)
    memory(cluster, tmp_path, "down", "plain")

    scaled, plain = losses(scaled_dir), losses(plain_dir)
    assert [step for step, _ in scaled] == list(range(1, STEPS + 1))
    # Bit for bit: float32 rows on the wire, the same seeds and tables, and a slot move loses, repeats or
    # splits no update (a rank reports a step to the shards only once all its rows landed).
    assert scaled == plain

    # Every shard (the third one too) ran on a memory node, every training worker on a compute node.
    actors = json.loads(subprocess.run([sys.executable, "-c", ACTORS_SCRIPT, cluster.address], cwd=ROOT,
                                       env=cluster.environ(), capture_output=True, text=True, timeout=120,
                                       check=True).stdout.strip().splitlines()[-1])
    for actor_class, resource in PLACEMENT.items():
        ran_on = [a["node"] for a in actors if a["class"] == actor_class]
        assert ran_on and all(resource in nodes[node] for node in ran_on), (actor_class, ran_on, nodes)
    shards = [a for a in actors if a["class"] == "ShardActor"]
    workers = [a["node"] for a in actors if a["class"] == "RayTrainWorker"]
    assert len(shards) == 2 + 1 + 2  # the first service's 2 and the one it grew by, the second service's 2
    assert len(workers) == 4 and len(set(workers)) == 2  # two per job, one on each compute node
    differing = [step for (step, loss), (_, expected) in zip(scaled, plain) if loss != expected]
    print(f"losses: first bit-level difference at step {differing[0] if differing else None}; "
          f"{time.monotonic() - started:.0f} s after the nodes were up")
