"""Ray for every command: an embedded local cluster of its own, or a cluster joined at an address.

Without an address a command starts its own local Ray (``address="local"``) and never joins another
Ray instance that runs, or once ran, on the machine. With one (a head's ``HOST:PORT``; ``auto`` and
``ray://`` addresses go to Ray as they are) it joins that cluster, carrying Ray's auth token from where
Ray's own CLI reads it: ``--ray-token``, ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. A missing or wrong token, or no cluster at the
address, fails within seconds with one line that says how to fix it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_HELP = ("pass --ray-token, set RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token to this machine "
              "(`ray get-auth-token` on the head prints it)")
PROBE_TIMEOUT_S = 5.0
# Ray's own driver logs that say nothing a user acts on: token-mode notices, usage stats, "Started a local Ray".
_QUIET_LOGGERS = ("ray", "ray._private.authentication.authentication_token_setup", "ray._private.usage.usage_lib")


class RayConnectError(ValueError):
    """Ray could not be started or joined; the message is one line that says what to do."""


def connect(address: str | None, *, token: str | None = None, namespace: str | None = None,
            resources: dict[str, float] | None = None, worker_setup_hook: Callable[[], None] | None = None,
            log_to_driver: bool = False, verbose: bool = False) -> None:
    """Join the cluster at ``address`` (with Ray's token), or start an embedded one with ``resources``."""
    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    common = dict(namespace=namespace, log_to_driver=log_to_driver, logging_level=level)
    if address:
        if address != "auto" and not address.startswith("ray://"):  # Ray finds and checks those itself
            _use_token(address, token)
        try:
            ray.init(address=address, **common)
        except ConnectionError as exc:
            raise RayConnectError(f"could not join the Ray cluster at {address}: {exc}") from None
        return
    runtime_env = {"worker_process_setup_hook": worker_setup_hook} if worker_setup_hook else None
    ray.init(address="local", num_cpus=os.cpu_count(), resources=resources or {}, include_dashboard=False,
             runtime_env=runtime_env, **common)


def cluster_token(explicit: str | None = None) -> str | None:
    """The Ray auth token, looked up where Ray looks: explicit, $RAY_AUTH_TOKEN, its path, ~/.ray/auth_token."""
    if explicit:
        return explicit.strip()
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _use_token(address: str, explicit: str | None) -> None:
    """Turn Ray's token mode on for this process when a token is at hand, and check it against the head.

    Ray reads the token itself; an explicit address never switches its token mode on by itself, and a
    wrong token makes ``ray.init`` retry for some 20 s before a long traceback, so the head is asked first.
    """
    token = cluster_token(explicit)
    if explicit:
        os.environ[TOKEN_ENV] = token
    if token and AUTH_MODE_ENV not in os.environ:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # Ray's own switch: sets $RAY_AUTH_MODE and refreshes the config Ray cached at import
    if os.environ.get(AUTH_MODE_ENV, "").lower() != "token":
        token = None
    _probe_head(address, token)


def _probe_head(address: str, token: str | None) -> None:
    """Ask the head's GCS for its cluster id with ``token``: raise a one-line error if that fails."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # Ray's TLS settings apply to its own channels; ray.init reports problems itself
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                problem = "the token given is not this cluster's" if token else "the cluster requires a token"
                raise RayConnectError(f"Ray at {address} refused the connection: {problem}; {TOKEN_HELP}") from None
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RayConnectError(f"no Ray cluster answers at {address} ({exc.code().name.lower()}); "
                                      f"check the head's address (`ray status` on the head)") from None
            raise
