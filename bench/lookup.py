"""Lookup throughput: in-process index_select vs MemoryClient on 1/2/4 shards vs a naive Ray actor.

Run: ``python bench/lookup.py`` (prints a table, writes bench/results/lookup.json and lookup.png).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch

from compute.memory_client import MemoryClient, _lookup_rows
from memory_service.controller import ControllerOptions, start_controller, stop_controller
from memory_service.row_init import init_rows
from memory_service.row_store import ShardStore
from memory_service.table_spec import OptimizerSpec, TableSpec
from memory_service.wire import encode_lookup_response
from protos import engram_memory_v1_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results"
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


def where_the_time_goes(spec: TableSpec, batches: list[np.ndarray], client_ms: float) -> dict[str, float]:
    """Milliseconds of each step of one MemoryClient lookup, timed alone in this process; the rest is gRPC."""
    store = ShardStore()
    store.add_table(spec, range(spec.num_slots))
    ids = batches[0]
    unique, inverse = torch.unique(torch.from_numpy(ids), sorted=True, return_inverse=True)
    rows = store.gather(spec.name, unique.numpy(), "bfloat16")
    reply = encode_lookup_response(rows, pb.BFLOAT16, 1)
    threads = torch.get_num_threads()

    def ms(fn, single_thread: bool = False) -> float:
        torch.set_num_threads(1 if single_thread else threads)  # shard actors run torch on one thread
        seconds = float(np.median(measure(lambda _: fn(), batches, 10)) * 1e3)
        torch.set_num_threads(threads)
        return seconds

    steps = {
        "client: deduplicate ids (torch.unique)": ms(lambda: torch.unique(torch.from_numpy(ids), sorted=True,
                                                                          return_inverse=True)),
        "shard: gather rows + bfloat16 (ShardStore.gather, 1 thread)": ms(
            lambda: store.gather(spec.name, unique.numpy(), "bfloat16"), single_thread=True),
        "shard: encode the reply (one copy)": ms(lambda: encode_lookup_response(rows, pb.BFLOAT16, 1), True),
        "client: copy rows out of the reply + reorder": ms(
            lambda: torch.empty_like(rows).copy_(torch.frombuffer(_lookup_rows(reply), dtype=torch.bfloat16)
                                                 .view_as(rows)).view(torch.int64).index_select(0, inverse)),
    }
    steps["gRPC transport, request parsing, event loops, client split (the rest)"] = client_ms - sum(steps.values())
    return steps


def record(system: str, shards: int, batch: int, seconds: np.ndarray, row_bytes: int) -> dict:
    rows_per_s = batch / seconds.mean()
    return {"system": system, "shards": shards, "batch_rows": batch, "rows_per_s": rows_per_s,
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
    rng = np.random.default_rng(0)
    ids = {batch: [rng.integers(0, spec.rows, size=batch) for _ in range(4)] for batch in args.batches}
    bf16_row_bytes, f32_row_bytes = args.dim * 2, args.dim * 4
    records = []

    table = torch.from_numpy(init_rows(spec.seed, np.arange(spec.rows, dtype=np.int64), spec.dim, spec.init_std))
    for batch in args.batches:
        seconds = measure(lambda i: table.index_select(0, torch.from_numpy(i)).to(torch.bfloat16), ids[batch],
                          repeats_for(batch))
        records.append(record("index_select", 0, batch, seconds, bf16_row_bytes))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, resources={"engram_memory": 16})
    for shards in args.shards:
        controller = start_controller(ControllerOptions(host="127.0.0.1"), name="bench-lookup")
        directory = ray.get(controller.deploy.remote([spec.to_dict()], shards))
        token = ray.get(controller.connection_info.remote())["token"]
        with MemoryClient(directory, token) as client:
            for batch in args.batches:
                seconds = measure(lambda i: client.lookup("bench", i, dtype=torch.bfloat16).result(), ids[batch],
                                  repeats_for(batch))
                records.append(record("memory_client", shards, batch, seconds, bf16_row_bytes))
        stop_controller("bench-lookup")

    naive = NaiveTableActor.remote(spec.rows, spec.dim, spec.seed, spec.init_std)
    ray.get(naive.lookup.remote(np.arange(4)))
    for batch in args.batches:
        seconds = measure(lambda i: ray.get(naive.lookup.remote(i)), ids[batch], repeats_for(batch))
        records.append(record("naive_ray_actor", 1, batch, seconds, f32_row_bytes))
    ray.shutdown()

    report(records)
    # Other work on the machine skews every system; the load average says how much there was.
    print(f"\n1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)")
    if TARGET_BATCH in args.batches:
        client_ms = min(r["p50_ms"] for r in records if r["system"] == "memory_client" and r["batch_rows"] == TARGET_BATCH)
        steps = where_the_time_goes(spec, ids[TARGET_BATCH], client_ms)
        print(f"\nwhere the time of one {TARGET_BATCH}-row MemoryClient lookup goes (p50 {client_ms:.1f} ms):")
        for step, step_ms in steps.items():
            print(f"  {step_ms:7.2f} ms  {step}")
        (RESULTS / "lookup.breakdown.json").write_text(json.dumps(steps, indent=2))


def report(records: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lookup.json").write_text(json.dumps(records, indent=2))
    print(f"{'system':>16} {'shards':>6} {'batch':>7} {'rows/s':>12} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for r in records:
        print(f"{r['system']:>16} {r['shards']:>6} {r['batch_rows']:>7} {r['rows_per_s']:>12.0f} "
              f"{r['gbytes_per_s']:>7.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    at = {(r["system"], r["shards"]): r["rows_per_s"] for r in records if r["batch_rows"] == TARGET_BATCH}
    if at:
        best = max(v for (system, _), v in at.items() if system == "memory_client")
        print(f"\nat {TARGET_BATCH} rows: best MemoryClient = {best / at[('index_select', 0)]:.2f}x index_select "
              f"(target >= 0.5x), {best / at[('naive_ray_actor', 1)]:.2f}x the naive Ray actor (target >= 3x)")
    plot(records)


def plot(records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["system"], r["shards"]) for r in records}):
        points = sorted((r["batch_rows"], r["rows_per_s"]) for r in records if (r["system"], r["shards"]) == key)
        label = key[0] if key[0] != "memory_client" else f"memory_client, {key[1]} shard(s)"
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch rows", ylabel="rows/s",
           title="Engram row lookup, dim 64 (bf16 on the wire)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "lookup.png", dpi=120)


if __name__ == "__main__":
    main()
