"""The ShardService: one shard's tables behind gRPC, with routing epochs, moves, push dedup and replication.

Handlers do their work without awaiting, so each request is atomic with respect to the others on
the shard's event loop: a freeze, export or checkpoint never interleaves with half an update. Every
state change is a plain synchronous method (``abort_step``, ``abort_expired_steps`` included), so the
timer sweep and the RPCs change state alike, one at a time. A replica group's primary forwards each
change it made for a client (updates, aborted steps, a restore's commit) to its replicas in that order,
and answers only once every live replica made it (``memory_service.replication``); replicas serve
lookups and change state only as their primary's stream says.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from memory_service import checkpoint
from memory_service.metrics import ShardMetrics
from memory_service.replication import Replicas
from memory_service.row_store import RowStoreError, ShardStore, SlotNotOwned, refused_as_invalid
from memory_service.server import UndecodableRequest, decoder, register_service
from memory_service.shared_rows import SegmentError, SharedRowSegments
from memory_service.core import push_checks
from memory_service.core.push_checks import InvalidPush
from memory_service.core.slots import slot_of
from memory_service.step_aggregator import StepAggregator
from memory_service.core.table_spec import SpecError, TableSpec
from protos.wire import (DEFAULT_MAX_MESSAGE_BYTES, GRAD_WIRE_DTYPES, ROUTING_EPOCH_KEY, SHARED_SEGMENT_DIR,
                         WIRE_DTYPE_BY_ENUM, WIRE_DTYPE_BY_NAME, WIRE_DTYPE_BY_TORCH, WIRE_DTYPES, WireDtype, WireError,
                         arrays_from_proto, arrays_to_proto, encode_lookup_response, pending_from_arrays,
                         pending_to_arrays, reply_dim, tensor_from_bytes, tensor_to_bytes)
from protos import engram_memory_v1_pb2 as pb

log = logging.getLogger(__name__)

# Refusals of bad input that carry no status code of their own: answered INVALID_ARGUMENT.
INVALID_INPUT = (SpecError, checkpoint.PathRefused, WireError, InvalidPush)

decode_lookup_request = decoder(pb.LookupRequest)

# Names under which a slot move carries each aggregator's memory of applied pushes.
APPLIED_PREFIXES = {True: "applied.synchronous.", False: "applied.asynchronous."}


# How long an export of frozen slots waits for the synchronous steps pending on them to complete (the
# ranks' remaining pushes to those steps are still taken); after it, the partial sums move with the slots.
PENDING_STEP_WAIT_S = 5.0


@dataclasses.dataclass
class _FrozenSlots:
    """One table's slots that take no new updates while they move: ``frozen`` ones still take the pushes
    that complete a step already pending here; ``sealed`` ones (exported) take nothing more."""

    frozen: set[int] = dataclasses.field(default_factory=set)
    sealed: set[int] = dataclasses.field(default_factory=set)
    since: float = 0.0  # when slots were last frozen

    def thaw(self, slots) -> None:
        self.frozen.difference_update(slots)
        self.sealed.difference_update(slots)


@dataclasses.dataclass
class _StepHold:
    """A checkpoint's hold on new steps: only pushes of the ``admit``ted synchronous steps are taken until
    the hold is released or its lease ends (so a lost controller cannot wedge the shard)."""

    until: float
    admit: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (table, step)


class RequestRejected(Exception):
    """A request the servicer refuses before touching the store; ``code`` is a grpc.StatusCode name."""

    def __init__(self, code: str, field: str, message: str, routing: bool = False):
        super().__init__(message)
        self.code, self.field, self.routing = code, field, routing


# Every refusal a handler maps to its status code.
REFUSALS = (RowStoreError, RequestRejected, *INVALID_INPUT)
# The handlers whose changes a primary forwards to its replicas, answered once the replicas made them.
FORWARDED = frozenset({"update", "abort_step", "restore"})


def _handler(method: str):
    """Run a synchronous handler body, which returns (response, rows, row bytes carried); map refusals
    to status codes and record metrics."""

    def decorate(body):
        @functools.wraps(body)
        async def handler(self: "ShardServicer", request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            result, refused = self.answer(method, functools.partial(body, self), request)
            if refused:
                await self._abort(context, *refused)
            response, rows, wire_bytes = result
            if method in FORWARDED and self.replicas is not None:
                # Acknowledged only once every live replica made the change (a duplicate: once they made the original).
                await self.replicas.wait_applied(self.replicas.seq)
            self.metrics.record(method, time.perf_counter() - start, rows, wire_bytes)
            if method != "lookup":  # only lookups leave the held bytes and the pending steps as they were
                self.metrics.set_state(self.store.memory_bytes(), self.pending_steps())
            return response

        return handler

    return decorate


class ShardServicer:
    """Serves the tables of one ShardStore; ``shard_index`` and ``epoch`` name it in routing errors."""

    def __init__(self, shard_index: int, metrics: ShardMetrics | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, data_root: Path | None = None,
                 replicas: Replicas | None = None, tier_dir: Path | None = None):
        self.shard_index = shard_index
        self.data_root = Path(data_root or checkpoint.default_data_root())  # checkpoints are read and written here
        self.epoch = 0
        self.address = ""
        self.node = ""
        self.tier_dir = tier_dir  # tiered tables' files go under it (None: row_store.default_tier_dir())
        self.store = self._new_store()
        self.metrics = metrics or ShardMetrics()
        self.max_message_bytes = max_message_bytes
        self._frozen: dict[str, _FrozenSlots] = {}
        self._aggregators: dict[tuple[str, bool], StepAggregator] = {}  # (table, synchronous)
        self._shared_rows = SharedRowSegments()
        # Replication: a primary takes clients' updates and forwards them through `replicas` (None: this shard
        # cannot replicate); a replica applies its primary's stream, whose id and last applied seq it keeps.
        self.primary, self.copying = True, False  # copying: a replica whose copy is being made, which serves nothing
        self.replicas = replicas
        self._replica_stream, self._replicated_seq = "", 0
        self._left_streams: set[str] = set()
        self.step_timeout_s = 0.0  # pending synchronous steps older than this are aborted (0: never)
        self.aborted_steps = 0
        self._hold: _StepHold | None = None
        self._staged: ShardStore | None = None  # a restore's tables, read and checked, not yet live
        self._staged_counters: dict[str, dict] = {}  # table -> step counters of the staged checkpoint

    def _new_store(self) -> ShardStore:
        """A store for this shard's tables, their rows in shared memory where clients on this machine can read
        them (``MapRows``; which tables, see ``row_store``)."""
        return ShardStore(self.tier_dir, share_rows=os.path.isdir(SHARED_SEGMENT_DIR))

    def drop_all_tables(self) -> None:
        """Drop the live and any staged tables, files of tiered ones included (the shard stops)."""
        self.store.drop_all_tables()
        if self._staged is not None:
            self._staged.drop_all_tables()
            self._staged = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register every ShardService method; Lookup replies skip protobuf's copies (same bytes)."""
        register_service(server, "ShardService", self, {"Lookup": lambda reply: encode_lookup_response(*reply)})

    # ---- errors ---------------------------------------------------------------------------

    def answer(self, method: str, body, request):
        """``body(request)``'s result and None, or None and the refusal it met (``refusal``'s triple); a bug is
        logged and refused INTERNAL. Both transports (gRPC, the row stream) run a handler body through here."""
        try:
            return body(request), None
        except REFUSALS as error:
            return None, self.refusal(error)
        except Exception as error:  # a bug, not bad input: log it, keep serving, tell the caller plainly
            log.exception("%s failed", method)
            return None, ("INTERNAL", f"{method}: {type(error).__name__}: {error}", False)

    async def _abort(self, context: grpc.aio.ServicerContext, code: str, message: str, routing: bool) -> None:
        """End a gRPC call with a refusal; a routing refusal carries this shard's epoch in the trailing metadata."""
        if routing:
            context.set_trailing_metadata(((ROUTING_EPOCH_KEY, str(self.epoch)),))
        await context.abort(getattr(grpc.StatusCode, code), message)

    def refusal(self, error: Exception) -> tuple[str, str, bool]:
        """A refused request's status code name, message, and whether the routing refused it."""
        code, message = getattr(error, "code", "INVALID_ARGUMENT"), str(error)
        routing = isinstance(error, SlotNotOwned) or getattr(error, "routing", False)
        if routing:
            message = f"{message} (shard {self.shard_index}, routing epoch {self.epoch}); refresh the routing"
        log.debug("refused with %s: %s", code, message)
        return code, message, routing

    def _spec(self, table: str) -> TableSpec:
        if not table:
            raise RequestRejected("INVALID_ARGUMENT", "table", "table: must name a table")
        return self.store.spec(table)

    @staticmethod
    def _row_ids(data: bytes, field: str = "row_ids") -> np.ndarray:
        if len(data) % 8:
            raise RequestRejected("INVALID_ARGUMENT", field,
                                  f"{field}: {len(data)} bytes is not a whole number of int64 ids")
        return np.frombuffer(data, dtype="<i8")

    @staticmethod
    def _dtype(value: int, field: str, allowed: tuple[WireDtype, ...] = WIRE_DTYPES) -> str:
        if value not in {dtype.enum for dtype in allowed}:
            raise RequestRejected("INVALID_ARGUMENT", field, f"{field}: must be one of "
                                  f"{sorted(dtype.name for dtype in allowed)}, got enum value {value}")
        return WIRE_DTYPE_BY_ENUM[value].name

    # ---- data plane -----------------------------------------------------------------------

    def _check_readable(self) -> None:
        if self.copying:
            raise RequestRejected("FAILED_PRECONDITION", "table", "this replica's copy of its primary is being "
                                  "made; read another copy", routing=True)

    @_handler("lookup")
    def Lookup(self, request: pb.LookupRequest):
        return self._lookup(request)

    def stream_lookup(self, data: bytes) -> tuple[pb.RowStreamReply, memoryview | None]:
        """A row stream's lookup of ``LookupRequest`` bytes: the reply, and the rows' bytes when answered."""
        start = time.perf_counter()
        request = decode_lookup_request(data)
        if isinstance(request, UndecodableRequest):
            return pb.RowStreamReply(code="INVALID_ARGUMENT", message=request.message), None
        result, refused = self.answer("lookup", functools.partial(self._lookup, rows_in_reply_only=True), request)
        if refused:
            code, message, routing = refused
            return pb.RowStreamReply(code=code, message=message, refresh_routing=routing), None
        (rows, dtype, epoch, _), num_rows, wire_bytes = result
        self.metrics.record("lookup", time.perf_counter() - start, num_rows, wire_bytes)
        payload = rows.contiguous().view(torch.uint8).numpy().reshape(-1)
        header = pb.LookupResponse(num_rows=num_rows, dim=reply_dim(rows, dtype), dtype=dtype, epoch=epoch)
        return pb.RowStreamReply(header=header, row_bytes=payload.nbytes), payload.data

    def _lookup(self, request: pb.LookupRequest, rows_in_reply_only: bool = False):
        """The rows of a lookup, written to its ``shared_rows`` if it names them (refused ``rows_in_reply_only``,
        at the point where a write would be refused: both transports refuse a request alike)."""
        self._check_readable()
        spec = self._spec(request.table)
        dtype = self._dtype(request.dtype, "dtype")
        ids = self._row_ids(request.row_ids)
        reply_bytes = self._check_reply_size(len(ids), WIRE_DTYPE_BY_NAME[dtype].row_bytes(spec.dim), "row_ids")
        rows = self.store.gather(request.table, ids, dtype)
        shared = request.HasField("shared_rows")
        if shared and rows_in_reply_only:
            raise RequestRejected("INVALID_ARGUMENT", "shared_rows", "shared_rows: not on the row stream (the rows "
                                  "come back on it); ask over the shard's Unix socket")
        if shared:
            self._write_shared_rows(request.shared_rows, rows)
        return (rows, request.dtype, self.epoch, not shared), len(ids), reply_bytes  # see encode_lookup_response

    @_handler("lookup_state")
    def LookupState(self, request: pb.LookupStateRequest):
        self._check_primary("LookupState")
        spec = self._spec(request.table)
        ids = self._row_ids(request.row_ids)
        # float32 rows with their state (a serving table is refused below)
        reply_bytes = self._check_reply_size(len(ids), spec.bytes_per_row(), "row_ids")
        tensors = self.store.gather_state(request.table, ids)
        response = pb.LookupStateResponse(epoch=self.epoch, tensors=[
            pb.RowValues(name=key, width=int(np.prod(tensor.shape[1:])),
                         values=tensor.contiguous().numpy().astype("<f4", copy=False).tobytes())
            for key, tensor in tensors.items()])
        return response, len(ids), reply_bytes

    @_handler("map_rows")
    def MapRows(self, request: pb.MapRowsRequest):
        self._check_readable()
        spec = self._spec(request.table)
        shared, slot_base = self.store.shared_rows(request.table)
        return pb.MapRowsResponse(segment=shared.name, rows=len(shared.rows), dim=spec.dim,
                                  dtype=WIRE_DTYPE_BY_TORCH[shared.rows.dtype].enum,
                                  slot_base=slot_base.numpy().astype("<i8", copy=False).tobytes(),
                                  epoch=self.epoch), 0, 0

    def _check_reply_size(self, num_rows: int, row_bytes: int, field: str) -> int:
        """The bytes of ``num_rows`` rows of ``row_bytes`` each; refused if over the message limit."""
        reply_bytes = num_rows * row_bytes
        if reply_bytes > self.max_message_bytes:
            raise RequestRejected(
                "RESOURCE_EXHAUSTED", field,
                f"{field}: {num_rows} rows make a {reply_bytes}-byte reply, over max_message_bytes="
                f"{self.max_message_bytes}; split the request")
        return reply_bytes

    def _write_shared_rows(self, shared: pb.SharedRows, rows) -> None:
        try:
            self._shared_rows.write(shared.name, shared.offset, rows, shared.positions)
        except SegmentError as error:
            raise RequestRejected("INVALID_ARGUMENT", error.field, str(error)) from None

    @_handler("update")
    def Update(self, request: pb.UpdateRequest):
        self._check_primary("Update")
        spec = self._spec(request.table)
        ids = self._row_ids(request.row_ids)
        grads = self._grads(request, spec, len(ids))
        aggregator = self._aggregator(request.table, request.synchronous)
        self._check_not_held(request)
        self._check_not_frozen(request.table, ids, spec.num_slots,
                               completes_a_pending_step=aggregator.is_pending(request.step))
        pull_ids, pull_dtype = self._pull_request(request, spec)
        response = self._take_update(request, ids, grads)
        if self.replicas is not None and self.replicas.forwarding:  # the re-encoded gradients cost a copy
            self.replicas.forward(update=_as_replicated(request, grads))
        wire_bytes = len(ids) * spec.dim * WIRE_DTYPE_BY_ENUM[request.grad_dtype].torch.itemsize
        if len(pull_ids) and not response.pending:  # the step is applied here: its rows are final
            rows = self.store.gather(request.table, pull_ids, pull_dtype)
            response.pulled, response.pulled_rows = True, tensor_to_bytes(rows)
            wire_bytes += rows.nbytes
        return response, len(ids) + len(pull_ids), wire_bytes

    def _pull_request(self, request: pb.UpdateRequest, spec: TableSpec) -> tuple[np.ndarray, str]:
        """A push-and-pull's row ids and dtype, refused (before the push is taken) if they could not be served."""
        pull_ids = self._row_ids(request.pull_row_ids, "pull_row_ids")
        dtype = self._dtype(request.pull_dtype, "pull_dtype") if len(pull_ids) else "float32"
        self._check_reply_size(len(pull_ids), WIRE_DTYPE_BY_NAME[dtype].row_bytes(spec.dim), "pull_row_ids")
        self.store.check_servable(request.table, pull_ids, "pull_row_ids")
        return pull_ids, dtype

    def _check_primary(self, method: str) -> None:
        """Refuse, as a routing error the client retries after a refresh, a change asked of a replica."""
        if not self.primary:
            raise RequestRejected("FAILED_PRECONDITION", "table", f"{method} goes to the primary of this shard's "
                                  "replica group; this shard is a replica", routing=True)

    def _take_update(self, request: pb.UpdateRequest, ids: np.ndarray, grads: torch.Tensor) -> pb.UpdateResponse:
        """Validate a push (or a part of one) and hand it to its aggregator; apply what that releases."""
        aggregator = self._aggregator(request.table, request.synchronous)
        update = self.store.check_update(request.table, ids, grads)
        ready = aggregator.add(request.step, request.rank, request.world_size, update,
                               last_part=not request.more_parts)
        applied = self._apply(request.table, ready)
        pending = aggregator.is_pending(request.step)
        duplicate = not ready and not pending and len(ids) > 0
        return pb.UpdateResponse(applied_rows=applied, duplicate=duplicate, pending=pending, epoch=self.epoch)

    def _grads(self, request: pb.UpdateRequest, spec: TableSpec, num_rows: int) -> torch.Tensor:
        dtype = self._dtype(request.grad_dtype, "grad_dtype", GRAD_WIRE_DTYPES)  # float8_e4m3 is for lookups only
        row_bytes = WIRE_DTYPE_BY_NAME[dtype].row_bytes(spec.dim)
        if request.HasField("shared_grads"):
            if request.grads:
                raise RequestRejected("INVALID_ARGUMENT", "grads", "grads: must be empty when shared_grads is set")
            shared = request.shared_grads
            try:
                data = self._shared_rows.read(shared.name, shared.offset, num_rows, row_bytes, shared.positions)
            except SegmentError as error:
                raise RequestRejected("INVALID_ARGUMENT", error.field, str(error)) from None
            return data.view(WIRE_DTYPE_BY_NAME[dtype].torch).view(num_rows, spec.dim).float()
        if len(request.grads) != num_rows * row_bytes:
            raise RequestRejected(
                "INVALID_ARGUMENT", "grads",
                f"grads: expected {num_rows * row_bytes} bytes ({num_rows} rows x dim {spec.dim} x {dtype}), "
                f"got {len(request.grads)}")
        return tensor_from_bytes(request.grads, dtype, (num_rows, spec.dim)).float()

    def _check_not_held(self, request: pb.UpdateRequest) -> None:
        """Refuse, as retryable, pushes that a checkpoint's step barrier holds back."""
        if not self._held():
            return
        if not (request.synchronous and (request.table, request.step) in self._hold.admit):
            raise RequestRejected("FAILED_PRECONDITION", "step",
                                  f"step: a checkpoint holds new steps of table '{request.table}' for a moment "
                                  f"(step {request.step} is not one it completes first); retry shortly", routing=True)

    def _held(self) -> bool:
        """Whether a step barrier holds new steps now (a hold whose lease ran out is dropped)."""
        if self._hold is not None and time.monotonic() > self._hold.until:
            self._hold = None
        return self._hold is not None

    def abort_step(self, table: str, step: int, world_size: int = 0) -> list[int] | None:
        """Abort synchronous ``step`` of ``table`` here: the ranks that never reported, None if already applied."""
        aggregator = self._aggregator(table, True)
        before = aggregator.aborted_total
        missing = aggregator.abort(step, world_size)
        self.aborted_steps += aggregator.aborted_total - before
        return missing

    def abort_expired_steps(self, now: float | None = None) -> int:
        """Abort every pending synchronous step older than ``step_timeout_s``; how many were aborted. A primary's
        replicas abort what it forwards them, never on a clock of their own."""
        if self.step_timeout_s <= 0 or not self.primary:
            return 0
        now = time.monotonic() if now is None else now
        aborted = 0
        for table, aggregator in self._synchronous_aggregators():
            for step, missing in aggregator.abort_expired(now, self.step_timeout_s).items():
                log.warning("table '%s': step %d pending for over %.0f s, aborted (ranks %s never reported)",
                            table, step, self.step_timeout_s, missing)
                if self.replicas is not None:
                    self.replicas.forward(abort=pb.AbortStepRequest(table=table, step=step))
                aborted += 1
        self.aborted_steps += aborted
        if aborted:
            self.metrics.set_state(self.store.memory_bytes(), self.pending_steps())
        return aborted

    @_handler("abort_step")
    def AbortStep(self, request: pb.AbortStepRequest):
        self._check_primary("AbortStep")
        self._spec(request.table)
        refused_as_invalid(push_checks.check_push_header, request.step, 0, max(request.world_size, 1))
        missing = self.abort_step(request.table, request.step, request.world_size)
        if self.replicas is not None:
            self.replicas.forward(abort=request)
        return pb.AbortStepResponse(aborted=missing is not None, missing_ranks=missing or []), 0, 0

    @_handler("step_barrier")
    def StepBarrier(self, request: pb.StepBarrierRequest):
        if request.hold:
            if not 0 < request.lease_s <= 3600:
                raise RequestRejected("INVALID_ARGUMENT", "lease_s", "lease_s: must be in (0, 3600] seconds")
            self._hold = _StepHold(time.monotonic() + request.lease_s, {(s.table, s.step) for s in request.admit})
        else:
            self._hold = None
        pending = [pb.StepBarrierStep(table=table, step=step, state="pending")
                   for table, aggregator in self._synchronous_aggregators() for step in aggregator.pending_steps()]
        admitted = [pb.StepBarrierStep(table=s.table, step=s.step,
                                       state=self._aggregator(s.table, True).step_state(s.step)
                                       if s.table in {spec.name for spec in self.store.specs()} else "unknown")
                    for s in request.admit]
        return pb.StepBarrierResponse(pending=pending, admitted=admitted), 0, 0

    def pending_steps(self) -> int:
        """Synchronous steps, over all tables, that still wait for some rank's push."""
        return sum(len(aggregator.pending_steps()) for _, aggregator in self._synchronous_aggregators())

    def _synchronous_aggregators(self) -> list[tuple[str, StepAggregator]]:
        """(table, aggregator) of every table's synchronous steps, by table name."""
        return [(table, aggregator) for (table, synchronous), aggregator in sorted(self._aggregators.items())
                if synchronous]

    def _aggregator(self, table: str, synchronous: bool) -> StepAggregator:
        key = (table, synchronous)
        if key not in self._aggregators:
            self._aggregators[key] = StepAggregator(synchronous=synchronous, table=table)
        return self._aggregators[key]

    def _apply(self, table: str, updates) -> int:
        """Apply the RowUpdates an aggregator released; the number of rows they touched."""
        for update in updates:
            self.store.apply_update(table, update)
        return sum(len(update.row_ids) for update in updates)

    def _check_not_frozen(self, table: str, row_ids: np.ndarray, num_slots: int,
                          completes_a_pending_step: bool) -> None:
        state = self._frozen.get(table)
        if not state or not state.frozen:
            return
        moving = state.frozen.intersection(np.unique(slot_of(row_ids, num_slots)).tolist())
        if moving and (not completes_a_pending_step or moving & state.sealed):
            raise RequestRejected("FAILED_PRECONDITION", "row_ids",
                                  f"row_ids: slots {sorted(moving)} of table '{table}' are moving to another shard",
                                  routing=True)

    @_handler("stats")
    def Stats(self, request: pb.StatsRequest):
        tables = []
        for spec in self.store.specs():
            table = pb.TableStats(name=spec.name, rows=self.store.num_rows(spec.name),
                                  slots=len(self.store.owned_slots(spec.name)),
                                  bytes=self.store.num_rows(spec.name) * spec.bytes_per_row(),
                                  unfilled_rows=self.store.unfilled_rows(spec.name))
            tier = self.store.tier_stats(spec.name)
            if tier is not None:
                table.tier.CopyFrom(pb.TierStats(
                    capacity_rows=tier.capacity, cached_rows=tier.cached_rows, hits=tier.hits, misses=tier.misses,
                    rows_read=tier.rows_read, evictions=tier.evictions, written_back=tier.written_back))
            tables.append(table)
        p50, p99 = self.metrics.lookup_percentiles_ms()
        response = pb.StatsResponse(
            shard_index=self.shard_index, address=self.address, node=self.node, epoch=self.epoch,
            memory_bytes=self.store.memory_bytes(), tables=tables, requests_total=self.metrics.requests_total,
            requests_per_s=self.metrics.requests_per_s(), p50_lookup_ms=p50, p99_lookup_ms=p99,
            pending_steps=[pb.PendingStepInfo(table=table, step=step, world_size=world_size, reported_ranks=ranks,
                                              age_s=age)
                           for table, aggregator in self._synchronous_aggregators()
                           for step, world_size, ranks, age in aggregator.pending_info()],
            aborted_steps=self.aborted_steps, step_barrier_held=self._held(), step_timeout_s=self.step_timeout_s)
        return response, 0, 0

    @_handler("checksum")
    def Checksum(self, request: pb.ChecksumRequest):
        self._spec(request.table)
        return pb.ChecksumResponse(sha256=self.store.checksum(request.table)), 0, 0

    # ---- control plane --------------------------------------------------------------------

    @_handler("add_table")
    def AddTable(self, request: pb.AddTableRequest):
        try:
            spec = TableSpec.from_dict(json.loads(request.spec_json))
        except (json.JSONDecodeError, RecursionError) as error:
            raise RequestRejected("INVALID_ARGUMENT", "spec_json", f"spec_json: not a JSON table spec ({error})") from None
        self.store.add_table(spec, list(request.slots))
        self.epoch = max(self.epoch, request.epoch)
        return pb.AddTableResponse(), 0, 0

    @_handler("drop_table")
    def DropTable(self, request: pb.DropTableRequest):
        self._spec(request.table)
        self.store.drop_table(request.table)
        self._frozen.pop(request.table, None)
        for synchronous in (False, True):
            self._aggregators.pop((request.table, synchronous), None)
        return pb.DropTableResponse(), 0, 0

    @_handler("set_epoch")
    def SetEpoch(self, request: pb.SetEpochRequest):
        if request.epoch < self.epoch:
            raise RequestRejected("FAILED_PRECONDITION", "epoch",
                                  f"epoch: routing epochs only grow; this shard is at {self.epoch}, got {request.epoch}")
        self.epoch = request.epoch
        return pb.SetEpochResponse(), 0, 0

    @_handler("freeze_slots")
    def FreezeSlots(self, request: pb.FreezeSlotsRequest):
        self._spec(request.table)
        state = self._frozen.setdefault(request.table, _FrozenSlots())
        if request.frozen:
            state.frozen.update(request.slots)
            state.since = time.monotonic()
        else:
            state.thaw(request.slots)
        return pb.FreezeSlotsResponse(), 0, 0

    @_handler("export_slots")
    def ExportSlots(self, request: pb.ExportSlotsRequest):
        spec = self._spec(request.table)
        state = self._frozen.get(request.table, _FrozenSlots())
        synchronous = self._aggregator(request.table, True)
        if (synchronous.has_pending_rows(request.slots, spec.num_slots)
                and time.monotonic() - state.since < PENDING_STEP_WAIT_S):
            # A step's partial sum applied on the target in two parts would differ (Adam is not linear):
            # let the pending steps complete here first.
            raise RequestRejected("ABORTED", "slots", f"slots: synchronous steps {synchronous.pending_steps()} of "
                                  f"table '{request.table}' are still pending on them; export again shortly")
        arrays = self.store.export_slots(request.table, list(request.slots))
        state.sealed.update(request.slots)
        # Partial sums of steps that did not complete in time travel with their slots, to complete on the target.
        pending = synchronous.export_pending(request.slots, spec.num_slots)
        arrays.update(pending_to_arrays(pending))
        # So does the memory of applied pushes: a retry that reaches the new owner is still dropped.
        arrays.update(self._export_applied(spec, request.slots))
        return pb.ExportSlotsResponse(arrays=arrays_to_proto(arrays)), 0, 0

    def _export_applied(self, spec: TableSpec, slots) -> dict[str, np.ndarray]:
        """Both aggregators' memory of the pushes applied to rows of ``slots``, as ImportSlots arrays."""
        arrays = {}
        for synchronous, prefix in APPLIED_PREFIXES.items():
            applied = self._aggregator(spec.name, synchronous).export_applied(slots, spec.num_slots)
            arrays.update({prefix + name: array for name, array in applied.items()})
        return arrays

    @_handler("import_slots")
    def ImportSlots(self, request: pb.ImportSlotsRequest):
        spec = self._spec(request.table)
        arrays = arrays_from_proto(request.arrays)
        pending = pending_from_arrays(arrays)  # removes the pending entries from `arrays`
        applied = {prefix: {name[len(prefix):]: arrays.pop(name) for name in list(arrays) if name.startswith(prefix)}
                   for prefix in APPLIED_PREFIXES.values()}
        # Everything is checked before anything changes: the applied-push memory, and the pending partial
        # sums as pushes (their slots are not owned here yet).
        for columns in applied.values():
            if columns:
                StepAggregator.check_applied(columns)
        for record in pending:
            for part in record["parts"]:
                ids = push_checks.check_row_ids(torch.from_numpy(part["row_ids"]), spec.rows, spec.name)
                push_checks.check_grads(torch.from_numpy(part["grads"]), len(ids), spec.dim)
        self.store.import_slots(request.table, arrays)
        for synchronous, prefix in APPLIED_PREFIXES.items():
            if applied[prefix]:
                self._aggregator(request.table, synchronous).import_applied(applied[prefix])
        check = functools.partial(self.store.check_update, request.table)
        self._apply(request.table, self._aggregator(request.table, True).import_pending(pending, check))
        return pb.ImportSlotsResponse(), 0, 0

    @_handler("release_slots")
    def ReleaseSlots(self, request: pb.ReleaseSlotsRequest):
        self._spec(request.table)
        self.store.release_slots(request.table, list(request.slots))
        self._frozen.get(request.table, _FrozenSlots()).thaw(request.slots)
        return pb.ReleaseSlotsResponse(), 0, 0

    @_handler("checkpoint")
    def Checkpoint(self, request: pb.CheckpointRequest):
        directory = checkpoint.inside_root(self.data_root, request.directory, "directory")
        if request.require_step_barrier and not self._held():
            raise RequestRejected("FAILED_PRECONDITION", "require_step_barrier",
                                  "require_step_barrier: the step barrier's hold ended before this shard wrote "
                                  "(its lease ran out); checkpoint again")
        files, counters = [], {}
        for spec in self.store.specs():
            slots = self.store.owned_slots(spec.name)
            path = checkpoint.write_shard_file(directory, spec.name, self.shard_index,
                                               self.store.export_slots(spec.name, slots))
            files.append(pb.CheckpointFile(table=spec.name, path=path, slots=slots))
            synchronous = self._aggregators.get((spec.name, True))
            asynchronous = self._aggregators.get((spec.name, False))
            counters[spec.name] = {"synchronous": synchronous.newest_steps().get(0, -1) if synchronous else -1,
                                   "ranks": asynchronous.newest_steps() if asynchronous else {}}
        return pb.CheckpointResponse(files=files, step_counters_json=json.dumps(counters)), 0, 0

    @_handler("restore")
    def Restore(self, request: pb.RestoreRequest):
        if request.phase == pb.RESTORE_DISCARD:
            self._staged, self._staged_counters = None, {}
        elif request.phase == pb.RESTORE_COMMIT:
            self._check_primary("Restore's commit")  # replicas commit in their primary's order
            self._commit_restore(request.epoch)
            if self.replicas is not None:
                self.replicas.forward(restore_commit=request)
        else:
            self._stage_restore(request)
        return pb.RestoreResponse(), 0, 0

    def _stage_restore(self, request: pb.RestoreRequest) -> None:
        """Read ``request.table``'s slots into the staging store: every file read and checked, every slot
        found, before anything is kept; the live tables do not change."""
        directory = checkpoint.inside_root(self.data_root, request.directory, "directory")
        for index, path in enumerate(request.paths):
            checkpoint.inside_root(directory, path, f"paths[{index}]")
        try:
            spec = TableSpec.from_dict(json.loads(request.spec_json))
            counters = checkpoint.step_counters(json.loads(request.step_counters_json or "{}"))
        except (json.JSONDecodeError, RecursionError, TypeError, ValueError, AttributeError) as error:
            raise RequestRejected("INVALID_ARGUMENT", "spec_json",
                                  f"spec_json, step_counters_json: not a table spec and its counters ({error})") \
                from None
        if spec.name != request.table:
            raise RequestRejected("INVALID_ARGUMENT", "table",
                                  f"table: {request.table!r} is not the spec's {spec.name!r}")
        parts = checkpoint.read_slots(directory, spec, list(request.paths), list(request.slots))
        if self._staged is None:
            self._staged = self._new_store()
        if spec.name in {staged.name for staged in self._staged.specs()}:
            self._staged.drop_table(spec.name)  # staged again: a retry
        self._staged.add_table(spec, [])
        try:
            for arrays in parts:
                self._staged.import_slots(spec.name, arrays)
            missing = sorted(set(request.slots) - set(self._staged.owned_slots(spec.name)))
            if missing:
                raise RequestRejected("INVALID_ARGUMENT", "paths",
                                      f"paths: slots {missing[:8]}{'...' if len(missing) > 8 else ''} of table "
                                      f"'{spec.name}' are in none of the checkpoint's files {list(request.paths)}")
        except BaseException:
            self._staged.drop_table(spec.name)
            raise
        self._staged_counters[spec.name] = counters

    def _commit_restore(self, epoch: int) -> None:
        """Make the staged tables the live ones (the others go), their step counters with them."""
        if self._staged is None:
            raise RequestRejected("FAILED_PRECONDITION", "phase", "phase: nothing is staged to commit")
        replaced, self.store, self._staged = self.store, self._staged, None
        replaced.drop_all_tables()  # frees its memory now, stops its background fills, removes its tier files
        self._frozen, self._aggregators, self._hold = {}, {}, None
        for table, counters in self._staged_counters.items():
            self._aggregator(table, True).start_after({0: counters["synchronous"]})
            self._aggregator(table, False).start_after(counters["ranks"])
        self._staged_counters = {}
        self.epoch = max(self.epoch, epoch)

    # ---- replication ----------------------------------------------------------------------

    @_handler("set_role")
    def SetRole(self, request: pb.SetRoleRequest):
        if request.replicas and (not request.primary or self.replicas is None):
            raise RequestRejected("FAILED_PRECONDITION", "replicas",
                                  "replicas: only a primary of a shard that can replicate forwards to replicas")
        if request.primary and not self.primary:
            self._left_streams.add(self._replica_stream)  # a promoted replica takes no more from its old primary
        self.primary, self.copying = request.primary, request.copying and not request.primary
        self.epoch = max(self.epoch, request.epoch)
        if self.replicas is not None:
            if request.primary:
                self.replicas.set_targets(list(request.replicas))
            else:
                self.replicas.close()
        return pb.SetRoleResponse(), 0, 0

    @_handler("replicate")
    def Replicate(self, request: pb.ReplicateRequest):
        if self.primary:
            raise RequestRejected("FAILED_PRECONDITION", "stream", "stream: this shard is a primary, not a replica")
        if request.ops and request.stream != self._replica_stream:
            if request.stream in self._left_streams:
                raise RequestRejected("FAILED_PRECONDITION", "stream", "stream: from a primary this shard has left")
            if self._replica_stream:
                self._left_streams.add(self._replica_stream)
            self._replica_stream, self._replicated_seq = request.stream, request.ops[0].seq - 1
        rows = 0
        for op in request.ops:
            if op.seq <= self._replicated_seq:
                continue  # resent after a lost answer: applied already
            if op.seq != self._replicated_seq + 1:
                raise RequestRejected("FAILED_PRECONDITION", "ops",
                                      f"ops: seq {op.seq} after {self._replicated_seq}; the stream has a gap")
            change = op.WhichOneof("op")
            if change == "update":
                rows += self._apply_replicated(op.update)
            elif change == "abort":
                self.abort_step(op.abort.table, op.abort.step, op.abort.world_size)
            elif change == "restore_commit":
                self._commit_restore(op.restore_commit.epoch)
            else:
                raise RequestRejected("INVALID_ARGUMENT", "ops", f"ops: seq {op.seq} carries no change")
            self._replicated_seq = op.seq
        return pb.ReplicateResponse(applied_seq=self._replicated_seq), rows, 0

    def _apply_replicated(self, request: pb.UpdateRequest) -> int:
        """Apply an update as the primary did, but only to the slots held here (a slot released on the primary
        may still have updates on their way to this replica). Returns the rows it carried."""
        if request.table not in {spec.name for spec in self.store.specs()}:
            return 0  # dropped here and on the primary since
        spec = self.store.spec(request.table)
        ids = self._row_ids(request.row_ids)
        grads = self._grads(request, spec, len(ids))
        held = np.isin(slot_of(ids, spec.num_slots), self.store.owned_slots(request.table))
        if not held.all():
            ids, grads = ids[held], grads[torch.from_numpy(held)]
        self._take_update(request, ids, grads)
        return len(ids)

    async def AddReplica(self, request: pb.AddReplicaRequest, context: grpc.aio.ServicerContext):
        """Copy every table to a new, empty replica (its tables added with no slots), then forward to it."""
        try:
            link, parts = self._snapshot_for(request.replica)
        except REFUSALS as error:
            await self._abort(context, *self.refusal(error))
        copied = 0
        try:
            stub = self.replicas.stub(request.replica.address)
            for table, arrays in parts:
                await stub.ImportSlots(pb.ImportSlotsRequest(table=table, arrays=arrays_to_proto(arrays)),
                                       metadata=self.replicas.metadata())
                copied += len(arrays["rows"])
        except grpc.aio.AioRpcError as error:
            self.replicas.remove(request.replica.index)
            await context.abort(error.code(), f"copying to replica {request.replica.index} at "
                                              f"{request.replica.address}: {error.details()}")
        link.live = True
        link.start()
        log.info("replica %d at %s holds a copy of this shard (%d rows); forwarding to it",
                 request.replica.index, request.replica.address, copied)
        return pb.AddReplicaResponse(copied_rows=copied)

    def _snapshot_for(self, target: pb.ReplicaTarget):
        """This shard's state, as ImportSlots parts per table under the message limit, and a new replica link
        that takes every update from this moment on (one atomic step on the event loop)."""
        if not self.primary or self.replicas is None:
            raise RequestRejected("FAILED_PRECONDITION", "replica", "replica: only a primary that can replicate "
                                  "copies itself to a new replica")
        if self.pending_steps():
            # Partial sums do not travel in a copy: the controller asks again between steps.
            raise RequestRejected("ABORTED", "replica", "replica: synchronous steps are pending; ask again shortly")
        parts = []
        for spec in self.store.specs():
            slots = self.store.owned_slots(spec.name)
            per_part = spec.slots_per_message(self.max_message_bytes)
            for start in range(0, max(1, len(slots)), per_part):
                batch = slots[start:start + per_part]
                parts.append((spec.name, {**self.store.export_slots(spec.name, batch),
                                          **self._export_applied(spec, batch)}))
        return self.replicas.add_copying(target), parts


def _as_replicated(request: pb.UpdateRequest, grads: torch.Tensor) -> pb.UpdateRequest:
    """``request`` as its replicas take it: the gradients this shard applied inline, in the request's wire dtype
    (they came in it, so the replicas decode the same float32 values)."""
    wire = WIRE_DTYPE_BY_ENUM[request.grad_dtype].torch
    return pb.UpdateRequest(table=request.table, row_ids=request.row_ids, grads=tensor_to_bytes(grads.to(wire)),
                            grad_dtype=request.grad_dtype, step=request.step, rank=request.rank,
                            world_size=request.world_size, synchronous=request.synchronous,
                            more_parts=request.more_parts)
