"""Integration: the controller is SIGKILLed under live traffic; Ray restarts it, its shards never notice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
import ray._private.state
import torch
from ray.experimental import internal_kv

from compute.memory.client import MemoryClient
from memory_service import controller_state
from memory_service.controller import ControllerOptions, start_controller, stop_controller
from memory_service.deploy import join
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import NAMESPACE as NAMESPACE_OF_THE_CLI
from protos.wire import bearer_metadata
from tests.integration.memory_deploy import ADMIN_TOKEN, TOKEN, process_alive, reference_rows, spec

pytestmark = pytest.mark.ray

TABLE = spec("survivor", kind="adam", lr=0.01, dim=8, rows=4000)
NAMESPACE = "engram-tests-restart"
ROOT = Path(__file__).resolve().parents[2]


def _push_rows(step: int) -> tuple[np.ndarray, torch.Tensor]:
    ids = np.sort(np.random.default_rng(step).choice(TABLE.rows, size=200, replace=False))
    return ids, torch.randn(len(ids), TABLE.dim, generator=torch.Generator().manual_seed(step))


def _start(name: str, data_root: str):
    options = ControllerOptions(data_token=TOKEN, admin_token=ADMIN_TOKEN, host="127.0.0.1", data_root=data_root)
    controller = start_controller(options, name=name, namespace=NAMESPACE)
    return controller, ray.get(controller.deploy.remote([TABLE.to_dict()], 2))


def _actors_of(name: str) -> dict[str, int]:
    """Name -> pid of the live actors named for controller ``name`` (itself and its shards)."""
    return {a["Name"]: a["Pid"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["Name"].startswith(name)}



def _routing(directory: str, timeout: float) -> pb.Routing:
    with grpc.insecure_channel(directory) as channel:
        return pb_grpc.DirectoryServiceStub(channel).GetRouting(pb.GetRoutingRequest(), timeout=timeout,
                                                                  metadata=bearer_metadata(TOKEN))


def _stopped_without_a_trace(name: str, pids: set[int]) -> None:
    stop_controller(name, NAMESPACE)
    _assert_nothing_left(name, pids, NAMESPACE)


def _assert_nothing_left(name: str, pids: set[int], namespace: str) -> None:
    """No actor named for controller ``name`` alive, none of ``pids`` running, no state stored."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_actors_of(name) or any(process_alive(pid) for pid in pids)):
        time.sleep(0.1)
    assert not _actors_of(name) and not any(process_alive(pid) for pid in pids)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(name)]
    assert not controller_state.exists(namespace, name)


def test_sigkill_of_the_controller_fails_no_data_request_and_it_is_back_within_10_s(ray_cluster):
    name = f"test-restart-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="engram-data-") as data_root:
        controller, directory = _start(name, data_root)
        routing = _routing(directory, timeout=5)
        shard_pids = {pid for actor, pid in _actors_of(name).items() if actor != name}
        assert len(shard_pids) == 2
        stop, errors, steps, lookups = threading.Event(), [], [0], [0]

        def train(client: MemoryClient) -> None:
            rng = np.random.default_rng(0)
            try:
                while not stop.is_set():
                    ids, grads = _push_rows(steps[0])
                    client.push(TABLE.name, ids, grads, step=steps[0], synchronous=True).result()
                    steps[0] += 1
                    assert client.lookup(TABLE.name, rng.integers(0, TABLE.rows, 500)).result().shape == (500, 8)
                    lookups[0] += 1
            except BaseException as error:  # noqa: BLE001 - any failure fails the test below
                errors.append(error)

        with MemoryClient(directory, TOKEN) as client:
            worker = threading.Thread(target=train, args=(client,))
            worker.start()
            try:
                time.sleep(0.5)
                dead_pid = ray.get(controller.pid.remote())
                os.kill(dead_pid, signal.SIGKILL)
                killed_at, steps_at_kill = time.monotonic(), steps[0]
                assert join(name, [TABLE], NAMESPACE).directory == directory  # waits for the restarting controller
                while True:
                    try:
                        recovered = _routing(directory, timeout=0.5)
                        break
                    except grpc.RpcError:
                        assert time.monotonic() - killed_at < 10, "the directory was not back within 10 s"
                        time.sleep(0.1)
                back_after = time.monotonic() - killed_at
                time.sleep(0.5)
            finally:
                stop.set()
                worker.join()
        assert not errors, errors[0]
        assert steps[0] > steps_at_kill > 0 and lookups[0] > 0
        print(f"directory back {back_after:.1f} s after the SIGKILL; {steps[0]} steps, {lookups[0]} lookups")
        assert recovered == routing  # same epoch, shards and slot owners, on the same address
        assert ray.get(controller.pid.remote()) != dead_pid
        assert all(process_alive(pid) for pid in shard_pids)
        assert [row["shard"] for row in ray.get(controller.status.remote())] == [0, 1]
        survived = ray.get(controller.checksums.remote())

        replay_name = f"test-replay-{uuid.uuid4().hex[:8]}"
        replay, replay_directory = _start(replay_name, data_root)
        try:
            with MemoryClient(replay_directory, TOKEN) as client:
                for step in range(steps[0]):
                    ids, grads = _push_rows(step)
                    client.push(TABLE.name, ids, grads, step=step, synchronous=True).result()
            assert ray.get(replay.checksums.remote()) == survived
        finally:
            stop_controller(replay_name, NAMESPACE)
        _stopped_without_a_trace(name, shard_pids)


def test_a_controller_dead_for_good_leaves_its_shards_serving_and_down_still_stops_them(ray_cluster, tmp_path):
    name = f"test-dead-{uuid.uuid4().hex[:8]}"
    controller, directory = _start(name, str(tmp_path))
    shard_pids = {pid for actor, pid in _actors_of(name).items() if actor != name}
    with MemoryClient(directory, TOKEN) as client:
        ray.kill(controller, no_restart=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and name in _actors_of(name):
            time.sleep(0.1)
        assert name not in _actors_of(name) and all(process_alive(pid) for pid in shard_pids)
        ids, grads = _push_rows(0)
        client.push(TABLE.name, ids, grads, step=0, synchronous=True).result()  # the shards serve on
        assert client.lookup(TABLE.name, ids).result().shape == (len(ids), TABLE.dim)
    with pytest.raises(ValueError, match="is dead but left its state"):
        start_controller(ControllerOptions(host="127.0.0.1", data_root=str(tmp_path)), name=name, namespace=NAMESPACE)
    _stopped_without_a_trace(name, shard_pids)
    with pytest.raises(ValueError, match="no memory controller named"):
        stop_controller(name, NAMESPACE)


def test_unreadable_stored_state_is_refused_by_name_and_down_discards_it(ray_cluster):
    name = f"test-corrupt-{uuid.uuid4().hex[:8]}"
    internal_kv._internal_kv_put(controller_state._key(NAMESPACE, name), b"{garbage",
                                 namespace=controller_state.KV_NAMESPACE)
    with pytest.raises(controller_state.StateError, match=f"not valid JSON .*engram memory down --name {name}"):
        controller_state.load(NAMESPACE, name)
    stop_controller(name, NAMESPACE)
    assert controller_state.load(NAMESPACE, name) is None


def test_a_push_held_by_slots_a_dying_controller_left_frozen_completes_once_it_is_back(ray_cluster, tmp_path):
    name = f"test-frozen-{uuid.uuid4().hex[:8]}"
    controller, directory = _start(name, str(tmp_path))
    routing = _routing(directory, timeout=5)
    owners = np.frombuffer(routing.tables[0].owners, dtype="<i4")
    for shard in routing.shards:  # what a checkpoint does first; its controller dies before thawing them
        with grpc.insecure_channel(shard.address) as channel:
            pb_grpc.ShardServiceStub(channel).FreezeSlots(pb.FreezeSlotsRequest(
                table=TABLE.name, slots=np.flatnonzero(owners == shard.index).tolist(), frozen=True),
                metadata=bearer_metadata(ADMIN_TOKEN), timeout=5)
    with MemoryClient(directory, TOKEN) as client:
        ids, grads = _push_rows(0)
        held = client.push(TABLE.name, ids, grads, step=0, synchronous=True)
        time.sleep(1.0)
        assert not held.done()  # refused by the frozen slots, retried
        os.kill(ray.get(controller.pid.remote()), signal.SIGKILL)
        assert held.result(timeout=20).applied_rows == len(ids)
        assert not torch.equal(client.lookup(TABLE.name, ids, dtype=torch.float32).result(), reference_rows(TABLE, ids))
    _stopped_without_a_trace(name, {pid for actor, pid in _actors_of(name).items() if actor != name})


def test_a_shard_that_died_while_the_controller_was_down_is_failed_over_once_it_is_back(ray_cluster, tmp_path):
    name = f"test-lost-{uuid.uuid4().hex[:8]}"
    controller, directory = _start(name, str(tmp_path))
    shards = {actor: pid for actor, pid in _actors_of(name).items() if actor != name}
    dead_shard = sorted(shards)[0]
    dead_index = next(s["index"] for s in controller_state.load(NAMESPACE, name).shards
                      if s["actor_name"] == dead_shard)
    with MemoryClient(directory, TOKEN) as client:
        os.kill(shards[dead_shard], signal.SIGKILL)
        os.kill(ray.get(controller.pid.remote()), signal.SIGKILL)
        assert ray.get(controller.pid.remote()) > 0  # back
        deadline = time.monotonic() + 30
        while not [e for e in ray.get(controller.failovers.remote()) if "recovered_s" in e]:
            assert time.monotonic() < deadline, "the dead shard was not failed over"
            time.sleep(0.1)
        (event,) = ray.get(controller.failovers.remote())
        assert event["shard"] == dead_index and event["remade_from"] == "initial values"  # one copy, no checkpoint
        client.refresh_routing()
        ids = np.arange(TABLE.rows)
        assert torch.equal(client.lookup(TABLE.name, ids, dtype=torch.float32).result(), reference_rows(TABLE, ids))
    _stopped_without_a_trace(name, set(shards.values()))


def test_cli_status_waits_for_a_restarting_controller_and_down_stops_a_dead_ones_shards(ray_cluster, tmp_path):
    name = f"test-cli-{uuid.uuid4().hex[:8]}"
    options = ControllerOptions(data_token=TOKEN, admin_token=ADMIN_TOKEN, host="127.0.0.1", data_root=str(tmp_path))
    controller = start_controller(options, name=name)  # the CLI's namespace
    ray.get(controller.deploy.remote([TABLE.to_dict()], 2))
    shard_pids = {pid for actor, pid in _actors_of(name).items() if actor != name}
    env = {**os.environ, "ENGRAM_HOME": str(tmp_path / "home")}

    def engram(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args, "--address", ray_cluster,
                               "--name", name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    os.kill(ray.get(controller.pid.remote()), signal.SIGKILL)
    assert len(engram("status").strip().splitlines()) == 3
    ray.kill(controller, no_restart=True)
    assert "memory service stopped" in engram("down")
    _assert_nothing_left(name, shard_pids, NAMESPACE_OF_THE_CLI)
