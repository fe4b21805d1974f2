"""Faults injected into a real memory service under a bounded stream of pushes and lookups, judged
against a fault-free twin.

The stream: ``ranks`` threads, each with a client of its own, push synchronous steps (every push a
pure function of (step, rank)); a reader thread looks rows up meanwhile. A fault strikes when rank 0
finishes a chosen step. The verdict: failed calls, whether the final tables (optimizer state
included) equal those of the same stream on a deployment where nothing failed, whether each group's
copies are bit-identical, and how long failover and recovery took. ``bench/faults.py`` runs every
scenario and writes the figures; ``tests/integration/test_memory_faults.py`` runs small versions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np
import ray
import torch

from compute.memory.client import MemoryClient, MemoryServiceError
from memory_service.controller import ControllerOptions, start_controller, stop_controller
from memory_service.core.table_spec import OptimizerSpec, TableSpec

TOKEN = "fault-injection-data-token-0123"
ADMIN_TOKEN = "fault-injection-admin-token-0123"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every run of a scenario and its twin do, step for step."""

    table: TableSpec = TableSpec(name="faults", rows=4000, dim=8, num_slots=64, seed=3,
                                 optimizer=OptimizerSpec(kind="adam", lr=0.05))
    steps: int = 24
    ranks: int = 2
    rows_per_push: int = 200
    shards: int = 2
    lookup_rows: int = 500

    def push(self, client: MemoryClient, step: int, rank: int) -> None:
        """Rank ``rank``'s push of step ``step``, waited for."""
        rng = np.random.default_rng([step, rank])
        ids = np.sort(rng.choice(self.table.rows, size=self.rows_per_push, replace=False))
        grads = torch.from_numpy(rng.standard_normal((len(ids), self.table.dim))).float()
        client.push(self.table.name, ids, grads, step=step, rank=rank, world_size=self.ranks, synchronous=True).result()


@dataclasses.dataclass
class Service:
    """A deployment on the session's Ray (loopback only), and its data root."""

    controller: Any
    name: str
    directory: str
    data_root: str

    def client(self, tcp: bool = False) -> MemoryClient:
        """A data client; ``tcp``: over TCP even to shards on this machine (no Unix socket, no shared memory)."""
        return MemoryClient(self.directory, TOKEN, use_local_transport=not tcp)

    def group_checksums(self, table: str) -> dict[int, list[str]]:
        """Per replica group, its serving shards' checksums, primary first."""
        records = ray.get(self.controller.status.remote())
        sums = ray.get(self.controller.checksums.remote())[table]
        serving = [record for record in records if record["role"] != "lost"]
        groups: dict[int, list[str]] = {}
        for record, checksum in sorted(zip(serving, sums), key=lambda pair: pair[0]["role"] != "primary"):
            groups.setdefault(record["group"], []).append(checksum)
        return groups

    def pid_of(self, group: int, primary: bool) -> int:
        pids = ray.get(self.controller.shard_pids.remote())
        return next(info["pid"] for info in pids.values() if info["group"] == group and info["primary"] == primary)

    def whole(self, replicas: int, shards: int) -> bool:
        """Whether every group serves with all its copies again."""
        records = ray.get(self.controller.status.remote())
        return (len(records) == replicas * shards
                and all(r["state"] == "serving" and r["role"] in ("primary", "replica") for r in records))


@contextlib.contextmanager
def service(workload: Workload, replicas: int, data_root: str, step_timeout_s: float = 120.0):
    name = f"faults-{uuid.uuid4().hex[:8]}"
    options = ControllerOptions(data_token=TOKEN, admin_token=ADMIN_TOKEN, host="127.0.0.1", data_root=data_root,
                                step_timeout_s=step_timeout_s)
    controller = start_controller(options, name=name)
    try:
        directory = ray.get(controller.deploy.remote([workload.table.to_dict()], workload.shards, replicas))
        yield Service(controller, name, directory, data_root)
    finally:
        stop_controller(name)


class Traffic:
    """The push stream (one thread per rank, from ``first_step``) and a reader, every failure recorded."""

    def __init__(self, service_: Service, workload: Workload, on_step: Callable[[int], None] | None = None,
                 first_step: int = 0, last_rank_dies_at: int | None = None, tcp: bool = False):
        self.workload, self.on_step, self.first_step = workload, on_step, first_step
        self.last_rank_dies_at = last_rank_dies_at  # the last rank pushes no step from this one on
        self.clients = [service_.client(tcp) for _ in range(workload.ranks + 1)]
        self.errors: list[BaseException] = []
        self.pushes = self.lookups = 0
        self.lookup_s: list[float] = []
        self.stop = threading.Event()  # set: the ranks push no further step
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._push, args=(rank,)) for rank in range(workload.ranks)]
        self._threads.append(threading.Thread(target=self._look_up))

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for thread in self._threads[:-1]:
            thread.join()
        self._done.set()
        self._threads[-1].join()
        for client in self.clients:
            client.close()

    def _push(self, rank: int) -> None:
        try:
            for step in range(self.first_step, self.workload.steps):
                if self.stop.is_set() or (rank == self.workload.ranks - 1 and step == self.last_rank_dies_at):
                    return
                self.workload.push(self.clients[rank], step, rank)
                self.pushes += 1
                if rank == 0 and self.on_step:
                    self.on_step(step)
        except BaseException as error:  # noqa: BLE001 - every failure is counted
            self.errors.append(error)

    def _look_up(self) -> None:
        rng = np.random.default_rng(1)
        while not self._done.is_set():
            ids = rng.integers(0, self.workload.table.rows, size=self.workload.lookup_rows)
            start = time.monotonic()
            try:
                rows = self.clients[-1].lookup(self.workload.table.name, ids, dtype=torch.float32).result()
                assert rows.shape == (len(ids), self.workload.table.dim)
            except BaseException as error:  # noqa: BLE001
                self.errors.append(error)
                time.sleep(0.05)
                continue
            self.lookup_s.append(time.monotonic() - start)
            self.lookups += 1

    def summary(self) -> dict[str, Any]:
        latencies = sorted(self.lookup_s) or [0.0]
        return {"failed_requests": len(self.errors), "errors": [str(error)[:300] for error in self.errors[:3]],
                "pushes": self.pushes, "lookups": self.lookups,
                "lookup_p50_ms": 1e3 * statistics.median(latencies),
                "lookup_p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                "slowest_lookup_s": latencies[-1]}


def fault_free_checksums(workload: Workload, data_root: str) -> dict[int, str]:
    """Each group's checksum after the whole stream on one copy, nothing failing."""
    with service(workload, replicas=1, data_root=data_root) as twin:
        with Traffic(twin, workload) as traffic:
            pass
        if traffic.errors:
            raise RuntimeError(f"the fault-free twin failed: {traffic.errors[0]}")
        return {group: sums[0] for group, sums in twin.group_checksums(workload.table.name).items()}


def wait_until(condition: Callable[[], Any], timeout_s: float) -> Any:
    """``condition()``'s first true value within ``timeout_s``, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return None


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A fault when rank 0 finishes step ``at_step``: ``signal`` sent to one shard (``group``, its primary or
    not) or to the controller, (``target`` "worker") the last rank dying, never to push again, or
    (``target`` "connections") every TCP connection to the shards (their row streams too) and the directory
    dropped, three times 0.2 s apart (``ss -K``; the clients then talk TCP, not Unix sockets)."""

    name: str
    signal: int
    primary: bool = True
    replicas: int = 2
    group: int = 0
    at_step: int = 6
    target: str = "shard"  # shard | controller | worker


SCENARIOS = {scenario.name: scenario for scenario in (
    Scenario("shard SIGKILL, primary", signal.SIGKILL),
    Scenario("shard SIGKILL, replica", signal.SIGKILL, primary=False),
    Scenario("shard SIGKILL, primary, 3 copies", signal.SIGKILL, replicas=3),
    Scenario("shard SIGSTOP, primary", signal.SIGSTOP, group=1),
    Scenario("controller SIGKILL", signal.SIGKILL, target="controller"),
    Scenario("controller SIGSTOP, 3 s", signal.SIGSTOP, target="controller"),
    Scenario("connections dropped", signal.SIGKILL, target="connections"),
    Scenario("worker dies mid-step", signal.SIGKILL, target="worker"),
    Scenario("shard SIGKILL, one copy", signal.SIGKILL, replicas=1),
)}
WORKER_STEP_TIMEOUT_S = 3.0  # the step timeout of the worker scenario's service
STOPPED_S = 3.0  # how long a SIGSTOPped controller stays stopped (a stopped shard is failed over instead)


def can_drop_connections() -> bool:
    """Whether ``ss -K`` may destroy sockets here (root, and a kernel built with socket destruction)."""
    return shutil.which("ss") is not None and os.geteuid() == 0


def run_scenario(scenario: Scenario, workload: Workload, expected: dict[int, str], data_root: str,
                 recovery_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run ``workload`` with ``scenario``'s fault and judge it against ``expected`` (fault_free_checksums).

    With one copy the shard's updates since the last checkpoint are lost by design: the driver checkpoints
    between steps every ``at_step`` steps and, told of the loss, restores the last checkpoint and runs on
    from its step, as a training job resumes; the verdict then holds for the run as a whole. A dead worker
    loses its steps by design: the verdict is whether the shards aborted them within their step timeout
    and hold nothing of them after.
    """
    if scenario.target == "worker":
        return _run_without_a_worker(scenario, workload, data_root)
    with service(workload, scenario.replicas, data_root) as svc:
        victim = (ray.get(svc.controller.pid.remote()) if scenario.target in ("controller", "connections")
                  else svc.pid_of(scenario.group, scenario.primary))
        struck: dict[str, float] = {}
        dropped: list[int] = []
        addresses = [address for r in ray.get(svc.controller.status.remote())
                     for address in (r["address"], r["row_stream_address"]) if address]
        ports = sorted({int(address.rsplit(":", 1)[1]) for address in [*addresses, svc.directory]})

        def strike(step: int) -> None:
            if step != scenario.at_step or struck:
                return
            struck["at"] = time.time()
            if scenario.target == "connections":
                threading.Thread(target=_drop_connections, args=(ports, dropped)).start()
                return
            os.kill(victim, scenario.signal)
            if scenario.target == "controller" and scenario.signal == signal.SIGSTOP:
                threading.Timer(STOPPED_S, os.kill, (victim, signal.SIGCONT)).start()

        try:
            if scenario.replicas == 1:
                traffic, resumed_from = _run_with_checkpoints(svc, workload, scenario, strike)
            else:
                with Traffic(svc, workload, strike, tcp=scenario.target == "connections") as traffic:
                    pass
                resumed_from = None
        finally:
            if scenario.signal == signal.SIGSTOP and scenario.target == "shard":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)  # the controller kills it; this matters only if it did not
        outcome = {"scenario": scenario.name, "replicas": scenario.replicas, **traffic.summary(),
                   "resumed_from_step": resumed_from}
        if scenario.target == "controller" and scenario.signal == signal.SIGKILL:
            outcome["controller_back_s"] = _controller_back_s(svc, victim, struck["at"])
            outcome["failover_s"] = outcome["recovered_s"] = None
        elif scenario.target != "shard":
            outcome["failovers"] = len(ray.get(svc.controller.failovers.remote()))  # none expected
            outcome["sockets_dropped"] = dropped
            outcome["failover_s"] = outcome["recovered_s"] = None
        else:
            events = wait_until(lambda: [e for e in ray.get(svc.controller.failovers.remote()) if "recovered_s" in e],
                                recovery_timeout_s) or ray.get(svc.controller.failovers.remote())
            event = events[0] if events else {}
            outcome["failover_s"] = event["at"] + event["routed_around_s"] - struck["at"] if event and struck else None
            outcome["recovered_s"] = (event["at"] + event["recovered_s"] - struck["at"]
                                      if "recovered_s" in event else None)
        whole = wait_until(lambda: svc.whole(scenario.replicas, workload.shards), recovery_timeout_s)
        groups = svc.group_checksums(workload.table.name)
        return {**outcome, "tables_equal": {group: sums[0] for group, sums in groups.items()} == expected,
                "copies_identical": bool(whole) and all(len(set(sums)) == 1 for sums in groups.values())}


def _drop_connections(ports: list[int], dropped: list[int], times: int = 3, every_s: float = 0.2) -> None:
    """Destroy every TCP connection from or to ``ports`` on this machine, ``times`` times; append to
    ``dropped`` how many sockets each round destroyed (``ss -K`` lists them)."""
    where = " or ".join(f"sport = :{port} or dport = :{port}" for port in ports)
    for _ in range(times):
        done = subprocess.run(["ss", "-K", "-t", f"( {where} )"], capture_output=True, text=True, check=False)
        dropped.append(max(0, len(done.stdout.strip().splitlines()) - 1))  # less the header
        time.sleep(every_s)


def _controller_back_s(svc: Service, dead_pid: int, killed_at: float) -> float:
    """Seconds from the kill until the restarted controller answers and its directory serves the routing."""
    wait_until(lambda: ray.get(svc.controller.pid.remote()) != dead_pid, 60)
    with svc.client() as client:
        wait_until(lambda: _answers(client), 60)
    return time.time() - killed_at


def _answers(client: MemoryClient) -> bool:
    try:
        client.refresh_routing()
    except MemoryServiceError:
        return False
    return True


def _run_without_a_worker(scenario: Scenario, workload: Workload, data_root: str) -> dict[str, Any]:
    """The last rank dies before step ``at_step``: every later step waits for it on the shards until their
    step timeout aborts it. Measures how long after rank 0's last push no step is pending any more, and
    the shards' held bytes before the death and after."""
    with service(workload, scenario.replicas, data_root, step_timeout_s=WORKER_STEP_TIMEOUT_S) as svc:
        held: dict[str, int] = {}

        def note_held(step: int) -> None:
            if step == scenario.at_step - 1:
                held["before"] = sum(r["bytes"] for r in ray.get(svc.controller.status.remote()))

        with Traffic(svc, workload, note_held, last_rank_dies_at=scenario.at_step) as traffic:
            pass
        last_push = time.time()
        cleared = wait_until(lambda: not any(r["pending_steps"] for r in ray.get(svc.controller.status.remote())), 60)
        records = ray.get(svc.controller.status.remote())
        return {"scenario": scenario.name, "replicas": scenario.replicas, **traffic.summary(),
                "resumed_from_step": None, "failover_s": None, "recovered_s": None,
                "step_timeout_s": WORKER_STEP_TIMEOUT_S,
                "aborted_steps": max(r["aborted_steps"] for r in records),
                "steps_cleared_s": time.time() - last_push if cleared else None,
                "held_bytes_before": held["before"], "held_bytes_after": sum(r["bytes"] for r in records),
                "tables_equal": None,
                "copies_identical": all(len(set(sums)) == 1
                                        for sums in svc.group_checksums(workload.table.name).values())}


def _run_with_checkpoints(svc: Service, workload: Workload, scenario: Scenario, strike) -> tuple[Traffic, int | None]:
    """One copy: steps in rounds of ``scenario.at_step``, a checkpoint before each; on the loss, wait for the
    group to be re-made, restore the last checkpoint and run on from its step. Returns the traffic of the
    round that failed (else the last) and the step the run resumed from."""
    saved_step, resumed_from, failed, traffic = 0, None, None, None
    ray.get(svc.controller.checkpoint.remote("round-0"))
    while saved_step < workload.steps:
        end = min(workload.steps, saved_step + scenario.at_step)
        with Traffic(svc, dataclasses.replace(workload, steps=end), strike, first_step=saved_step) as traffic:
            pass
        if traffic.errors:
            if not all(isinstance(error, MemoryServiceError) for error in traffic.errors):
                raise traffic.errors[0]
            failed = failed or traffic
            wait_until(lambda: svc.whole(1, workload.shards), 60)
            ray.get(svc.controller.restore.remote(f"round-{saved_step}"))
            resumed_from = saved_step
            continue
        ray.get(svc.controller.checkpoint.remote(f"round-{end}"))
        saved_step = end
    return failed or traffic, resumed_from


def soak(workload: Workload, seconds: float, data_root: str, replicas: int = 2) -> dict[str, Any]:
    """``workload``'s ranks and reader for ``seconds`` on ``replicas`` copies; the shards' held bytes and
    resident memory sampled every second."""
    with service(workload, replicas, data_root) as svc:
        pids = [info["pid"] for info in ray.get(svc.controller.shard_pids.remote()).values()]
        samples: dict[str, list] = {"sample_s": [], "shard_bytes": [], "shard_rss": []}
        start = time.monotonic()
        with Traffic(svc, workload) as traffic:
            while time.monotonic() - start < seconds:
                time.sleep(1.0)
                samples["sample_s"].append(time.monotonic() - start)
                samples["shard_bytes"].append(sum(r["bytes"] for r in ray.get(svc.controller.status.remote())))
                samples["shard_rss"].append(sum(_resident_bytes(pid) for pid in pids))
            traffic.stop.set()
        return {"seconds": seconds, "ranks": workload.ranks, "replicas": replicas,
                "steps": traffic.pushes // workload.ranks, **traffic.summary(), **samples,
                "shard_bytes_first": samples["shard_bytes"][0], "shard_bytes_last": samples["shard_bytes"][-1]}


def _resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
