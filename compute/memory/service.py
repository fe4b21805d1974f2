"""A client on the memory service that a ``MemoryHandle`` names (the handle comes from ``memory_service.deploy``)."""
from __future__ import annotations

from compute.memory.client import MemoryClient
from memory_service.deploy import MemoryHandle


def open_client(handle: MemoryHandle, **options) -> MemoryClient:
    """A new client on ``handle``'s service; ``options`` go to ``MemoryClient``."""
    return MemoryClient(handle.directory, handle.token, tls=handle.tls, **options)
