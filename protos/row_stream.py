"""The row stream's framing (``RowStreamHello`` in the .proto): each frame is a little-endian uint32 byte count,
then one message; an answered lookup's rows follow its reply unframed. The shard and the MemoryClient speak it on
non-blocking sockets of an asyncio event loop (the rows go from the socket straight into their buffer);
``BlockingRowStream`` speaks it plainly.
"""
from __future__ import annotations

import asyncio
import socket
import struct

from protos import engram_memory_v1_pb2 as pb

FRAME_HEAD = struct.Struct("<I")
HELLO_LIMIT = 4096  # bytes a hello frame may hold
RECEIVE_PART = 1 << 20  # bytes a frame's message is received in at most, at a time


class FrameError(Exception):
    """A frame that breaks the framing (too large for its limit); the connection cannot go on."""


async def receive_into(sock: socket.socket, buffer: memoryview) -> None:
    """Fill ``buffer`` from ``sock``; ConnectionError when the peer closes first."""
    loop, filled = asyncio.get_running_loop(), 0
    while filled < len(buffer):
        count = await loop.sock_recv_into(sock, buffer[filled:])
        if not count:
            raise _closed_early(len(buffer) - filled)
        filled += count


async def receive_frame(sock: socket.socket, limit: int) -> bytes:
    """The next frame's message bytes; FrameError for a frame over ``limit`` bytes (none of it is read). The
    message grows as its bytes arrive: a frame that announces many and sends few holds only what it sent."""
    head = bytearray(FRAME_HEAD.size)
    await receive_into(sock, memoryview(head))
    (size,) = FRAME_HEAD.unpack(head)
    if size > limit:
        raise FrameError(f"a {size}-byte frame, over the {limit}-byte limit")
    loop, message = asyncio.get_running_loop(), bytearray()
    while len(message) < size:
        part = await loop.sock_recv(sock, min(size - len(message), RECEIVE_PART))
        if not part:
            raise _closed_early(size - len(message))
        message += part
    return bytes(message)


def _closed_early(missing: int) -> ConnectionResetError:
    return ConnectionResetError(f"the peer closed the row stream {missing} bytes early")


async def send(sock: socket.socket, message: bytes, rows: memoryview | None = None) -> None:
    """Send ``message`` as a frame, then ``rows`` (unframed) if given."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, FRAME_HEAD.pack(len(message)) + message)
    if rows is not None and len(rows):
        await loop.sock_sendall(sock, rows)


def tune(sock: socket.socket) -> socket.socket:
    """``sock`` non-blocking, with Nagle's delay off (a request is one small write the reply waits for)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class BlockingRowStream:
    """A row stream on a blocking socket: the protocol spelled out for clients in other languages, and what
    the tests and the fuzzer speak (frames by hand, hostile ones included). With ``token`` it says its hello
    and raises ConnectionRefusedError if that is refused."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 10.0):
        host, port = address.rsplit(":", 1)
        self.socket = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
        if token is not None:
            self.send(pb.RowStreamHello(token=token).SerializeToString())
            reply = self.reply()
            if reply.code:
                self.socket.close()
                raise ConnectionRefusedError(f"row stream {address}: {reply.code}: {reply.message}")

    def send(self, message: bytes) -> None:
        self.socket.sendall(FRAME_HEAD.pack(len(message)) + message)

    def receive(self, size: int) -> bytes:
        data = self.socket.recv(size, socket.MSG_WAITALL) if size else b""
        if len(data) != size:
            raise _closed_early(size - len(data))
        return data

    def reply(self) -> pb.RowStreamReply:
        (size,) = FRAME_HEAD.unpack(self.receive(FRAME_HEAD.size))
        return pb.RowStreamReply.FromString(self.receive(size))

    def lookup(self, request: bytes) -> tuple[pb.RowStreamReply, bytes]:
        """Send ``LookupRequest`` bytes; the reply and the rows' bytes that follow it."""
        self.send(request)
        reply = self.reply()
        return reply, self.receive(reply.row_bytes)

    def closed(self) -> bool:
        """Whether the shard closed the stream (a reset where it left bytes unread)."""
        try:
            return self.socket.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.socket.close()
