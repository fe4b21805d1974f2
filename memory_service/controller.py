"""The controller: a named, detached Ray actor holding table specs, slot->shard routing and its epoch.

It deploys tables onto shard actors, moves slots to scale while clients keep working (freeze the
slot's updates on the source, export, import on the target, flip the routing, release on the
source), and checkpoints and restores all tables. It serves the DirectoryService over gRPC.

It survives its own death: its state is persisted (``controller_state``) after every change, Ray
restarts it, and it re-adopts its shards (named, detached actors that serve on meanwhile) and serves
the directory again on the same address.
"""
from __future__ import annotations

import asyncio
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
import ray

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
    lost: bool = False  # found dead or not answering when the controller restarted; left for failover


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
        self._tables: dict[str, tuple[TableSpec, SlotMap]] = {}
        self._epoch = 0
        self._lock = asyncio.Lock()
        self._directory_address = ""
        self._server = None
        if saved is not None:
            await self._recover(saved)

    async def start(self) -> str:
        """Start the DirectoryService; return its address."""
        return await self._serve(self._host, 0)

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
            shards=[controller_state.shard_record(shard) for shard in self._shards]))

    async def _recover(self, saved: controller_state.ControllerState) -> None:
        """Take up where the previous process of this controller died: its tables, epoch and shards (adopted
        by name, each told the epoch again), and the directory on the same address, which clients hold."""
        self._epoch = saved.epoch
        self._tables = {table["spec"]["name"]: (TableSpec.from_dict(table["spec"]),
                                                SlotMap(table["epoch"], table["owners"])) for table in saved.tables}
        host, port = saved.directory.rsplit(":", 1)
        await self._serve(host, int(port))
        self._shards = list(await asyncio.gather(*(self._adopt_shard(record) for record in saved.shards)))
        self._persist()
        lost = [shard.index for shard in self._shards if shard.lost]
        log.info("controller %r recovered: epoch %d, tables %s, %d shards (lost: %s), directory on %s", self._name,
                 self._epoch, sorted(self._tables), len(self._shards), lost or "none", self._directory_address)

    async def _adopt_shard(self, record: dict[str, Any]) -> Shard:
        """The shard of a persisted record, with a new channel; flagged ``lost`` if it does not answer. Its slots
        are thawed: a checkpoint or scale that the death cut short froze them, and no one else would thaw them."""
        channel = self._open_channel(record["address"])
        try:
            shard = Shard(**record, actor=None, stub=pb_grpc.ShardServiceStub(channel), channel=channel)
        except TypeError as error:
            raise controller_state.StateError(f"controller {self._name!r}: a shard record does not fit ({error})")
        if shard.lost:
            return shard
        try:
            shard.actor = ray.get_actor(shard.actor_name, namespace=self._namespace)
            await self._call(shard, "SetEpoch", pb.SetEpochRequest(epoch=self._epoch), timeout=ADOPT_TIMEOUT_S)
        except (ValueError, grpc.aio.AioRpcError) as error:
            shard.lost = True
            log.error("shard %d (%s on %s) is lost: %s", shard.index, shard.actor_name, shard.address,
                      error.details() if isinstance(error, grpc.aio.AioRpcError) else error)
            return shard
        try:
            await asyncio.gather(*(self._call(shard, "FreezeSlots", pb.FreezeSlotsRequest(
                table=spec.name, slots=slot_map.slots_of(shard.index).tolist(), frozen=False), timeout=ADOPT_TIMEOUT_S)
                for spec, slot_map in self._tables.values()))
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
                                   if not s.lost))
            self._tokens.rotate(data, admin, grace_s)
            self._persist()
        log.info("rotated the data and admin tokens on %d shards and the directory (grace %.0f s)",
                 len(self._shards), grace_s)
        return self.connection_info()

    # ---- state as protos --------------------------------------------------------------------

    def _routing(self) -> pb.Routing:
        return pb.Routing(
            epoch=self._epoch,
            shards=[pb.ShardInfo(index=s.index, address=s.address, node=s.node, local_address=s.local_address,
                                 hostname=s.hostname) for s in self._shards],
            tables=[pb.TableRouting(name=spec.name, num_slots=spec.num_slots, rows=spec.rows, dim=spec.dim,
                                    owners=slot_map.owners.astype("<i4").tobytes())
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

    async def _call(self, shard: Shard, method: str, request, timeout: float | None = None):
        return await getattr(shard.stub, method)(request, metadata=bearer_metadata(self._tokens.admin), timeout=timeout)

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        return open_channel(address, self._client_tls, transport_options(self._options.max_message_bytes))

    async def _start_shard(self, index: int, reserve_bytes: int) -> Shard:
        # Named and detached: a shard outlives the controller's death (the restarted controller adopts it by
        # name) and stop_controller finds it by name. Never restarted: a restarted shard would have no rows.
        name = shard_actor_name(self._name, index)
        actor = ShardActor.options(
            name=name, namespace=self._namespace, lifetime="detached", max_restarts=0,
            resources={self._options.shard_resource: 1}, memory=max(reserve_bytes, 1 << 20),
        ).remote(index, (self._tokens.data, self._tokens.admin), str(self._data_root), self._options.tls,
                 self._options.host, self._options.max_message_bytes, self._options.reflection)
        info = await actor.start.remote()
        channel = self._open_channel(info["address"])
        log.info("shard %d (%s) serving on %s (node %s)", index, name, info["address"], info["node"][:12])
        return Shard(index=index, address=info["address"], local_address=info["local_address"], node=info["node"],
                     hostname=info["hostname"], reserved_bytes=info["reserved_bytes"], actor_name=name, actor=actor,
                     stub=pb_grpc.ShardServiceStub(channel), channel=channel)

    def _reserve_bytes(self, specs: list[TableSpec], num_shards: int) -> int:
        """Ray ``memory`` a shard reserves: its even share of every table's rows and optimizer state."""
        return sum(spec.rows * spec.bytes_per_row() for spec in specs) // num_shards

    async def _grow_to(self, num_shards: int, specs: list[TableSpec], *, add_empty_tables: bool) -> None:
        """Start shards up to ``num_shards``, each reserving its share of ``specs``' memory (so Ray places
        them only on memory nodes with room, and the autoscaler sizes those); with ``add_empty_tables``,
        the new shards get every table of ``specs`` with no slots yet (they fill as slots move in)."""
        reserve = self._reserve_bytes(specs, num_shards)
        new = await asyncio.gather(*(self._start_shard(i, reserve) for i in range(len(self._shards), num_shards)))
        if add_empty_tables:
            for shard in new:
                await asyncio.gather(*(self._call(shard, "AddTable", pb.AddTableRequest(
                    spec_json=json.dumps(spec.to_dict()), slots=[], epoch=self._epoch)) for spec in specs))
        self._shards.extend(new)
        self._persist()

    async def _shrink_to(self, num_shards: int) -> None:
        removed, self._shards = self._shards[num_shards:], self._shards[:num_shards]
        for shard in removed:
            await shard.channel.close()
            if shard.actor is None:  # lost before this controller's restart
                continue
            try:
                await shard.actor.stop.remote()
            except ray.exceptions.RayActorError:
                log.warning("shard %d was already dead", shard.index)
            ray.kill(shard.actor)
        self._persist()

    async def _broadcast_epoch(self) -> None:
        """Persist the new epoch and routing, then tell the shards (a restarted controller tells them again)."""
        self._persist()
        await asyncio.gather(*(self._call(s, "SetEpoch", pb.SetEpochRequest(epoch=self._epoch)) for s in self._shards))

    # ---- deploy / scale ---------------------------------------------------------------------

    async def deploy(self, spec_dicts: list[dict[str, Any]], num_shards: int) -> str:
        """Create ``num_shards`` shards holding ``spec_dicts``' tables; return the directory address."""
        specs = [TableSpec.from_dict(d) for d in spec_dicts]
        if not specs:
            raise ValueError("tables: at least one table spec is required")
        if num_shards < 1 or any(num_shards > spec.num_slots for spec in specs):
            raise ValueError(f"num_shards: must be in [1, num_slots], got {num_shards}")
        async with self._lock:
            if self._tables:
                raise ValueError(f"tables: already deployed {sorted(self._tables)}; run down first")
            await self.start()
            self._epoch = 1
            await self._grow_to(num_shards, specs, add_empty_tables=False)
            for spec in specs:
                slot_map = SlotMap.even(spec.num_slots, num_shards)
                await asyncio.gather(*(self._call(s, "AddTable", pb.AddTableRequest(
                    spec_json=json.dumps(spec.to_dict()), slots=slot_map.slots_of(s.index).tolist(),
                    epoch=self._epoch)) for s in self._shards))
                self._tables[spec.name] = (spec, slot_map)
            self._persist()
            log.info("deployed %s on %d shards", [s.name for s in specs], num_shards)
            return self._directory_address

    async def scale(self, num_shards: int) -> dict[str, int]:
        """Move slots so that ``num_shards`` shards hold every table; return moved slots per table."""
        specs = [spec for spec, _ in self._tables.values()]
        if num_shards < 1 or any(num_shards > spec.num_slots for spec in specs):
            raise ValueError(f"num_shards: must be in [1, num_slots], got {num_shards}")
        async with self._lock:
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
        """Copy moved slots to their targets; sources keep serving lookups but freeze updates."""
        by_pair: dict[tuple[int, int], list[int]] = {}
        for slot, source, target in moves:
            by_pair.setdefault((source, target), []).append(slot)
        rows_per_slot = -(-spec.rows // spec.num_slots)
        per_batch = max(1, self._options.max_message_bytes // 2 // max(1, rows_per_slot * spec.bytes_per_row()))

        async def move(source: Shard, target: Shard, slots: list[int]) -> None:
            for start in range(0, len(slots), per_batch):
                batch = slots[start:start + per_batch]
                await self._call(source, "FreezeSlots", pb.FreezeSlotsRequest(table=spec.name, slots=batch, frozen=True))
                exported = await self._export_once_steps_complete(source, spec, batch)
                await self._call(target, "ImportSlots", pb.ImportSlotsRequest(table=spec.name, arrays=exported.arrays))

        await asyncio.gather(*(move(self._shards[s], self._shards[t], slots) for (s, t), slots in by_pair.items()))

    async def _export_once_steps_complete(self, source: Shard, spec: TableSpec, slots: list[int]):
        """ExportSlots, asked again while the source answers ABORTED: synchronous steps pending on the
        slots are completing there (it exports them with their partial sums after PENDING_STEP_WAIT_S)."""
        delay = 0.005
        while True:
            try:
                return await self._call(source, "ExportSlots", pb.ExportSlotsRequest(table=spec.name, slots=slots))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.ABORTED:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _release(self, spec: TableSpec, moves: list[tuple[int, int, int]]) -> None:
        by_source: dict[int, list[int]] = {}
        for slot, source, _ in moves:
            by_source.setdefault(source, []).append(slot)
        await asyncio.gather(*(self._call(self._shards[s], "ReleaseSlots", pb.ReleaseSlotsRequest(
            table=spec.name, slots=slots)) for s, slots in by_source.items()))

    # ---- status / checkpoint / restore ------------------------------------------------------

    @ray.method(max_task_retries=READ_RETRIES)
    async def status(self) -> list[dict[str, Any]]:
        """One record per shard: index, node, address, slots, rows, bytes held and reserved, requests/s,
        p50/p99 lookup ms."""
        stats = await asyncio.gather(*(self._call(s, "Stats", pb.StatsRequest()) for s in self._shards))
        return [{
            "shard": st.shard_index, "node": st.node, "address": st.address, "epoch": st.epoch,
            "slots": sum(t.slots for t in st.tables), "rows": sum(t.rows for t in st.tables),
            "bytes": st.memory_bytes, "reserved_bytes": shard.reserved_bytes, "requests_per_s": st.requests_per_s,
            "p50_ms": st.p50_lookup_ms, "p99_ms": st.p99_lookup_ms,
        } for shard, st in zip(self._shards, stats)]

    @ray.method(max_task_retries=READ_RETRIES)
    async def checksums(self) -> dict[str, list[str]]:
        """Per table, each shard's checksum of its slots (tests compare these around bad input)."""
        result = {}
        for name in self._tables:
            replies = await asyncio.gather(*(self._call(s, "Checksum", pb.ChecksumRequest(table=name))
                                             for s in self._shards))
            result[name] = [r.sha256 for r in replies]
        return result

    def _inside_root(self, directory: str) -> Path:
        """``directory`` (relative to the data root, or absolute) resolved inside the root; ValueError if not."""
        return checkpoint.inside_root(self._data_root, str(directory), "directory")

    async def checkpoint(self, directory: str) -> str:
        """Write every table under ``directory`` (inside the data root), shards in parallel, updates frozen
        meanwhile; return the manifest path."""
        path = self._inside_root(directory)
        relative = str(path.relative_to(self._data_root))
        async with self._lock:
            await self._freeze_all(True)
            try:
                replies = await asyncio.gather(*(self._call(s, "Checkpoint", pb.CheckpointRequest(directory=relative))
                                                 for s in self._shards))
            finally:
                await self._freeze_all(False)
            files: dict[str, list[dict[str, Any]]] = {name: [] for name in self._tables}
            for shard, reply in zip(self._shards, replies):
                for f in reply.files:
                    files[f.table].append({"shard": shard.index, "path": f.path, "slots": list(f.slots)})
            checkpoint.write_manifest(path, [spec for spec, _ in self._tables.values()], files, self._epoch)
            log.info("checkpointed %d tables to %s", len(files), path)
            return str(path / checkpoint.MANIFEST)

    async def _freeze_all(self, frozen: bool) -> None:
        await asyncio.gather(*(self._call(s, "FreezeSlots", pb.FreezeSlotsRequest(
            table=spec.name, slots=slot_map.slots_of(s.index).tolist(), frozen=frozen))
            for spec, slot_map in self._tables.values() for s in self._shards))

    async def restore(self, directory: str, num_shards: int | None = None, read_only: bool = False) -> int:
        """Replace all tables by the checkpoint in ``directory`` on ``num_shards`` shards; return the epoch.
        ``read_only``: as serving tables (bfloat16 rows, no optimizer state, updates refused)."""
        path = self._inside_root(directory)
        entries = checkpoint.read_manifest(path)
        if read_only:
            entries = [(dataclasses.replace(spec, storage_dtype="bfloat16"), files) for spec, files in entries]
        num_shards = num_shards or len(self._shards) or max(len(files) for _, files in entries)
        async with self._lock:
            await self.start()
            for name in list(self._tables):
                await asyncio.gather(*(self._call(s, "DropTable", pb.DropTableRequest(table=name)) for s in self._shards))
            self._tables.clear()
            await self._shrink_to(min(num_shards, len(self._shards)))
            await self._grow_to(num_shards, [spec for spec, _ in entries], add_empty_tables=False)
            self._epoch += 1
            for spec, files in entries:
                slot_map = SlotMap.even(spec.num_slots, num_shards)
                await asyncio.gather(*(self._restore_shard(s, str(path.relative_to(self._data_root)), spec, files,
                                                           slot_map) for s in self._shards))
                self._tables[spec.name] = (spec, SlotMap(self._epoch, slot_map.owners))
            await self._broadcast_epoch()
            log.info("restored %d tables from %s onto %d shards", len(entries), path, num_shards)
            return self._epoch

    async def _restore_shard(self, shard: Shard, directory: str, spec: TableSpec, files, slot_map: SlotMap) -> None:
        mine = set(slot_map.slots_of(shard.index).tolist())
        paths = [f["path"] for f in files if mine.intersection(f["slots"])]
        await self._call(shard, "AddTable", pb.AddTableRequest(spec_json=json.dumps(spec.to_dict()), slots=[],
                                                               epoch=self._epoch))
        await self._call(shard, "Restore", pb.RestoreRequest(directory=directory, table=spec.name, paths=paths,
                                                             slots=sorted(mine)))

    async def shutdown(self) -> None:
        """Stop every shard and the directory; the caller then kills this actor."""
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
