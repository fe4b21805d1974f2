"""The client's side of the shards' row streams (``memory_service.row_stream``): lookups whose rows come back as
raw bytes on a TCP connection and are received straight into their buffer. One connection per lookup in flight,
kept for the next; used on the client's event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
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


@dataclasses.dataclass(eq=False)
class _Connection:
    socket: socket.socket
    # Rows are received into this buffer, kept for the connection's next lookups: a fresh one per lookup
    # page-faulted on every 4 KiB, which halved the pace at which the shard could send (8 MiB in 5.6 ms, not 2.2).
    buffer: bytearray = dataclasses.field(default_factory=bytearray)

    def receive_buffer(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        return memoryview(self.buffer)[:size]


class RowStreams:
    """Row-stream connections to the shards, by ``host:port``; each idle one keeps the buffer of its largest
    reply so far."""

    def __init__(self, token: str | None, deadlines: CallDeadlines):
        self._hello = pb.RowStreamHello(token=token or "").SerializeToString()
        self._deadlines = deadlines
        self._idle: dict[str, list[_Connection]] = {}

    async def lookup(self, address: str, request: pb.LookupRequest, row_bytes: int,
                     place: Callable[[memoryview], None]) -> None:
        """Look ``request``'s rows up from the shard at ``address`` and hand their ``row_bytes`` bytes to ``place``
        (a view valid only during the call). ResendAfterRefresh for routing refusals and failures that may pass
        (the shard went away, the deadline passed), MemoryServiceError for the rest."""
        start = time.monotonic()
        try:
            connection, reply = await asyncio.wait_for(self._exchange(address, request, row_bytes),
                                                       self._deadlines.of("Lookup"))
        except (OSError, asyncio.TimeoutError, FrameError, DecodeError) as error:  # connection errors are OSErrors
            raise ResendAfterRefresh() from error
        try:
            _raise_refusal(reply, address)  # a refusal leaves the connection usable
            place(connection.receive_buffer(row_bytes))
        finally:
            self._idle.setdefault(address, []).append(connection)
        self._deadlines.record("Lookup", time.monotonic() - start)

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.socket.close()
        self._idle.clear()

    async def _connection(self, address: str) -> _Connection:
        """An idle connection to ``address``, or a new one that said its hello."""
        idle = self._idle.get(address)
        if idle:
            return idle.pop()
        host, port = address.rsplit(":", 1)
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        info = (await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))[0]
        connection = tune(socket.socket(info[0], socket.SOCK_STREAM))
        try:
            await loop.sock_connect(connection, info[4])
            await send(connection, self._hello)
            _raise_refusal(pb.RowStreamReply.FromString(await receive_frame(connection, HELLO_REPLY_LIMIT)), address)
        except BaseException:
            connection.close()
            raise
        return _Connection(connection)

    async def _exchange(self, address: str, request: pb.LookupRequest, row_bytes: int):
        """Send ``request`` on a connection, receive the reply and its rows into the connection's buffer; the
        connection and the reply. A connection that failed (or was cancelled) mid-way is closed, never reused."""
        connection = await self._connection(address)
        try:
            await send(connection.socket, request.SerializeToString())
            reply = pb.RowStreamReply.FromString(await receive_frame(connection.socket, REPLY_LIMIT))
            if reply.row_bytes not in (0, row_bytes):
                raise MemoryServiceError(grpc.StatusCode.INTERNAL, f"row stream {address} answered "
                                         f"{reply.row_bytes} bytes of rows, not the {row_bytes} asked for")
            await receive_into(connection.socket, connection.receive_buffer(reply.row_bytes))
        except BaseException:
            connection.socket.close()
            raise
        return connection, reply


def _raise_refusal(reply: pb.RowStreamReply, address: str) -> None:
    """Raise what a refused ``reply`` means to the caller; nothing for an answer."""
    if not reply.code:
        return
    code = grpc.StatusCode.__members__.get(reply.code, grpc.StatusCode.UNKNOWN)
    if reply.refresh_routing or code in TRANSIENT_CODES:
        raise ResendAfterRefresh()
    raise MemoryServiceError(code, f"{reply.message} (row stream {address})")
