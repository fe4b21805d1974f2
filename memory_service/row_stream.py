"""A shard's row stream: lookups over a plain TCP socket beside its gRPC server, the rows sent as raw bytes.

A client on another machine gets every row through the network; over gRPC a 4 MiB reply costs several times
what the socket does (``bench.transport``), in HTTP/2 framing and copies. The stream asks the same token, and
each lookup runs the servicer's own handler on the shard's event loop, so it is as atomic with respect to
updates as a gRPC lookup. Not offered with TLS (the rows then travel over gRPC).
"""
from __future__ import annotations

import asyncio
import logging
import socket

from google.protobuf.message import DecodeError

from memory_service.auth import AccessTokens
from memory_service.servicer import ShardServicer
from protos import engram_memory_v1_pb2 as pb
from protos.row_stream import HELLO_LIMIT, FrameError, receive_frame, send, tune

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0  # a connection that has not said its token by then is closed
MAX_CONNECTIONS = 256  # connections beyond these are closed at once
REFUSED_TOKEN = pb.RowStreamReply(code="UNAUTHENTICATED", message="row stream: wrong token in the hello, or one "
                                  "rotated out since").SerializeToString()


class RowStreamServer:
    """Serves ``servicer``'s lookups to connections that present one of ``tokens``."""

    def __init__(self, servicer: ShardServicer, tokens: AccessTokens):
        self._servicer = servicer
        self._tokens = tokens
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str) -> str:
        """Listen on ``host`` (any free port); return the stream's ``host:port``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        port = self._listener.getsockname()[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"

    async def stop(self) -> None:
        tasks = [task for task in (self._accepting, *self._connections) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, peer = await loop.sock_accept(self._listener)
            if len(self._connections) >= MAX_CONNECTIONS:
                log.warning("row stream: %d connections open; closing the one from %s", MAX_CONNECTIONS, peer)
                connection.close()
                continue
            task = loop.create_task(self._serve(tune(connection), peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, connection: socket.socket, peer) -> None:
        try:
            with connection:
                hello = pb.RowStreamHello.FromString(
                    await asyncio.wait_for(receive_frame(connection, HELLO_LIMIT), HELLO_TIMEOUT_S))
                if not await self._admitted(connection, hello.token):
                    return
                while True:
                    request = await receive_frame(connection, self._servicer.max_message_bytes)
                    if not await self._admitted(connection, hello.token, answer_ok=False):  # rotated out since
                        return
                    reply, rows = self._servicer.stream_lookup(request)
                    await send(connection, reply.SerializeToString(), rows)
        except (FrameError, DecodeError) as error:
            log.info("row stream from %s closed: %s", peer, error)
        except (OSError, asyncio.TimeoutError):
            pass  # the client went away (or never said its token)

    async def _admitted(self, connection: socket.socket, token: str, answer_ok: bool = True) -> bool:
        """Whether ``token`` is (still) accepted; a refusal is answered, an acceptance when ``answer_ok``."""
        if self._tokens.right_of(f"Bearer {token}") is None:
            await send(connection, REFUSED_TOKEN)
            return False
        if answer_ok:
            await send(connection, pb.RowStreamReply().SerializeToString())
        return True
