"""Bearer tokens and TLS for the memory service's gRPC servers.

Every call must carry ``authorization: Bearer <token>`` metadata, except the standard health check
(``grpc.health.v1.Health``), which stays open so that load balancers and probes need no secret.
"""
from __future__ import annotations

import dataclasses
import hmac
import secrets
from pathlib import Path

import grpc

from protos.wire import AUTHORIZATION_KEY

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "ENGRAM_MEMORY_TOKEN"


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Operator-given PEM files: the server's certificate chain and private key."""

    cert_file: str
    key_file: str

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())])


def _refuse(message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call whose bearer token is missing or wrong."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("token: must be a non-empty string")
        self._expected = f"Bearer {token}".encode()
        self._missing = _refuse("missing 'authorization: Bearer <token>' metadata")
        self._wrong = _refuse("wrong bearer token in 'authorization' metadata")

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(HEALTH_SERVICE_PREFIX):
            return await continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTHORIZATION_KEY)
        if presented is None:
            return self._missing
        if not hmac.compare_digest(presented.encode(), self._expected):
            return self._wrong
        return await continuation(handler_call_details)
