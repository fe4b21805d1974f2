"""Integration: the two rights (data and admin tokens), their rotation, and files only under the data root."""
from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
import ray
import torch

from compute.memory.client import MemoryClient, MemoryServiceError, RetryPolicy

from memory_service.auth import DATA_METHODS
from protos import engram_memory_v1_pb2 as pb
from protos.row_stream import BlockingRowStream
from tests.integration.memory_deploy import ADMIN_TOKEN, TOKEN, deployment, row_streams, shard_stub, spec

pytestmark = pytest.mark.ray

TABLE = spec("access", rows=2000, dim=8)
LARGER = spec("larger", rows=20_000, dim=16)  # makes each shard's share exceed the 1 MiB floor of a reservation
SHARD_SERVICE = pb.DESCRIPTOR.services_by_name["ShardService"]
ADMIN_METHODS = [m for m in SHARD_SERVICE.methods if f"/{SHARD_SERVICE.full_name}/{m.name}" not in DATA_METHODS]


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def memory(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("data-root")
    with deployment([TABLE, LARGER], shards=2, data_root=str(root)) as (controller, client):
        stub, channel = shard_stub(client)
        yield controller, client, stub, root
        channel.close()


def test_the_data_token_reaches_no_admin_method_and_changes_nothing(memory):
    controller, _, stub, _ = memory
    assert {m.name for m in ADMIN_METHODS} == {"AddTable", "DropTable", "SetEpoch", "FreezeSlots", "ExportSlots",
                                               "ImportSlots", "ReleaseSlots", "Checkpoint", "Restore", "SetRole",
                                               "Replicate", "AddReplica", "StepBarrier"}
    before = ray.get(controller.checksums.remote())
    for method in ADMIN_METHODS:
        request = getattr(pb, method.input_type.name)(table="access") if "table" in \
            method.input_type.fields_by_name else getattr(pb, method.input_type.name)()
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method.name)(request, metadata=bearer(TOKEN))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, method.name
        assert "admin token" in caught.value.details()
    assert ray.get(controller.checksums.remote()) == before
    assert {shard["epoch"] for shard in ray.get(controller.status.remote())} == {1}  # SetEpoch did not reach it


def test_the_admin_token_reaches_admin_and_data_methods(memory):
    _, _, stub, _ = memory
    stub.FreezeSlots(pb.FreezeSlotsRequest(table="access", slots=[3], frozen=True), metadata=bearer(ADMIN_TOKEN))
    stub.FreezeSlots(pb.FreezeSlotsRequest(table="access", slots=[3], frozen=False), metadata=bearer(ADMIN_TOKEN))
    assert stub.Stats(pb.StatsRequest(), metadata=bearer(ADMIN_TOKEN)).epoch == 1
    with pytest.raises(grpc.RpcError) as caught:  # an admin may not turn the routing epoch back either
        stub.SetEpoch(pb.SetEpochRequest(epoch=0), metadata=bearer(ADMIN_TOKEN))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "only grow" in caught.value.details()


def test_undecodable_requests_get_invalid_argument_naming_the_message(memory):
    _, client, _, _ = memory
    with grpc.insecure_channel(client.shard_address(0)) as channel:
        raw = channel.unary_unary(f"/{SHARD_SERVICE.full_name}/Update")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff", metadata=bearer(TOKEN))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "engram.memory.v1.UpdateRequest" in caught.value.details()


def refusal(stub, method: str, request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request, metadata=bearer(ADMIN_TOKEN))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


def test_checkpoint_and_restore_paths_stay_inside_the_data_root(memory, tmp_path):
    controller, _, stub, root = memory
    outside = tmp_path / "outside"
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    for directory in ("", str(outside), "../outside", "link/outside", "/"):
        assert "directory" in refusal(stub, "Checkpoint", pb.CheckpointRequest(directory=directory))
    assert not outside.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="inside the data root"):
        ray.get(controller.checkpoint.remote(str(outside)))

    # Whether the file outside exists or not, the refusal reads the same.
    messages = {refusal(stub, "Restore", pb.RestoreRequest(directory=directory, table="access", paths=[path],
                                                           slots=[0])).replace(path, "PATH")
                for directory, path in (("/", "etc/hostname"), ("/", "etc/no-such-file-here"))}
    assert len(messages) == 1 and "data root" in messages.pop()
    (root / "ckpt").mkdir()
    messages = {refusal(stub, "Restore", pb.RestoreRequest(directory="ckpt", table="access", paths=[path],
                                                           slots=[0])).replace(path, "PATH")
                for path in ("../../../../../../etc/hostname", "../../../../../../etc/no-such-file-here")}
    assert len(messages) == 1 and "data root" in messages.pop()


def test_checkpoint_files_are_private_and_table_names_cannot_make_paths(memory):
    controller, _, stub, root = memory
    manifest = ray.get(controller.checkpoint.remote("private"))
    files = [p for p in (root / "private").rglob("*")]
    assert manifest == str(root / "private" / "manifest.json") and files
    for path in files:
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    for name in ("../../../x", "a/b", ".hidden", "", "x" * 65, "nul\x00"):
        bad = {**TABLE.to_dict(), "name": name}
        details = refusal(stub, "AddTable", pb.AddTableRequest(spec_json=json.dumps(bad), slots=[], epoch=1))
        assert details.startswith("name:"), details
    assert not (root.parent / "x").exists()


def test_tokens_rotate_without_a_restart_and_old_ones_expire_after_the_grace(ray_cluster, tmp_path):
    with deployment([TABLE], shards=1, data_root=str(tmp_path), reflection=True) as (controller, client):
        stub, channel = shard_stub(client)
        stream_address = row_streams(client.directory)[0]
        stream = BlockingRowStream(stream_address, TOKEN)  # admitted with the token about to be replaced
        new_data, new_admin = "rotated-data-token-000000", "rotated-admin-token-00000"
        info = ray.get(controller.rotate_tokens.remote(new_data, new_admin, 1.5))
        assert info["token"] == new_data
        lookup = pb.LookupRequest(table="access", row_ids=b"\x01" + b"\x00" * 7, dtype=pb.FLOAT32)
        one_row = lookup.SerializeToString()
        for token in (TOKEN, new_data):  # both, during the grace period
            stub.Lookup(lookup, metadata=bearer(token))
        assert stream.lookup(one_row)[0].code == ""
        time.sleep(2.0)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Lookup(lookup, metadata=bearer(TOKEN))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.Lookup(lookup, metadata=bearer(new_data))
        # The row stream asks for the token at every lookup: the open connection is refused and closed.
        assert stream.lookup(one_row)[0].code == "UNAUTHENTICATED" and stream.closed()
        assert BlockingRowStream(stream_address, new_data).lookup(one_row)[0].code == ""
        assert len(ray.get(controller.status.remote())) == 1  # the controller speaks with the new admin token

        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=bearer(new_data))
        services = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {"engram.memory.v1.ShardService", "grpc.health.v1.Health"} <= services
        channel.close()


def test_a_push_refused_for_its_content_changes_no_shard(memory):
    controller, client, _, _ = memory
    ids = np.arange(0, 128, 2)  # rows of both shards
    route = client._route("access")
    assert set(route.owners[ids % route.num_slots].tolist()) == {0, 1}
    nan, inf = torch.ones(len(ids), TABLE.dim), torch.ones(len(ids), TABLE.dim, dtype=torch.bfloat16)
    nan[-1, 0], inf[0, 5] = float("nan"), float("inf")
    before = ray.get(controller.checksums.remote())
    for row_ids, grads, field in ((ids, nan, "grads"), (ids, inf, "grads"), ([*ids[:-1], TABLE.rows], nan, "row_ids"),
                                  (ids, torch.ones(len(ids), TABLE.dim + 1), "grads")):
        with pytest.raises(ValueError, match=field):
            client.push("access", row_ids, grads, step=5).result()
    with pytest.raises(ValueError, match="rank"):
        client.push("access", ids, torch.ones(len(ids), TABLE.dim), step=5, rank=2, world_size=2).result()
    assert ray.get(controller.checksums.remote()) == before


def test_a_push_cut_short_changes_nothing_names_the_shards_that_took_rows_and_resending_completes_it(memory):
    """A synchronous push reports its rank to the shards only once every row has landed, so one cut short
    leaves its rows pending (applied nowhere); resent with the same step and rank, it completes once."""
    controller, client, _, _ = memory
    route = client._route("access")
    ids = np.arange(1, 129, 2)
    on_shard_1 = route.owners[ids % route.num_slots] == 1
    frozen_slots = sorted(set((ids[on_shard_1] % route.num_slots).tolist()))
    grads = torch.full((len(ids), TABLE.dim), 0.5)
    before = client.lookup("access", ids, dtype=torch.float32).result()
    stub_1, channel = shard_stub(client, 1)
    freeze = pb.FreezeSlotsRequest(table="access", slots=frozen_slots, frozen=True)
    stub_1.FreezeSlots(freeze, metadata=bearer(ADMIN_TOKEN))  # shard 1 refuses updates, as during a move
    impatient = MemoryClient(client.directory, TOKEN, retry=RetryPolicy(deadline_s=0.5))
    try:
        with pytest.raises(MemoryServiceError) as caught:
            impatient.push("access", ids, grads, step=40).result()
        assert "shards [0] had already taken rows of this push" in caught.value.details
        assert "nothing was applied" in caught.value.details
        assert torch.equal(client.lookup("access", ids, dtype=torch.float32).result(), before)

        freeze.frozen = False
        stub_1.FreezeSlots(freeze, metadata=bearer(ADMIN_TOKEN))
        result = impatient.push("access", ids, grads, step=40).result()
        assert result.applied_rows == len(ids) and not result.pending  # shard 0 took only the report
        done = client.lookup("access", ids, dtype=torch.float32).result()
        assert not (done == before).all(dim=1).any()  # every row moved, by one step of Adam
        again = impatient.push("access", ids, grads, step=40).result()
        assert again.duplicate and again.applied_rows == 0
        assert torch.equal(client.lookup("access", ids, dtype=torch.float32).result(), done)
    finally:
        impatient.close()
        channel.close()


def test_each_shard_reserves_its_share_of_the_tables_memory_from_ray(memory):
    """So Ray places shards only on memory nodes with room for them, and its autoscaler can size those."""
    controller, _, _, _ = memory
    shards = ray.get(controller.status.remote())
    share = sum(table.rows * table.bytes_per_row() for table in (TABLE, LARGER)) // 2
    assert share > 1 << 20 and [shard["reserved_bytes"] for shard in shards] == [share] * 2
    assert all(shard["bytes"] <= 1.1 * shard["reserved_bytes"] for shard in shards)


def test_empty_calls_work_in_a_process_where_ray_records_the_clients_metrics(memory):
    """Ray's counters take only positive increments: a lookup or push of no rows must not trip them."""
    _, client, _, _ = memory
    assert ray.is_initialized()
    assert client.lookup("access", np.empty(0, dtype=np.int64)).result().shape == (0, TABLE.dim)
    result = client.push("access", np.empty(0, dtype=np.int64), torch.empty(0, TABLE.dim), step=90).result()
    assert result.applied_rows == 0 and not result.pending
