"""Assembles a grpc.aio server the way every memory-service endpoint needs it.

Token check, explicit message size limits, standard health checking and server reflection.
"""
from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memory_service.auth import BearerTokenInterceptor, TlsFiles
from protos.wire import DEFAULT_MAX_MESSAGE_BYTES, transport_options

log = logging.getLogger(__name__)


async def start_server(
    register,
    service_names: list[str],
    *,
    token: str,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsFiles | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    unix_socket: str | None = None,
) -> tuple[grpc.aio.Server, str]:
    """Start a server whose services ``register(server)`` adds; return it and its ``host:port``.

    With ``unix_socket`` (a path) it also listens there, without TLS, for clients on the same machine.
    """
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(token)], options=transport_options(max_message_bytes)
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    target = f"{host}:{port}"
    bound = server.add_secure_port(target, tls.server_credentials()) if tls else server.add_insecure_port(target)
    if unix_socket:
        server.add_insecure_port(f"unix:{unix_socket}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    log.info("serving %s on %s (%s)", ", ".join(service_names), address, "TLS" if tls else "plaintext")
    return server, address
