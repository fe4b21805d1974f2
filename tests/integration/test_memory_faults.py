"""Integration: replica groups and failover on real shards, with the fault-injection harness's small runs.

Each run is a fixed stream of synchronous pushes from two ranks with lookups beside it; the final
tables, optimizer state included, must equal the same stream's on a deployment where nothing failed.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from bench.fault_injection import (SCENARIOS, Traffic, Workload, fault_free_checksums, run_scenario, service,
                                  wait_until)
from compute.memory.client import MemoryServiceError

pytestmark = pytest.mark.ray

WORKLOAD = Workload(steps=12)


@pytest.fixture(scope="module")
def expected(ray_cluster, tmp_path_factory) -> dict[int, str]:
    return fault_free_checksums(WORKLOAD, str(tmp_path_factory.mktemp("twin")))


def test_replicas_are_bit_identical_and_share_the_lookups(expected, tmp_path):
    with service(WORKLOAD, replicas=2, data_root=str(tmp_path)) as svc:
        with Traffic(svc, WORKLOAD) as traffic:
            pass
        assert not traffic.errors, traffic.errors
        groups = svc.group_checksums(WORKLOAD.table.name)
        assert {group: sums[0] for group, sums in groups.items()} == expected
        assert all(len(sums) == 2 and len(set(sums)) == 1 for sums in groups.values()), groups
        replicas = [r for r in ray.get(svc.controller.status.remote()) if r["role"] == "replica"]
        assert len(replicas) == 2 and all(r["requests_per_s"] > 0 for r in replicas), replicas


# The replica's death and one copy's loss run in bench.faults; a lost shard's error and its re-making from the
# checkpoint are below, and a training run that resumes from its checkpoint is in test_training.py.
@pytest.mark.parametrize("name", ["shard SIGKILL, primary", "shard SIGSTOP, primary",
                                  "shard SIGKILL, primary, 3 copies"])
def test_with_two_copies_a_dead_or_stopped_shard_fails_and_loses_nothing(expected, tmp_path, name):
    outcome = run_scenario(SCENARIOS[name], WORKLOAD, expected, str(tmp_path))
    assert outcome["failed_requests"] == 0, outcome["errors"]
    assert outcome["tables_equal"] and outcome["copies_identical"], outcome
    assert outcome["failover_s"] < 5, outcome
    assert outcome["slowest_lookup_s"] < 8, outcome  # one call deadline (5 s), then another copy


def test_a_lost_shard_is_named_until_remade_from_the_checkpoint(ray_cluster, tmp_path):
    with service(WORKLOAD, replicas=1, data_root=str(tmp_path)) as svc, svc.client() as client:
        table, rows = WORKLOAD.table.name, np.arange(WORKLOAD.table.rows)
        ray.get(svc.controller.checkpoint.remote("saved"))
        saved = client.lookup(table, rows, dtype=torch.float32).result()
        for step in range(3):
            for rank in range(WORKLOAD.ranks):
                WORKLOAD.push(client, step, rank)
        pids = ray.get(svc.controller.shard_pids.remote())
        lost = next(index for index, info in pids.items() if info["group"] == 0)
        os.kill(pids[lost]["pid"], signal.SIGKILL)
        with pytest.raises(MemoryServiceError, match=rf"shard {lost} \(table 'faults', slots \[0, .*\) died with no "
                                                     "replica left"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the controller has routed around it
                client.lookup(table, rows, dtype=torch.float32).result()
                time.sleep(0.05)
        assert wait_until(lambda: svc.whole(1, WORKLOAD.shards), 30)
        event = ray.get(svc.controller.failovers.remote())[0]
        assert event["remade_from"] == "saved"
        client.refresh_routing()
        now = client.lookup(table, rows, dtype=torch.float32).result()
        group0 = torch.from_numpy(rows % WORKLOAD.table.num_slots < WORKLOAD.table.num_slots // 2)
        assert torch.equal(now[group0], saved[group0])  # group 0 as checkpointed; its later updates are lost
        assert not torch.equal(now[~group0], saved[~group0])  # group 1 kept its updates


def test_aborted_steps_and_a_restore_reach_every_copy_in_order(ray_cluster, tmp_path):
    with service(WORKLOAD, replicas=2, data_root=str(tmp_path), step_timeout_s=2.0) as svc, svc.client() as client:
        for rank in range(WORKLOAD.ranks):
            WORKLOAD.push(client, 0, rank)
        at_cut = svc.group_checksums(WORKLOAD.table.name)
        ray.get(svc.controller.checkpoint.remote("cut"))
        WORKLOAD.push(client, 1, 0)  # rank 1 never pushes step 1: each primary's sweep aborts it, its replica too
        assert wait_until(lambda: all(r["aborted_steps"] == 1 for r in ray.get(svc.controller.status.remote())), 15)
        groups = svc.group_checksums(WORKLOAD.table.name)
        assert all(len(set(sums)) == 1 for sums in groups.values()), groups
        os.kill(svc.pid_of(group=0, primary=True), signal.SIGKILL)
        assert wait_until(lambda: svc.whole(2, WORKLOAD.shards), 30)
        with pytest.raises(MemoryServiceError, match="ABORTED"):  # the promoted replica knows step 1 was aborted
            WORKLOAD.push(client, 1, 1)
        ray.get(svc.controller.restore.remote("cut"))  # staged on every copy, committed in each primary's order
        assert svc.group_checksums(WORKLOAD.table.name) == at_cut
