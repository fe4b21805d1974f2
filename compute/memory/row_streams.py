"""The client's side of the shards' row streams (``memory_service.row_stream``): lookups whose rows come back as
raw bytes on a TCP connection and are received straight into a buffer. One connection per lookup in flight,
kept for the next; used on the client's event loop.
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from compute.memory.calls import TRANSIENT_CODES, CallDeadlines, MemoryServiceError, ResendAfterRefresh
from protos import engram_memory_v1_pb2 as pb
from protos.row_stream import FrameError, receive_frame, receive_into, send, tune

HELLO_REPLY_LIMIT = 4096  # bytes of the reply to a hello
REPLY_LIMIT = 1 << 20  # bytes of a lookup's reply frame (the rows follow it, unframed)


KEPT_BUFFERS = 8  # receive buffers kept for the next lookups
KEPT_CONNECTIONS = 8  # idle connections kept per shard


class _Buffers:
    """Receive buffers, kept for the next lookups: a fresh one per lookup page-faulted on every 4 KiB as the rows
    arrived, which halved the pace the shard could send at (8 MiB in 5.6 ms, not 2.2). At most KEPT_BUFFERS are
    kept, the largest: what the client holds idle follows how many lookups ran at once, not how many shards."""

    def __init__(self):
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        fitting = [buffer for buffer in self._free if len(buffer) >= size]
        if not fitting:
            return bytearray(size)
        buffer = min(fitting, key=len)
        self._free.remove(buffer)
        return buffer

    def give(self, buffer: bytearray) -> None:
        self._free.append(buffer)
        if len(self._free) > KEPT_BUFFERS:
            self._free.remove(min(self._free, key=len))


class RowStreams:
    """Row-stream connections to the shards, by ``host:port``, and the buffers their rows arrive in."""

    def __init__(self, token: str | None, deadlines: CallDeadlines):
        self._hello = pb.RowStreamHello(token=token or "").SerializeToString()
        self._deadlines = deadlines
        self._idle: dict[str, list[socket.socket]] = {}
        self._buffers = _Buffers()

    async def lookup(self, address: str, request: pb.LookupRequest, row_bytes: int,
                     place: Callable[[memoryview], None]) -> None:
        """Look ``request``'s rows up from the shard at ``address`` and hand their ``row_bytes`` bytes to ``place``
        (a view valid only during the call). ResendAfterRefresh for routing refusals and failures that may pass
        (the shard went away, the deadline passed), MemoryServiceError for the rest."""
        start = time.monotonic()
        buffer = self._buffers.take(row_bytes)
        try:
            reply = await asyncio.wait_for(self._exchange(address, request, memoryview(buffer)[:row_bytes]),
                                           self._deadlines.of("Lookup"))
            _raise_refusal(reply, address)
            place(memoryview(buffer)[:row_bytes])
        except (OSError, asyncio.TimeoutError, FrameError, DecodeError) as error:  # connection errors are OSErrors
            raise ResendAfterRefresh() from error
        finally:
            self._buffers.give(buffer)
        self._deadlines.record("Lookup", time.monotonic() - start)

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _connection(self, address: str) -> socket.socket:
        """An idle connection to ``address``, or a new one that said its hello."""
        idle = self._idle.get(address)
        if idle:
            return idle.pop()
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        info = (await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM))[0]
        connection = tune(socket.socket(info[0], socket.SOCK_STREAM))
        try:
            await loop.sock_connect(connection, info[4])
            await send(connection, self._hello)
            _raise_refusal(pb.RowStreamReply.FromString(await receive_frame(connection, HELLO_REPLY_LIMIT)), address)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _exchange(self, address: str, request: pb.LookupRequest, rows: memoryview) -> pb.RowStreamReply:
        """Send ``request`` on a connection and receive the reply, and the rows into ``rows`` when answered. The
        connection is kept for the next lookup (a refusal leaves it usable); one that failed (or was cancelled)
        mid-way is closed."""
        connection = await self._connection(address)
        try:
            await send(connection, request.SerializeToString())
            reply = pb.RowStreamReply.FromString(await receive_frame(connection, REPLY_LIMIT))
            if reply.row_bytes != (0 if reply.code else len(rows)):
                raise MemoryServiceError(grpc.StatusCode.INTERNAL, f"row stream {address} answered "
                                         f"{reply.row_bytes} bytes of rows, not the {len(rows)} asked for")
            await receive_into(connection, rows[:reply.row_bytes])
        except BaseException:
            connection.close()
            raise
        idle = self._idle.setdefault(address, [])
        if len(idle) < KEPT_CONNECTIONS:
            idle.append(connection)
        else:
            connection.close()
        return reply


def _raise_refusal(reply: pb.RowStreamReply, address: str) -> None:
    """Raise what a refused ``reply`` means to the caller; nothing for an answer."""
    if not reply.code:
        return
    code = grpc.StatusCode.__members__.get(reply.code, grpc.StatusCode.UNKNOWN)
    if reply.refresh_routing or code in TRANSIENT_CODES:
        raise ResendAfterRefresh()
    raise MemoryServiceError(code, f"{reply.message} (row stream {address})")
