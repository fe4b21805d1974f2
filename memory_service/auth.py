"""Who may call what: two bearer tokens (data and admin) and the servers' TLS settings.

Every call must carry ``authorization: Bearer <token>`` metadata, except the standard health check
(``grpc.health.v1.Health``), which stays open so that load balancers and probes need no secret.
The *data* token allows reading rows and pushing gradients (the methods in ``DATA_METHODS``); the
*admin* token allows those and everything else: tables, routing, epochs, slot moves and files.
Tokens are compared in constant time and can be replaced while serving (``AccessTokens.rotate``);
the replaced ones stay valid for a grace period so that running clients can switch over.
"""
from __future__ import annotations

import dataclasses
import hmac
import secrets
import threading
import time
from pathlib import Path

import grpc

from protos import engram_memory_v1_pb2 as pb
from protos.wire import AUTHORIZATION_KEY

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_SERVICE_PREFIX = "/grpc.reflection."
TOKEN_ENV = "ENGRAM_MEMORY_TOKEN"  # the data token: what trainers and servers of models hold
ADMIN_TOKEN_ENV = "ENGRAM_MEMORY_ADMIN_TOKEN"  # the admin token: what the controller and operators hold
DEFAULT_GRACE_S = 60.0

_SHARD = pb.DESCRIPTOR.services_by_name["ShardService"].full_name
_DIRECTORY = pb.DESCRIPTOR.services_by_name["DirectoryService"].full_name
# What the data token allows; any other method (present or future) needs the admin token.
DATA_METHODS = frozenset({f"/{_SHARD}/Lookup", f"/{_SHARD}/LookupState", f"/{_SHARD}/MapRows", f"/{_SHARD}/Update",
                          f"/{_SHARD}/Stats", f"/{_SHARD}/Checksum", f"/{_SHARD}/AbortStep",
                          f"/{_DIRECTORY}/GetRouting", f"/{_DIRECTORY}/ListTables"})


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def check_token(token: str, name: str) -> str:
    """``token`` if it is usable as a bearer token; ValueError naming ``name`` otherwise."""
    if not isinstance(token, str) or len(token) < 16 or not token.isascii() or not token.isprintable():
        raise ValueError(f"{name}: must be at least 16 printable ASCII characters")
    return token


class AccessTokens:
    """The data and admin tokens a server accepts; thread-safe, replaceable while serving."""

    def __init__(self, data: str, admin: str):
        if hmac.compare_digest(check_token(data, "data token"), check_token(admin, "admin token")):
            raise ValueError("admin token: must differ from the data token")
        self._lock = threading.Lock()
        self._current = (data, admin)
        self._previous: tuple[str, str] | None = None
        self._previous_until = 0.0

    @classmethod
    def generate(cls) -> "AccessTokens":
        return cls(new_token(), new_token())

    @property
    def data(self) -> str:
        return self._current[0]

    @property
    def admin(self) -> str:
        return self._current[1]

    def rotate(self, data: str, admin: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Accept ``data``/``admin`` from now on; the tokens they replace for ``grace_s`` more seconds."""
        replacement = AccessTokens(data, admin)  # the same checks as at start
        with self._lock:
            self._previous, self._previous_until = self._current, time.monotonic() + grace_s
            self._current = replacement._current

    def in_grace(self) -> tuple[tuple[str, str], float] | None:
        """The replaced (data, admin) tokens still accepted and for how many more seconds; None if none are."""
        with self._lock:
            left = self._previous_until - time.monotonic()
            return (self._previous, left) if self._previous is not None and left > 0 else None

    def right_of(self, presented: str) -> str | None:
        """``'admin'``, ``'data'`` or None for a presented ``Bearer <token>`` value.

        Every accepted token is compared, each in constant time, so the answer's timing tells nothing.
        """
        with self._lock:
            sets = [self._current]
            if self._previous is not None and time.monotonic() < self._previous_until:
                sets.append(self._previous)
        value = presented.encode()
        admin = data = False
        for data_token, admin_token in sets:
            admin |= hmac.compare_digest(value, f"Bearer {admin_token}".encode())
            data |= hmac.compare_digest(value, f"Bearer {data_token}".encode())
        return "admin" if admin else "data" if data else None


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Operator-given PEM files of the servers: certificate chain and key; with ``client_ca_file``,
    mutual TLS: every client must present a certificate signed by that CA."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())]
        if self.client_ca_file is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(pair, root_certificates=Path(self.client_ca_file).read_bytes(),
                                           require_client_auth=True)


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid token (UNAUTHENTICATED) and data-token calls to admin methods
    (PERMISSION_DENIED). Health is open; reflection, when served, needs a token."""

    def __init__(self, tokens: AccessTokens):
        self._tokens = tokens
        self._missing = _refuse(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        self._wrong = _refuse(grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token in 'authorization' metadata")
        self._not_admin = _refuse(grpc.StatusCode.PERMISSION_DENIED,
                                  "this method needs the admin token; the data token allows only lookups, "
                                  "updates, stats, checksums and routing")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_SERVICE_PREFIX):
            return await continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTHORIZATION_KEY)
        if presented is None:
            return self._missing
        right = self._tokens.right_of(presented)
        if right is None:
            return self._wrong
        if right == "data" and method not in DATA_METHODS and not method.startswith(REFLECTION_SERVICE_PREFIX):
            return self._not_admin
        return await continuation(handler_call_details)
