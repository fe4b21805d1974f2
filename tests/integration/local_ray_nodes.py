"""Ray nodes of a test's own on this machine: a head and worker nodes started by `ray start --block`.

Each node runs in its own process group with its own temp dir (Ray allows one per node) and its own
dashboard-agent port (the default, 52365, would clash between nodes and with other Ray on the machine);
Ray picks the other ports. Every process runs with ``home`` as $HOME, so Ray's token file is the test's
own (none: token auth stays off). ``stop()`` ends what the test started, by process group: never
`ray stop`, which would end every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # the tests move little through Ray's object store
# Ray Train's controller polls its workers every 2 s by default, and a run waits out several polls between
# starting its workers and fit()'s return (~10 s of a tiny run's 21 s); a worker's report waits in a queue of
# one for the poll that takes it, so a run that reports every step makes about a step per poll. The tests'
# runs poll every 0.2 s, but where a test needs a run's steps paced.
RAY_TRAIN_POLLING = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# On SIGTERM a `ray start --block` first drains its node for up to 30 s (for Ray Serve), longer than stop()
# waits: the tests' nodes stop at once.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayNodes:
    """A head on 127.0.0.1 and the nodes added to it; use as a context manager (stops them all on exit)."""

    home: Path
    token: str | None = None  # what the test's own commands send when the head wants a token
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node
    port: int = field(default_factory=free_port)
    dashboard_port: int | None = None
    _nodes: list[tuple[subprocess.Popen, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def environ(self) -> dict[str, str]:
        """The environment of the nodes: this one with no RAY_ settings of the caller's, $HOME the test's."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**environ, **NO_DRAIN, "HOME": str(self.home), **self.env}

    def start_head(self, *, num_cpus: int = 1, resources: dict | None = None, dashboard: bool = False) -> None:
        args = ["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1"]
        if dashboard:
            self.dashboard_port = free_port()
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        self._start(args, num_cpus, resources or {})

    def add_node(self, *, num_cpus: int = 1, resources: dict | None = None) -> None:
        self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], num_cpus, resources or {})

    def _start(self, args: list[str], num_cpus: int, resources: dict) -> None:
        temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths must stay short
        log = open(Path(temp_dir) / "ray-start.log", "w")
        process = subprocess.Popen(
            [str(RAY), "start", "--block", *args, f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
             f"--resources={json.dumps(resources)}", f"--object-store-memory={OBJECT_STORE_BYTES}",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
            env=self.environ(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._nodes.append((process, temp_dir))

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        """Wait until ``count`` nodes are alive; return them (``node_id`` hex, ``resources``, ``is_head``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for process, temp_dir in self._nodes:
                if process.poll() is not None:
                    log = (Path(temp_dir) / "ray-start.log").read_text()[-2000:]
                    raise AssertionError(f"a `ray start` exited with {process.returncode}:\n{log}")
            nodes = self.alive_nodes()
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(nodes)} of {count} Ray nodes came up in {timeout_s:.0f} s")
            time.sleep(0.5)

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes, asked of the head's GCS ([] while it does not answer)."""
        import grpc
        from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        with grpc.insecure_channel(self.address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=5, metadata=metadata)
            except grpc.RpcError:
                return []
        return [{"node_id": node.node_id.hex(), "resources": dict(node.resources_total), "is_head": node.is_head_node}
                for node in reply.node_info_list if node.state == gcs_pb2.GcsNodeInfo.ALIVE]

    def stop(self) -> None:
        """Stop every node: SIGTERM to each `ray start --block` (it stops what it started), then SIGKILL to
        whatever of its process group is left after 15 s. $ENGRAM_KEEP_RAY_TEMP keeps the nodes' temp dirs
        (their logs) for a post-mortem."""
        for process, _ in self._nodes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process, _ in self._nodes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        for _, temp_dir in self._nodes:
            if os.environ.get("ENGRAM_KEEP_RAY_TEMP"):
                print(f"kept the Ray temp dir {temp_dir}", file=sys.stderr)
            else:
                shutil.rmtree(temp_dir, ignore_errors=True)
        self._nodes.clear()

    def __enter__(self) -> "LocalRayNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
