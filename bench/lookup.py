"""Lookup throughput: in-process index_select vs MemoryClient on 1/2/4 shards vs a naive Ray actor.

MemoryClient runs five times per shard count on a table that trains (SGD, float32 on the shards): as a
co-located client, which reads the rows out of the shards' shared memory without a request (the default on
one machine), as one that asks for them (Unix socket, rows written into its shared memory), and forced onto
TCP (what a remote client gets: the shards' row streams, and for comparison gRPC alone); and on the same rows
as a serving table (read-only, bfloat16 on the shards), which it reads out of the shards' shared memory. Every system also runs, at the target batch, on
sorted unique ids: what the training path sends.
Run: ``python -m bench.lookup`` (prints a table, writes bench/results/lookup.json and lookup.png).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time

import numpy as np
import ray
import torch

from bench.results_files import figure, write_json
from compute.memory.client import MemoryClient
from compute.memory.shared_segments import SharedRowSegment
from memory_service.controller import ControllerOptions, start_controller, stop_controller
from memory_service.core.row_init import init_rows
from memory_service.core.slots import split_by_shard
from memory_service.core.table_spec import OptimizerSpec, TableSpec
from memory_service.row_store import ShardStore
from memory_service.shared_rows import SharedRowSegments

BATCHES = (1024, 4096, 16384, 65536, 262144)
TARGET_BATCH = 65536


@ray.remote(num_cpus=0)
class NaiveTableActor:
    """What a user writes first: the table as a numpy array in an actor, rows returned by a method."""

    def __init__(self, rows: int, dim: int, seed: int, std: float):
        self.table = init_rows(seed, np.arange(rows, dtype=np.int64), dim, std)

    def lookup(self, row_ids: np.ndarray) -> np.ndarray:
        return self.table[row_ids]


def measure(fetch, batches: list[np.ndarray], repeats: int, warmup: int = 2) -> np.ndarray:
    """Seconds per call of ``fetch(ids)`` over ``repeats`` calls cycling through ``batches``."""
    for i in range(warmup):
        fetch(batches[i % len(batches)])
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        fetch(batches[i % len(batches)])
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds)


def where_the_time_goes(spec: TableSpec, batches: list[np.ndarray], shards: int,
                        client_ms: float) -> dict[str, float]:
    """Milliseconds of each step of one co-located MemoryClient lookup asked for, timed alone; the rest is gRPC.

    Steps cycle through the batches as the lookups did: repeating one batch would serve its rows
    from the CPU cache and make the shard's gather look twice as fast.
    """
    store = ShardStore()
    store.add_table(spec, range(spec.num_slots))
    owners = np.random.default_rng(0).integers(0, shards, size=spec.num_slots).astype(np.int16)
    segment = SharedRowSegment(max(len(ids) for ids in batches) * spec.dim * 2)
    segments = SharedRowSegments()
    prepared = []
    for ids in batches:
        unique, inverse = np.unique(ids, return_inverse=True)
        positions = np.flatnonzero(owners[unique % spec.num_slots] == 0)  # one shard's part
        prepared.append((ids, unique, inverse, positions, store.gather(spec.name, unique[positions], "bfloat16")))
    threads = torch.get_num_threads()

    def ms(step) -> float:
        torch.set_num_threads(1)  # shard actors and the client's loop thread run torch on one thread
        seconds = float(np.median(measure(lambda i: step(*prepared[i]), list(range(len(prepared))), 12)) * 1e3)
        torch.set_num_threads(threads)
        return seconds

    steps = {
        "client: deduplicate ids (np.unique)": ms(lambda ids, *_: np.unique(ids, return_inverse=True)),
        "client: split by shard": ms(lambda ids, unique, *_: split_by_shard(unique, owners)),
        f"shard: gather its ~{len(prepared[0][3])} rows + bfloat16 (ShardStore.gather)": ms(
            lambda ids, unique, inverse, positions, rows: store.gather(spec.name, unique[positions], "bfloat16")),
        "shard: write them at their places in the client's shared memory": ms(
            lambda ids, unique, inverse, positions, rows: segments.write(segment.name, 0, rows, positions.tobytes())),
        "client: copy rows out in the caller's order": ms(
            lambda ids, unique, inverse, *_: segment.rows(len(unique), spec.dim, torch.bfloat16).view(torch.int64)
            .index_select(0, torch.from_numpy(inverse))),
    }
    steps["gRPC calls (Unix socket), event loops, waiting for a core (the rest)"] = client_ms - sum(steps.values())
    segment.close()
    return steps


def record(system: str, shards: int, ids: str, batch: int, rows: float, seconds: np.ndarray, row_bytes: int) -> dict:
    """One system's figures; ``rows`` is the mean ids per call (below ``batch`` for deduplicated ids)."""
    rows_per_s = rows / seconds.mean()
    return {"system": system, "shards": shards, "ids": ids, "batch_rows": batch, "rows_per_s": rows_per_s,
            "gbytes_per_s": rows_per_s * row_bytes / 1e9, "p50_ms": float(np.percentile(seconds, 50) * 1e3),
            "p99_ms": float(np.percentile(seconds, 99) * 1e3)}


def repeats_for(batch: int) -> int:
    return int(np.clip(2_000_000 // batch, 10, 200))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]

    spec = TableSpec(name="bench", rows=args.rows, dim=args.dim, optimizer=OptimizerSpec(kind="sgd"), seed=1)
    serving = dataclasses.replace(spec, name="bench_serving", storage_dtype="bfloat16")
    rng = np.random.default_rng(0)
    cases = [("random", batch, [rng.integers(0, spec.rows, size=batch) for _ in range(4)]) for batch in args.batches]
    cases += [("sorted_unique", batch, [np.unique(i) for i in batches]) for kind, batch, batches in cases
              if batch == TARGET_BATCH]
    bf16_row_bytes, f32_row_bytes = args.dim * 2, args.dim * 4
    records = []

    def run(system: str, shards: int, fetch, row_bytes: int) -> None:
        for kind, batch, batches in cases:
            seconds = measure(fetch, batches, repeats_for(batch))
            records.append(record(system, shards, kind, batch, np.mean([len(i) for i in batches]), seconds, row_bytes))

    table = torch.from_numpy(init_rows(spec.seed, np.arange(spec.rows, dtype=np.int64), spec.dim, spec.init_std))
    run("index_select", 0, lambda i: table.index_select(0, torch.from_numpy(i)).to(torch.bfloat16), bf16_row_bytes)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"engram_memory": 16})
    for shards in args.shards:
        controller = start_controller(ControllerOptions(host="127.0.0.1"), name="bench-lookup")
        directory = ray.get(controller.deploy.remote([spec.to_dict(), serving.to_dict()], shards))
        token = ray.get(controller.connection_info.remote())["token"]
        for system, table, options in (
                ("memory_client", spec.name, {}),
                ("memory_client_asked", spec.name, {"read_shared_rows": False}),
                ("memory_client_tcp", spec.name, {"use_local_transport": False}),
                ("memory_client_tcp_grpc", spec.name, {"use_local_transport": False, "use_row_streams": False}),
                ("memory_client_serving", serving.name, {})):
            with MemoryClient(directory, token, **options) as client:
                run(system, shards, lambda i: client.lookup(table, i, dtype=torch.bfloat16).result(), bf16_row_bytes)
        stop_controller("bench-lookup")

    naive = NaiveTableActor.remote(spec.rows, spec.dim, spec.seed, spec.init_std)
    ray.get(naive.lookup.remote(np.arange(4)))
    run("naive_ray_actor", 1, lambda i: ray.get(naive.lookup.remote(i)), f32_row_bytes)
    ray.shutdown()

    report(records)
    # Other work on the machine skews every system; the load average says how much there was.
    print(f"\n1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)")
    if TARGET_BATCH in args.batches:
        client_ms, shards = min((r["p50_ms"], r["shards"]) for r in records if r["system"] == "memory_client_asked"
                                and r["batch_rows"] == TARGET_BATCH and r["ids"] == "random")
        steps = where_the_time_goes(spec, cases[args.batches.index(TARGET_BATCH)][2], shards, client_ms)
        print(f"\nwhere the time of one {TARGET_BATCH}-row co-located MemoryClient request on {shards} shard(s) goes "
              f"(random ids, p50 {client_ms:.1f} ms):")
        for step, step_ms in steps.items():
            print(f"  {step_ms:7.2f} ms  {step}")
        write_json("lookup.breakdown", steps)


def report(records: list[dict]) -> None:
    write_json("lookup", records)
    print(f"{'system':>22} {'shards':>6} {'ids':>13} {'batch':>7} {'rows/s':>12} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for r in records:
        print(f"{r['system']:>22} {r['shards']:>6} {r['ids']:>13} {r['batch_rows']:>7} {r['rows_per_s']:>12.0f} "
              f"{r['gbytes_per_s']:>7.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    for ids in ("random", "sorted_unique"):
        at = {(r["system"], r["shards"]): r["rows_per_s"] for r in records
              if r["batch_rows"] == TARGET_BATCH and r["ids"] == ids}
        if not at:
            continue
        for system in ("memory_client", "memory_client_asked", "memory_client_tcp", "memory_client_tcp_grpc",
                       "memory_client_serving"):
            best = max(v for (name, _), v in at.items() if name == system)
            print(f"at {TARGET_BATCH} {ids} ids: best {system} = {best / at[('index_select', 0)]:.2f}x index_select "
                  f"(target >= 0.5x), {best / at[('naive_ray_actor', 1)]:.2f}x the naive Ray actor (target >= 3x)")
    plot([r for r in records if r["ids"] == "random"])


def plot(records: list[dict]) -> None:
    with figure("lookup", figsize=(7, 4.5)) as (fig, ax):
        for key in sorted({(r["system"], r["shards"]) for r in records}):
            points = sorted((r["batch_rows"], r["rows_per_s"]) for r in records if (r["system"], r["shards"]) == key)
            label = f"{key[0]}, {key[1]} shard(s)" if key[0].startswith("memory_client") else key[0]
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="batch rows", ylabel="rows/s",
               title="Engram row lookup, dim 64 (bf16 on the wire)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()


if __name__ == "__main__":
    main()
