"""Helpers shared by the memory-service integration tests: deploy on the session's Ray, raw stubs."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

import grpc
import numpy as np
import ray
import torch

from compute.memory.client import MemoryClient
from memory_service.controller import ControllerOptions, start_controller, stop_controller
from memory_service.core.row_init import init_rows
from memory_service.core.table_spec import OptimizerSpec, TableSpec
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import bearer_metadata

TOKEN = "test-data-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"


def spec(name: str, *, rows: int = 10_000, dim: int = 16, kind: str = "adam", lr: float = 0.01,
         storage_dtype: str = "float32", seed: int = 7) -> TableSpec:
    return TableSpec(name=name, rows=rows, dim=dim, storage_dtype=storage_dtype, seed=seed, num_slots=64,
                     optimizer=OptimizerSpec(kind=kind, lr=lr))


def reference_rows(table: TableSpec, row_ids) -> torch.Tensor:
    return torch.from_numpy(init_rows(table.seed, np.asarray(row_ids, dtype=np.int64), table.dim, table.init_std))


@contextlib.contextmanager
def deployment(specs: list[TableSpec], shards: int, data_root: str | None = None, reflection: bool = False,
               replicas: int = 1, step_timeout_s: float = ControllerOptions.step_timeout_s, tier_dir: str | None = None,
               **client_kwargs):
    """A controller with ``specs`` on ``shards`` shard groups of ``replicas`` (127.0.0.1 only, checkpoints under
    ``data_root``, default a fresh temporary folder, synchronous steps aborted after ``step_timeout_s``, tiered
    tables' files under ``tier_dir``) and a client holding the data token; torn down after."""
    name = f"test-memory-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as cleanup:
        root = data_root or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="engram-data-"))
        options = ControllerOptions(data_token=TOKEN, admin_token=ADMIN_TOKEN, host="127.0.0.1", data_root=root,
                                    reflection=reflection, step_timeout_s=step_timeout_s, tier_dir=tier_dir)
        controller = start_controller(options, name=name)
        cleanup.callback(stop_controller, name)
        directory = ray.get(controller.deploy.remote([s.to_dict() for s in specs], shards, replicas))
        with MemoryClient(directory, TOKEN, **client_kwargs) as client:
            yield controller, client


def shard_stub(client: MemoryClient, shard: int = 0):
    """A raw ShardService stub on one shard of ``client``'s routing (for malformed requests)."""
    channel = grpc.insecure_channel(client.shard_address(shard))
    return pb_grpc.ShardServiceStub(channel), channel


def row_streams(directory: str) -> dict[int, str]:
    """Each shard's row stream address, as the directory routes them."""
    with grpc.insecure_channel(directory) as channel:
        routing = pb_grpc.DirectoryServiceStub(channel).GetRouting(pb.GetRoutingRequest(),
                                                                    metadata=bearer_metadata(TOKEN), timeout=10)
    return {shard.index: shard.row_stream_address for shard in routing.shards}


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
