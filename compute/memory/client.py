"""MemoryClient: looks Engram rows up from the memory shards and pushes their gradients, over gRPC.

Talks to the memory service only through the ``engram.memory.v1`` protos: the directory gives the
routing (slot -> shard, with an epoch), the shards serve rows. Calls run on a private event loop
thread and return ``concurrent.futures.Future``s, so a training step can overlap them with compute.
Shards on other machines answer lookups on their row stream where they offer one (raw rows over TCP,
``row_streams``). Shards on the client's own machine are reached through their Unix socket, write looked-up rows
straight into the client's shared memory and read pushed gradients from it, instead of sending them
through the socket; the rows of their tables in shared memory the client reads itself, without a request
(``mapped_rows``; a read that overlapped a shard's write of a table that trains is asked for instead).
Lookups go to any live copy of a slot's rows (its primary or a replica, in turn); a copy that fails or
times out is passed over for a while, and the lookup goes to another at once.
Pushes go to the slot's primary.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Awaitable, Callable

import grpc
import numpy as np
import torch

from compute.memory.calls import (SHARD_LOST, CallDeadlines, Channels, MemoryServiceError, ResendAfterRefresh,
                                  RetryPolicy, gather_parts, with_retries)
from compute.memory.client_metrics import ClientMetrics
from compute.memory.futures import settled
from compute.memory.mapped_rows import MappedRows
from compute.memory.routing import Routing, TableRoute, connection_info_from_controller
from compute.memory.row_streams import RowStreams
from compute.memory.shared_segments import SharedSegmentPool
from memory_service.core import push_checks
from memory_service.core.leftovers import remove_leftovers
from memory_service.core.slots import ShardSplit, slot_of
from protos import engram_memory_v1_pb2 as pb
from protos.wire import (CONTROLLER_NAME, DEFAULT_MAX_MESSAGE_BYTES, GRAD_WIRE_DTYPES, NAMESPACE, SHARED_SEGMENT_DIR,
                         SHARED_SEGMENT_PREFIX, WIRE_DTYPE_BY_TORCH, ClientTls, WireDtype, as_row_records,
                         as_row_words, tensor_to_bytes)

__all__ = ["MemoryClient", "MemoryServiceError", "PushResult", "RetryPolicy"]

log = logging.getLogger(__name__)

GRAD_TORCH_DTYPES = {dtype.torch for dtype in GRAD_WIRE_DTYPES}  # gradients travel in these, others as float32
PASS_OVER_S = 5.0  # how long a copy that failed a lookup is passed over while others are live


@dataclasses.dataclass(frozen=True)
class PushResult:
    applied_rows: int
    duplicate: bool
    pending: bool
    pulled: torch.Tensor | None = None  # a push-and-pull's rows, as they are once the push is applied


class MemoryClient:
    """Client of one memory deployment, addressed by its directory (``host:port``)."""

    def __init__(self, directory: str, token: str | None = None, *, tls: ClientTls | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_rows_per_request: int = 65536,
                 retry: RetryPolicy = RetryPolicy(), use_local_transport: bool = True, read_shared_rows: bool = True,
                 use_row_streams: bool = True):
        """``use_local_transport``: reach shards on this machine through their Unix socket and shared memory;
        ``read_shared_rows``: and read the rows they keep in shared memory without a request;
        ``use_row_streams``: look rows up from other machines' shards on their row streams (raw rows over TCP)
        where they offer one, instead of over gRPC."""
        self._directory_address = directory
        deadlines = CallDeadlines(retry.call_timeout_s)
        self._calls = Channels(token, tls, max_message_bytes, deadlines)
        self._row_streams = RowStreams(token, deadlines) if use_row_streams and tls is None else None
        self._max_message_bytes = max_message_bytes
        self._max_rows_per_request = max_rows_per_request
        self._retry = retry
        self._routing = Routing()
        self._turn = itertools.count()  # spreads lookups over the copies of a shard's rows
        self._failed_at: dict[int, float] = {}  # shard -> when a call to it last failed
        self._use_local_transport = use_local_transport and tls is None and os.path.isdir(SHARED_SEGMENT_DIR)
        if self._use_local_transport:
            remove_leftovers(SHARED_SEGMENT_DIR, SHARED_SEGMENT_PREFIX)  # those of clients that were killed
        self._segments = SharedSegmentPool()
        self._read_shared_rows = read_shared_rows
        self._mapped: dict[tuple[str, int], MappedRows | None] = {}  # (table, shard): None where it has no shared rows
        self._metrics = ClientMetrics()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_calls, name="memory-client", daemon=True)
        self._thread.start()
        self._run(self._refresh_routing()).result()

    @classmethod
    def from_controller(cls, name: str = CONTROLLER_NAME, namespace: str = NAMESPACE, **kwargs) -> "MemoryClient":
        """Inside a Ray cluster: ask the controller actor for the directory address, data token and TLS."""
        info = connection_info_from_controller(name, namespace)
        return cls(info["directory"], info["token"], tls=info["tls"], **kwargs)

    # ---- public API -------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The directory's address (``host:port``) this client was made with."""
        return self._directory_address

    @property
    def epoch(self) -> int:
        """The routing epoch this client currently uses."""
        return self._routing.epoch

    @property
    def co_located_shards(self) -> frozenset[int]:
        """The shards reached through their Unix socket, with rows through shared memory."""
        return self._routing.co_located

    def shard_address(self, index: int) -> str:
        """The address this client calls shard ``index`` at: ``unix:<path>`` if co-located, else ``host:port``."""
        return self._routing.addresses[index]

    @property
    def idle_segment_names(self) -> list[str]:
        """The shared-memory segments (``/dev/shm/<name>``) kept for the next calls; ``close`` removes them."""
        return self._segments.names

    def moved(self) -> dict[str, dict[str, int]]:
        """What this client moved since it was made, by method (``lookup``, ``pull``: rows pushes brought back,
        ``lookup_state``, ``push``): ``{"calls", "rows", "bytes"}`` of rows and gradients on the wire; and
        ``read_shared``: rows of lookups read from co-located shards' shared memory, which crossed no wire."""
        return self._metrics.totals()

    def table_dim(self, table: str) -> int:
        return self._route(table).dim

    def slot_owners(self) -> tuple[int, dict[str, np.ndarray]]:
        """The routing epoch and each table's slot -> shard array, for a loader to split rows by shard ahead."""
        routing = self._routing
        return routing.epoch, {name: route.owners for name, route in routing.tables.items()}

    def lookup(self, table: str, row_ids, dtype: torch.dtype = torch.bfloat16, pin_memory: bool = False,
               shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        """A future of the rows of ``row_ids`` ([n, dim] in ``dtype``), in the caller's order; in
        page-locked memory with ``pin_memory`` when CUDA is available. ``torch.float8_e4m3fn`` gives the
        wire rows as they came, [n, dim + 4] uint8 (E4M3 values, then a float32 scale):
        ``protos.wire.dequantize_rows`` turns them into values on whichever device they are copied to.

        ``shard_split`` is the caller's split of sorted, distinct ``row_ids`` by owning shard, made
        under a routing epoch (a loader makes it ahead of the step): used while that epoch is current.

        Where every shard's rows of ``table`` are mapped (shards of this machine that keep them in shared memory,
        after the table's first lookup), the rows are read here, on the calling thread, and the future comes back
        settled.
        """
        if dtype not in WIRE_DTYPE_BY_TORCH:
            raise ValueError(f"dtype: must be one of {list(WIRE_DTYPE_BY_TORCH)}, got {dtype}")
        ids = _as_int64(row_ids, "row_ids")
        pinned = pin_memory and torch.cuda.is_available()
        rows = self._read_all_shared(table, ids, WIRE_DTYPE_BY_TORCH[dtype], pinned)
        return settled(rows) if rows is not None else self._run(self._lookup(table, ids, dtype, pinned, shard_split))

    def lookup_state(self, table: str, row_ids) -> concurrent.futures.Future:
        """A future of the float32 rows of distinct ``row_ids`` with their optimizer state, by name as an export
        names them (``rows``, ``state.<name>``), each [n, width] in the caller's order: read from each group's
        primary, which holds every acknowledged step. What a cache that steps its own copies of rows starts from."""
        return self._run(self._lookup_state(table, _as_int64(row_ids, "row_ids")))

    def push(self, table: str, row_ids, grads, step: int, rank: int = 0, world_size: int = 1,
             synchronous: bool = True, pull_ids=None, pull_dtype: torch.dtype = torch.bfloat16,
             pin_memory: bool = False) -> concurrent.futures.Future:
        """Send the gradients of unique ``row_ids`` for (step, rank); a future of the combined PushResult.
        A push that no shard would accept (ids, shape, NaN/Inf, step/rank) raises ``InvalidPush`` here.

        ``grads`` travel in their own dtype when it is a wire dtype (float32, bfloat16, float16), else
        as float32; the shard accumulates and applies them in float32.

        Push-and-pull: the result's ``pulled`` holds the rows of sorted, distinct ``pull_ids`` in ``pull_dtype``
        (held as ``lookup`` holds them; pinned with ``pin_memory``) as they are once this push is applied. A
        synchronous push's last message to each shard carries that shard's ids, so the shard that completes
        the step answers them in the same round trip; rows a shard could not answer yet (another rank's push
        still missing) are looked up once the push is done, which sees the step applied only if this rank's
        push was its last.
        """
        ids = _as_int64(row_ids, "row_ids")
        grads = torch.as_tensor(grads).detach()
        grads = (grads if grads.dtype in GRAD_TORCH_DTYPES else grads.float()).to("cpu").contiguous()
        # The whole push is checked as the shards would check it before any part is sent: a push
        # refused for its content changes no shard.
        route = self._route(table)
        push_checks.check_push_header(step, rank, world_size)
        checked_ids = push_checks.check_row_ids(torch.from_numpy(ids), route.rows, table)
        push_checks.check_unique(checked_ids)
        push_checks.check_grads(grads, len(ids), route.dim)
        pull = None
        if pull_ids is not None:
            if pull_dtype not in WIRE_DTYPE_BY_TORCH:
                raise ValueError(f"pull_dtype: must be one of {list(WIRE_DTYPE_BY_TORCH)}, got {pull_dtype}")
            pull = _as_int64(pull_ids, "pull_ids")
            if not _sorted_unique(pull):
                raise ValueError("pull_ids: must be sorted and distinct")
            push_checks.check_row_ids(torch.from_numpy(pull), route.rows, table)
        pinned = pin_memory and torch.cuda.is_available()
        return self._run(self._push(table, ids, grads, step, rank, world_size, synchronous, pull, pull_dtype, pinned))

    def abort_step(self, table: str, step: int, world_size: int = 0) -> concurrent.futures.Future:
        """Abort synchronous ``step`` of ``table`` on every shard owning its slots (a job driver whose worker
        died): partial sums dropped, every later push of the step refused with ABORTED. A future of
        {shard: the ranks that had not reported there, or None where the step was already applied}."""
        shards = self._route(table).all_shards()
        request = pb.AbortStepRequest(table=table, step=step, world_size=world_size)

        async def abort(shard: int):
            try:
                return await self._call_shard(shard, "AbortStep", request)
            except ResendAfterRefresh:
                raise MemoryServiceError(grpc.StatusCode.UNAVAILABLE, f"shard {shard} did not answer; abort "
                                         "again (aborting twice is harmless)") from None

        async def abort_everywhere():
            replies = await asyncio.gather(*(abort(shard) for shard in shards))
            return {shard: list(reply.missing_ranks) if reply.aborted else None
                    for shard, reply in zip(shards, replies)}

        return self._run(abort_everywhere())

    def tables(self) -> list[pb.TableSpecInfo]:
        """The deployed tables' specs, from the directory."""
        reply = self._run(self._calls.directory(self._directory_address, "ListTables", pb.ListTablesRequest())).result()
        return list(reply.tables)

    def refresh_routing(self) -> int:
        """Fetch the routing now; return its epoch."""
        self._run(self._refresh_routing()).result()
        return self._routing.epoch

    def close(self) -> None:
        async def close_channels():
            await self._calls.close()
            if self._row_streams is not None:
                self._row_streams.close()
            self._segments.close()

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

    async def _refresh_routing(self) -> None:
        reply = await self._calls.directory(self._directory_address, "GetRouting", pb.GetRoutingRequest())
        if reply.epoch != self._routing.epoch:
            log.debug("routing epoch %d -> %d", self._routing.epoch, reply.epoch)
            self._mapped = {}
        self._routing = Routing.from_reply(reply, self._use_local_transport)

    def _route(self, table: str) -> TableRoute:
        if table not in self._routing.tables:
            raise MemoryServiceError(grpc.StatusCode.NOT_FOUND,
                                     f"table: unknown table {table!r}; deployed: {sorted(self._routing.tables)}")
        return self._routing.tables[table]

    def _rows_per_request(self, row_bytes: int) -> int:
        """Rows a request may carry at ``row_bytes`` each: half the message limit, and the row cap."""
        return max(1, min(self._max_rows_per_request, self._max_message_bytes // 2 // row_bytes))

    async def _call_shard(self, shard: int, method: str, request, call: Callable[[], Awaitable] | None = None):
        """``method`` on ``shard`` (made by ``call`` if given, else over gRPC); a failure that may pass marks the shard
        to be passed over for lookups a while."""
        if self._routing.lost(shard):
            route = self._routing.tables.get(request.table)
            ids = np.frombuffer(getattr(request, "row_ids", b""), dtype="<i8")
            slots = np.unique(slot_of(ids, route.num_slots)) if route else []
            named = f" (table '{request.table}', slots {slots[:8].tolist()}{'...' if len(slots) > 8 else ''})" \
                if len(slots) else ""
            raise MemoryServiceError(grpc.StatusCode.UNAVAILABLE, (
                f"shard {shard}{named} {SHARD_LOST}; the memory service is re-making its slots from the last "
                f"checkpoint, and the updates since are lost: resume the job from that checkpoint"))
        address = self._routing.addresses.get(shard)
        if address is None:  # a scale-down retired it since the caller split its ids by shard: split them anew
            raise ResendAfterRefresh()
        try:
            return await (call() if call else self._calls.shard(address, method, request))
        except ResendAfterRefresh:
            self._failed_at[shard] = time.monotonic()
            raise

    def _lookup_copy(self, shard: int) -> int:
        """The copy of ``shard``'s rows to read from: the copies take turns; one that failed lately is passed
        over while another has not."""
        copies = self._routing.copies(shard)
        if len(copies) == 1:
            return shard
        now = time.monotonic()
        healthy = [copy for copy in copies if now - self._failed_at.get(copy, -PASS_OVER_S) >= PASS_OVER_S]
        candidates = healthy or sorted(copies, key=lambda copy: self._failed_at.get(copy, 0.0))[:1]
        return candidates[next(self._turn) % len(candidates)]

    def _read_all_shared(self, table: str, ids: np.ndarray, wire: WireDtype, pinned: bool) -> torch.Tensor | None:
        """The rows of ``ids`` read out of the shards' shared memory, on the calling thread; None unless every
        shard's rows of ``table`` are mapped and current (the lookup then takes its course on the event loop)."""
        route = self._routing.tables.get(table)
        if not self._read_shared_rows or route is None:
            return None
        groups = route.split(ids, np.arange(len(ids)))
        copies = {primary: self._lookup_copy(primary) for primary in groups}
        if not all(self._mapped.get((table, copy)) for copy in copies.values()):
            return None
        element, width = wire.row_layout(route.dim)
        with torch.inference_mode(False):  # the rows go on to other threads, which may not be in inference mode
            rows = torch.empty((len(ids), width), dtype=element, pin_memory=pinned)
        if not all(self._read_mapped(table, copies[primary], ids[positions], wire, rows, positions)
                   for primary, positions in groups.items()):
            return None
        self._metrics.record("read_shared", None, len(ids), 0)
        return rows

    def _read_mapped(self, table: str, shard: int, row_ids: np.ndarray, wire: WireDtype, received: torch.Tensor,
                     positions: np.ndarray) -> bool:
        """Read the rows of ``row_ids`` out of ``shard``'s shared memory into ``received`` at ``positions``, as
        ``wire`` carries them; False where its mapping is missing or no longer current (nothing written)."""
        mapped = self._mapped.get((table, shard))
        rows = mapped.read(row_ids) if mapped else None
        if rows is None:
            return False
        as_row_records(received)[positions] = as_row_records(wire.encode(rows))
        return True

    async def _mapping(self, table: str, shard: int) -> MappedRows | None:
        """Co-located ``shard``'s rows of ``table`` mapped, or None where it keeps them in no shared memory (a lazily
        filled or tiered table, a shard whose shared memory is full, or one that does not know ``MapRows``)."""
        key = (table, shard)
        if key not in self._mapped:
            try:
                reply = await self._call_shard(shard, "MapRows", pb.MapRowsRequest(table=table))
                route = self._route(table)
                self._mapped[key] = MappedRows(reply, route.num_slots, route.rows)
            except (MemoryServiceError, ResendAfterRefresh, ValueError, OSError) as error:
                log.debug("table %s on shard %d: rows asked for, not read from shared memory: %s", table, shard, error)
                self._mapped[key] = None
        return self._mapped[key]

    async def _with_retries(self, attempt, pending: np.ndarray) -> None:
        await with_retries(attempt, pending, self._retry, self._refresh_routing)

    # ---- lookup -----------------------------------------------------------------------------

    async def _lookup(self, table: str, ids: np.ndarray, dtype: torch.dtype, pinned: bool,
                      shard_split: ShardSplit | None) -> torch.Tensor:
        start = time.perf_counter()
        route = self._route(table)
        unique, inverse = (ids, None) if _sorted_unique(ids) else np.unique(ids, return_inverse=True)
        # `received` holds the rows of `unique` in its order: co-located shards write theirs in place (or the client
        # reads them out of the shards' shared memory), the others' arrive as bytes and are copied in. Without a
        # segment to copy out of nor an order to restore, `received` is the result, allocated pinned when asked.
        # Scaled (float8_e4m3) rows stay wire rows: uint8, each row's values then its scale.
        wire = WIRE_DTYPE_BY_TORCH[dtype]
        row_bytes = wire.row_bytes(route.dim)
        element, width = wire.row_layout(route.dim)
        segment = self._segments.acquire(len(unique) * row_bytes) if self._routing.co_located else None
        if segment:
            received = segment.rows(len(unique), width, element)
        else:
            received = torch.empty((len(unique), width), dtype=element, pin_memory=pinned and inverse is None)
        wire_dtype = wire.enum
        per_request = self._rows_per_request(row_bytes)
        read_shared = 0  # rows read out of co-located shards' shared memory

        async def fetch(primary: int, positions: np.ndarray) -> None:
            nonlocal read_shared
            shard = self._lookup_copy(primary)
            if self._read_shared_rows and shard in self._routing.co_located and await self._mapping(table, shard):
                if self._read_mapped(table, shard, unique[positions], wire, received, positions):
                    read_shared += len(positions)
                    return
                mapped = self._mapped.get((table, shard))
                if mapped and not mapped.current():
                    self._mapped.pop((table, shard))  # no longer the table's rows: map again next time
                # ask now: the rows moved, or the shard was writing them
            request = pb.LookupRequest(table=table, row_ids=unique[positions].tobytes(), dtype=wire_dtype)
            if segment and shard in self._routing.co_located:
                request.shared_rows.name = segment.name
                request.shared_rows.positions = positions.astype("<i8", copy=False).tobytes()

            def place(payload) -> None:
                rows = torch.frombuffer(payload, dtype=element).view(len(positions), width)
                as_row_words(received).index_copy_(0, torch.from_numpy(positions), as_row_words(rows))

            stream = self._routing.row_streams.get(shard) if self._row_streams is not None else None
            if stream:
                await self._call_shard(shard, "Lookup", request, lambda: self._row_streams.lookup(
                    stream, request, len(positions) * row_bytes, place))
                return
            payload = await self._call_shard(shard, "Lookup", request)
            if request.HasField("shared_rows") and not len(payload):
                return  # the shard wrote the rows into `received` itself
            place(payload)

        async def attempt(pending: np.ndarray) -> np.ndarray:
            nonlocal shard_split
            if shard_split is not None and shard_split.epoch == self._routing.epoch and inverse is None:
                groups = dict(shard_split.positions)  # every row is pending on the first attempt
            else:
                groups = self._route(table).split(unique, pending)
            shard_split = None  # a retry follows a routing change: split afresh
            parts = [(chunk, fetch(shard, chunk)) for shard, positions in groups.items()
                     for chunk in _chunks(positions, per_request)]
            return await gather_parts(parts)

        try:
            await self._with_retries(attempt, np.arange(len(unique)))
            if inverse is not None:  # one copy, in the caller's order, into the result
                out = torch.empty((len(ids), width), dtype=element, pin_memory=pinned)
                torch.index_select(as_row_words(received), 0, torch.from_numpy(inverse), out=as_row_words(out))
            elif segment:  # a segment is reused by the next call: one copy out into the result
                out = torch.empty(received.shape, dtype=element, pin_memory=pinned).copy_(received)
            else:
                out = received
        except BaseException:
            if segment:  # a shard may still be writing into it: never reuse it
                segment.close()
            raise
        if segment:
            self._segments.release(segment)
        asked = len(unique) - read_shared
        if asked or not read_shared:
            self._metrics.record("lookup", time.perf_counter() - start, asked, asked * row_bytes)
        if read_shared:
            self._metrics.record("read_shared", None, read_shared, 0)
        return out

    async def _lookup_state(self, table: str, ids: np.ndarray) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        # A row with its state is at most 4 x dim float32 values (Adam: the row, two moments and a step count).
        per_request = self._rows_per_request(16 * self._route(table).dim)

        async def fetch(shard: int, positions: np.ndarray) -> None:
            request = pb.LookupStateRequest(table=table, row_ids=ids[positions].tobytes())
            reply = await self._call_shard(shard, "LookupState", request)
            for part in reply.tensors:
                values = torch.frombuffer(bytearray(part.values), dtype=torch.float32).view(len(positions), part.width)
                if part.name not in tensors:
                    tensors[part.name] = torch.empty((len(ids), part.width), dtype=torch.float32)
                tensors[part.name][torch.from_numpy(positions)] = values

        async def attempt(pending: np.ndarray) -> np.ndarray:
            groups = self._route(table).split(ids, pending)
            return await gather_parts([(chunk, fetch(shard, chunk)) for shard, positions in groups.items()
                                       for chunk in _chunks(positions, per_request)])

        start = time.perf_counter()
        await self._with_retries(attempt, np.arange(len(ids)))
        self._metrics.record("lookup_state", time.perf_counter() - start, len(ids),
                             sum(values.numel() * values.element_size() for values in tensors.values()))
        return tensors

    # ---- push -------------------------------------------------------------------------------

    async def _push(self, table: str, ids: np.ndarray, grads: torch.Tensor, step: int, rank: int,
                    world_size: int, synchronous: bool, pull: np.ndarray | None = None,
                    pull_dtype: torch.dtype = torch.bfloat16, pinned: bool = False) -> PushResult:
        start = time.perf_counter()
        element, width = WIRE_DTYPE_BY_TORCH[pull_dtype].row_layout(self._route(table).dim)
        pulled = None if pull is None else torch.empty((len(pull), width), dtype=element, pin_memory=pinned)
        unanswered = np.ones(0 if pull is None else len(pull), dtype=bool)  # pulled rows no shard answered yet
        totals = {"applied": 0, "duplicate": False, "pending": False}
        took_rows: set[int] = set()  # shards that took rows of this push
        # Co-located shards read the gradients from shared memory: one copy in, none through the socket.
        segment = self._segments.acquire(grads.numel() * grads.element_size()) if self._routing.co_located else None
        if segment:
            segment.rows(*grads.shape, grads.dtype).copy_(grads)

        async def send(shard: int, positions: np.ndarray, more_parts: bool,
                       pull_positions: np.ndarray | None = None) -> None:
            request = pb.UpdateRequest(table=table, row_ids=ids[positions].tobytes(),
                                       grad_dtype=WIRE_DTYPE_BY_TORCH[grads.dtype].enum, step=step, rank=rank,
                                       world_size=world_size, synchronous=synchronous, more_parts=more_parts)
            if pull_positions is not None and len(pull_positions):
                request.pull_row_ids = pull[pull_positions].tobytes()
                request.pull_dtype = WIRE_DTYPE_BY_TORCH[pull_dtype].enum
            if segment and shard in self._routing.co_located:
                request.shared_grads.name = segment.name
                request.shared_grads.positions = positions.astype("<i8", copy=False).tobytes()
            else:
                request.grads = tensor_to_bytes(grads[torch.from_numpy(positions)])
            reply = await self._call_shard(shard, "Update", request)
            if len(positions):
                took_rows.add(shard)
            totals["applied"] += reply.applied_rows
            totals["duplicate"] |= reply.duplicate
            if not more_parts:  # a synchronous step is pending until this rank's reports say otherwise
                totals["pending"] |= reply.pending
            if reply.pulled:
                rows = torch.frombuffer(reply.pulled_rows, dtype=element).view(len(pull_positions), width)
                index = torch.from_numpy(pull_positions)
                as_row_words(pulled).index_copy_(0, index, as_row_words(rows))
                unanswered[pull_positions] = False

        def parts_of(shard: int, positions: np.ndarray) -> list[np.ndarray]:
            """A shard's rows in requests under the message limit (co-located: ids and positions only)."""
            payload = 8 if segment and shard in self._routing.co_located else grads.shape[1] * grads.element_size()
            return _chunks(positions, self._rows_per_request(8 + payload))

        async def send_rows(pending: np.ndarray) -> np.ndarray:
            """The rows at ``pending`` to their owners; synchronous ones as parts that do not report the rank."""
            groups = self._route(table).split(ids, pending)
            return await gather_parts([(part, send(shard, part, synchronous)) for shard, positions in groups.items()
                                       for part in parts_of(shard, positions)])

        async def report(_: np.ndarray) -> np.ndarray:
            """Tell every owner of the table's slots that this rank's step is all there (rows or not).
            Only once every row has landed: a shard that counted the rank as reported could complete the
            step without rows still on their way after a slot move, and apply the step in two parts."""
            route = self._route(table)
            to_pull = route.split(pull, np.flatnonzero(unanswered)) if pull is not None else {}
            per_request = self._rows_per_request(WIRE_DTYPE_BY_TORCH[pull_dtype].row_bytes(route.dim))
            none = np.empty(0, dtype=np.int64)
            return await gather_parts([(np.array([shard]),
                                        send(shard, none, False, to_pull.get(shard, none)[:per_request]))
                                       for shard in route.all_shards()])

        try:
            await self._with_retries(send_rows, np.arange(len(ids)))
            if synchronous:
                await self._with_retries(report, np.arange(1))
        except BaseException as error:
            if segment:  # a shard may still be reading it: never reuse it
                segment.close()
            if isinstance(error, MemoryServiceError) and took_rows:
                taken = ("holds them pending: nothing was applied" if synchronous
                         else "applied them")
                raise MemoryServiceError(error.code, (
                    f"{error.details}; shards {sorted(took_rows)} had already taken rows of this push (step {step}, "
                    f"rank {rank}) and {taken}: resend it with the same step and rank, and each shard takes only "
                    "the rows it lacks")) from None
            raise
        if segment:
            self._segments.release(segment)
        self._metrics.record("push", time.perf_counter() - start, len(ids), grads.numel() * grads.element_size())
        if pull is not None:
            answered = len(pull) - int(unanswered.sum())
            row_bytes = WIRE_DTYPE_BY_TORCH[pull_dtype].row_bytes(self._route(table).dim)
            self._metrics.record("pull", None, answered, answered * row_bytes)  # their time is the push's
        if unanswered.any():  # pending elsewhere, over a reply's size, or an asynchronous push: look them up
            late = np.flatnonzero(unanswered)
            rows = await self._lookup(table, pull[late], pull_dtype, False, None)
            as_row_words(pulled).index_copy_(0, torch.from_numpy(late), as_row_words(rows))
        return PushResult(totals["applied"], totals["duplicate"], totals["pending"], pulled)


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

