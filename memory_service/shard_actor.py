"""A memory shard as a Ray actor: a ShardServicer behind a grpc.aio server on its node's address.

Without TLS the server also listens on a Unix socket in a private temporary directory: clients on
the same machine skip the TCP stack (same bytes, same token check); and a row stream
(``memory_service.row_stream``) answers other machines' lookups with raw rows.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import ray
import torch

from memory_service.auth import AccessTokens, TlsFiles
from memory_service.core.leftovers import pid_tagged, remove_leftovers
from memory_service.metrics import RayMetricsExporter, ShardMetrics
from memory_service.replication import Replicas
from memory_service.row_stream import RowStreamServer
from memory_service.server import start_liveness_server, start_server
from memory_service.servicer import ShardServicer
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import (DEFAULT_MAX_MESSAGE_BYTES, SHARED_SEGMENT_DIR, SHARED_TABLE_PREFIX, ClientTls, bearer_metadata,
                         open_channel, transport_options)

log = logging.getLogger(__name__)


SOCKET_DIR_PREFIX = "engram-shard-"  # a shard's folder for its Unix socket, in the temporary folder
SWEEP_INTERVAL_S = 1.0  # how often a shard looks for synchronous steps pending past the step timeout

# glibc mallopt parameters: serve large buffers from the heap and keep freed ones there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def auto_threads() -> int:
    """A shard's default thread count: a quarter of the cores it may run on (the rest serve gRPC, other shards
    and any training process on the node), 1 to 8. An H100 host's 16 cores give each shard 4."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 4))


def keep_large_buffers_mapped() -> None:
    """Stop glibc from unmapping each freed lookup buffer, which made every lookup page-fault its rows anew."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: batches up to 32 MiB reuse heap memory
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


@ray.remote(num_cpus=0)
class ShardActor:
    """Owns one ShardServicer; the controller talks to it over gRPC, Ray only starts and stops it."""

    def __init__(self, shard_index: int, tokens: tuple[str, str], data_root: str, tls: TlsFiles | None = None,
                 host: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 reflection: bool = False, peer_tls: ClientTls | None = None,
                 step_timeout_s: float = 0.0, threads: int = 0, tier_dir: str | None = None):
        logging.basicConfig(level=logging.INFO)
        keep_large_buffers_mapped()
        # Ray starts a zero-CPU actor with OMP_NUM_THREADS=1; the optimizer's element-wise passes over a step's
        # rows and the gathers are what a shard spends its time on, and they scale with threads.
        torch.set_num_threads(threads or auto_threads())
        self._tokens, self._tls, self._reflection = AccessTokens(*tokens), tls, reflection
        self._host = host or ray.util.get_node_ip_address()
        self._peer_tls, self._peer_stubs = peer_tls, {}
        replicas = Replicas(self._peer_stub, lambda: bearer_metadata(self._tokens.admin), max_message_bytes // 2)
        self._servicer = ShardServicer(shard_index, ShardMetrics(RayMetricsExporter(shard_index)), max_message_bytes,
                                       Path(data_root), replicas, Path(tier_dir) if tier_dir else None)
        self._servicer.node = ray.get_runtime_context().get_node_id()
        self._servicer.step_timeout_s = step_timeout_s
        self._server = self._liveness = self._row_stream = None
        self._row_stream_address = ""
        self._sweep: asyncio.Task | None = None
        self._socket_dir = None
        # A killed shard's shared rows, and its socket folder, stay behind until the next shard on this machine starts.
        remove_leftovers(SHARED_SEGMENT_DIR, SHARED_TABLE_PREFIX)
        if not tls:
            remove_leftovers(tempfile.gettempdir(), SOCKET_DIR_PREFIX)
            self._socket_dir = tempfile.mkdtemp(prefix=pid_tagged(SOCKET_DIR_PREFIX))  # mode 0700

    async def start(self) -> dict[str, str]:
        """Start serving; return this shard's ``address``, ``local_address`` and ``row_stream_address`` ('' with
        TLS), ``liveness_address`` (its health, answered even while a long request holds the event loop), ``node``,
        ``hostname`` and the Ray ``memory`` it reserved (``reserved_bytes``)."""
        local_socket = f"{self._socket_dir}/shard-{self._servicer.shard_index}.sock" if self._socket_dir else None
        if self._server is None:
            self._server, self._servicer.address = await start_server(
                self._servicer.add_to_server,
                [pb.DESCRIPTOR.services_by_name["ShardService"].full_name],
                tokens=self._tokens, host=self._host, tls=self._tls, max_message_bytes=self._servicer.max_message_bytes,
                unix_socket=local_socket, reflection_enabled=self._reflection)
            self._liveness, self._liveness_address = start_liveness_server(self._host, self._tls)
            if not self._tls:
                self._row_stream = RowStreamServer(self._servicer, self._tokens)
                self._row_stream_address = await self._row_stream.start(self._host)
            self._sweep = asyncio.get_running_loop().create_task(self._abort_expired_steps())
        return {"address": self._servicer.address, "local_address": f"unix:{local_socket}" if local_socket else "",
                "liveness_address": self._liveness_address, "row_stream_address": self._row_stream_address,
                "node": self._servicer.node, "hostname": socket.gethostname(),
                "reserved_bytes": int(ray.get_runtime_context().get_assigned_resources().get("memory", 0))}

    def _peer_stub(self, address: str) -> pb_grpc.ShardServiceStub:
        """A stub on another shard (this shard's replicas), one channel per address."""
        if address not in self._peer_stubs:
            channel = open_channel(address, self._peer_tls, transport_options(self._servicer.max_message_bytes))
            self._peer_stubs[address] = pb_grpc.ShardServiceStub(channel)
        return self._peer_stubs[address]

    def pid(self) -> int:
        """This shard's process id (the fault-injection tests signal it)."""
        return os.getpid()

    def rotate_tokens(self, data: str, admin: str, grace_s: float) -> None:
        """Accept new tokens from now on, the current ones for ``grace_s`` more seconds."""
        self._tokens.rotate(data, admin, grace_s)

    async def _abort_expired_steps(self) -> None:
        """Every ``SWEEP_INTERVAL_S``: abort the synchronous steps pending for longer than the step timeout."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self._servicer.abort_expired_steps()
            except Exception:  # a bug: log it, keep sweeping
                log.exception("aborting expired steps failed")

    async def stop(self) -> None:
        if self._servicer.replicas is not None:
            self._servicer.replicas.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        if self._liveness is not None:
            self._liveness.stop(grace=None)
            self._liveness = None
        if self._row_stream is not None:
            await self._row_stream.stop()
            self._row_stream = None
        self._servicer.drop_all_tables()  # tiered tables' files go now: a stopped shard is killed next
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
