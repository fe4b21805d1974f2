"""MemoryClient: looks Engram rows up from the memory shards and pushes their gradients, over gRPC.

Talks to the memory service only through the ``engram.memory.v1`` protos: the directory gives the
routing (slot -> shard, with an epoch), the shards serve rows. Calls run on a private event loop
thread and return ``concurrent.futures.Future``s, so a training step can overlap them with compute.
Shards on the client's own machine are reached through their Unix socket, write looked-up rows
straight into the client's shared memory and read pushed gradients from it, instead of sending them
through the socket.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import mmap
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# The controller's Ray name and namespace (memory_service.controller), for clients inside Ray.
CONTROLLER_NAME = "engram-memory-controller"
NAMESPACE = "engram"
ROUTING_EPOCH_KEY = "engram-routing-epoch"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_FRAME_BYTES = (1 << 24) - 1  # HTTP/2's largest frame: big replies in few frames
WIRE_DTYPES = {torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.float16: pb.FLOAT16}
LOOKUP_METHOD = "/engram.memory.v1.ShardService/Lookup"
TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

# Rows arrive as immutable bytes and are viewed without a copy, then copied once into the result.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class MemoryServiceError(RuntimeError):
    """A call the memory service refused; ``code`` is the gRPC status, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Backoff for routing changes and transient failures: exponential with jitter, bounded in time."""

    initial_s: float = 0.005
    max_s: float = 0.5
    deadline_s: float = 60.0

    def delays(self):
        delay, start = self.initial_s, time.monotonic()
        while time.monotonic() - start < self.deadline_s:
            yield delay * (0.5 + random.random())
            delay = min(delay * 2, self.max_s)


@dataclasses.dataclass(frozen=True)
class PushResult:
    applied_rows: int
    duplicate: bool
    pending: bool


@dataclasses.dataclass
class _TableRoute:
    num_slots: int
    dim: int
    rows: int
    owners: np.ndarray  # int16 [num_slots]: small integers sort by radix, several times faster

    def shards_of(self, ids: np.ndarray) -> np.ndarray:
        """The owning shard of each id; a power-of-two slot count (the default) takes a mask, not a division."""
        slots = ids & (self.num_slots - 1) if self.num_slots & (self.num_slots - 1) == 0 else ids % self.num_slots
        return self.owners[slots]


class _SharedRowSegment:
    """A POSIX shared-memory segment (``/dev/shm/<name>``) that co-located shards write rows into or
    read gradients from."""

    PREFIX = "engram-rows-"  # shards open only segments named so

    def __init__(self, nbytes: int):
        self.name = f"{self.PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(f"/dev/shm/{self.name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        # Removed by close(), else when collected or at exit: a client never closed leaves no file behind.
        self._unlink = weakref.finalize(self, os.unlink, f"/dev/shm/{self.name}")
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.bytes.zero_()  # fault every page in once, not on each lookup

    def rows(self, count: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        return self.bytes[:count * dim * dtype.itemsize].view(dtype).view(count, dim)

    def close(self) -> None:
        self._unlink()
        del self.bytes  # the map closes once no tensor views it
        self._map = None


_ORPHAN_CANDIDATE = re.compile(re.escape(_SharedRowSegment.PREFIX) + r"(\d+)-[0-9a-f]+")


def remove_orphaned_segments(directory: str = "/dev/shm") -> list[str]:
    """Unlink this user's ``engram-rows-<pid>-*`` segments whose process is gone (a client killed
    before it could remove them, by SIGKILL say); return their names. Live processes' stay."""
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _ORPHAN_CANDIDATE.fullmatch(entry.name)
            if not match or entry.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(int(match[1])):
                continue
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:  # another client swept it first
                pass
    if removed:
        log.info("removed %d shared-memory segments left by ended processes: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class _SharedRowPool:
    """Segments reused across calls, one per lookup or push in flight; used on the event loop thread only."""

    def __init__(self):
        self._free: list[_SharedRowSegment] = []

    def acquire(self, nbytes: int) -> _SharedRowSegment:
        fitting = [segment for segment in self._free if segment.bytes.numel() >= nbytes]
        if fitting:
            segment = min(fitting, key=lambda segment: segment.bytes.numel())
            self._free.remove(segment)
            return segment
        return _SharedRowSegment(max(1 << 20, 1 << (nbytes - 1).bit_length()))

    def release(self, segment: _SharedRowSegment) -> None:
        self._free.append(segment)

    def close(self) -> None:
        for segment in self._free:
            segment.close()
        self._free.clear()


class _Retry(Exception):
    """A part of a call must be resent after the routing is refreshed."""


class MemoryClient:
    """Client of one memory deployment, addressed by its directory (``host:port``)."""

    def __init__(self, directory: str, token: str | None = None, *, tls_cert_file: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_rows_per_request: int = 65536,
                 retry: RetryPolicy = RetryPolicy(), use_local_transport: bool = True):
        self._directory_address = directory
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = grpc.ssl_channel_credentials(Path(tls_cert_file).read_bytes()) if tls_cert_file else None
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.http2.max_frame_size", MAX_FRAME_BYTES),
                         # This client retries by itself; gRPC's own retries would buffer a copy of every request.
                         ("grpc.enable_retries", 0)]
        self._max_message_bytes = max_message_bytes
        self._max_rows_per_request = max_rows_per_request
        self._retry = retry
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.ShardServiceStub] = {}
        self._epoch = 0
        self._tables: dict[str, _TableRoute] = {}
        self._shard_addresses: dict[int, str] = {}
        self._local_shards: set[int] = set()  # reached by Unix socket, rows through shared memory
        self._use_local_transport = use_local_transport and self._credentials is None and os.path.isdir("/dev/shm")
        if self._use_local_transport:
            remove_orphaned_segments()
        self._node = _this_node()
        self._shared_rows = _SharedRowPool()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_calls, name="memory-client", daemon=True)
        self._thread.start()
        self._run(self._refresh_routing()).result()

    @classmethod
    def from_controller(cls, name: str = CONTROLLER_NAME, namespace: str = NAMESPACE, **kwargs) -> "MemoryClient":
        """Inside a Ray cluster: ask the controller actor for the directory address and token."""
        import ray

        info = ray.get(ray.get_actor(name, namespace=namespace).connection_info.remote())
        return cls(info["directory"], info["token"], tls_cert_file=info["tls_cert_file"], **kwargs)

    # ---- public API -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The routing epoch this client currently uses."""
        return self._epoch

    def table_dim(self, table: str) -> int:
        return self._route(table).dim

    def lookup(self, table: str, row_ids, dtype: torch.dtype = torch.bfloat16,
               pin_memory: bool = False) -> concurrent.futures.Future:
        """A future of the rows of ``row_ids`` ([n, dim] in ``dtype``), in the caller's order."""
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype: must be one of {list(WIRE_DTYPES)}, got {dtype}")
        ids = _as_int64(row_ids, "row_ids")
        return self._run(self._lookup(table, ids, dtype, pin_memory))

    def push(self, table: str, row_ids, grads, step: int, rank: int = 0, world_size: int = 1,
             synchronous: bool = True) -> concurrent.futures.Future:
        """Send the gradients of unique ``row_ids`` for (step, rank); a future of the combined PushResult.

        ``grads`` travel in their own dtype when it is a wire dtype (float32, bfloat16, float16), else
        as float32; the shard accumulates and applies them in float32.
        """
        ids = _as_int64(row_ids, "row_ids")
        grads = torch.as_tensor(grads).detach()
        grads = (grads if grads.dtype in WIRE_DTYPES else grads.float()).to("cpu").contiguous()
        if grads.ndim != 2 or grads.shape[0] != len(ids):
            raise ValueError(f"grads: expected shape [{len(ids)}, dim], got {tuple(grads.shape)}")
        return self._run(self._push(table, ids, grads, step, rank, world_size, synchronous))

    def tables(self) -> list[pb.TableSpecInfo]:
        """The deployed tables' specs, from the directory."""
        return list(self._run(self._directory_call("ListTables", pb.ListTablesRequest())).result().tables)

    def refresh_routing(self) -> int:
        """Fetch the routing now; return its epoch."""
        self._run(self._refresh_routing()).result()
        return self._epoch

    def close(self) -> None:
        async def close_channels():
            for channel in self._channels.values():
                await channel.close()
            self._shared_rows.close()

        if self._loop.is_running():
            self._run(close_channels()).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing ---------------------------------------------------------------------------

    def _serve_calls(self) -> None:
        # One torch thread here (OpenMP's count is per thread): a parallel reorder whose helper waits
        # for a core held by a shard or the training step took 3-8x longer than this thread alone.
        torch.set_num_threads(1)
        self._loop.run_forever()

    def _run(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return self._channels[address]

    def _stub(self, shard: int) -> pb_grpc.ShardServiceStub:
        address = self._shard_addresses[shard]
        if address not in self._stubs:
            stub = pb_grpc.ShardServiceStub(self._channel(address))
            # Same bytes on the wire; only the reply's rows are read as a view instead of parsed.
            stub.Lookup = self._channel(address).unary_unary(
                LOOKUP_METHOD, request_serializer=pb.LookupRequest.SerializeToString, response_deserializer=_lookup_rows)
            self._stubs[address] = stub
        return self._stubs[address]

    async def _directory_call(self, method: str, request):
        stub = pb_grpc.DirectoryServiceStub(self._channel(self._directory_address))
        try:
            return await getattr(stub, method)(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise MemoryServiceError(error.code(), error.details()) from None

    async def _refresh_routing(self) -> None:
        routing = await self._directory_call("GetRouting", pb.GetRoutingRequest())
        self._local_shards = {s.index for s in routing.shards if self._is_local(s)}
        self._shard_addresses = {s.index: s.local_address if s.index in self._local_shards else s.address
                                 for s in routing.shards}
        self._tables = {t.name: _TableRoute(t.num_slots, t.dim, t.rows,
                                            np.frombuffer(t.owners, dtype="<i4").astype(np.int16))
                        for t in routing.tables}
        if routing.epoch != self._epoch:
            log.debug("routing epoch %d -> %d", self._epoch, routing.epoch)
        self._epoch = routing.epoch

    def _is_local(self, shard: pb.ShardInfo) -> bool:
        """Whether ``shard`` runs on this machine: same Ray node, else same hostname; and its socket is here."""
        if not (self._use_local_transport and shard.local_address):
            return False
        same_machine = shard.node == self._node if self._node else shard.hostname == socket.gethostname()
        return same_machine and os.path.exists(shard.local_address.removeprefix("unix:"))

    def _route(self, table: str) -> _TableRoute:
        if table not in self._tables:
            raise MemoryServiceError(grpc.StatusCode.NOT_FOUND,
                                     f"table: unknown table {table!r}; deployed: {sorted(self._tables)}")
        return self._tables[table]

    def _split(self, route: _TableRoute, ids: np.ndarray, positions: np.ndarray) -> dict[int, np.ndarray]:
        """``positions`` (into ``ids``) grouped by owning shard."""
        shards = route.shards_of(ids[positions])
        order = positions[np.argsort(shards, kind="stable")]
        counts = np.bincount(shards)
        return {shard: order[end - count:end] for shard, (count, end) in
                enumerate(zip(counts.tolist(), np.cumsum(counts).tolist())) if count}

    def _rows_per_request(self, row_bytes: int) -> int:
        """Rows a request may carry at ``row_bytes`` each: half the message limit, and the row cap."""
        return max(1, min(self._max_rows_per_request, self._max_message_bytes // 2 // row_bytes))

    async def _with_retries(self, attempt, pending: np.ndarray):
        """Run ``attempt(pending)`` -> positions still to resend, refreshing routing between tries."""
        delays = self._retry.delays()
        while True:
            pending = await attempt(pending)
            if not len(pending):
                return
            delay = next(delays, None)
            if delay is None:
                raise MemoryServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                         f"gave up after {self._retry.deadline_s}s of routing changes/failures")
            await asyncio.sleep(delay)
            try:
                await self._refresh_routing()
            except MemoryServiceError as error:
                if error.code not in TRANSIENT_CODES:
                    raise

    async def _call_shard(self, shard: int, method: str, request):
        """One RPC; raises _Retry for routing refusals and transient failures, MemoryServiceError else."""
        try:
            return await getattr(self._stub(shard), method)(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            trailing = {key for key, _ in error.trailing_metadata() or ()}  # (key, value) pairs on every grpcio
            if error.code() in TRANSIENT_CODES or ROUTING_EPOCH_KEY in trailing:
                log.debug("shard %d %s: %s; will retry", shard, method, error.details())
                raise _Retry() from None
            raise MemoryServiceError(error.code(), error.details()) from None

    async def _gather_parts(self, parts: list[tuple[np.ndarray, Any]]) -> np.ndarray:
        """Await (positions, coroutine) parts; return the positions of the parts to resend."""
        results = await asyncio.gather(*(coroutine for _, coroutine in parts), return_exceptions=True)
        retry = [positions for (positions, _), result in zip(parts, results) if isinstance(result, _Retry)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, _Retry):
                raise result
        return np.concatenate(retry) if retry else np.empty(0, dtype=np.int64)

    # ---- lookup -----------------------------------------------------------------------------

    async def _lookup(self, table: str, ids: np.ndarray, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        route = self._route(table)
        unique, inverse = (ids, None) if _sorted_unique(ids) else np.unique(ids, return_inverse=True)
        # `received` holds the rows of `unique` in its order: co-located shards write theirs in place.
        row_bytes = route.dim * dtype.itemsize
        segment = self._shared_rows.acquire(len(unique) * row_bytes) if self._local_shards else None
        received = segment.rows(len(unique), route.dim, dtype) if segment else torch.empty((len(unique), route.dim), dtype=dtype)
        wire_dtype = WIRE_DTYPES[dtype]
        per_request = self._rows_per_request(row_bytes)

        async def fetch(shard: int, positions: np.ndarray) -> None:
            request = pb.LookupRequest(table=table, row_ids=unique[positions].tobytes(), dtype=wire_dtype)
            if segment and shard in self._local_shards:
                request.shared_rows.name = segment.name
                request.shared_rows.positions = positions.astype("<i8", copy=False).tobytes()
            payload = await self._call_shard(shard, "Lookup", request)
            if request.HasField("shared_rows") and not len(payload):
                return  # the shard wrote the rows into `received` itself
            rows = torch.frombuffer(payload, dtype=dtype).view(len(positions), route.dim)
            _as_words(received).index_copy_(0, torch.from_numpy(positions), _as_words(rows))

        async def attempt(pending: np.ndarray) -> np.ndarray:
            groups = self._split(self._route(table), unique, pending)
            parts = [(chunk, fetch(shard, chunk)) for shard, positions in groups.items()
                     for chunk in _chunks(positions, per_request)]
            return await self._gather_parts(parts)

        try:
            await self._with_retries(attempt, np.arange(len(unique)))
            if inverse is not None:
                out = _as_words(received).index_select(0, torch.from_numpy(inverse)).view(dtype)
            else:  # a segment is reused by the next lookup, so its rows are copied out
                out = received.clone() if segment else received
        except BaseException:
            if segment:  # a shard may still be writing into it: never reuse it
                segment.close()
            raise
        if segment:
            self._shared_rows.release(segment)
        if pin_memory and torch.cuda.is_available():
            out = out.pin_memory()
        return out

    # ---- push -------------------------------------------------------------------------------

    async def _push(self, table: str, ids: np.ndarray, grads: torch.Tensor, step: int, rank: int,
                    world_size: int, synchronous: bool) -> PushResult:
        self._route(table)
        if not _sorted_unique(ids) and len(np.unique(ids)) != len(ids):  # the trainer's ids are sorted: no sort
            raise ValueError("row_ids: a push must name each row once (sum duplicate rows' gradients first)")
        totals = {"applied": 0, "duplicate": False, "pending": False}
        # Co-located shards read the gradients from shared memory: one copy in, none through the socket.
        segment = self._shared_rows.acquire(grads.numel() * grads.element_size()) if self._local_shards else None
        if segment:
            segment.rows(*grads.shape, grads.dtype).copy_(grads)

        async def send(shard: int, positions: np.ndarray, more_parts: bool) -> None:
            request = pb.UpdateRequest(table=table, row_ids=ids[positions].tobytes(), grad_dtype=WIRE_DTYPES[grads.dtype],
                                       step=step, rank=rank, world_size=world_size, synchronous=synchronous,
                                       more_parts=more_parts)
            if segment and shard in self._local_shards:
                request.shared_grads.name = segment.name
                request.shared_grads.positions = positions.astype("<i8", copy=False).tobytes()
            else:
                request.grads = _tensor_bytes(grads[torch.from_numpy(positions)])
            reply = await self._call_shard(shard, "Update", request)
            totals["applied"] += reply.applied_rows
            totals["duplicate"] |= reply.duplicate
            totals["pending"] |= reply.pending

        def parts_of(shard: int, positions: np.ndarray) -> list[np.ndarray]:
            """A shard's rows in requests under the message limit (co-located: ids and positions only)."""
            payload = 8 if segment and shard in self._local_shards else grads.shape[1] * grads.element_size()
            return _chunks(positions, self._rows_per_request(8 + payload))

        async def attempt(pending: np.ndarray) -> np.ndarray:
            route_now = self._route(table)
            groups = self._split(route_now, ids, pending)
            if synchronous:  # every owner of the table's slots must hear from every rank, rows or not
                for shard in np.unique(route_now.owners).tolist():
                    groups.setdefault(shard, np.empty(0, dtype=np.int64))
            parts = {shard: parts_of(shard, positions) for shard, positions in groups.items()}
            # A synchronous step counts this rank as reported by a shard with its last part, so a
            # shard's last part goes only once its other parts have landed.
            retry = await self._gather_parts([(part, send(shard, part, True)) for shard, shard_parts in parts.items()
                                              for part in shard_parts[:-1]])
            unfinished = set(route_now.shards_of(ids[retry]).tolist())
            held_back = [shard_parts[-1] for shard, shard_parts in parts.items() if shard in unfinished]
            retry_last = await self._gather_parts([(shard_parts[-1], send(shard, shard_parts[-1], False))
                                                   for shard, shard_parts in parts.items() if shard not in unfinished])
            return np.concatenate([retry, *held_back, retry_last])

        try:
            await self._with_retries(attempt, np.arange(len(ids)))
        except BaseException:
            if segment:  # a shard may still be reading it: never reuse it
                segment.close()
            raise
        if segment:
            self._shared_rows.release(segment)
        return PushResult(totals["applied"], totals["duplicate"], totals["pending"])


def _as_int64(row_ids, field: str) -> np.ndarray:
    ids = row_ids.detach().cpu().numpy() if isinstance(row_ids, torch.Tensor) else np.asarray(row_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{field}: expected a 1-D array of integers, got {ids.dtype} with shape {ids.shape}")
    return np.ascontiguousarray(ids, dtype="<i8")


def _chunks(positions: np.ndarray, per_request: int) -> list[np.ndarray]:
    """``positions`` in consecutive requests of at most ``per_request`` rows (one, if empty)."""
    return np.array_split(positions, max(1, -(-len(positions) // per_request)))


def _sorted_unique(ids: np.ndarray) -> bool:
    """Whether ``ids`` are strictly ascending (deduplicated by the caller); costs a few microseconds."""
    return bool(np.all(ids[1:] > ids[:-1]))


def _this_node() -> str:
    """This process's Ray node id when it runs inside Ray, else ''."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def _as_words(rows: torch.Tensor) -> torch.Tensor:
    """Rows viewed as int64 words when they fit (row copies by index run several times faster)."""
    return rows.view(torch.int64) if rows.shape[-1] * rows.element_size() % 8 == 0 else rows


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _lookup_rows(data: bytes) -> memoryview:
    """The ``rows`` field of ``LookupResponse`` bytes as a view, without the two copies protobuf makes."""
    view, pos, rows = memoryview(data), 0, memoryview(b"")
    while pos < len(view):
        key, pos = _read_varint(view, pos)
        if key & 7 == 2:
            length, pos = _read_varint(view, pos)
            if key >> 3 == 1:
                rows = view[pos:pos + length]
            pos += length
        elif key & 7 == 0:
            _, pos = _read_varint(view, pos)
        else:
            raise ValueError(f"LookupResponse: unexpected wire type {key & 7} of field {key >> 3}")
    return rows


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()
