"""Integration: every case of the error contract gets its status code, names its field, changes nothing."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compute.memory.client import MemoryClient, MemoryServiceError
from protos import engram_memory_v1_pb2 as pb
from tests.integration.memory_deploy import TOKEN, deployment, shard_stub, spec

pytestmark = pytest.mark.ray

TABLE = spec("errors", dim=16)
WIDE = spec("wide", rows=1000, dim=128)
READ_ONLY = spec("read_only", storage_dtype="bfloat16")
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def memory(ray_cluster):
    with deployment([TABLE, WIDE, READ_ONLY], shards=1) as (controller, client):
        stub, channel = shard_stub(client)
        yield controller, client, stub
        channel.close()


def ids_bytes(*ids) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def grads_bytes(rows: int, dim: int = TABLE.dim, fill: float = 0.1) -> bytes:
    return np.full((rows, dim), fill, dtype="<f4").tobytes()


def update(table="errors", ids=(1, 2), grads=None, **fields) -> pb.UpdateRequest:
    values = dict(table=table, row_ids=ids_bytes(*ids), grads=grads if grads is not None else grads_bytes(len(ids)),
                  grad_dtype=pb.FLOAT32, step=1, rank=0, world_size=1)
    values.update(fields)
    return pb.UpdateRequest(**values)


NAN = np.full((2, TABLE.dim), 0.1, dtype="<f4")
NAN[1, 3] = np.nan
INF = np.full((2, TABLE.dim), np.inf, dtype="<f4")

BAD_REQUESTS = [
    ("Lookup", pb.LookupRequest(table="nope", row_ids=ids_bytes(1), dtype=pb.FLOAT32), "NOT_FOUND", "nope"),
    ("Lookup", pb.LookupRequest(table="errors", row_ids=ids_bytes(TABLE.rows), dtype=pb.FLOAT32), "INVALID_ARGUMENT", "row_ids"),
    ("Lookup", pb.LookupRequest(table="errors", row_ids=ids_bytes(-1), dtype=pb.FLOAT32), "INVALID_ARGUMENT", "row_ids"),
    ("Lookup", pb.LookupRequest(table="errors", row_ids=b"\x01\x02\x03", dtype=pb.FLOAT32), "INVALID_ARGUMENT", "row_ids"),
    ("Lookup", pb.LookupRequest(table="errors", row_ids=ids_bytes(1)), "INVALID_ARGUMENT", "dtype"),
    ("Lookup", pb.LookupRequest(table="wide", row_ids=ids_bytes(*[3] * 140_000), dtype=pb.FLOAT32),
     "RESOURCE_EXHAUSTED", "max_message_bytes"),
    # 510,000 rows of 128 E4M3 bytes fit in 64 MiB; with their 4-byte scales they do not.
    ("Lookup", pb.LookupRequest(table="wide", row_ids=ids_bytes(*[3] * 510_000), dtype=pb.FLOAT8_E4M3),
     "RESOURCE_EXHAUSTED", "67320000-byte reply"),
    ("Update", update(table="nope"), "NOT_FOUND", "nope"),
    ("Update", update(ids=(1, TABLE.rows + 5)), "INVALID_ARGUMENT", "row_ids"),
    ("Update", update(ids=(4, 4)), "INVALID_ARGUMENT", "row_ids"),
    ("Update", update(grads=grads_bytes(3)), "INVALID_ARGUMENT", "grads"),
    ("Update", update(grads=NAN.tobytes()), "INVALID_ARGUMENT", "grads"),
    ("Update", update(grads=INF.tobytes()), "INVALID_ARGUMENT", "grads"),
    ("Update", update(grad_dtype=pb.DTYPE_UNSPECIFIED), "INVALID_ARGUMENT", "grad_dtype"),
    ("Update", update(grad_dtype=pb.FLOAT8_E4M3, grads=bytes(2 * TABLE.dim)), "INVALID_ARGUMENT", "grad_dtype"),
    ("Update", update(rank=2, world_size=2), "INVALID_ARGUMENT", "rank"),
    ("Update", update(world_size=0), "INVALID_ARGUMENT", "world_size"),
    ("Update", update(step=-1), "INVALID_ARGUMENT", "step"),
    ("Update", update(synchronous=True, ids=(1, 2), grads=NAN.tobytes()), "INVALID_ARGUMENT", "grads"),
    ("Update", update(table="read_only"), "FAILED_PRECONDITION", "read_only"),
    # Push-and-pull: rows it could not answer refuse the push before it is taken.
    ("Update", update(pull_row_ids=ids_bytes(TABLE.rows), pull_dtype=pb.FLOAT32), "INVALID_ARGUMENT", "pull_row_ids"),
    ("Update", update(pull_row_ids=b"\x01\x02", pull_dtype=pb.FLOAT32), "INVALID_ARGUMENT", "pull_row_ids"),
    ("Update", update(pull_row_ids=ids_bytes(3)), "INVALID_ARGUMENT", "pull_dtype"),
    ("Update", update(table="wide", ids=(), grads=b"", pull_row_ids=ids_bytes(*[3] * 140_000), pull_dtype=pb.FLOAT32),
     "RESOURCE_EXHAUSTED", "pull_row_ids"),
]


@pytest.mark.parametrize("method, request_, code, named", BAD_REQUESTS,
                         ids=[f"{m}-{c}-{n}-{i}" for i, (m, _, c, n) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_its_code_and_leaves_the_table_unchanged(memory, method, request_, code, named):
    controller, _, stub = memory
    before = ray.get(controller.checksums.remote())
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request_, metadata=AUTH)
    assert caught.value.code().name == code
    assert named in caught.value.details()
    assert ray.get(controller.checksums.remote()) == before


def test_a_call_without_or_with_a_wrong_token_is_refused(memory):
    _, client, stub = memory
    request = pb.LookupRequest(table="errors", row_ids=ids_bytes(1), dtype=pb.FLOAT32)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                     (("authorization", f"Bearer {TOKEN[:-1]}"),)):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Lookup(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(MemoryServiceError) as caught:
        MemoryClient(client.directory, token="wrong")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_check_answers_without_a_token(memory):
    _, client, _ = memory
    with grpc.insecure_channel(client.shard_address(0)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="engram.memory.v1.ShardService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_off_unless_asked_for(memory):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, client, _ = memory
    with grpc.insecure_channel(client.shard_address(0)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=AUTH))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_surfaces_the_servers_message(memory):
    _, client, _ = memory
    with pytest.raises(MemoryServiceError) as caught:
        client.lookup("errors", [TABLE.rows + 1]).result()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "row_ids" in caught.value.details


def test_client_refuses_a_push_naming_a_row_twice_and_sends_nothing(memory):
    _, client, _ = memory
    before = client.lookup("errors", [1, 3], dtype=torch.float32).result()
    for ids in ([3, 1, 3], [1, 3, 3]):  # unsorted, and sorted with a repeat
        with pytest.raises(ValueError, match="row_ids"):
            client.push("errors", ids, torch.ones(3, TABLE.dim), step=1).result()
    assert torch.equal(client.lookup("errors", [1, 3], dtype=torch.float32).result(), before)


def test_large_lookups_are_chunked_into_requests_under_the_limit(memory):
    _, client, _ = memory
    ids = np.random.default_rng(5).integers(0, TABLE.rows, size=262_144)
    whole = client.lookup("errors", ids, dtype=torch.float32).result()
    with MemoryClient(client.directory, TOKEN, max_rows_per_request=1000) as chunking:
        assert torch.equal(chunking.lookup("errors", ids, dtype=torch.float32).result(), whole)
