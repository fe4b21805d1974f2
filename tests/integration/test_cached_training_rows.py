"""LookupState, what a hot-row cache of a table that trains admits rows with: a trainable table's float32 rows with
their optimizer state, as the shards hold them after the pushes they acknowledged; a serving table has none."""
from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
import torch

from compute.memory.calls import MemoryServiceError
from compute.memory.service import open_client
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy
from tests.integration.tiny_runs import tiny_run

pytestmark = pytest.mark.ray


def test_lookup_state_gives_the_rows_a_lookup_gives_with_their_adam_state(ray_cluster, tmp_path):
    config = tiny_run(tmp_path)
    spec = engram_table_specs(config)[0]
    handle = deploy([spec], 2)
    client = open_client(handle, read_shared_rows=False)  # lookups asked for, so that they count bytes
    try:
        stepped = np.arange(0, 40, 2)
        for step in range(3):
            client.push(spec.name, stepped, torch.full((len(stepped), spec.dim), 0.1), step=step).result(timeout=60)
        ids = np.arange(0, 60, 3)  # some stepped three times, some never, on both shards
        state = client.lookup_state(spec.name, ids).result(timeout=60)
        assert sorted(state) == ["rows", "state.exp_avg", "state.exp_avg_sq", "state.step"]
        assert torch.equal(state["rows"], client.lookup(spec.name, ids, dtype=torch.float32).result(timeout=60))
        assert state["state.exp_avg"].shape == (len(ids), spec.dim) and state["state.step"].shape == (len(ids), 1)
        assert state["state.step"][:, 0].tolist() == [3.0 if i in set(stepped) else 0.0 for i in ids]
        # What the client moved, by method: a benchmark's bytes on the wire come from these counts.
        client.push(spec.name, stepped, torch.zeros((len(stepped), spec.dim)), step=3, pull_ids=ids[:7],
                    pull_dtype=torch.bfloat16).result(timeout=60)
        moved = client.moved()
        assert moved["push"] == {"calls": 4, "rows": 4 * len(stepped), "bytes": 4 * len(stepped) * spec.dim * 4}
        assert moved["lookup_state"] == {"calls": 1, "rows": len(ids), "bytes": len(ids) * spec.bytes_per_row()}
        assert moved["lookup"] == {"calls": 1, "rows": len(ids), "bytes": len(ids) * spec.dim * 4}
        assert moved["pull"] == {"calls": 1, "rows": 7, "bytes": 7 * spec.dim * 2}
        assert client.lookup_state(spec.name, np.empty(0, dtype=np.int64)).result(timeout=60) == {}
    finally:
        client.close()
        handle.stop()


def test_a_serving_table_has_no_state_to_look_up(ray_cluster, tmp_path):
    spec = engram_table_specs(tiny_run(tmp_path))[0]
    serving = dataclasses.replace(spec, storage_dtype="bfloat16")
    handle = deploy([serving], 1)
    client = open_client(handle)
    try:
        with pytest.raises(MemoryServiceError) as refused:
            client.lookup_state(serving.name, np.arange(4)).result(timeout=60)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and "read-only serving" in str(refused.value)
    finally:
        client.close()
        handle.stop()


def test_a_cache_admits_rows_that_pay_back_and_drops_those_other_workers_updated(ray_cluster, tmp_path):
    """A choice admits the rows looked up again, not those looked up once (fetching a row with its Adam state costs
    ~3 lookups of it here). ``step_applied_everywhere``: after the step's barrier, the cached rows another worker
    stepped are dropped (looked up from the shards again), the others stay; a due choice is made there, with the
    step applied."""
    from compute.memory.cached_table import CachedRowTable

    spec = engram_table_specs(tiny_run(tmp_path))[0]
    handle = deploy([spec], 2)
    client = open_client(handle)
    table = CachedRowTable(client, spec.name, capacity=16, readmit_every=4, wire_dtype=torch.float32)
    try:
        ids, once = torch.arange(0, 24, 3), torch.arange(100, 110)
        assert 2 < table.payback_lookups < 4
        table.lookup(torch.cat([ids, once]).view(1, -1, 1)).result(timeout=60)
        table.lookup(ids.view(1, -1, 1)).result(timeout=60)
        table.step_applied_everywhere(torch.empty(0, dtype=torch.int64))  # the first choice is due (2 lookups)
        assert torch.equal(table.cached_ids, ids)
        assert table.stats.bytes_admitted == len(ids) * spec.bytes_per_row()
        client.push(spec.name, ids[[1, 4]].numpy(), torch.full((2, spec.dim), 0.5), step=0).result(timeout=60)
        table.step_applied_everywhere(ids[[1, 4]])  # as if another worker had pushed them
        kept = ids[[0, 2, 3, 5, 6, 7]]
        assert torch.equal(table.cached_ids, kept)
        hits = table.stats.hits
        rows = table.lookup(ids.view(1, -1, 1)).result(timeout=60)
        assert table.stats.hits == hits + len(kept)
        shards = client.lookup(spec.name, ids.numpy(), dtype=torch.float32).result(timeout=60)
        assert torch.equal(rows.unique_rows.detach(), shards)
    finally:
        table.close()
        client.close()
        handle.stop()
