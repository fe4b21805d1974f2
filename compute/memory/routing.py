"""Where a client's calls go: the deployment's routing (slot -> primary shard per table, each primary's
live replicas, shard addresses, which shards share this machine) as the directory last gave it, and
finding the directory from inside Ray.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys

import numpy as np

from memory_service.core.slots import split_by_shard
from protos import engram_memory_v1_pb2 as pb
from protos.wire import CONTROLLER_NAME, NAMESPACE


@dataclasses.dataclass(frozen=True)
class TableRoute:
    num_slots: int
    dim: int
    rows: int
    owners: np.ndarray  # int16 [num_slots]: small integers sort by radix, several times faster

    def split(self, row_ids: np.ndarray, positions: np.ndarray) -> dict[int, np.ndarray]:
        """``positions`` (into ``row_ids``) grouped by owning shard, in their order within a shard."""
        return {shard: positions[where] for shard, where in split_by_shard(row_ids[positions], self.owners).items()}

    def all_shards(self) -> list[int]:
        """Every shard owning a slot of the table."""
        return np.unique(self.owners).tolist()


@dataclasses.dataclass(frozen=True)
class Routing:
    """One epoch's routing: tables by name, each shard's address (its Unix socket if co-located), and the row
    streams of shards on other machines."""

    epoch: int = 0
    tables: dict[str, TableRoute] = dataclasses.field(default_factory=dict)
    addresses: dict[int, str] = dataclasses.field(default_factory=dict)  # '' for a lost shard
    co_located: frozenset[int] = frozenset()  # reached by Unix socket, rows through shared memory
    replicas: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # primary -> its live replicas
    row_streams: dict[int, str] = dataclasses.field(default_factory=dict)  # the others' row streams, where offered

    def copies(self, shard: int) -> tuple[int, ...]:
        """The shards holding ``shard``'s rows: itself, then its live replicas."""
        return (shard, *self.replicas.get(shard, ()))

    def lost(self, shard: int) -> bool:
        """Whether ``shard`` died with no copy left (its slots are being re-made); not one that a scale-down
        retired, which the routing no longer lists."""
        return self.addresses.get(shard) == ""

    @classmethod
    def from_reply(cls, reply: pb.Routing, local_transport: bool) -> "Routing":
        """The routing of a ``GetRouting`` reply; with ``local_transport``, shards on this machine
        whose socket is here count as co-located."""
        node = this_node()
        co_located = frozenset(s.index for s in reply.shards if local_transport and _on_this_machine(s, node))
        return cls(epoch=reply.epoch,
                   tables={t.name: TableRoute(t.num_slots, t.dim, t.rows,
                                              np.frombuffer(t.owners, dtype="<i4").astype(np.int16))
                           for t in reply.tables},
                   addresses={s.index: s.local_address if s.index in co_located else s.address for s in reply.shards},
                   co_located=co_located,
                   replicas={s.index: tuple(s.replicas) for s in reply.shards if s.replicas},
                   row_streams={s.index: s.row_stream_address for s in reply.shards
                                if s.row_stream_address and s.index not in co_located})


def this_node() -> str:
    """This process's Ray node id when it runs inside Ray, else ''."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def _on_this_machine(shard: pb.ShardInfo, node: str) -> bool:
    """Whether ``shard`` runs on this machine (same Ray node, else same hostname) with its socket here."""
    if not shard.local_address:
        return False
    same_machine = shard.node == node if node else shard.hostname == socket.gethostname()
    return same_machine and os.path.exists(shard.local_address.removeprefix("unix:"))


def connection_info_from_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE) -> dict:
    """Inside a Ray cluster: the controller actor's ``directory``, data ``token`` and ``tls`` (a ClientTls or None)."""
    import ray

    return ray.get(ray.get_actor(name, namespace=namespace).connection_info.remote())
