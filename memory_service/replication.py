"""A primary shard's side of replication: its changes, in the order it made them, to each replica.

Each change the primary makes for a client (an update, an aborted step, a restore's commit) gets the
next sequence number of the primary's stream and joins every replica's queue; one task per replica
sends its queue in order, in batches, and resends after a
failure until the replica acknowledges or the controller removes the replica. The primary answers
its client once every live replica has applied the update (``wait_applied``), so an acknowledged
update is on every live copy, and every copy applied the same updates in the same order: replicas
stay bit-identical to their primary.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Callable

import grpc

from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRY_INITIAL_S, RETRY_MAX_S = 0.02, 1.0
SEND_TIMEOUT_S = 10.0  # one Replicate call; the sender resends after it


class ReplicaLink:
    """One replica: the ops it has not acknowledged, sent in order by one task."""

    def __init__(self, target: pb.ReplicaTarget, stream: str, open_stub: Callable[[str], pb_grpc.ShardServiceStub],
                 metadata: Callable[[], tuple], max_batch_bytes: int, live: bool):
        self.target = target
        self.live = live  # acknowledged updates wait for live replicas only (a new one is live once copied)
        self._stream, self._metadata, self._max_batch_bytes = stream, metadata, max_batch_bytes
        self._stub = open_stub(target.address)
        self._ops: collections.deque[pb.ReplicatedOp] = collections.deque()
        self._acked = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start sending (a new replica starts once its copy is in place)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._send_forever())

    def append(self, op: pb.ReplicatedOp) -> None:
        self._ops.append(op)
        self._wakeup.set()

    def applied(self, seq: int) -> asyncio.Future:
        """A future done once the replica has applied every op up to ``seq``."""
        future = asyncio.get_running_loop().create_future()
        if self._acked >= seq:
            future.set_result(None)
        else:
            self._waiters.append((seq, future))
        return future

    def close(self) -> None:
        """Stop sending; whoever waits for this replica stops waiting (it left the group)."""
        if self._task is not None:
            self._task.cancel()
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()

    async def _send_forever(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            if not self._ops:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._batch()
            try:
                reply = await self._stub.Replicate(pb.ReplicateRequest(stream=self._stream, ops=batch),
                                                   metadata=self._metadata(), timeout=SEND_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                log.warning("replica %d (%s): %s: %s; resending in %.2f s", self.target.index, self.target.address,
                            error.code().name, error.details(), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_INITIAL_S
            self._acknowledge(reply.applied_seq)

    def _batch(self) -> list[pb.ReplicatedOp]:
        """The oldest unacknowledged ops, at least one, up to the batch size."""
        batch, size = [], 0
        for op in self._ops:
            size += op.ByteSize()
            if batch and size > self._max_batch_bytes:
                break
            batch.append(op)
        return batch

    def _acknowledge(self, applied_seq: int) -> None:
        self._acked = max(self._acked, applied_seq)
        while self._ops and self._ops[0].seq <= self._acked:
            self._ops.popleft()
        still = []
        for seq, future in self._waiters:
            if seq <= self._acked:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((seq, future))
        self._waiters = still


class Replicas:
    """A primary's replicas and its stream of updates to them."""

    def __init__(self, open_stub: Callable[[str], pb_grpc.ShardServiceStub], metadata: Callable[[], tuple],
                 max_batch_bytes: int):
        self._open_stub, self._metadata, self._max_batch_bytes = open_stub, metadata, max_batch_bytes
        self._links: dict[int, ReplicaLink] = {}
        self._stream = uuid.uuid4().hex
        self._seq = 0

    @property
    def seq(self) -> int:
        """The sequence number of the newest forwarded op."""
        return self._seq

    @property
    def indices(self) -> list[int]:
        return sorted(self._links)

    @property
    def forwarding(self) -> bool:
        """Whether changes made here go anywhere (a group of one copy forwards nothing)."""
        return bool(self._links)

    def stub(self, address: str) -> pb_grpc.ShardServiceStub:
        """A stub on another shard of the group (with ``metadata``, the admin token's)."""
        return self._open_stub(address)

    def metadata(self) -> tuple:
        return self._metadata()

    def set_targets(self, targets: list[pb.ReplicaTarget]) -> None:
        """Forward to exactly ``targets`` from now on: links to new ones start live (the controller adds a
        replica this way only when it already holds the primary's state, e.g. both fresh at deploy)."""
        wanted = {target.index: target for target in targets}
        for index in set(self._links) - set(wanted):
            self._links.pop(index).close()
        for index, target in wanted.items():
            if index not in self._links:
                link = self._new_link(target, live=True)
                link.start()

    def add_copying(self, target: pb.ReplicaTarget) -> ReplicaLink:
        """A link to a replica whose copy of the state is being made: ops queue from now on, but are sent,
        and waited for, only once ``start``ed and made live."""
        if target.index in self._links:
            self._links.pop(target.index).close()
        return self._new_link(target, live=False)

    def remove(self, index: int) -> None:
        link = self._links.pop(index, None)
        if link is not None:
            link.close()

    def forward(self, **change) -> None:
        """Queue a change made here (``update=``, ``abort=`` or ``restore_commit=``, as ``ReplicatedOp`` names
        them) for every replica, under the next sequence number."""
        if not self._links:
            return
        self._seq += 1
        op = pb.ReplicatedOp(seq=self._seq, **change)
        for link in self._links.values():
            link.append(op)

    async def wait_applied(self, seq: int) -> None:
        """Until every live replica has applied the ops up to ``seq``."""
        futures = [link.applied(seq) for link in self._links.values() if link.live]
        if futures:
            await asyncio.gather(*futures)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()

    def _new_link(self, target: pb.ReplicaTarget, live: bool) -> ReplicaLink:
        link = ReplicaLink(target, self._stream, self._open_stub, self._metadata, self._max_batch_bytes, live)
        self._links[target.index] = link
        return link
