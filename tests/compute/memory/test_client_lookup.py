"""MemoryClient's lookup against shards answered in-process: the rows of every id in the caller's
order, bit for bit, whether they come through the reply or the client's shared memory, and in
page-locked memory when asked (on CUDA machines)."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from compute.memory.calls import Channels, MemoryServiceError, ResendAfterRefresh
from compute.memory.client import MemoryClient
from compute.memory.futures import settled
from compute.memory.remote_table import RemoteRowTable
from compute.memory.routing import Routing, this_node
from memory_service.core.slots import ShardSplit
from memory_service.shared_rows import SharedRowSegments
from protos import engram_memory_v1_pb2 as pb
from protos.wire import WIRE_DTYPE_BY_ENUM, decode_lookup_rows, dequantize_rows, encode_lookup_response, quantize_rows

ROWS, DIM, NUM_SLOTS = 4096, 16, 64
TABLE = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
OWNERS = (np.arange(NUM_SLOTS) % 2).astype("<i4")


@pytest.fixture
def shards(monkeypatch, tmp_path):
    """Two shards answered in-process (through the real codec and segment writer); ``co_located``
    picks whether the client finds their sockets on this machine."""
    segments = SharedRowSegments()
    socket_path = tmp_path / "shard.sock"
    socket_path.touch()

    async def directory(self, address, method, request):
        if method == "ListTables":
            return pb.ListTablesResponse(tables=[pb.TableSpecInfo(name="t", rows=ROWS, dim=DIM)])
        assert method == "GetRouting"
        return pb.Routing(epoch=1, tables=[pb.TableRouting(name="t", num_slots=NUM_SLOTS, owners=OWNERS.tobytes(),
                                                           rows=ROWS, dim=DIM)],
                          shards=[pb.ShardInfo(index=i, address=f"shard-{i}:1", local_address=f"unix:{socket_path}",
                                               node=this_node(), hostname=socket.gethostname()) for i in (0, 1)])

    async def shard(self, address, method, request):
        if method == "MapRows":  # as a shard answers for a table it keeps private: its rows are asked for
            raise MemoryServiceError(grpc.StatusCode.FAILED_PRECONDITION, "table 't': its rows are not in shared memory")
        ids = torch.from_numpy(np.frombuffer(request.row_ids, dtype="<i8").copy())
        wire = WIRE_DTYPE_BY_ENUM[request.dtype]
        rows = wire.encode(TABLE[ids])
        if request.HasField("shared_rows"):
            segments.write(request.shared_rows.name, request.shared_rows.offset, rows, request.shared_rows.positions)
            return decode_lookup_rows(encode_lookup_response(rows, request.dtype, 1, rows_in_reply=False))
        return decode_lookup_rows(encode_lookup_response(rows, request.dtype, 1))

    monkeypatch.setattr(Channels, "directory", directory)
    monkeypatch.setattr(Channels, "shard", shard)


@pytest.mark.parametrize("co_located", [True, False])
@pytest.mark.parametrize("pin_memory", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="page-locked memory needs CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_lookup_returns_every_row_bit_for_bit_in_the_asked_memory(shards, co_located, pin_memory, dtype):
    """float8_e4m3 rows come as they travel: [n, dim + 4] uint8, E4M3 values then the row's scale."""
    random_ids = np.random.default_rng(1).integers(0, ROWS, size=3000)
    with MemoryClient("directory:1", use_local_transport=co_located, max_rows_per_request=500) as client:
        assert client.co_located_shards == ({0, 1} if co_located else set())
        for ids in (random_ids, np.unique(random_ids), random_ids[:1], random_ids[:0]):
            rows = client.lookup("t", ids, dtype=dtype, pin_memory=pin_memory).result()
            expected = TABLE[torch.from_numpy(ids)]
            expected = quantize_rows(expected) if dtype == torch.float8_e4m3fn else expected.to(dtype)
            assert rows.dtype == expected.dtype and rows.shape == expected.shape
            assert torch.equal(rows.view(torch.uint8), expected.view(torch.uint8))
            assert rows.is_pinned() == (pin_memory and len(ids) > 0)  # torch pins no storage for zero rows


def test_a_loaders_shard_split_is_used_while_its_routing_epoch_is_current(shards, monkeypatch):
    served = []
    answer = Channels.shard

    async def recording(self, address, method, request):
        served.append((address, len(request.row_ids) // 8))
        return await answer(self, address, method, request)

    monkeypatch.setattr(Channels, "shard", recording)
    ids = np.unique(np.random.default_rng(2).integers(0, ROWS, size=500))
    everything_on_shard_0 = {0: np.arange(len(ids))}  # not the routing's split: shows which split was taken
    with MemoryClient("directory:1", use_local_transport=False) as client:
        epoch, owners = client.slot_owners()
        assert epoch == 1 and np.array_equal(owners["t"], OWNERS)
        for split_epoch, expected_shards in ((1, {"shard-0:1"}), (0, {"shard-0:1", "shard-1:1"})):
            served.clear()
            rows = client.lookup("t", ids, dtype=torch.float32,
                                 shard_split=ShardSplit(split_epoch, everything_on_shard_0)).result()
            assert torch.equal(rows, TABLE[torch.from_numpy(ids)])
            assert {address for address, _ in served} == expected_shards
            assert sum(count for _, count in served) == len(ids)


def test_float8_rows_reach_the_model_dequantised_in_its_compute_dtype(shards):
    ids = torch.from_numpy(np.unique(np.random.default_rng(3).integers(0, ROWS, size=700)))
    with MemoryClient("directory:1", use_local_transport=True) as client:
        table = RemoteRowTable(client, "t", wire_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        try:
            rows = table.prefetch(ids, torch.arange(len(ids))).result().unique_rows
        finally:
            table.close()
    assert rows.dtype == torch.float32 and rows.requires_grad
    assert torch.equal(rows.detach(), dequantize_rows(quantize_rows(TABLE[ids])))
    assert ((rows.detach() - TABLE[ids]).abs() <= 2**-4 * TABLE[ids].abs().amax(dim=1, keepdim=True)).all()


class StepsOnTheCopier(RemoteRowTable):
    """A CPU table on a GPU's training path: a step's lookups start on the copier thread."""

    def _steps_on_gpu(self) -> bool:
        return True


@pytest.mark.parametrize("table_type", [RemoteRowTable, StepsOnTheCopier])
def test_a_training_steps_rows_are_the_same_wherever_their_lookup_starts(shards, table_type):
    """Prefetched rows, and the next step's across an update: the rows it leaves alone looked up, the others
    as the update's push pulled them."""
    ids = torch.from_numpy(np.unique(np.random.default_rng(4).integers(0, ROWS, size=700)))
    with MemoryClient("directory:1", use_local_transport=True) as client:
        table = table_type(client, "t", wire_dtype=torch.float32)
        try:
            rows = table.prefetch(ids, torch.arange(len(ids))).result()
            across = table.prefetch_across_update(ids, torch.arange(len(ids)), updated_ids=ids[::3])
            pulled = TABLE[ids[::3]] + 1  # as the update left them
            across.after(settled(SimpleNamespace(pulled=pulled)))
            next_rows = across.rows.result(timeout=30)
        finally:
            table.close()
    assert torch.equal(rows.unique_rows.detach(), TABLE[ids]) and rows.unique_rows.requires_grad
    expected = TABLE[ids].clone()
    expected[::3] = pulled
    assert torch.equal(next_rows.unique_rows.detach(), expected)


def test_a_shard_a_scale_down_retired_is_not_lost_and_a_call_to_it_is_resent(shards):
    """A lost shard stays in the routing without an address; a retired one leaves it. A call split by shard under
    the routing before the scale-down is resent once the routing is refreshed, not failed as if the rows were lost."""
    routing = Routing.from_reply(pb.Routing(epoch=2, shards=[pb.ShardInfo(index=0, address="shard-0:1"),
                                                             pb.ShardInfo(index=2)]), local_transport=False)
    assert (routing.lost(0), routing.lost(1), routing.lost(2)) == (False, False, True)
    with MemoryClient("directory:1") as client:
        with pytest.raises(ResendAfterRefresh):
            client._run(client._call_shard(5, "Lookup", pb.LookupRequest(table="t"))).result(timeout=30)
        client._routing = routing
        with pytest.raises(MemoryServiceError, match="died with no replica left"):
            client._run(client._call_shard(2, "Lookup", pb.LookupRequest(table="t"))).result(timeout=30)
