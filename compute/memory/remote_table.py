"""An Engram table held by the memory service: rows fetched ahead over gRPC, gradients pushed back."""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable

import numpy as np
import torch

import kernels
from compute.memory.client import MemoryClient
from compute.memory.futures import follow, settled
from compute.memory.row_table import EngramRows, RowsAcrossUpdate, RowTable
from memory_service.core.slots import ShardSplit
from protos.wire import WIRE_DTYPE_BY_TORCH


class RemoteRowTable(RowTable):
    """``prefetch`` starts a lookup and returns at once; the rows land in pinned memory and reach the
    device on a side stream, so a step's compute hides the next step's lookup (float8_e4m3 rows travel
    to the device as they came, E4M3 bytes and scales, and are dequantised there). The rows handed to the
    model are a leaf in ``compute_dtype``: after ``backward`` its ``.grad`` is the unique-row gradient
    that ``apply_gradients`` pushes, leaving the device on another side stream, off the training thread.
    """

    def __init__(self, client: MemoryClient, table: str, device: torch.device | str = "cpu",
                 wire_dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.float32,
                 grad_wire_dtype: torch.dtype = torch.float32):
        self.client, self.table = client, table
        self.device, self.wire_dtype, self.compute_dtype = torch.device(device), wire_dtype, compute_dtype
        self.grad_wire_dtype = grad_wire_dtype
        self._wire = WIRE_DTYPE_BY_TORCH[wire_dtype]
        routing = {t.name: t for t in client.tables()}
        if table not in routing:
            raise ValueError(f"table: {table!r} is not deployed; deployed tables: {sorted(routing)}")
        self.num_rows, self.dim = routing[table].rows, routing[table].dim
        on_gpu = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._push_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"rows-{table}")
        self._pusher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"grads-{table}")
        self._copy_lock = threading.Lock()

    def prefetch(self, unique_ids: torch.Tensor, inverse: torch.Tensor,
                 shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        fetched = self._fetch_for_step(unique_ids, shard_split)
        if not self._steps_on_gpu() and fetched.done() and fetched.exception() is None:
            return settled(self._rows_read(fetched.result(), inverse))
        return self._copier.submit(self._to_device, fetched, inverse)

    def prefetch_across_update(self, unique_ids: torch.Tensor, inverse: torch.Tensor, updated_ids: torch.Tensor,
                               shard_split: ShardSplit | None = None) -> RowsAcrossUpdate:
        """Push-and-pull: the rows the update leaves alone are looked up now; the ones it changes come back
        in the update's own push, from the shards that apply it (see ``MemoryClient.push``)."""
        return self._pulled_across_update(unique_ids, updated_ids, inverse, self._merged_to_device)

    def _steps_on_gpu(self) -> bool:
        """Whether the caller wants a training step's rows on a GPU: they come with the backward's grouping by row,
        made on the copier thread."""
        return self._copy_stream is not None and torch.is_grad_enabled()

    def _fetch_for_step(self, row_ids: torch.Tensor,
                        shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        """``_fetch``, started on the copier thread for a training step on a GPU: a lookup of rows the client reads
        out of shared memory reads them where it is made, and the training thread must not wait for that (the
        copier runs its jobs in turn, so a later job of it finds the rows in)."""
        if self._steps_on_gpu():
            return self._copier.submit(lambda: self._fetch(row_ids, shard_split).result())
        return self._fetch(row_ids, shard_split)

    def _fetch(self, row_ids: torch.Tensor, shard_split: ShardSplit | None = None) -> concurrent.futures.Future:
        """Start looking ``row_ids`` up in the wire dtype, into page-locked memory when the rows go on to a GPU."""
        return self.client.lookup(self.table, row_ids, dtype=self.wire_dtype, pin_memory=self._copy_stream is not None,
                                  shard_split=shard_split)

    def _pulled_across_update(self, row_ids: torch.Tensor, updated_ids: torch.Tensor, inverse: torch.Tensor,
                              to_rows: Callable[["_PulledAcrossUpdate", concurrent.futures.Future], EngramRows]
                              ) -> "_PulledAcrossUpdate":
        """Push-and-pull for ``row_ids``: those the update of ``updated_ids`` leaves alone are looked up now, its push
        pulls the others; once it is in, ``to_rows(across, pushed)`` makes the rows on the copier thread."""
        changed = torch.from_numpy(np.isin(row_ids.numpy(), updated_ids.numpy(), assume_unique=True))
        across = _PulledAcrossUpdate(lambda pushed: self._copier.submit(to_rows, across, pushed), row_ids[changed],
                                     changed, self._fetch_for_step(row_ids[~changed]), inverse)
        return across

    def apply_gradients(self, unique_ids: torch.Tensor, rows: EngramRows, step: int, rank: int = 0,
                        world_size: int = 1, next_rows: RowsAcrossUpdate | None = None) -> concurrent.futures.Future:
        """Push the rows' gradients in ``grad_wire_dtype``, divided by ``world_size``: the shards sum the
        ranks' pushes of a step, so they apply the mean. Returns at once: a future of the shards' PushResult."""
        grads = (rows.unique_rows.grad / world_size).detach().to(self.grad_wire_dtype)
        pull = dict(pull_ids=next_rows.pull_ids, pull_dtype=self.wire_dtype, pin_memory=self._copy_stream is not None) \
            if isinstance(next_rows, _PulledAcrossUpdate) else {}
        if self._push_stream is None:
            pushed = self.client.push(self.table, unique_ids, grads, step, rank, world_size, **pull)
        else:
            computed = torch.cuda.Event()
            computed.record()  # on the training thread's stream, after the kernels that produce ``grads``
            pushed = concurrent.futures.Future()

            def copy_and_send() -> None:
                try:
                    host = self._to_host(grads, computed)
                    follow(pushed, self.client.push(self.table, unique_ids, host, step, rank, world_size, **pull))
                except BaseException as error:  # the trainer learns of it from the future
                    pushed.set_exception(error)

            self._pusher.submit(copy_and_send)
        if next_rows is not None:
            next_rows.after(pushed)
        return pushed

    def _to_host(self, grads: torch.Tensor, computed: torch.cuda.Event) -> torch.Tensor:
        """Copy device ``grads`` into pinned memory on the push stream; blocks the pusher thread only."""
        host = torch.empty(grads.shape, dtype=grads.dtype, pin_memory=True)
        with torch.cuda.stream(self._push_stream):
            self._push_stream.wait_event(computed)
            host.copy_(grads, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._push_stream)
        copied.synchronize()  # ``grads`` stays referenced until here, so its memory is not reused early
        return host

    def _rows_read(self, wire_rows: torch.Tensor, inverse: torch.Tensor) -> EngramRows:
        """The ``EngramRows`` of rows the lookup read on the calling thread (out of shared memory), made there: on
        a CPU, or where no backward follows (generation, evaluation), which needs neither the copier thread nor the
        backward's grouping by row. Their copies queue on the caller's stream, ahead of the kernels that read them."""
        unique_rows = self._on_device(wire_rows).requires_grad_(torch.is_grad_enabled())
        return EngramRows(unique_rows, inverse.to(self.device, non_blocking=True))

    def _to_device(self, rows_future: concurrent.futures.Future, inverse: torch.Tensor) -> EngramRows:
        rows = rows_future.result()
        return self._engram_rows(lambda: self._on_device(rows), inverse)

    def _on_device(self, wire_rows: torch.Tensor) -> torch.Tensor:
        """Host ``wire_rows`` as values in ``compute_dtype`` on the device; float8_e4m3 rows cross as E4M3
        bytes and scales and are dequantised there. On a GPU, call it on the copy stream."""
        return self._wire.values(wire_rows.to(self.device, non_blocking=True), self.compute_dtype)

    def _engram_rows(self, build: Callable[[], torch.Tensor], inverse: torch.Tensor) -> EngramRows:
        """The ``EngramRows`` of the unique rows that ``build()`` makes on the device; on a GPU with the
        backward's grouping by row built beside them, so the step does not sort."""
        if self._copy_stream is None:
            return EngramRows(build().requires_grad_(True), inverse)

        def rows_and_segments() -> tuple[torch.Tensor, ...]:
            unique_rows = build()
            on_device = inverse.to(self.device, non_blocking=True)
            return unique_rows, on_device, *kernels.row_segments(on_device, len(unique_rows))

        unique_rows, inverse, *segments = self._on_copy_stream(rows_and_segments)
        return EngramRows(unique_rows.requires_grad_(True), inverse, kernels.RowSegments(*segments))

    def _on_copy_stream(self, build: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The tensors ``build()`` makes on the GPU, on the copy stream: ready when this returns (it blocks the
        calling copier thread only), and kept alive until the training thread's stream is done with them."""
        with self._copy_lock, torch.cuda.stream(self._copy_stream):
            tensors = build()
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        done.synchronize()
        for tensor in tensors:
            tensor.record_stream(torch.cuda.default_stream(self.device))
        return tensors

    def _merged_to_device(self, across: "_PulledAcrossUpdate", pushed: concurrent.futures.Future) -> EngramRows:
        """The next step's rows from the ones looked up ahead and the ones the push pulled, on the device."""
        return self._to_device(settled(self._merged_rows(across, pushed)), across.inverse)

    def _merged_rows(self, across: "_PulledAcrossUpdate", pushed: concurrent.futures.Future) -> torch.Tensor:
        """The wire rows of ``across``'s ids on the host: those looked up ahead, and those the push pulled."""
        element, width = self._wire.row_layout(self.dim)
        rows = torch.empty((len(across.changed), width), dtype=element, pin_memory=self._copy_stream is not None)
        rows[~across.changed] = across.kept.result()
        rows[across.changed] = pushed.result().pulled
        return rows

    def close(self) -> None:
        self._pusher.shutdown(wait=True)
        self._copier.shutdown(wait=True)


class _PulledAcrossUpdate(RowsAcrossUpdate):
    """A remote table's next rows across an update: ``kept`` (a lookup's future) holds the rows the update
    leaves alone, ``pull_ids`` are those it changes, which its push pulls."""

    def __init__(self, fetch: Callable[[concurrent.futures.Future], concurrent.futures.Future],
                 pull_ids: torch.Tensor, changed: torch.Tensor, kept: concurrent.futures.Future, inverse: torch.Tensor):
        super().__init__(fetch)
        self.pull_ids, self.changed, self.kept, self.inverse = pull_ids, changed, kept, inverse
