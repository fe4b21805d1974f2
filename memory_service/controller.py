"""The controller: a named, detached Ray actor holding table specs, slot->shard routing and its epoch.

It deploys tables onto shard actors, moves slots to scale while clients keep working (freeze the
slot's updates on the source, export, import on the target, flip the routing, release on the
source), and checkpoints and restores all tables. It serves the DirectoryService over gRPC.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import ray

from memory_service import checkpoint
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
BARRIER_TIMEOUT_S = 30.0  # how long a checkpoint waits for pending synchronous steps to complete everywhere
BARRIER_POLL_S = 0.02
LEASE_MARGIN_S = 30.0  # a hold outlives the barrier's wait by this much, then ends by itself


@dataclasses.dataclass
class Shard:
    index: int
    actor: Any
    address: str
    local_address: str  # unix:<path> for clients on the shard's machine; '' when there is none
    node: str
    hostname: str
    reserved_bytes: int  # Ray `memory` reserved for its rows and optimizer state
    stub: pb_grpc.ShardServiceStub
    channel: grpc.aio.Channel


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


@ray.remote(num_cpus=0)
class MemoryController:
    """Owns the shard actors and the routing; every mutation runs under one lock."""

    def __init__(self, options: ControllerOptions):
        logging.basicConfig(level=logging.INFO)
        self._options = options
        generated = AccessTokens.generate()
        self._tokens = AccessTokens(options.data_token or generated.data, options.admin_token or generated.admin)
        self._data_root = Path(options.data_root or checkpoint.default_data_root()).resolve()
        self._client_tls = options.client_tls()
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
                servicer.add_to_server, [pb.DESCRIPTOR.services_by_name["DirectoryService"].full_name],
                tokens=self._tokens, host=self._host, tls=self._options.tls,
                max_message_bytes=self._options.max_message_bytes, reflection_enabled=self._options.reflection)
        return self._directory_address

    def connection_info(self) -> dict[str, Any]:
        """What a data client inside the cluster needs: the directory address, the data token, its TLS settings."""
        return {"directory": self._directory_address, "token": self._tokens.data, "tls": self._client_tls,
                "data_root": str(self._data_root)}

    async def rotate_tokens(self, data: str, admin: str, grace_s: float = DEFAULT_GRACE_S) -> dict[str, Any]:
        """Replace the tokens on every server; the old ones keep working for ``grace_s`` seconds.
        Returns ``connection_info`` with the new data token."""
        AccessTokens(data, admin)  # refuse bad tokens before any server takes them
        async with self._lock:
            await asyncio.gather(*(s.actor.rotate_tokens.remote(data, admin, grace_s) for s in self._shards))
            self._tokens.rotate(data, admin, grace_s)
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

    def routing(self) -> bytes:
        """The serialized Routing proto (what the DirectoryService answers)."""
        return self._routing().SerializeToString()

    def table_specs(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec, _ in self._tables.values()]

    # ---- shards -----------------------------------------------------------------------------

    async def _call(self, shard: Shard, method: str, request):
        return await getattr(shard.stub, method)(request, metadata=bearer_metadata(self._tokens.admin))

    async def _start_shard(self, index: int, reserve_bytes: int) -> Shard:
        # Not detached: shards share the controller's fate, so a killed controller leaks no shards.
        actor = ShardActor.options(
            resources={self._options.shard_resource: 1}, memory=max(reserve_bytes, 1 << 20),
        ).remote(index, (self._tokens.data, self._tokens.admin), str(self._data_root), self._options.tls,
                 self._options.host, self._options.max_message_bytes, self._options.reflection,
                 self._options.step_timeout_s)
        info = await actor.start.remote()
        channel = open_channel(info["address"], self._client_tls, transport_options(self._options.max_message_bytes))
        log.info("shard %d serving on %s (node %s)", index, info["address"], info["node"][:12])
        return Shard(index, actor, info["address"], info["local_address"], info["node"], info["hostname"],
                     info["reserved_bytes"], pb_grpc.ShardServiceStub(channel), channel)

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
            await self._grow_to(num_shards, specs, add_empty_tables=False)
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

    async def status(self) -> list[dict[str, Any]]:
        """One record per shard: index, node, address, slots, rows, bytes held and reserved, requests/s,
        p50/p99 lookup ms, its pending synchronous steps (table, step, world_size, reported ranks, age_s)
        and how many steps it aborted."""
        stats = await asyncio.gather(*(self._call(s, "Stats", pb.StatsRequest()) for s in self._shards))
        return [{
            "shard": st.shard_index, "node": st.node, "address": st.address, "epoch": st.epoch,
            "slots": sum(t.slots for t in st.tables), "rows": sum(t.rows for t in st.tables),
            "bytes": st.memory_bytes, "reserved_bytes": shard.reserved_bytes, "requests_per_s": st.requests_per_s,
            "p50_ms": st.p50_lookup_ms, "p99_ms": st.p99_lookup_ms,
            "pending_steps": [{"table": p.table, "step": p.step, "world_size": p.world_size,
                               "reported_ranks": list(p.reported_ranks), "age_s": p.age_s} for p in st.pending_steps],
            "aborted_steps": st.aborted_steps,
        } for shard, st in zip(self._shards, stats)]

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

    async def checkpoint(self, directory: str, barrier_timeout_s: float = BARRIER_TIMEOUT_S) -> str:
        """Write every table under ``directory`` (inside the data root) at a step boundary of every shard;
        return the manifest path.

        New steps are held on every shard while the steps pending anywhere complete everywhere (bounded by
        ``barrier_timeout_s``: then TimeoutError naming them, nothing written); the shards write in
        parallel into a hidden folder that becomes ``directory`` only once complete."""
        path = self._inside_root(directory)
        async with self._lock:
            staging = checkpoint.staging_folder(path)
            try:
                async with self._steps_held(barrier_timeout_s):
                    replies = await asyncio.gather(*(self._call(s, "Checkpoint", pb.CheckpointRequest(
                        directory=str(staging.relative_to(self._data_root)), require_step_barrier=True))
                        for s in self._shards))
                files: dict[str, list[dict[str, Any]]] = {name: [] for name in self._tables}
                counters = {name: {"synchronous": -1, "ranks": {}} for name in self._tables}
                for shard, reply in zip(self._shards, replies):
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
            log.info("checkpointed %d tables to %s", len(files), path)
            return str(path / checkpoint.MANIFEST)

    @contextlib.asynccontextmanager
    async def _steps_held(self, timeout_s: float):
        """Hold new steps on every shard until the synchronous steps pending anywhere completed (or were
        aborted) everywhere; release the hold on leaving. TimeoutError naming the steps still pending."""
        lease = pb.StepBarrierRequest(hold=True, lease_s=timeout_s + LEASE_MARGIN_S)
        try:
            replies = await asyncio.gather(*(self._call(s, "StepBarrier", lease) for s in self._shards))
            steps = sorted({(p.table, p.step) for reply in replies for p in reply.pending})
            admit = pb.StepBarrierRequest(hold=True, lease_s=lease.lease_s,
                                          admit=[pb.StepBarrierStep(table=t, step=step) for t, step in steps])
            deadline = asyncio.get_running_loop().time() + timeout_s
            while True:
                replies = await asyncio.gather(*(self._call(s, "StepBarrier", admit) for s in self._shards))
                waiting = self._steps_still_pending(steps, replies)
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
                                   for s in self._shards), return_exceptions=True)

    def _steps_still_pending(self, steps: list[tuple[str, int]], replies) -> list[tuple[str, int]]:
        """The admitted steps not yet done: pending on some shard, or neither aborted anywhere nor
        released on every shard owning slots of their table."""
        states: dict[tuple[str, int], dict[int, str]] = {step: {} for step in steps}
        for shard, reply in zip(self._shards, replies):
            for admitted in reply.admitted:
                states[(admitted.table, admitted.step)][shard.index] = admitted.state
        waiting = []
        for (table, step), by_shard in states.items():
            owners = set(self._tables[table][1].owners.tolist()) if table in self._tables else set()
            done = "pending" not in by_shard.values() and (
                "aborted" in by_shard.values() or all(by_shard.get(owner) in ("released", "forgotten")
                                                      for owner in owners))
            if not done:
                waiting.append((table, step))
        return waiting

    async def restore(self, directory: str, num_shards: int | None = None, read_only: bool = False) -> int:
        """Replace all tables by the checkpoint in ``directory`` on ``num_shards`` shards; return the epoch.
        ``read_only``: as serving tables (bfloat16 rows, no optimizer state, updates refused).

        Every shard first stages its part (every file read and checked, aside from the live tables); only
        when all have, they swap it in. A failure before that leaves the live tables and routing as they
        were (RuntimeError saying so)."""
        path = self._inside_root(directory)
        entries = checkpoint.read_tables(path)
        if read_only:
            entries = [(dataclasses.replace(spec, storage_dtype="bfloat16"), files, steps)
                       for spec, files, steps in entries]
        num_shards = num_shards or len(self._shards) or max(len(files) for _, files, _ in entries)
        relative = str(path.relative_to(self._data_root))
        async with self._lock:
            await self.start()
            before = len(self._shards)
            slot_maps = {spec.name: SlotMap.even(spec.num_slots, num_shards) for spec, _, _ in entries}
            try:
                await self._grow_to(num_shards, [spec for spec, _, _ in entries], add_empty_tables=False)
                for spec, files, steps in entries:
                    await asyncio.gather(*(self._stage_restore(s, relative, spec, files, steps, slot_maps[spec.name])
                                           for s in self._shards[:num_shards]))
            except Exception as error:
                await asyncio.gather(*(self._call(s, "Restore", pb.RestoreRequest(phase=pb.RESTORE_DISCARD))
                                       for s in self._shards), return_exceptions=True)
                await self._shrink_to(before)  # the shards started for the restore go
                cause = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else error
                raise RuntimeError(f"restore of {path} failed, the live tables and routing are unchanged: "
                                   f"{cause}") from None
            epoch = self._epoch + 1
            commit = pb.RestoreRequest(phase=pb.RESTORE_COMMIT, epoch=epoch)
            await asyncio.gather(*(self._call(s, "Restore", commit) for s in self._shards[:num_shards]))
            self._epoch = epoch
            self._tables = {spec.name: (spec, SlotMap(epoch, slot_maps[spec.name].owners)) for spec, _, _ in entries}
            await self._shrink_to(num_shards)
            await self._broadcast_epoch()
            log.info("restored %d tables from %s onto %d shards", len(entries), path, num_shards)
            return self._epoch

    async def _stage_restore(self, shard: Shard, directory: str, spec: TableSpec, files, steps,
                             slot_map: SlotMap) -> None:
        mine = set(slot_map.slots_of(shard.index).tolist())
        paths = [f["path"] for f in files if mine.intersection(f["slots"])]
        await self._call(shard, "Restore", pb.RestoreRequest(
            phase=pb.RESTORE_STAGE, directory=directory, table=spec.name, paths=paths, slots=sorted(mine),
            spec_json=json.dumps(spec.to_dict()), step_counters_json=json.dumps(steps)))

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
