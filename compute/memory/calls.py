"""The client's gRPC calls: channels and stubs per address, each failure sorted into "resend after a
routing refresh" or an error for the caller, and the retry loop with its backoff."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import (LOOKUP_METHOD, ROUTING_EPOCH_KEY, ClientTls, bearer_metadata, decode_lookup_rows, open_channel,
                         transport_options)

log = logging.getLogger(__name__)

# CANCELLED reaches a client that did not cancel (its own cancellation raises asyncio.CancelledError) when the
# server stops with the call in flight: a shard that a scale-down or failover retires. Pushes are deduplicated by
# (step, rank), so resending any of these is safe.
TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# In the error of a call that needed a shard which died with no copy left (a job resumes from its checkpoint).
SHARD_LOST = "died with no replica left"


class MemoryServiceError(RuntimeError):
    """A call the memory service refused; ``code`` is the gRPC status, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message

    def __reduce__(self):  # raised in a Ray worker, it reaches the driver whole
        return type(self), (self.code, self.details)


class ResendAfterRefresh(Exception):
    """A part of a call must be resent once the routing is refreshed."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Deadlines and backoff: each call gives up after its deadline (a stopped shard never holds a client
    longer), and a call's parts are resent after routing changes and transient failures, with exponential
    backoff and jitter, for up to ``deadline_s`` in all. A call's deadline is ``call_timeout_s`` if given,
    else a few times the p99 of the method's recent calls (``CallDeadlines``)."""

    initial_s: float = 0.005
    max_s: float = 0.5
    deadline_s: float = 30.0
    call_timeout_s: float | None = None

    def delays(self):
        delay, start = self.initial_s, time.monotonic()
        while time.monotonic() - start < self.deadline_s:
            yield delay * (0.5 + random.random())
            delay = min(delay * 2, self.max_s)


class CallDeadlines:
    """Each method's deadline: P99_FACTOR times the p99 of its last WINDOW successful calls, within
    DEADLINE_BOUNDS_S (FIRST_DEADLINE_S until MIN_CALLS were seen); or one fixed deadline for all."""

    P99_FACTOR, WINDOW, MIN_CALLS = 4.0, 256, 32
    DEADLINE_BOUNDS_S, FIRST_DEADLINE_S = (2.0, 10.0), 5.0

    def __init__(self, fixed_s: float | None = None):
        self._fixed_s = fixed_s
        self._seconds: dict[str, collections.deque[float]] = {}

    def of(self, method: str) -> float:
        if self._fixed_s is not None:
            return self._fixed_s
        recent = self._seconds.get(method, ())
        if len(recent) < self.MIN_CALLS:
            return self.FIRST_DEADLINE_S
        p99 = sorted(recent)[int(0.99 * (len(recent) - 1))]
        low, high = self.DEADLINE_BOUNDS_S
        return min(high, max(low, self.P99_FACTOR * p99))

    def record(self, method: str, seconds: float) -> None:
        self._seconds.setdefault(method, collections.deque(maxlen=self.WINDOW)).append(seconds)


class Channels:
    """grpc.aio channels to the directory and the shards, one per address; used on one event loop."""

    def __init__(self, token: str | None, tls: ClientTls | None, max_message_bytes: int, deadlines: CallDeadlines):
        self._metadata = bearer_metadata(token) if token else ()
        self._deadlines = deadlines
        self._tls = tls
        # This client retries by itself; gRPC's own retries would buffer a copy of every request.
        self._options = [*transport_options(max_message_bytes), ("grpc.enable_retries", 0)]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._shard_stubs: dict[str, pb_grpc.ShardServiceStub] = {}

    async def directory(self, address: str, method: str, request):
        """One DirectoryService call; MemoryServiceError when it fails."""
        stub = pb_grpc.DirectoryServiceStub(self._channel(address))
        try:
            return await getattr(stub, method)(request, metadata=self._metadata,
                                               timeout=self._deadlines.of("directory"))
        except grpc.aio.AioRpcError as error:
            raise MemoryServiceError(error.code(), error.details()) from None

    async def shard(self, address: str, method: str, request):
        """One ShardService call (``Lookup`` replies with the rows' bytes only); ResendAfterRefresh for
        routing refusals and transient failures, MemoryServiceError for the rest."""
        start = time.monotonic()
        try:
            reply = await getattr(self._shard_stub(address), method)(request, metadata=self._metadata,
                                                                     timeout=self._deadlines.of(method))
        except grpc.aio.AioRpcError as error:
            trailing = {key for key, _ in error.trailing_metadata() or ()}  # (key, value) pairs on every grpcio
            if error.code() in TRANSIENT_CODES or ROUTING_EPOCH_KEY in trailing:
                log.debug("shard %s %s: %s; will retry", address, method, error.details())
                raise ResendAfterRefresh() from None
            raise MemoryServiceError(error.code(), error.details()) from None
        self._deadlines.record(method, time.monotonic() - start)
        return reply

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = open_channel(address, self._tls, self._options)
        return self._channels[address]

    def _shard_stub(self, address: str) -> pb_grpc.ShardServiceStub:
        if address not in self._shard_stubs:
            stub = pb_grpc.ShardServiceStub(self._channel(address))
            # Same bytes on the wire; only the reply's rows are read, as a view instead of parsed.
            stub.Lookup = self._channel(address).unary_unary(
                LOOKUP_METHOD, request_serializer=pb.LookupRequest.SerializeToString,
                response_deserializer=decode_lookup_rows)
            self._shard_stubs[address] = stub
        return self._shard_stubs[address]


async def with_retries(attempt: Callable[[np.ndarray], Awaitable[np.ndarray]], pending: np.ndarray,
                       policy: RetryPolicy, refresh_routing: Callable[[], Awaitable[None]]) -> None:
    """Run ``attempt(pending)`` -> positions still to resend, refreshing the routing between tries."""
    delays = policy.delays()
    while True:
        pending = await attempt(pending)
        if not len(pending):
            return
        delay = next(delays, None)
        if delay is None:
            raise MemoryServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"gave up after {policy.deadline_s} s of routing changes and failures")
        await asyncio.sleep(delay)
        try:
            await refresh_routing()
        except MemoryServiceError as error:
            if error.code not in TRANSIENT_CODES:
                raise


async def gather_parts(parts: list[tuple[np.ndarray, Any]]) -> np.ndarray:
    """Await (positions, coroutine) parts; return the positions of the parts to resend."""
    results = await asyncio.gather(*(coroutine for _, coroutine in parts), return_exceptions=True)
    retry = [positions for (positions, _), result in zip(parts, results) if isinstance(result, ResendAfterRefresh)]
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, ResendAfterRefresh):
            raise result
    return np.concatenate(retry) if retry else np.empty(0, dtype=np.int64)
