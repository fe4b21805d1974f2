"""A memory shard as a Ray actor: a ShardServicer behind a grpc.aio server on its node's address."""
from __future__ import annotations

import logging

import ray

from memory_service.auth import TlsFiles
from memory_service.metrics import RayMetricsExporter, ShardMetrics
from memory_service.server import DEFAULT_MAX_MESSAGE_BYTES, start_server
from memory_service.servicer import ShardServicer
from protos import engram_memory_v1_pb2 as pb

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ShardActor:
    """Owns one ShardServicer; the controller talks to it over gRPC, Ray only starts and stops it."""

    def __init__(self, shard_index: int, token: str, tls: TlsFiles | None = None, host: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        logging.basicConfig(level=logging.INFO)
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
