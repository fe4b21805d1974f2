"""An Engram table held by the memory service: rows fetched ahead over gRPC, gradients pushed back."""
from __future__ import annotations

import concurrent.futures
import threading

import torch

from compute.memory_client import MemoryClient
from compute.row_table import EngramRows, RowTable


class RemoteRowTable(RowTable):
    """``fetch`` starts a lookup and returns at once; the rows land in pinned memory and reach the
    device on a side stream, so a step's compute hides the next step's lookup. The rows handed to the
    model are a float32 leaf: after ``backward`` its ``.grad`` is the unique-row gradient to ``push``.
    """

    def __init__(self, client: MemoryClient, table: str, device: torch.device | str = "cpu",
                 wire_dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.float32):
        self.client, self.table = client, table
        self.device, self.wire_dtype, self.compute_dtype = torch.device(device), wire_dtype, compute_dtype
        routing = {t.name: t for t in client.tables()}
        if table not in routing:
            raise ValueError(f"table: {table!r} is not deployed; deployed tables: {sorted(routing)}")
        self.num_rows, self.dim = routing[table].rows, routing[table].dim
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"rows-{table}")
        self._copy_lock = threading.Lock()

    def lookup(self, row_ids: torch.Tensor) -> EngramRows:
        return self.lookup_async(row_ids).result()

    def lookup_async(self, row_ids: torch.Tensor) -> concurrent.futures.Future:
        unique_ids, inverse = torch.unique(row_ids, return_inverse=True)
        return self.fetch(unique_ids, inverse)

    def fetch(self, unique_ids: torch.Tensor, inverse: torch.Tensor) -> concurrent.futures.Future:
        """A future of the rows of sorted ``unique_ids``, with ``inverse`` mapping tokens to them."""
        rows = self.client.lookup(self.table, unique_ids, dtype=self.wire_dtype,
                                  pin_memory=self._copy_stream is not None)
        return self._copier.submit(self._to_device, rows, inverse)

    def push(self, unique_ids: torch.Tensor, grads: torch.Tensor, step: int, rank: int = 0, world_size: int = 1,
             synchronous: bool = True) -> concurrent.futures.Future:
        """Send the unique rows' gradients of ``step``; summed across ranks on the shard when synchronous."""
        return self.client.push(self.table, unique_ids, grads, step, rank, world_size, synchronous)

    def _to_device(self, rows_future: concurrent.futures.Future, inverse: torch.Tensor) -> EngramRows:
        rows = rows_future.result()
        if self._copy_stream is None:
            unique_rows = rows.to(self.compute_dtype)
            inverse = inverse.to(self.device)
        else:
            with self._copy_lock, torch.cuda.stream(self._copy_stream):
                unique_rows = rows.to(self.device, non_blocking=True).to(self.compute_dtype)
                inverse = inverse.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            done.synchronize()  # blocks this copier thread only; the rows are ready when the future is
            # The training thread uses them on the default stream: keep their memory until it is done.
            for tensor in (unique_rows, inverse):
                tensor.record_stream(torch.cuda.default_stream(self.device))
        return EngramRows(unique_rows.requires_grad_(True), inverse)

    def close(self) -> None:
        self._copier.shutdown(wait=True)
