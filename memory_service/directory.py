"""The DirectoryService: how any client, inside Ray or not, finds the shards and the table specs."""
from __future__ import annotations

from typing import Callable

import grpc

from memory_service.server import register_service
from protos import engram_memory_v1_pb2 as pb


class DirectoryServicer:
    """Answers from the controller's current state, read through two callables."""

    def __init__(self, routing: Callable[[], pb.Routing], tables: Callable[[], list[pb.TableSpecInfo]]):
        self._routing = routing
        self._tables = tables

    def add_to_server(self, server: grpc.aio.Server) -> None:
        register_service(server, "DirectoryService", self)

    async def GetRouting(self, request: pb.GetRoutingRequest, context) -> pb.Routing:
        return self._routing()

    async def ListTables(self, request: pb.ListTablesRequest, context) -> pb.ListTablesResponse:
        return pb.ListTablesResponse(tables=self._tables())
