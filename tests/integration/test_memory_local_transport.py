"""Co-located clients: Unix sockets, rows written into the client's shared memory and serving rows read out of the
shards', same results as TCP."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
import torch

from compute.memory.client import MemoryClient
from compute.memory.shared_segments import SharedRowSegment
from memory_service import row_store
from memory_service.core.leftovers import remove_leftovers
from memory_service.shared_rows import SegmentError, SharedRowSegments
from protos import engram_memory_v1_pb2 as pb
from protos.wire import SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX, SHARED_TABLE_PREFIX, quantize_rows
from tests.integration.memory_deploy import TOKEN, deployment, reference_rows, shard_stub, spec

TABLE = spec("local", dim=16)
SGD_TABLE = spec("local_sgd", kind="sgd", lr=0.5)
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def segment_file():
    """A client-style segment of 4 KiB in /dev/shm, removed afterwards."""
    name = f"engram-rows-test-{uuid.uuid4().hex[:8]}"
    with open(f"/dev/shm/{name}", "wb") as file:
        file.truncate(4096)
    yield name
    if os.path.exists(f"/dev/shm/{name}"):
        os.unlink(f"/dev/shm/{name}")


def segment_bytes(name: str) -> bytes:
    with open(f"/dev/shm/{name}", "rb") as file:
        return file.read()


def test_segments_write_rows_in_order_or_at_positions_and_forget_deleted_segments(segment_file):
    segments = SharedRowSegments()
    rows = torch.arange(12, dtype=torch.int16).view(3, 4)  # rows of 8 bytes
    segments.write(segment_file, 16, rows)
    assert segment_bytes(segment_file)[16:40] == rows.numpy().tobytes()
    segments.write(segment_file, 3, rows, np.array([2, 0, 1], dtype="<i8").tobytes())  # unaligned: bytes path
    assert segment_bytes(segment_file)[3:27] == rows[[1, 2, 0]].numpy().tobytes()
    os.truncate(f"/dev/shm/{segment_file}", 16)  # shrunk by its client: mapped again, not written past its end
    with pytest.raises(SegmentError) as caught:
        segments.write(segment_file, 0, rows)
    assert caught.value.field == "shared_rows.offset"
    os.unlink(f"/dev/shm/{segment_file}")
    with pytest.raises(SegmentError) as caught:
        segments.write(segment_file, 0, rows)
    assert caught.value.field == "shared_rows.name"


def test_segments_read_back_rows_as_written_and_name_the_gradient_field(segment_file):
    segments = SharedRowSegments()
    rows = torch.arange(12, dtype=torch.int16).view(3, 4)
    positions = np.array([2, 0, 1], dtype="<i8").tobytes()
    for offset in (16, 3):  # aligned words and the unaligned bytes path
        segments.write(segment_file, offset, rows, positions)
        assert torch.equal(segments.read(segment_file, offset, 3, 8, positions).view(torch.int16), rows)
    segments.write(segment_file, 8, rows)
    assert torch.equal(segments.read(segment_file, 8, 3, 8).view(torch.int16), rows)
    with pytest.raises(SegmentError) as caught:
        segments.read(segment_file, 4090, 3, 8)
    assert caught.value.field == "shared_grads.offset"


def test_client_segment_is_removed_on_close_and_when_dropped_unclosed():
    closed, dropped = SharedRowSegment(1 << 20), SharedRowSegment(1 << 20)
    paths = [f"/dev/shm/{segment.name}" for segment in (closed, dropped)]
    assert all(os.path.exists(path) for path in paths)
    closed.close()
    del dropped
    gc.collect()
    assert not any(os.path.exists(path) for path in paths)


def test_segments_of_a_killed_client_are_swept_and_live_ones_kept():
    ours = SharedRowSegment(1 << 20)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal\n"
         "from compute.memory.shared_segments import SharedRowSegment\n"
         "segment = SharedRowSegment(1 << 20)\n"
         "print(segment.name, flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)"],
        capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left_behind = killed.stdout.strip()
    assert os.path.exists(f"/dev/shm/{left_behind}")
    assert left_behind in remove_leftovers(SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX)
    assert not os.path.exists(f"/dev/shm/{left_behind}") and os.path.exists(f"/dev/shm/{ours.name}")
    ours.close()


@pytest.mark.parametrize("name, offset, positions, field", [
    ("../etc/passwd", 0, b"", "shared_rows.name"),
    ("engram-rows-absent", 0, b"", "shared_rows.name"),
    (None, 4090, b"", "shared_rows.offset"),
    (None, -1, b"", "shared_rows.offset"),
    (None, 0, np.array([0, 512], dtype="<i8").tobytes(), "shared_rows.positions"),  # 512 rows of 8 bytes fit
    (None, 0, np.array([0, -1], dtype="<i8").tobytes(), "shared_rows.positions"),
    (None, 0, np.array([0], dtype="<i8").tobytes(), "shared_rows.positions"),
    (None, 0, b"\x00" * 12, "shared_rows.positions"),
])
def test_segments_refuse_bad_segments_offsets_and_positions_writing_nothing(segment_file, name, offset, positions,
                                                                             field):
    with pytest.raises(SegmentError) as caught:
        SharedRowSegments().write(name or segment_file, offset, torch.ones(2, 4, dtype=torch.int16), positions)
    assert caught.value.field == field and field in str(caught.value)
    assert segment_bytes(segment_file) == bytes(4096)


@pytest.mark.ray
def test_local_client_gets_rows_through_unix_sockets_and_shared_memory(ray_cluster):
    with deployment([TABLE, SGD_TABLE], shards=2) as (_, local):
        assert local.co_located_shards == {0, 1}
        assert all(local.shard_address(shard).startswith("unix:") for shard in (0, 1))
        random_ids = np.random.default_rng(1).integers(0, TABLE.rows, size=5000)
        for ids in (random_ids, np.unique(random_ids)):  # the caller's order, and already deduplicated
            expected = reference_rows(TABLE, ids)
            assert torch.equal(local.lookup("local", ids, dtype=torch.float32).result(), expected)
            assert torch.equal(local.lookup("local", ids, dtype=torch.bfloat16).result(), expected.bfloat16())
            assert torch.equal(local.lookup("local", ids, dtype=torch.float8_e4m3fn).result(), quantize_rows(expected))
        with MemoryClient(local.directory, TOKEN, use_local_transport=False) as remote:
            assert not remote.co_located_shards
            assert all(not remote.shard_address(shard).startswith("unix:") for shard in (0, 1))
            torch.testing.assert_close(remote.lookup("local", random_ids, dtype=torch.float32).result(),
                                       reference_rows(TABLE, random_ids), rtol=0, atol=0)
        # Pushes: co-located shards read the gradients from shared memory, remote ones from the request.
        ids = np.unique(random_ids)[:300]
        grads = torch.randn(len(ids), SGD_TABLE.dim, generator=torch.Generator().manual_seed(2))
        local.push("local_sgd", ids, grads, step=0).result()
        with MemoryClient(local.directory, TOKEN, use_local_transport=False) as remote:
            remote.push("local_sgd", ids, grads, step=1).result()
        expected = reference_rows(SGD_TABLE, ids) - 2 * SGD_TABLE.optimizer.lr * grads
        torch.testing.assert_close(local.lookup("local_sgd", ids, dtype=torch.float32).result(), expected)
        names = local.idle_segment_names
        assert names and all(os.path.exists(f"/dev/shm/{name}") for name in names)
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in names)  # closing the client removes them


def refuse_bad_segments(call, field: str, request_with, segment_file: str) -> None:
    """``call`` refuses a segment that does not exist and an offset past its end, naming ``field``."""
    for shared, part in ((pb.SharedRows(name="engram-rows-absent"), "name"),
                         (pb.SharedRows(name=segment_file, offset=4000), "offset")):
        with pytest.raises(grpc.RpcError) as caught:
            call(request_with(shared), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{field}.{part}" in caught.value.details()


@pytest.mark.ray
def test_shard_refuses_a_bad_segment_with_the_field_named_and_changes_nothing(ray_cluster, segment_file):
    with deployment([TABLE], shards=1) as (_, client):
        stub, channel = shard_stub(client)
        with channel:
            ids = np.arange(4, dtype="<i8").tobytes()
            refuse_bad_segments(stub.Lookup, "shared_rows",
                                lambda shared: pb.LookupRequest(table="local", row_ids=ids, dtype=pb.FLOAT32,
                                                                shared_rows=shared), segment_file)
            positions = np.array([3, 0, 2, 1], dtype="<i8")
            request = pb.LookupRequest(table="local", row_ids=np.arange(4, dtype="<i8").tobytes(), dtype=pb.FLOAT32,
                                       shared_rows=pb.SharedRows(name=segment_file, offset=64,
                                                                 positions=positions.tobytes()))
            reply = stub.Lookup(request, metadata=AUTH)
            assert reply.rows == b"" and (reply.num_rows, reply.dim) == (4, TABLE.dim)
            before = client.lookup("local", np.arange(4), dtype=torch.float32).result()
            refuse_bad_segments(stub.Update, "shared_grads",
                                lambda shared: pb.UpdateRequest(table="local", row_ids=ids, grad_dtype=pb.FLOAT32,
                                                                shared_grads=shared), segment_file)
            assert torch.equal(client.lookup("local", np.arange(4), dtype=torch.float32).result(), before)
        written = np.frombuffer(segment_bytes(segment_file), dtype="<f4")[16:16 + 4 * TABLE.dim].reshape(4, TABLE.dim)
        assert torch.equal(torch.from_numpy(written[positions].copy()), reference_rows(TABLE, np.arange(4)))


SERVING_TABLE = spec("local_serving", storage_dtype="bfloat16")


def shared_table_files(pids) -> list[str]:
    return [name for name in os.listdir(SHARED_SEGMENT_DIR)
            if any(name.startswith(f"{SHARED_TABLE_PREFIX}{pid}-") for pid in pids)]


@pytest.mark.ray
def test_a_co_located_client_reads_table_rows_from_the_shards_shared_memory_as_a_request_would(ray_cluster):
    tables = 2 if row_store._READERS_SEE_WRITES_IN_ORDER else 1  # a table that trains is shared on x86-64
    with deployment([SERVING_TABLE, SGD_TABLE], shards=2) as (controller, local):
        pids = [info["pid"] for info in ray.get(controller.shard_pids.remote()).values()]
        assert len(shared_table_files(pids)) == 2 * tables  # each shared table's rows on each shard
        ids = np.random.default_rng(3).integers(0, SERVING_TABLE.rows, size=5000)
        with MemoryClient(local.directory, TOKEN, use_local_transport=False) as remote:
            for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
                assert torch.equal(local.lookup("local_serving", ids, dtype=dtype).result(),
                                   remote.lookup("local_serving", ids, dtype=dtype).result())
            moved = local.moved()
            # The first lookup mapped the files (deduplicating its ids first, as for a request); the others read
            # every id as given.
            assert moved["read_shared"]["rows"] == len(np.unique(ids)) + 2 * len(ids) and "lookup" not in moved
            with torch.inference_mode():  # read on the calling thread, for other threads outside inference mode
                assert not local.lookup("local_serving", ids).result().is_inference()
            # A table that trains, updated in place: read (or, off x86-64, asked for) with its updates.
            stepped = np.unique(ids)[::3]
            local.push("local_sgd", stepped, torch.ones(len(stepped), SGD_TABLE.dim), step=0).result()
            for _ in range(2):  # the first lookup maps the files, the second reads on the calling thread
                assert torch.equal(local.lookup("local_sgd", ids).result(), remote.lookup("local_sgd", ids).result())
            assert ("lookup" in local.moved()) != row_store._READERS_SEE_WRITES_IN_ORDER

            # Slots move to a third shard: the old files are retired, the client reads the new ones.
            assert ray.get(controller.scale.remote(3))["local_serving"] > 0
            assert torch.equal(local.lookup("local_serving", ids).result(), remote.lookup("local_serving", ids).result())
            pids = [info["pid"] for info in ray.get(controller.shard_pids.remote()).values()]
            assert len(shared_table_files(pids)) == 3 * tables
            before = local.moved()["read_shared"]["rows"]
            assert torch.equal(local.lookup("local_serving", ids).result(), remote.lookup("local_serving", ids).result())
            assert local.moved()["read_shared"]["rows"] == before + len(ids)
    assert not shared_table_files(pids)  # the shards removed them as they stopped

