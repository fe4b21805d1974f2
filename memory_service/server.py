"""Assembles a grpc.aio server the way every memory-service endpoint needs it.

Token check with two rights, explicit message size limits, requests that fail to decode answered
INVALID_ARGUMENT, standard health checking (no token) and, when asked for, server reflection.
"""
from __future__ import annotations

import logging
from concurrent import futures
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memory_service.auth import AccessTokens, BearerTokenInterceptor, TlsFiles
from protos import engram_memory_v1_pb2 as pb
from protos.wire import DEFAULT_MAX_MESSAGE_BYTES, transport_options

log = logging.getLogger(__name__)


class UndecodableRequest:
    """Stands for a request whose bytes are not its message type; its handler answers INVALID_ARGUMENT."""

    def __init__(self, message_type: str, error: Exception):
        self.message = f"request: not a valid {message_type} ({type(error).__name__}: {error})"


def decoder(message_class) -> Callable[[bytes], object]:
    """Decodes ``message_class`` bytes; an UndecodableRequest where they are not one."""
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as error:  # also protobuf's recursion and UTF-8 checks
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, error)

    return decode


def _refusing_undecodable(method):
    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handle


def register_service(server: grpc.aio.Server, service: str, implementation,
                     response_serializers: dict[str, Callable] | None = None) -> None:
    """Serve every method of ``service`` (a name in the engram proto) by ``implementation``'s method of
    the same name; ``response_serializers`` replaces protobuf's for the methods it names."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    overrides = response_serializers or {}
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _refusing_undecodable(getattr(implementation, method.name)),
            request_deserializer=decoder(getattr(pb, method.input_type.name)),
            response_serializer=overrides.get(method.name, getattr(pb, method.output_type.name).SerializeToString))
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


async def start_server(
    register,
    service_names: list[str],
    *,
    tokens: AccessTokens,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsFiles | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    unix_socket: str | None = None,
    reflection_enabled: bool = False,
) -> tuple[grpc.aio.Server, str]:
    """Start a server whose services ``register(server)`` adds; return it and its ``host:port``.

    With ``unix_socket`` (a path) it also listens there, without TLS, for clients on the same machine.
    """
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(tokens)], options=transport_options(max_message_bytes))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = _bind(server, host, port, tls)
    if unix_socket:
        server.add_insecure_port(f"unix:{unix_socket}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    security = ("mutual TLS" if tls.client_ca_file else "TLS") if tls else "plaintext"
    log.info("serving %s on %s (%s)", ", ".join(service_names), address, security)
    return server, address


def start_liveness_server(host: str, tls: TlsFiles | None) -> tuple[grpc.Server, str]:
    """A standard health endpoint answered from threads of its own (no token), so that a server whose
    event loop is busy with a long request still answers while a stopped or dead process does not;
    return it and its ``host:port``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="liveness"))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    bound = _bind(server, host, 0, tls)
    server.start()
    return server, f"{host}:{bound}"


def _bind(server: grpc.Server | grpc.aio.Server, host: str, port: int, tls: TlsFiles | None) -> int:
    """Listen on ``host:port`` (0: any free port), with TLS when given; return the port bound."""
    target = f"{host}:{port}"
    return server.add_secure_port(target, tls.server_credentials()) if tls else server.add_insecure_port(target)
