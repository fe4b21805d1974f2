"""Integration: the shards' row streams (lookups with raw rows over TCP), from a remote client and a raw socket."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import ray
import torch

from compute.memory.client import MemoryClient
from protos import engram_memory_v1_pb2 as pb
from protos.row_stream import FRAME_HEAD, HELLO_LIMIT, BlockingRowStream
from protos.wire import quantize_rows
from tests.integration.memory_deploy import TOKEN, deployment, reference_rows, row_streams, spec

pytestmark = pytest.mark.ray

TABLE = spec("streamed", rows=5000, dim=16, kind="sgd", lr=0.5)


def test_a_remote_client_looks_rows_up_on_the_row_streams_before_and_after_slots_move(ray_cluster):
    with deployment([TABLE], shards=2) as (controller, local):
        assert all(row_streams(local.directory).values())
        ids = np.random.default_rng(0).integers(0, TABLE.rows, size=3000)  # with duplicates, on both shards
        with MemoryClient(local.directory, TOKEN, use_local_transport=False) as remote:
            assert set(remote._routing.row_streams) == {0, 1}
            expected = reference_rows(TABLE, ids)
            assert torch.equal(remote.lookup("streamed", ids, dtype=torch.float32).result(), expected)
            assert torch.equal(remote.lookup("streamed", ids).result(), expected.bfloat16())
            assert torch.equal(remote.lookup("streamed", ids, dtype=torch.float8_e4m3fn).result(),
                               quantize_rows(expected))
            # An update is seen by the next lookup; then slots move to a third shard while the client holds
            # connections to the first two: the refused parts are resent after a routing refresh.
            stepped = np.unique(ids)[::4]
            remote.push("streamed", stepped, torch.ones(len(stepped), TABLE.dim), step=0).result()
            expected[np.isin(ids, stepped)] -= TABLE.optimizer.lr
            assert torch.equal(remote.lookup("streamed", ids, dtype=torch.float32).result(), expected)
            assert ray.get(controller.scale.remote(3))["streamed"] > 0
            assert torch.equal(remote.lookup("streamed", ids, dtype=torch.float32).result(), expected)
            assert set(remote._routing.row_streams) == {0, 1, 2}
            assert torch.equal(local.lookup("streamed", ids, dtype=torch.float32).result(), expected)


def lookup(stream: BlockingRowStream, ids, table: str = "streamed", dtype=pb.FLOAT32, **fields):
    return stream.lookup(pb.LookupRequest(table=table, row_ids=np.asarray(ids, dtype="<i8").tobytes(), dtype=dtype,
                                          **fields).SerializeToString())


def test_the_row_stream_refuses_bad_tokens_frames_and_requests_and_keeps_serving(ray_cluster):
    with deployment([TABLE], shards=1) as (controller, client):
        address = row_streams(client.directory)[0]
        before = ray.get(controller.checksums.remote())

        with pytest.raises(ConnectionRefusedError, match="UNAUTHENTICATED"):
            BlockingRowStream(address, "not-the-token-0123456789")
        no_token_yet = BlockingRowStream(address)  # a lookup before the hello is no hello: the stream closes
        no_token_yet.send(b"\xff" * 16)
        assert no_token_yet.closed()
        too_long = BlockingRowStream(address)
        too_long.send(b"x" * (HELLO_LIMIT + 1))
        assert too_long.closed()

        stream = BlockingRowStream(address, TOKEN)
        refusals = [
            (lookup(stream, [1, TABLE.rows]), "INVALID_ARGUMENT", "row_ids"),
            (lookup(stream, [1], dtype=77), "INVALID_ARGUMENT", "dtype"),
            (lookup(stream, [1], shared_rows=pb.SharedRows(name="engram-rows-x")), "INVALID_ARGUMENT", "shared_rows"),
            (lookup(stream, [0], table="absent"), "NOT_FOUND", "absent"),
            (stream.lookup(b"\x0a\xff\xff\xff\xff\x0f"), "INVALID_ARGUMENT", "LookupRequest"),  # a field past the end
        ]
        for (reply, rows), code, named in refusals:
            assert (reply.code, rows) == (code, b"") and named in reply.message, reply
        # After the refusals the same connection answers, rows as raw bytes after the reply.
        reply, rows = lookup(stream, [3, 4000, 3])
        assert (reply.code, reply.header.num_rows, reply.header.dim) == ("", 3, TABLE.dim)
        assert torch.equal(torch.frombuffer(bytearray(rows), dtype=torch.float32).view(3, TABLE.dim),
                           reference_rows(TABLE, [3, 4000, 3]))
        stream.socket.sendall(FRAME_HEAD.pack(1 << 31))  # a frame over the message limit: closed unread
        assert stream.closed()

        assert ray.get(controller.checksums.remote()) == before
        assert torch.equal(client.lookup("streamed", [7], dtype=torch.float32).result(), reference_rows(TABLE, [7]))


def test_when_a_primary_dies_remote_lookups_go_to_its_replicas_stream(ray_cluster):
    with deployment([TABLE], shards=2, replicas=2) as (controller, local):
        ids = np.arange(0, TABLE.rows, 3)
        with MemoryClient(local.directory, TOKEN, use_local_transport=False) as remote:
            expected = remote.lookup("streamed", ids, dtype=torch.float32).result()
            pids = ray.get(controller.shard_pids.remote())
            primary = next(info["pid"] for info in pids.values() if info["group"] == 0 and info["primary"])
            os.kill(primary, signal.SIGKILL)
            for _ in range(4):  # every lookup answered: the dead copy's part goes to the other copy at once
                assert torch.equal(remote.lookup("streamed", ids, dtype=torch.float32).result(), expected)
