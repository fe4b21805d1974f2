"""The controller: a named, detached Ray actor holding table specs, slot->shard routing and its epoch.

It deploys tables onto shard actors, moves slots to scale while clients keep working (freeze the
slot's updates on the source, export, import on the target, flip the routing, release on the
source), and checkpoints and restores all tables. It serves the DirectoryService over gRPC.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import ray

from memory_service import checkpoint
from memory_service.auth import TlsFiles, new_token
from memory_service.core.slots import SlotMap
from memory_service.core.table_spec import TableSpec
from memory_service.directory import DirectoryServicer
from memory_service.server import start_server
from memory_service.shard_actor import ShardActor
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import CONTROLLER_NAME, DEFAULT_MAX_MESSAGE_BYTES, NAMESPACE, bearer_metadata, transport_options

log = logging.getLogger(__name__)

SHARD_RESOURCE = "engram_memory"


@dataclasses.dataclass
class Shard:
    index: int
    actor: Any
    address: str
    local_address: str  # unix:<path> for clients on the shard's machine; '' when there is none
    node: str
    hostname: str
    stub: pb_grpc.ShardServiceStub
    channel: grpc.aio.Channel


@dataclasses.dataclass
class ControllerOptions:
    """How shards are placed and secured."""

    token: str | None = None              # None: generate one at deploy
    tls: TlsFiles | None = None
    host: str | None = None               # bind address of every server; None: the node's IP
    shard_resource: str = SHARD_RESOURCE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@ray.remote(num_cpus=0)
class MemoryController:
    """Owns the shard actors and the routing; every mutation runs under one lock."""

    def __init__(self, options: ControllerOptions):
        logging.basicConfig(level=logging.INFO)
        self._options = options
        self._token = options.token or new_token()
        self._metadata = bearer_metadata(self._token)
        self._host = options.host or ray.util.get_node_ip_address()
        self._shards: list[Shard] = []
        self._tables: dict[str, tuple[TableSpec, SlotMap]] = {}
        self._epoch = 0
        self._lock = asyncio.Lock()
        self._directory_address = ""
        self._server = None

    async def start(self) -> str:
        """Start the DirectoryService; return its address."""
        if self._server is None:
            servicer = DirectoryServicer(self._routing, self._table_infos)
            self._server, self._directory_address = await start_server(
                lambda server: pb_grpc.add_DirectoryServiceServicer_to_server(servicer, server),
                [pb.DESCRIPTOR.services_by_name["DirectoryService"].full_name],
                token=self._token, host=self._host, tls=self._options.tls,
                max_message_bytes=self._options.max_message_bytes)
        return self._directory_address

    def connection_info(self) -> dict[str, Any]:
        """What a client inside the cluster needs: the directory address, the token, whether TLS is on."""
        return {"directory": self._directory_address, "token": self._token,
                "tls_cert_file": self._options.tls.cert_file if self._options.tls else None}

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

    def routing(self) -> bytes:
        """The serialized Routing proto (what the DirectoryService answers)."""
        return self._routing().SerializeToString()

    def table_specs(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec, _ in self._tables.values()]

    # ---- shards -----------------------------------------------------------------------------

    async def _call(self, shard: Shard, method: str, request):
        return await getattr(shard.stub, method)(request, metadata=self._metadata)

    async def _start_shard(self, index: int, reserve_bytes: int) -> Shard:
        # Not detached: shards share the controller's fate, so a killed controller leaks no shards.
        actor = ShardActor.options(
            resources={self._options.shard_resource: 1}, memory=max(reserve_bytes, 1 << 20),
        ).remote(index, self._token, self._options.tls, self._options.host, self._options.max_message_bytes)
        info = await actor.start.remote()
        options = transport_options(self._options.max_message_bytes)
        if self._options.tls:
            credentials = grpc.ssl_channel_credentials(Path(self._options.tls.cert_file).read_bytes())
            channel = grpc.aio.secure_channel(info["address"], credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(info["address"], options=options)
        log.info("shard %d serving on %s (node %s)", index, info["address"], info["node"][:12])
        return Shard(index, actor, info["address"], info["local_address"], info["node"], info["hostname"],
                     pb_grpc.ShardServiceStub(channel), channel)

    def _reserve_bytes(self, specs: list[TableSpec], num_shards: int) -> int:
        return sum(spec.rows * spec.bytes_per_row() for spec in specs) // num_shards

    async def _grow_to(self, num_shards: int, specs: list[TableSpec]) -> None:
        reserve = self._reserve_bytes(specs, num_shards)
        new = await asyncio.gather(*(self._start_shard(i, reserve) for i in range(len(self._shards), num_shards)))
        for shard in new:
            await asyncio.gather(*(self._call(shard, "AddTable", pb.AddTableRequest(
                spec_json=json.dumps(spec.to_dict()), slots=[], epoch=self._epoch)) for spec in specs))
        self._shards.extend(new)

    async def _shrink_to(self, num_shards: int) -> None:
        removed, self._shards = self._shards[num_shards:], self._shards[:num_shards]
        for shard in removed:
            await shard.channel.close()
            try:
                await shard.actor.stop.remote()
            except ray.exceptions.RayActorError:
                log.warning("shard %d was already dead", shard.index)
            ray.kill(shard.actor)

    async def _broadcast_epoch(self) -> None:
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
            await self._grow_to(num_shards, [])
            for spec in specs:
                slot_map = SlotMap.even(spec.num_slots, num_shards)
                await asyncio.gather(*(self._call(s, "AddTable", pb.AddTableRequest(
                    spec_json=json.dumps(spec.to_dict()), slots=slot_map.slots_of(s.index).tolist(),
                    epoch=self._epoch)) for s in self._shards))
                self._tables[spec.name] = (spec, slot_map)
            log.info("deployed %s on %d shards", [s.name for s in specs], num_shards)
            return self._directory_address

    async def scale(self, num_shards: int) -> dict[str, int]:
        """Move slots so that ``num_shards`` shards hold every table; return moved slots per table."""
        specs = [spec for spec, _ in self._tables.values()]
        if num_shards < 1 or any(num_shards > spec.num_slots for spec in specs):
            raise ValueError(f"num_shards: must be in [1, num_slots], got {num_shards}")
        async with self._lock:
            await self._grow_to(num_shards, specs)
            moved = {}
            for spec, slot_map in list(self._tables.values()):
                new_map, moves = slot_map.rebalanced(num_shards)
                await self._move_slots(spec, moves)
                self._epoch += 1
                self._tables[spec.name] = (spec, SlotMap(self._epoch, new_map.owners))
                await self._broadcast_epoch()  # the flip: from here clients are routed to the new owners
                await self._release(spec, moves)
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
                exported = await self._call(source, "ExportSlots", pb.ExportSlotsRequest(table=spec.name, slots=batch))
                await self._call(target, "ImportSlots", pb.ImportSlotsRequest(table=spec.name, arrays=exported.arrays))

        await asyncio.gather(*(move(self._shards[s], self._shards[t], slots) for (s, t), slots in by_pair.items()))

    async def _release(self, spec: TableSpec, moves: list[tuple[int, int, int]]) -> None:
        by_source: dict[int, list[int]] = {}
        for slot, source, _ in moves:
            by_source.setdefault(source, []).append(slot)
        await asyncio.gather(*(self._call(self._shards[s], "ReleaseSlots", pb.ReleaseSlotsRequest(
            table=spec.name, slots=slots)) for s, slots in by_source.items()))

    # ---- status / checkpoint / restore ------------------------------------------------------

    async def status(self) -> list[dict[str, Any]]:
        """One record per shard: index, node, address, slots, rows, bytes, requests/s, p50/p99 lookup ms."""
        stats = await asyncio.gather(*(self._call(s, "Stats", pb.StatsRequest()) for s in self._shards))
        return [{
            "shard": st.shard_index, "node": st.node, "address": st.address, "epoch": st.epoch,
            "slots": sum(t.slots for t in st.tables), "rows": sum(t.rows for t in st.tables),
            "bytes": st.memory_bytes, "requests_per_s": st.requests_per_s,
            "p50_ms": st.p50_lookup_ms, "p99_ms": st.p99_lookup_ms,
        } for st in stats]

    async def checksums(self) -> dict[str, list[str]]:
        """Per table, each shard's checksum of its slots (tests compare these around bad input)."""
        result = {}
        for name in self._tables:
            replies = await asyncio.gather(*(self._call(s, "Checksum", pb.ChecksumRequest(table=name))
                                             for s in self._shards))
            result[name] = [r.sha256 for r in replies]
        return result

    async def checkpoint(self, directory: str) -> str:
        """Write every table, shards in parallel, updates frozen meanwhile; return the manifest path."""
        path = Path(directory).resolve()
        async with self._lock:
            await self._freeze_all(True)
            try:
                replies = await asyncio.gather(*(self._call(s, "Checkpoint", pb.CheckpointRequest(directory=str(path)))
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

    async def restore(self, directory: str, num_shards: int | None = None) -> int:
        """Replace all tables by the checkpoint in ``directory`` on ``num_shards`` shards; return the epoch."""
        path = Path(directory).resolve()
        entries = checkpoint.read_manifest(path)
        num_shards = num_shards or len(self._shards) or max(len(files) for _, files in entries)
        async with self._lock:
            await self.start()
            for name in list(self._tables):
                await asyncio.gather(*(self._call(s, "DropTable", pb.DropTableRequest(table=name)) for s in self._shards))
            self._tables.clear()
            await self._shrink_to(min(num_shards, len(self._shards)))
            await self._grow_to(num_shards, [])
            self._epoch += 1
            for spec, files in entries:
                slot_map = SlotMap.even(spec.num_slots, num_shards)
                await asyncio.gather(*(self._restore_shard(s, path, spec, files, slot_map) for s in self._shards))
                self._tables[spec.name] = (spec, SlotMap(self._epoch, slot_map.owners))
            await self._broadcast_epoch()
            log.info("restored %d tables from %s onto %d shards", len(entries), path, num_shards)
            return self._epoch

    async def _restore_shard(self, shard: Shard, path: Path, spec: TableSpec, files, slot_map: SlotMap) -> None:
        mine = set(slot_map.slots_of(shard.index).tolist())
        paths = [f["path"] for f in files if mine.intersection(f["slots"])]
        await self._call(shard, "AddTable", pb.AddTableRequest(spec_json=json.dumps(spec.to_dict()), slots=[],
                                                               epoch=self._epoch))
        await self._call(shard, "Restore", pb.RestoreRequest(directory=str(path), table=spec.name, paths=paths,
                                                             slots=sorted(mine)))

    async def shutdown(self) -> None:
        """Stop every shard and the directory; the caller then kills this actor."""
        async with self._lock:
            await self._shrink_to(0)
            self._tables.clear()
            if self._server is not None:
                await self._server.stop(grace=1.0)
                self._server = None


def start_controller(options: ControllerOptions | None = None, name: str = CONTROLLER_NAME,
                     namespace: str = NAMESPACE):
    """Create the named, detached controller (Ray must be initialised) and start its directory."""
    controller = MemoryController.options(name=name, namespace=namespace, lifetime="detached").remote(
        options or ControllerOptions())
    ray.get(controller.start.remote())
    return controller


def get_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE):
    """The running controller; ValueError naming it if there is none."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ValueError(f"no memory controller named {name!r} in namespace {namespace!r}; run `engram memory up`") from None


def stop_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE) -> None:
    """Stop the shards and kill the controller, whatever state they are in."""
    controller = get_controller(name, namespace)
    try:
        ray.get(controller.shutdown.remote())
    finally:
        ray.kill(controller)  # its shard actors die with it
