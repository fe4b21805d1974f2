"""A memory shard as a Ray actor: a ShardServicer behind a grpc.aio server on its node's address."""
from __future__ import annotations

import ctypes
import logging
import sys

import ray

from memory_service.auth import TlsFiles
from memory_service.metrics import RayMetricsExporter, ShardMetrics
from memory_service.server import DEFAULT_MAX_MESSAGE_BYTES, start_server
from memory_service.servicer import ShardServicer
from protos import engram_memory_v1_pb2 as pb

log = logging.getLogger(__name__)


# glibc mallopt parameters: serve large buffers from the heap and keep freed ones there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_large_buffers_mapped() -> None:
    """Stop glibc from unmapping each freed lookup buffer, which made every lookup page-fault its rows anew."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: batches up to 32 MiB reuse heap memory
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


@ray.remote(num_cpus=0)
class ShardActor:
    """Owns one ShardServicer; the controller talks to it over gRPC, Ray only starts and stops it."""

    def __init__(self, shard_index: int, token: str, tls: TlsFiles | None = None, host: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        logging.basicConfig(level=logging.INFO)
        keep_large_buffers_mapped()
        self._token, self._tls = token, tls
        self._host = host or ray.util.get_node_ip_address()
        self._servicer = ShardServicer(shard_index, ShardMetrics(RayMetricsExporter(shard_index)), max_message_bytes)
        self._servicer.node = ray.get_runtime_context().get_node_id()
        self._server = None

    async def start(self) -> dict[str, str]:
        """Start serving; return this shard's ``address`` and ``node``."""
        if self._server is None:
            self._server, self._servicer.address = await start_server(
                self._servicer.add_to_server,
                [pb.DESCRIPTOR.services_by_name["ShardService"].full_name],
                token=self._token, host=self._host, tls=self._tls,
                max_message_bytes=self._servicer.max_message_bytes)
        return {"address": self._servicer.address, "node": self._servicer.node}

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
