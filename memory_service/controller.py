"""The controller: a named, detached Ray actor holding table specs, slot->group routing and its epoch.

Shards come in replica groups: the ``replicas`` shards of a group hold the same slots; its primary
takes the updates and forwards them to the others (``memory_service.replication``). The controller
deploys tables onto the groups, moves slots between groups to scale while clients keep working
(freeze the slot's updates on the source, export, import on the target's shards, flip the routing,
release on the source), watches every shard's health and fails a dead one over (a replica promoted,
the missing copy re-made from a live one; a group with no copy left is re-made from the last
checkpoint), and checkpoints and restores all tables. It serves the DirectoryService over gRPC.

It survives its own death: its state is persisted (``controller_state``) after every change, Ray
restarts it, and it re-adopts its shards (named, detached actors that serve on meanwhile), serves
the directory again on the same address and finishes any failover its death cut short.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn

from memory_service import checkpoint, controller_state
from memory_service.auth import DEFAULT_GRACE_S, AccessTokens, TlsFiles, check_token
from memory_service.core.slots import SlotMap
from memory_service.core.table_spec import TableSpec
from memory_service.directory import DirectoryServicer
from memory_service.server import start_server
from memory_service.shard_actor import ShardActor
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import (CONTROLLER_NAME, DEFAULT_MAX_MESSAGE_BYTES, NAMESPACE, ClientTls, bearer_metadata, open_channel,
                         transport_options)

log = logging.getLogger(__name__)

SHARD_RESOURCE = "engram_memory"
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id
HEALTH_PERIOD_S = 0.5  # how often the controller checks every shard's health
HEALTH_TIMEOUT_S = 1.0  # one health check's deadline
DEAD_AFTER_MISSES = 2  # failed checks in a row that make a shard dead: a stopped shard is failed over in ~2.5 s
CONTROL_TIMEOUT_S = 120.0  # one control-plane call to a shard
QUICK_CALL_TIMEOUT_S = 5.0  # a call that moves no data (stats, an epoch, a stop); one missed is the watch's business
COPY_WAIT_S = 60.0  # how long a new replica's copy waits for a moment with no synchronous step pending
BARRIER_TIMEOUT_S = 30.0  # how long a checkpoint waits for pending synchronous steps to complete everywhere
BARRIER_POLL_S = 0.02
LEASE_MARGIN_S = 30.0  # a hold outlives the barrier's wait by this much, then ends by itself
RESTART_WAIT_S = 30.0  # how long callers wait for a restarting controller to answer
SHUTDOWN_WAIT_S = 15.0  # how long stop_controller waits for the controller to stop its shards itself
REBIND_WAIT_S = 10.0  # how long a restarted controller tries to bind its directory's address again
ADOPT_TIMEOUT_S = 5.0  # how long a restarted controller waits for each shard to answer
READ_RETRIES = 10  # read-only methods are asked again when the controller died or restarts meanwhile


@dataclasses.dataclass
class Shard:
    index: int
    address: str
    local_address: str  # unix:<path> for clients on the shard's machine; '' when there is none
    node: str
    hostname: str
    reserved_bytes: int  # Ray `memory` reserved for its rows and optimizer state
    actor_name: str  # its Ray name in the controller's namespace (shard_actor_name)
    actor: Any
    stub: pb_grpc.ShardServiceStub
    channel: grpc.aio.Channel
    liveness_address: str = ""  # its health endpoint, answered from a thread even while its event loop is busy
    row_stream_address: str = ""  # host:port answering lookups with raw rows (memory_service.row_stream); '' with TLS
    group: int = 0  # its replica group: the shards that hold the same slots
    primary: bool = True  # takes the group's updates and forwards them to the group's live replicas
    live: bool = True  # holds the group's state (a new replica: once its copy is made)

    def target(self) -> pb.ReplicaTarget:
        return pb.ReplicaTarget(index=self.index, address=self.address)


@dataclasses.dataclass
class ControllerOptions:
    """How shards are placed and secured, and where their files live."""

    data_token: str | None = None         # what clients present; None: generated
    admin_token: str | None = None        # what the controller presents; None: generated
    tls: TlsFiles | None = None
    tls_ca_file: str | None = None        # the CA that signed tls.cert_file; None: tls.client_ca_file, else the cert
    tls_client_cert_file: str | None = None  # under mutual TLS, the identity the controller and its jobs present;
    tls_client_key_file: str | None = None   # None: the servers' own certificate and key
    host: str | None = None               # bind address of every server; None: the node's IP
    shard_resource: str = SHARD_RESOURCE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    data_root: str | None = None          # checkpoints are read and written only under it; None: default_data_root()
                                          # of the controller's process (callers resolve it on their side)
    reflection: bool = False              # serve gRPC reflection (to token holders)
    step_timeout_s: float = 120.0         # a synchronous step pending longer than this is aborted (0: never)
    shard_threads: int = 0                # threads of each shard's optimizer and gathers (0: shard_actor.auto_threads)
    tier_dir: str | None = None           # where tiered tables' files go on each shard's node (a local SSD);
                                          # None: row_store.default_tier_dir() there

    def __post_init__(self):
        for token, name in ((self.data_token, "data token"), (self.admin_token, "admin token")):
            if token is not None:
                check_token(token, name)
        if self.data_token is not None and self.data_token == self.admin_token:
            raise ValueError("admin token: must differ from the data token")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls-client-cert/tls-client-key: give both or neither")
        if self.tls_client_cert_file and (self.tls is None or self.tls.client_ca_file is None):
            raise ValueError("tls-client-cert: a client identity needs mutual TLS (--tls-client-ca)")
        if self.step_timeout_s < 0:
            raise ValueError(f"step-timeout-s: must be >= 0 (0: never abort), got {self.step_timeout_s}")
        if self.shard_threads < 0:
            raise ValueError(f"shard-threads: must be >= 0 (0: a quarter of the node's cores), got {self.shard_threads}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "ControllerOptions":
        """The inverse of ``dataclasses.asdict``."""
        return cls(**{**fields, "tls": TlsFiles(**fields["tls"]) if fields["tls"] else None})

    def client_tls(self) -> ClientTls | None:
        """What the controller and the clients it informs use to reach the servers: the servers' CA and,
        under mutual TLS, the client identity (by default the servers' own certificate and key)."""
        if self.tls is None:
            return None
        ca_file = self.tls_ca_file or self.tls.client_ca_file or self.tls.cert_file
        if self.tls.client_ca_file is None:
            return ClientTls(ca_file)
        return ClientTls(ca_file, self.tls_client_cert_file or self.tls.cert_file,
                         self.tls_client_key_file or self.tls.key_file)


@ray.remote(num_cpus=0, max_restarts=-1)
class MemoryController:
    """Owns the shard actors and the routing; every mutation runs under one lock and is persisted.

    Ray restarts it whenever it dies; it then recovers from its persisted state (``_recover``).
    """

    async def __init__(self, options: ControllerOptions, name: str, namespace: str):
        logging.basicConfig(level=logging.INFO)
        self._name, self._namespace = name, namespace
        saved = controller_state.load(namespace, name)
        if saved is not None:
            options = ControllerOptions.from_dict(saved.options)
        self._options = options
        generated = AccessTokens.generate()
        self._tokens = (_saved_tokens(saved) if saved is not None else
                        AccessTokens(options.data_token or generated.data, options.admin_token or generated.admin))
        self._data_root = Path(options.data_root or checkpoint.default_data_root()).resolve()
        self._client_tls = options.client_tls()
        self._host = options.host or ray.util.get_node_ip_address()
        self._shards: list[Shard] = []
        self._tables: dict[str, tuple[TableSpec, SlotMap]] = {}  # slot maps own slots by replica group
        self._replicas = 1  # shards per group
        self._next_index = 0
        self._lost: dict[int, Shard] = {}  # groups with no copy left -> their last primary, until re-made
        self._last_checkpoint: str | None = None  # relative to the data root: what a lost group is re-made from
        self._failovers: list[dict[str, Any]] = []  # what the health watch did, for status
        self._misses: dict[int, int] = {}  # shard index -> failed health checks in a row
        self._liveness: dict[int, grpc.aio.Channel] = {}  # shard index -> a channel to its liveness endpoint
        self._epoch = 0
        self._lock = asyncio.Lock()
        self._directory_address = ""
        self._server = None
        self._watch: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        if saved is not None:
            await self._recover(saved)

    async def start(self) -> str:
        """Start the DirectoryService and the shards' health watch; return the directory's address."""
        address = await self._serve(self._host, 0)
        self._start_watch()
        return address

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_shards())

    async def _serve(self, host: str, port: int) -> str:
        """Serve the DirectoryService on ``host:port`` (0: any free port), then persist the address. A
        restarted controller binds its former address again, which its dead process may hold for a moment."""
        deadline = time.monotonic() + REBIND_WAIT_S
        while self._server is None:
            servicer = DirectoryServicer(self._routing, self._table_infos)
            try:
                self._server, self._directory_address = await start_server(
                    servicer.add_to_server, [pb.DESCRIPTOR.services_by_name["DirectoryService"].full_name],
                    tokens=self._tokens, host=host, port=port, tls=self._options.tls,
                    max_message_bytes=self._options.max_message_bytes, reflection_enabled=self._options.reflection)
            except RuntimeError as error:  # grpc: failed to bind
                if port == 0 or time.monotonic() > deadline:
                    raise RuntimeError(f"directory: cannot serve on {host}:{port} ({error})") from None
                await asyncio.sleep(0.2)
            else:
                self._persist()
        return self._directory_address

    # ---- surviving a restart ----------------------------------------------------------------

    def _persist(self) -> None:
        """Write this controller's state where its restarted self finds it (``controller_state``)."""
        replaced, grace_s = self._tokens.in_grace() or ([], 0.0)
        controller_state.save(self._namespace, self._name, controller_state.ControllerState(
            options=dataclasses.asdict(self._options), tokens=[self._tokens.data, self._tokens.admin],
            replaced_tokens=list(replaced), replaced_until=time.time() + grace_s if replaced else 0.0,
            directory=self._directory_address, epoch=self._epoch,
            tables=[{"spec": spec.to_dict(), "epoch": slot_map.epoch, "owners": slot_map.owners.tolist()}
                    for spec, slot_map in self._tables.values()],
            shards=[controller_state.shard_record(shard) for shard in self._shards],
            replicas=self._replicas, next_index=self._next_index,
            lost=[controller_state.shard_record(shard) for shard in self._lost.values()],
            last_checkpoint=self._last_checkpoint, failovers=self._failovers))

    async def _recover(self, saved: controller_state.ControllerState) -> None:
        """Take up where the previous process of this controller died: its tables, epoch and shards (adopted
        by name, each told the epoch again), the directory on the same address, which clients hold, the
        health watch, and the re-making of any copy a failover had not finished."""
        self._epoch = saved.epoch
        self._tables = {table["spec"]["name"]: (TableSpec.from_dict(table["spec"]),
                                                SlotMap(table["epoch"], table["owners"])) for table in saved.tables}
        self._replicas, self._next_index = saved.replicas, saved.next_index
        self._last_checkpoint, self._failovers = saved.last_checkpoint, saved.failovers
        host, port = saved.directory.rsplit(":", 1)
        await self._serve(host, int(port))
        self._shards = list(await asyncio.gather(*(self._adopt_shard(record) for record in saved.shards)))
        self._lost = {shard.group: shard for shard in
                      (self._shard_of(record, actor=None) for record in saved.lost)}
        self._persist()
        self._start_watch()
        unfinished = sorted({s.group for s in self._shards if not s.live} | set(self._lost)
                            | {g for g in range(self._num_groups()) if len(self._members(g)) < self._replicas})
        for group in unfinished:
            self._in_background(self._remake_copies(group, {"group": group, "at": time.time(), "resumed": True}))
        absent = [shard.index for shard in self._shards if shard.actor is None]
        log.info("controller %r recovered: epoch %d, tables %s, %d shards (not answering: %s), directory on %s; "
                 "re-making copies of groups %s", self._name, self._epoch, sorted(self._tables), len(self._shards),
                 absent or "none", self._directory_address, unfinished or "none")

    def _shard_of(self, record: dict[str, Any], actor: Any) -> Shard:
        """A Shard from its persisted record, with a new channel."""
        channel = self._open_channel(record["address"]) if record["address"] else None
        try:
            return Shard(**record, actor=actor, stub=pb_grpc.ShardServiceStub(channel) if channel else None,
                         channel=channel)
        except TypeError as error:
            raise controller_state.StateError(f"controller {self._name!r}: a shard record does not fit ({error})")

    async def _adopt_shard(self, record: dict[str, Any]) -> Shard:
        """The shard of a persisted record, with a new channel and its actor, if it answers (one that does not
        is left to the health watch to fail over). A primary's slots are thawed: a checkpoint or scale that
        the death cut short froze them, and no one else would thaw them."""
        shard = self._shard_of(record, actor=None)
        try:
            actor = ray.get_actor(shard.actor_name, namespace=self._namespace)
            await self._call(shard, "SetEpoch", pb.SetEpochRequest(epoch=self._epoch), timeout=ADOPT_TIMEOUT_S)
        except (ValueError, grpc.aio.AioRpcError) as error:
            log.error("shard %d (%s on %s) does not answer: %s", shard.index, shard.actor_name, shard.address,
                      error.details() if isinstance(error, grpc.aio.AioRpcError) else error)
            return shard
        shard.actor = actor
        if shard.primary:
            try:
                await asyncio.gather(*(self._call(shard, "FreezeSlots", pb.FreezeSlotsRequest(
                    table=spec.name, slots=slot_map.slots_of(shard.group).tolist(), frozen=False),
                    timeout=ADOPT_TIMEOUT_S) for spec, slot_map in self._tables.values()))
            except grpc.aio.AioRpcError as error:
                log.warning("shard %d: could not thaw its slots: %s", shard.index, error.details())
        return shard

    @ray.method(max_task_retries=READ_RETRIES)
    def pid(self) -> int:
        """This controller's process id (answers once a restarting controller is back)."""
        return os.getpid()

    @ray.method(max_task_retries=READ_RETRIES)
    def connection_info(self) -> dict[str, Any]:
        """What a data client inside the cluster needs: the directory address, the data token, its TLS settings."""
        return {"directory": self._directory_address, "token": self._tokens.data, "tls": self._client_tls,
                "data_root": str(self._data_root)}

    async def rotate_tokens(self, data: str, admin: str, grace_s: float = DEFAULT_GRACE_S) -> dict[str, Any]:
        """Replace the tokens on every server; the old ones keep working for ``grace_s`` seconds.
        Returns ``connection_info`` with the new data token."""
        AccessTokens(data, admin)  # refuse bad tokens before any server takes them
        async with self._lock:
            await asyncio.gather(*(s.actor.rotate_tokens.remote(data, admin, grace_s) for s in self._shards
                                   if s.actor is not None))
            self._tokens.rotate(data, admin, grace_s)
            self._persist()
        log.info("rotated the data and admin tokens on %d shards and the directory (grace %.0f s)",
                 len(self._shards), grace_s)
        return self.connection_info()

    # ---- state as protos --------------------------------------------------------------------

    def _routing(self) -> pb.Routing:
        """Each slot routed to its group's primary; a primary lists its live replicas; a lost group's slots go to
        its last primary, listed without an address (clients then fail fast, naming it)."""
        primary_of = {s.group: s.index for s in self._shards if s.primary}
        primary_of.update({group: shard.index for group, shard in self._lost.items()})
        by_group = np.full(max(primary_of, default=0) + 1, -1, dtype=np.int64)
        for group, index in primary_of.items():
            by_group[group] = index
        shards = [pb.ShardInfo(index=s.index, address=s.address, node=s.node, local_address=s.local_address,
                               hostname=s.hostname, replicas=[r.index for r in self._live_replicas(s)],
                               row_stream_address=s.row_stream_address)
                  for s in self._shards]
        shards += [pb.ShardInfo(index=s.index, node=s.node, hostname=s.hostname) for s in self._lost.values()]
        return pb.Routing(
            epoch=self._epoch, shards=shards,
            tables=[pb.TableRouting(name=spec.name, num_slots=spec.num_slots, rows=spec.rows, dim=spec.dim,
                                    owners=by_group[slot_map.owners].astype("<i4").tobytes())
                    for spec, slot_map in self._tables.values()])

    def _table_infos(self) -> list[pb.TableSpecInfo]:
        return [pb.TableSpecInfo(name=spec.name, rows=spec.rows, dim=spec.dim, num_slots=spec.num_slots,
                                 storage_dtype=spec.storage_dtype, spec_json=json.dumps(spec.to_dict()))
                for spec, _ in self._tables.values()]

    @ray.method(max_task_retries=READ_RETRIES)
    def routing(self) -> bytes:
        """The serialized Routing proto (what the DirectoryService answers)."""
        return self._routing().SerializeToString()

    @ray.method(max_task_retries=READ_RETRIES)
    def table_specs(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec, _ in self._tables.values()]

    # ---- shards -----------------------------------------------------------------------------

    async def _call(self, shard: Shard, method: str, request, timeout: float = CONTROL_TIMEOUT_S):
        return await getattr(shard.stub, method)(request, metadata=bearer_metadata(self._tokens.admin), timeout=timeout)

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        return open_channel(address, self._client_tls, transport_options(self._options.max_message_bytes))

    async def _start_shard(self, group: int, reserve_bytes: int, primary: bool) -> Shard:
        """A new shard of ``group``, on a node other than its group's shards' where the cluster has one."""
        index, self._next_index = self._next_index, self._next_index + 1
        others = [s.node for s in self._shards if s.group == group]
        spread = {"scheduling_strategy": NodeLabelSchedulingStrategy(hard={}, soft={NODE_ID_LABEL: NotIn(*others)})} \
            if others else {}
        # Named and detached: a shard outlives the controller's death (the restarted controller adopts it by
        # name) and stop_controller finds it by name. Never restarted: a restarted shard would have no rows.
        name = shard_actor_name(self._name, index)
        actor = ShardActor.options(
            name=name, namespace=self._namespace, lifetime="detached", max_restarts=0,
            resources={self._options.shard_resource: 1}, memory=max(reserve_bytes, 1 << 20), **spread,
        ).remote(index, (self._tokens.data, self._tokens.admin), str(self._data_root), self._options.tls,
                 self._options.host, self._options.max_message_bytes, self._options.reflection, self._client_tls,
                 self._options.step_timeout_s, self._options.shard_threads, self._options.tier_dir)
        info = await actor.start.remote()
        channel = self._open_channel(info["address"])
        log.info("shard %d (%s; group %d, %s) serving on %s (node %s)", index, name, group,
                 "primary" if primary else "replica", info["address"], info["node"][:12])
        return Shard(index=index, address=info["address"], local_address=info["local_address"], node=info["node"],
                     hostname=info["hostname"], reserved_bytes=info["reserved_bytes"], actor_name=name, actor=actor,
                     stub=pb_grpc.ShardServiceStub(channel), channel=channel,
                     liveness_address=info["liveness_address"], row_stream_address=info["row_stream_address"],
                     group=group, primary=primary)

    # ---- replica groups ---------------------------------------------------------------------

    def _num_groups(self) -> int:
        return max([s.group + 1 for s in self._shards] + [group + 1 for group in self._lost], default=0)

    def _members(self, group: int) -> list[Shard]:
        """The group's shards, its primary first."""
        return sorted((s for s in self._shards if s.group == group), key=lambda s: not s.primary)

    def _primary(self, group: int) -> Shard:
        primary = next((s for s in self._shards if s.group == group and s.primary), None)
        if primary is None:
            raise ValueError(f"shard group {group} has no live copy; it is being re-made from the last checkpoint")
        return primary

    def _primaries(self) -> list[Shard]:
        return [s for s in self._shards if s.primary]

    def _live_replicas(self, shard: Shard) -> list[Shard]:
        """A primary's replicas that hold its state (none for a replica)."""
        if not shard.primary:
            return []
        return [s for s in self._shards if s.group == shard.group and not s.primary and s.live]

    async def _set_roles(self, groups) -> None:
        """Tell each shard of ``groups`` its role: primaries whom to forward to, replicas to take only that."""
        calls = []
        for group in groups:
            for shard in self._members(group):
                replicas = [r.target() for r in self._live_replicas(shard)]
                calls.append(self._call(shard, "SetRole", pb.SetRoleRequest(
                    primary=shard.primary, replicas=replicas, epoch=self._epoch, copying=not shard.live)))
        await asyncio.gather(*calls)

    def _reserve_bytes(self, specs: list[TableSpec], num_groups: int) -> int:
        """Ray ``memory`` a shard reserves: the DRAM of its group's even share of every table's rows and optimizer
        state (of a tiered table, its cache and index)."""
        held = sum(spec.rows * spec.bytes_per_row() for spec in specs if spec.tier is None) // num_groups
        return held + sum(spec.dram_bytes(-(-spec.rows // num_groups)) for spec in specs if spec.tier is not None)

    async def _grow_to(self, num_groups: int, specs: list[TableSpec], *, add_empty_tables: bool) -> None:
        """Start groups of ``self._replicas`` shards up to ``num_groups``, each shard reserving its group's share
        of ``specs``' memory (so Ray places them only on memory nodes with room, and the autoscaler sizes
        those); with ``add_empty_tables``, the new shards get every table of ``specs`` with no slots yet
        (they fill as slots move in). Fresh copies are alike, so replicas start live."""
        reserve = self._reserve_bytes(specs, num_groups)
        groups = range(self._num_groups(), num_groups)
        for member in range(self._replicas):  # each copy placed away from its group's earlier ones
            new = await asyncio.gather(*(self._start_shard(group, reserve, primary=member == 0) for group in groups))
            if add_empty_tables:
                for shard in new:
                    await self._add_empty_tables(shard, specs)
            self._shards.extend(new)
        if self._replicas > 1:
            await self._set_roles(groups)
        self._persist()

    async def _add_empty_tables(self, shard: Shard, specs: list[TableSpec]) -> None:
        await asyncio.gather(*(self._call(shard, "AddTable", pb.AddTableRequest(
            spec_json=json.dumps(spec.to_dict()), slots=[], epoch=self._epoch)) for spec in specs))

    async def _shrink_to(self, num_groups: int) -> None:
        removed = [s for s in self._shards if s.group >= num_groups]
        self._shards = [s for s in self._shards if s.group < num_groups]
        self._lost = {group: shard for group, shard in self._lost.items() if group < num_groups}
        for shard in removed:
            await shard.channel.close()
            if shard.actor is None:  # lost before this controller's restart
                continue
            try:
                await asyncio.wait_for(shard.actor.stop.remote(), QUICK_CALL_TIMEOUT_S)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                log.warning("shard %d was dead or did not answer; killed", shard.index)
            ray.kill(shard.actor)
        self._persist()

    async def _broadcast_epoch(self) -> None:
        """Persist the new epoch and routing, then tell every shard (one that does not answer is the health
        watch's business; a restarted controller tells them again)."""
        self._persist()
        shards = list(self._shards)
        replies = await asyncio.gather(*(self._call(s, "SetEpoch", pb.SetEpochRequest(epoch=self._epoch),
                                                    timeout=QUICK_CALL_TIMEOUT_S) for s in shards),
                                       return_exceptions=True)
        for shard, reply in zip(shards, replies):
            if isinstance(reply, Exception):
                log.warning("shard %d missed epoch %d: %s", shard.index, self._epoch, reply)

    # ---- deploy / scale ---------------------------------------------------------------------

    async def deploy(self, spec_dicts: list[dict[str, Any]], num_shards: int, replicas: int = 1) -> str:
        """Create ``num_shards`` replica groups of ``replicas`` shards each (a primary and ``replicas - 1``
        copies) holding ``spec_dicts``' tables; return the directory address."""
        specs = [TableSpec.from_dict(d) for d in spec_dicts]
        if not specs:
            raise ValueError("tables: at least one table spec is required")
        if num_shards < 1 or any(num_shards > spec.num_slots for spec in specs):
            raise ValueError(f"num_shards: must be in [1, num_slots], got {num_shards}")
        if replicas < 1:
            raise ValueError(f"replicas: must be >= 1 (1: no copy), got {replicas}")
        async with self._lock:
            if self._tables:
                raise ValueError(f"tables: already deployed {sorted(self._tables)}; run down first")
            await self.start()
            self._epoch, self._replicas = 1, replicas
            await self._grow_to(num_shards, specs, add_empty_tables=False)
            for spec in specs:
                slot_map = SlotMap.even(spec.num_slots, num_shards)
                await asyncio.gather(*(self._call(s, "AddTable", pb.AddTableRequest(
                    spec_json=json.dumps(spec.to_dict()), slots=slot_map.slots_of(s.group).tolist(),
                    epoch=self._epoch)) for s in self._shards))
                self._tables[spec.name] = (spec, slot_map)
            self._persist()
            log.info("deployed %s on %d shard groups of %d", [s.name for s in specs], num_shards, replicas)
            return self._directory_address

    async def scale(self, num_shards: int) -> dict[str, int]:
        """Move slots so that ``num_shards`` replica groups hold every table; return moved slots per table."""
        specs = [spec for spec, _ in self._tables.values()]
        if num_shards < 1 or any(num_shards > spec.num_slots for spec in specs):
            raise ValueError(f"num_shards: must be in [1, num_slots], got {num_shards}")
        async with self._lock:
            self._check_whole("scale")
            await self._grow_to(num_shards, specs, add_empty_tables=True)
            moved = {}
            for spec, slot_map in list(self._tables.values()):
                new_map, moves = slot_map.rebalanced(num_shards)
                await self._move_slots(spec, moves)
                # The sources forget the moved slots before anyone is routed to the targets: a client with
                # the old routing is refused (and retries) rather than served the source's copy, which
                # misses the updates that the targets apply from here on.
                await self._release(spec, moves)
                self._epoch += 1
                self._tables[spec.name] = (spec, SlotMap(self._epoch, new_map.owners))
                await self._broadcast_epoch()  # the flip: from here clients are routed to the new owners
                moved[spec.name] = len(moves)
            await self._shrink_to(num_shards)
            log.info("scaled to %d shards at epoch %d, moved %s", num_shards, self._epoch, moved)
            return moved

    async def _move_slots(self, spec: TableSpec, moves: list[tuple[int, int, int]]) -> None:
        """Copy moved slots from their source group's primary to every shard of their target group; sources
        keep serving lookups but freeze updates."""
        by_pair: dict[tuple[int, int], list[int]] = {}
        for slot, source, target in moves:
            by_pair.setdefault((source, target), []).append(slot)
        per_batch = spec.slots_per_message(self._options.max_message_bytes)

        async def move(source: Shard, targets: list[Shard], slots: list[int]) -> None:
            for start in range(0, len(slots), per_batch):
                batch = slots[start:start + per_batch]
                await self._call(source, "FreezeSlots", pb.FreezeSlotsRequest(table=spec.name, slots=batch, frozen=True))
                # ABORTED while steps pending on the slots complete there (it exports them with their partial
                # sums after PENDING_STEP_WAIT_S)
                exported = await self._call_past_pending_steps(source, "ExportSlots", pb.ExportSlotsRequest(
                    table=spec.name, slots=batch))
                await asyncio.gather(*(self._call(target, "ImportSlots", pb.ImportSlotsRequest(
                    table=spec.name, arrays=exported.arrays)) for target in targets))

        await asyncio.gather(*(move(self._primary(s), self._members(t), slots) for (s, t), slots in by_pair.items()))

    async def _call_past_pending_steps(self, shard: Shard, method: str, request, wait_s: float | None = None):
        """``method``, asked again with backoff while the shard answers ABORTED (synchronous steps are pending
        there), for up to ``wait_s`` (None: until it answers otherwise)."""
        delay, deadline = 0.005, None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                return await self._call(shard, method, request)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.ABORTED or (deadline is not None and time.monotonic() > deadline):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _release(self, spec: TableSpec, moves: list[tuple[int, int, int]]) -> None:
        by_source: dict[int, list[int]] = {}
        for slot, source, _ in moves:
            by_source.setdefault(source, []).append(slot)
        await asyncio.gather(*(self._call(shard, "ReleaseSlots", pb.ReleaseSlotsRequest(table=spec.name, slots=slots))
                               for group, slots in by_source.items() for shard in self._members(group)))

    # ---- status / checkpoint / restore ------------------------------------------------------

    @ray.method(max_task_retries=READ_RETRIES)
    async def status(self) -> list[dict[str, Any]]:
        """One record per shard: index, replica group and role, node, address (and its row stream's), slots, rows
        (``unfilled_rows``: how many still wait for their initial values), bytes held and reserved, requests/s,
        p50/p99 lookup ms, its pending synchronous steps (table, step, world_size, reported ranks, age_s), how many
        steps it aborted and its tiered tables' DRAM caches (``TierStats``' fields by table); a shard that does not
        answer and a lost group's last primary have their ``state`` say so and zeros for the rest."""
        shards = list(self._shards)
        stats = await asyncio.gather(*(self._call(s, "Stats", pb.StatsRequest(), timeout=QUICK_CALL_TIMEOUT_S)
                                       for s in shards), return_exceptions=True)
        records = []
        for shard, st in [*zip(shards, stats), *((lost, None) for lost in self._lost.values())]:
            role = "lost" if st is None else "primary" if shard.primary else "replica" if shard.live else "copying"
            answered = isinstance(st, pb.StatsResponse)
            records.append({
                "shard": shard.index, "group": shard.group, "role": role, "node": shard.node,
                "address": shard.address, "row_stream_address": shard.row_stream_address,
                "state": "serving" if answered else role if st is None else "unreachable",
                "epoch": st.epoch if answered else self._epoch,
                "slots": sum(t.slots for t in st.tables) if answered else 0,
                "rows": sum(t.rows for t in st.tables) if answered else 0,
                "unfilled_rows": sum(t.unfilled_rows for t in st.tables) if answered else 0,
                "bytes": st.memory_bytes if answered else 0, "reserved_bytes": shard.reserved_bytes,
                "requests_per_s": st.requests_per_s if answered else 0.0,
                "p50_ms": st.p50_lookup_ms if answered else 0.0, "p99_ms": st.p99_lookup_ms if answered else 0.0,
                "pending_steps": [{"table": p.table, "step": p.step, "world_size": p.world_size,
                                   "reported_ranks": list(p.reported_ranks), "age_s": p.age_s}
                                  for p in st.pending_steps] if answered else [],
                "aborted_steps": st.aborted_steps if answered else 0,
                "tiers": {t.name: {field.name: getattr(t.tier, field.name) for field in pb.TierStats.DESCRIPTOR.fields}
                          for t in st.tables if t.HasField("tier")} if answered else {}})
        return records

    def failovers(self) -> list[dict[str, Any]]:
        """What the health watch did, oldest first: each dead shard, when, what replaced it and how long it took."""
        return list(self._failovers)

    @ray.method(max_task_retries=READ_RETRIES)
    async def checksums(self) -> dict[str, list[str]]:
        """Per table, each shard's checksum of its slots, in shard order (tests compare these around bad input,
        and a group's replicas with their primary)."""
        result = {}
        for name in self._tables:
            replies = await asyncio.gather(*(self._call(s, "Checksum", pb.ChecksumRequest(table=name))
                                             for s in self._shards))
            result[name] = [r.sha256 for r in replies]
        return result

    async def shard_pids(self) -> dict[int, dict[str, Any]]:
        """Each shard's process id, group and role, by shard index (what fault injection signals)."""
        shards = list(self._shards)
        pids = await asyncio.gather(*(s.actor.pid.remote() for s in shards))
        return {s.index: {"pid": pid, "group": s.group, "primary": s.primary} for s, pid in zip(shards, pids)}

    def _inside_root(self, directory: str) -> Path:
        """``directory`` (relative to the data root, or absolute) resolved inside the root; ValueError if not."""
        return checkpoint.inside_root(self._data_root, str(directory), "directory")

    async def checkpoint(self, directory: str, barrier_timeout_s: float = BARRIER_TIMEOUT_S) -> str:
        """Write every table under ``directory`` (inside the data root) at a step boundary of every shard;
        return the manifest path.

        New steps are held on every shard while the steps pending anywhere complete everywhere (bounded by
        ``barrier_timeout_s``: then TimeoutError naming them, nothing written); the shards write in
        parallel into a hidden folder that becomes ``directory`` only once complete."""
        path = self._inside_root(directory)
        async with self._lock:
            self._check_whole("checkpoint", copies=False)
            primaries = self._primaries()  # a group's replicas hold the same values
            staging = checkpoint.staging_folder(path)
            try:
                async with self._steps_held(primaries, barrier_timeout_s):
                    replies = await asyncio.gather(*(self._call(s, "Checkpoint", pb.CheckpointRequest(
                        directory=str(staging.relative_to(self._data_root)), require_step_barrier=True))
                        for s in primaries))
                files: dict[str, list[dict[str, Any]]] = {name: [] for name in self._tables}
                counters = {name: {"synchronous": -1, "ranks": {}} for name in self._tables}
                for shard, reply in zip(primaries, replies):
                    for f in reply.files:
                        files[f.table].append({"shard": shard.index, "path": f.path, "slots": list(f.slots)})
                    for table, steps in json.loads(reply.step_counters_json).items():
                        merged = counters[table]
                        merged["synchronous"] = max(merged["synchronous"], steps["synchronous"])
                        for rank, step in steps["ranks"].items():
                            merged["ranks"][rank] = max(merged["ranks"].get(rank, -1), step)
                checkpoint.write_manifest(staging, [spec for spec, _ in self._tables.values()], files, self._epoch,
                                          counters)
                checkpoint.publish(staging, path)
            except BaseException:
                checkpoint.discard(staging)
                raise
            self._last_checkpoint = str(path.relative_to(self._data_root))
            self._persist()
            log.info("checkpointed %d tables to %s", len(files), path)
            return str(path / checkpoint.MANIFEST)

    @contextlib.asynccontextmanager
    async def _steps_held(self, primaries: list[Shard], timeout_s: float):
        """Hold new steps on every primary until the synchronous steps pending anywhere completed (or were
        aborted) everywhere; release the hold on leaving. TimeoutError naming the steps still pending."""
        lease = pb.StepBarrierRequest(hold=True, lease_s=timeout_s + LEASE_MARGIN_S)
        try:
            replies = await asyncio.gather(*(self._call(s, "StepBarrier", lease) for s in primaries))
            steps = sorted({(p.table, p.step) for reply in replies for p in reply.pending})
            admit = pb.StepBarrierRequest(hold=True, lease_s=lease.lease_s,
                                          admit=[pb.StepBarrierStep(table=t, step=step) for t, step in steps])
            deadline = asyncio.get_running_loop().time() + timeout_s
            while True:
                replies = await asyncio.gather(*(self._call(s, "StepBarrier", admit) for s in primaries))
                waiting = self._steps_still_pending(steps, primaries, replies)
                if not waiting:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(
                        f"barrier_timeout_s: synchronous steps {waiting} (table, step) did not complete on every "
                        f"shard within {timeout_s} s (a rank that never pushes; the shards abort such steps after "
                        "their step timeout); nothing was written")
                await asyncio.sleep(BARRIER_POLL_S)
            yield
        finally:
            await asyncio.gather(*(self._call(s, "StepBarrier", pb.StepBarrierRequest(hold=False))
                                   for s in primaries), return_exceptions=True)

    def _steps_still_pending(self, steps: list[tuple[str, int]], primaries: list[Shard],
                             replies) -> list[tuple[str, int]]:
        """The admitted steps not yet done: pending on some group, or neither aborted anywhere nor
        released on every group owning slots of their table."""
        states: dict[tuple[str, int], dict[int, str]] = {step: {} for step in steps}
        for shard, reply in zip(primaries, replies):
            for admitted in reply.admitted:
                states[(admitted.table, admitted.step)][shard.group] = admitted.state
        waiting = []
        for (table, step), by_group in states.items():
            owners = set(self._tables[table][1].owners.tolist()) if table in self._tables else set()
            done = "pending" not in by_group.values() and (
                "aborted" in by_group.values() or all(by_group.get(owner) in ("released", "forgotten")
                                                      for owner in owners))
            if not done:
                waiting.append((table, step))
        return waiting

    async def restore(self, directory: str, num_shards: int | None = None, read_only: bool = False,
                      replicas: int | None = None) -> int:
        """Replace all tables by the checkpoint in ``directory`` on ``num_shards`` groups of ``replicas`` shards
        (default: as now; a running service keeps its copy count); return the epoch. ``read_only``: as
        serving tables (bfloat16 rows, no optimizer state, updates refused).

        Every shard first stages its part (every file read and checked, aside from the live tables); only
        when all have, the primaries swap it in, and their replicas in the same order. A failure before that
        leaves the live tables and routing as they were (RuntimeError saying so)."""
        path = self._inside_root(directory)
        entries = checkpoint.read_tables(path)
        if read_only:
            entries = [(dataclasses.replace(spec, storage_dtype="bfloat16"), files, steps)
                       for spec, files, steps in entries]
        num_shards = num_shards or self._num_groups() or max(len(files) for _, files, _ in entries)
        if replicas is not None and replicas < 1:
            raise ValueError(f"replicas: must be >= 1 (1: no copy), got {replicas}")
        relative = str(path.relative_to(self._data_root))
        async with self._lock:
            await self.start()
            if self._shards and replicas not in (None, self._replicas):
                raise ValueError(f"replicas: this service runs {self._replicas} copies of each shard; restore onto "
                                 "as many (a new service takes any count)")
            self._check_whole("restore", copies=False)
            self._replicas = replicas or self._replicas
            before = self._num_groups()
            slot_maps = {spec.name: SlotMap.even(spec.num_slots, num_shards) for spec, _, _ in entries}
            try:
                await self._grow_to(num_shards, [spec for spec, _, _ in entries], add_empty_tables=False)
                for spec, files, steps in entries:
                    await asyncio.gather(*(self._stage_restore(s, relative, spec, files, steps, slot_maps[spec.name])
                                           for s in self._shards if s.group < num_shards))
            except Exception as error:
                await asyncio.gather(*(self._call(s, "Restore", pb.RestoreRequest(phase=pb.RESTORE_DISCARD))
                                       for s in self._shards), return_exceptions=True)
                await self._shrink_to(before)  # the shards started for the restore go
                cause = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else error
                raise RuntimeError(f"restore of {path} failed, the live tables and routing are unchanged: "
                                   f"{cause}") from None
            epoch = self._epoch + 1
            commit = pb.RestoreRequest(phase=pb.RESTORE_COMMIT, epoch=epoch)
            await asyncio.gather(*(self._call(s, "Restore", commit) for s in self._primaries() if s.group < num_shards))
            self._epoch = epoch
            self._tables = {spec.name: (spec, SlotMap(epoch, slot_maps[spec.name].owners)) for spec, _, _ in entries}
            await self._shrink_to(num_shards)
            await self._broadcast_epoch()
            self._last_checkpoint = str(path.relative_to(self._data_root))
            self._persist()
            log.info("restored %d tables from %s onto %d shard groups", len(entries), path, num_shards)
            return self._epoch

    async def _stage_restore(self, shard: Shard, directory: str, spec: TableSpec, files, steps,
                             slot_map: SlotMap) -> None:
        mine = set(slot_map.slots_of(shard.group).tolist())
        paths = [f["path"] for f in files if mine.intersection(f["slots"])]
        await self._call(shard, "Restore", pb.RestoreRequest(
            phase=pb.RESTORE_STAGE, directory=directory, table=spec.name, paths=paths, slots=sorted(mine),
            spec_json=json.dumps(spec.to_dict()), step_counters_json=json.dumps(steps)))

    # ---- failure detection and failover ------------------------------------------------------

    def _check_whole(self, what: str, copies: bool = True) -> None:
        """ValueError while a group has no live copy or, with ``copies``, while a copy is being re-made (what
        waits for the end of a failover: scale; checkpoint and restore need only every group's primary)."""
        if self._lost or (copies and any(not s.live for s in self._shards)):
            raise ValueError(f"{what}: the service is recovering from a failed shard "
                             f"(see `engram memory status`); try again once every shard serves")

    async def _watch_shards(self) -> None:
        """Check every shard's health each HEALTH_PERIOD_S; fail over one that misses DEAD_AFTER_MISSES in a row."""
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            try:
                shards = list(self._shards)
                for index in set(self._liveness) - {s.index for s in shards}:  # shards gone since
                    await self._liveness.pop(index).close()
                answers = await asyncio.gather(*(self._answers(s) for s in shards))
                for shard, healthy in zip(shards, answers):
                    self._misses[shard.index] = 0 if healthy else self._misses.get(shard.index, 0) + 1
                    if self._misses[shard.index] >= DEAD_AFTER_MISSES:
                        await self._fail_over(shard)
            except Exception:  # the watch must outlive any one failure
                log.exception("shard health watch")

    async def _answers(self, shard: Shard) -> bool:
        """Whether ``shard``'s process answers its liveness endpoint (a thread of its own: a shard busy with a
        long request, such as initialising a large table, still answers; a killed or stopped one does not)."""
        if shard.index not in self._liveness:
            self._liveness[shard.index] = self._open_channel(shard.liveness_address)
        try:
            reply = await health_pb2_grpc.HealthStub(self._liveness[shard.index]).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def _fail_over(self, dead: Shard) -> None:
        """Fence ``dead`` (kill its actor), promote a live replica if it was a primary, route around it; then
        re-make the group's missing copies in the background."""
        detected = time.monotonic()
        async with self._lock:
            if dead not in self._shards:
                return
            self._shards.remove(dead)
            self._misses.pop(dead.index, None)
            if dead.actor is not None:
                ray.kill(dead.actor, no_restart=True)  # a stopped shard must never serve again once routed around
            await dead.channel.close()
            members = self._members(dead.group)
            promoted = None
            if dead.primary:
                live = [s for s in members if s.live]
                if live:
                    promoted = live[0]
                    promoted.primary = True
                    for other in members:
                        if other is not promoted:  # may hold more or fewer updates than the new primary:
                            other.primary, other.live = False, False  # no reads; _remake_copies copies it again
                else:
                    for other in members:  # copies still being made have nothing to copy from any more
                        self._shards.remove(other)
                        if other.actor is not None:
                            ray.kill(other.actor, no_restart=True)
                    self._lost[dead.group] = dead
            self._epoch += 1
            await self._set_roles([dead.group])
            await self._broadcast_epoch()
            event = {"shard": dead.index, "group": dead.group, "was": "primary" if dead.primary else "replica",
                     "at": time.time(), "promoted": promoted.index if promoted else None,
                     "routed_around_s": time.monotonic() - detected, "epoch": self._epoch}
            self._failovers.append(event)
            self._persist()
            log.warning("shard %d (group %d, %s) is dead: %s", dead.index, dead.group, event["was"],
                        f"shard {promoted.index} is the group's primary now" if promoted else
                        "the group has no copy left" if dead.group in self._lost else "its primary serves on")
        self._in_background(self._remake_copies(dead.group, event))

    async def _reset_copy(self, shard: Shard) -> None:
        """Empty ``shard``'s tables and make it a replica to be copied again."""
        shard.primary, shard.live = False, False
        await asyncio.gather(*(self._call(shard, "DropTable", pb.DropTableRequest(table=name))
                               for name in self._tables))
        await self._add_empty_tables(shard, [spec for spec, _ in self._tables.values()])

    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remake_copies(self, group: int, event: dict[str, Any]) -> None:
        """Give ``group`` back its ``replicas`` copies: new shards copied from its primary while it serves, or,
        with no copy left, its slots re-made from the last checkpoint."""
        try:
            async with self._lock:
                if group >= self._num_groups():
                    return  # scaled away meanwhile
                specs = [spec for spec, _ in self._tables.values()]
                reserve = self._reserve_bytes(specs, self._num_groups())
                if group in self._lost:
                    await self._remake_from_checkpoint(group, reserve)
                    event["remade_from"] = self._last_checkpoint or "initial values"
                for shard in self._members(group):
                    if not shard.live:  # a copy cut short (by the controller's death) starts over
                        await self._reset_copy(shard)
                for _ in range(self._replicas - len(self._members(group))):
                    shard = await self._start_shard(group, reserve, primary=False)
                    shard.live = False
                    await self._add_empty_tables(shard, specs)
                    self._shards.append(shard)
                await self._set_roles([group])
                for shard in self._members(group):
                    if not shard.live:
                        await self._copy_to(shard)
                        shard.live = True
                self._epoch += 1
                await self._set_roles([group])
                await self._broadcast_epoch()
                event["recovered_s"] = time.time() - event["at"]
                self._persist()
                log.info("shard group %d has its %d copies again after %.1f s", group, self._replicas,
                         event["recovered_s"])
        except Exception as error:
            event["error"] = f"{type(error).__name__}: {error}"
            log.exception("re-making the copies of shard group %d", group)

    async def _copy_to(self, replica: Shard) -> None:
        """Have the group's primary copy its state to ``replica`` and forward to it from then on; the copy
        waits for a moment with no synchronous step pending (partial sums are not copied)."""
        primary = self._primary(replica.group)
        reply = await self._call_past_pending_steps(primary, "AddReplica", pb.AddReplicaRequest(
            replica=replica.target()), wait_s=COPY_WAIT_S)
        log.info("shard %d copied %d rows to its new replica %d", primary.index, reply.copied_rows, replica.index)

    async def _remake_from_checkpoint(self, group: int, reserve: int) -> None:
        """A new primary for a group with no copy left, holding its slots as of the last checkpoint (or as
        initialised, with none). Clients are refused, naming the lost shard, until it serves."""
        shard = await self._start_shard(group, reserve, primary=True)
        saved = {spec.name: (files, steps) for spec, files, steps in
                 checkpoint.read_tables(self._inside_root(self._last_checkpoint))} if self._last_checkpoint else {}
        restored = [(spec, slot_map) for spec, slot_map in self._tables.values() if spec.name in saved]
        for spec, slot_map in restored:
            await self._stage_restore(shard, self._last_checkpoint, spec, *saved[spec.name], slot_map)
        if restored:
            await self._call(shard, "Restore", pb.RestoreRequest(phase=pb.RESTORE_COMMIT, epoch=self._epoch))
        for spec, slot_map in self._tables.values():
            if spec.name not in saved:
                await self._call(shard, "AddTable", pb.AddTableRequest(spec_json=json.dumps(spec.to_dict()),
                                                                       slots=slot_map.slots_of(group).tolist(),
                                                                       epoch=self._epoch))
        self._shards.append(shard)
        lost = self._lost.pop(group)
        log.warning("shard group %d (lost with shard %d) re-made on shard %d from %s: updates since are lost", group,
                    lost.index, shard.index, self._last_checkpoint or "the tables' initial values")

    async def shutdown(self) -> None:
        """Stop every shard and the directory; the caller then kills this actor."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        async with self._lock:
            await self._shrink_to(0)
            self._tables.clear()
            if self._server is not None:
                await self._server.stop(grace=1.0)
                self._server = None


def _saved_tokens(saved: controller_state.ControllerState) -> AccessTokens:
    """The tokens of a persisted state, the replaced ones accepted for the rest of their grace period."""
    grace_s = saved.replaced_until - time.time()
    if not saved.replaced_tokens or grace_s <= 0:
        return AccessTokens(*saved.tokens)
    tokens = AccessTokens(*saved.replaced_tokens)
    tokens.rotate(*saved.tokens, grace_s=grace_s)
    return tokens


def shard_actor_name(controller: str, index: int) -> str:
    """A new shard's Ray name: the controller's name, the index, and a suffix of its own (a name is
    released only once its actor is dead, and a restore or scale may start a shard of the same index sooner)."""
    return f"{controller}.shard-{index}.{uuid.uuid4().hex[:8]}"


def _is_shard_of(controller: str, actor_name: str) -> bool:
    return re.fullmatch(rf"{re.escape(controller)}\.shard-\d+\.[0-9a-f]{{8}}", actor_name) is not None


def start_controller(options: ControllerOptions | None = None, name: str = CONTROLLER_NAME,
                     namespace: str = NAMESPACE):
    """Create the named, detached controller (Ray must be initialised) and start its directory.

    Ray restarts it whenever it dies, from the state it persisted; a stopped controller's name is free again
    only once ``stop_controller`` has deleted that state."""
    if controller_state.exists(namespace, name) and not _exists(name, namespace):
        raise ValueError(f"memory controller {name!r} in namespace {namespace!r} is dead but left its state (and "
                         f"maybe shards); run `engram memory down --name {name}` first")
    controller = MemoryController.options(name=name, namespace=namespace, lifetime="detached").remote(
        options or ControllerOptions(), name, namespace)
    ray.get(controller.start.remote())
    return controller


def get_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE, wait_s: float = RESTART_WAIT_S):
    """The running controller, once it answers (a restarting one within ``wait_s``); ValueError naming it if
    there is none or it does not answer."""
    try:
        controller = ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ValueError(f"no memory controller named {name!r} in namespace {namespace!r}; run `engram memory up`") from None
    try:
        ray.get(controller.pid.remote(), timeout=wait_s)
    except (ray.exceptions.RayError, TimeoutError) as error:
        raise ValueError(f"memory controller {name!r} did not answer within {wait_s:.0f} s "
                         f"({type(error).__name__}); `engram memory down --name {name}` stops what is left") from None
    return controller


def stop_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE) -> None:
    """Stop the shards and kill the controller, whatever state they are in (the controller alive, restarting
    or dead), and delete its persisted state; ValueError if no controller of that name left anything."""
    shards = _shard_names(name, namespace)
    try:
        controller = ray.get_actor(name, namespace=namespace)
    except ValueError:
        if not shards and not controller_state.exists(namespace, name):
            raise ValueError(f"no memory controller named {name!r} in namespace {namespace!r}; "
                             "run `engram memory up`") from None
        controller = None
    if controller is not None:
        try:
            ray.get(controller.shutdown.remote(), timeout=SHUTDOWN_WAIT_S)
        except (ray.exceptions.RayError, TimeoutError) as error:
            log.warning("controller %r did not stop its shards (%s); killing them by name", name, error)
        ray.kill(controller, no_restart=True)
    _kill_named(_shard_names(name, namespace), namespace)
    _wait_gone([name, *shards], namespace)  # before the state goes: a controller in its restart may still write it
    controller_state.delete(namespace, name)


def _exists(actor_name: str, namespace: str) -> bool:
    try:
        ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return False
    return True


def _shard_names(controller: str, namespace: str) -> list[str]:
    """The Ray names of the live shard actors of ``controller``."""
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == namespace and _is_shard_of(controller, actor["name"])]


def _kill_named(names: list[str], namespace: str) -> None:
    """Kill the actors named ``names``, once their servers stopped (or did not within a few seconds)."""
    actors = []
    for actor_name in names:
        try:
            actors.append(ray.get_actor(actor_name, namespace=namespace))
        except ValueError:  # died meanwhile
            continue
    if actors:
        ray.wait([actor.stop.remote() for actor in actors], num_returns=len(actors), timeout=5.0)
    for actor in actors:
        ray.kill(actor)


def _wait_gone(names: list[str], namespace: str, timeout_s: float = 10.0) -> None:
    """Wait until Ray has released ``names`` (a killed actor's name is free once it is dead)."""
    deadline = time.monotonic() + timeout_s
    while any(_exists(actor_name, namespace) for actor_name in names) and time.monotonic() < deadline:
        time.sleep(0.1)
