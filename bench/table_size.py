"""Tables of real size: deploy time, shard memory per row and lookup rows/s of a large table against a 3M-row one.

Deploys two memory services side by side on the same shard count, a 3M-row table and a large one (dim 64,
Adam), timing each deploy from the controller's call to tables serving (shards started, tables allocated;
a table of more than ``row_store.FILL_AT_ONCE_ROWS`` rows a shard fills its rows lazily) and on to every
row initialised (the shards' ``unfilled_rows`` at 0); the large table's lookups while it fills are timed
too. Then looks up 64K unique random ids (sorted, as the training path sends them) on each, in
rounds of alternating order so that other load on the machine weighs on both alike, with a co-located
MemoryClient (bfloat16 on the wire); rows/s is of the median lookup. Resident memory is the shard
processes' RSS once every row is initialised: rows are written then, the optimizer state's pages only once
rows are stepped. The shards' rows are in transparent huge pages unless ``NUMPY_MADVISE_HUGEPAGE=0`` is set
for the run (the embedded Ray's shards inherit it), which compares both.
Run: ``python -m bench.table_size [--preset cpu|gpu] [--rows N]``; prints a table and writes
bench/results/table_size[_gpu].json and a PNG.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from bench.host import cpu_model
from bench.lookup import measure
from bench.results_files import figure, write_json
from compute.memory.client import MemoryClient
from memory_service.core.table_spec import TableSpec
from memory_service.deploy import (SHARD_RESOURCE, ControllerOptions, connect, describe_shard_memory, human_bytes,
                                   start_controller, stop_controller)

PRESETS = {
    # Fits the 2-core, 24 GiB development machine: 10M rows (2.6 GB of rows resident, 7.7 GB with Adam's state).
    "cpu": dict(rows=10_000_000, shards=2, rounds=5, repeats=10),
    # The GPU host (16 cores, 128 GiB): the 100M-row table, 77 GB with Adam's state over 2 shards.
    "gpu": dict(rows=100_000_000, shards=2, rounds=8, repeats=20),
}
SMALL_ROWS = 3_000_000
BATCH = 65536


def huge_pages() -> bool:
    """Whether the shards (which inherit this environment) ask for transparent huge pages for their rows."""
    return os.environ.get("NUMPY_MADVISE_HUGEPAGE", "1") != "0"


def shard_resident_bytes(controller: str) -> int | None:
    """Summed RSS of the controller's live shard processes, where they run on this machine (else None)."""
    import ray._private.state

    pids = [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "ShardActor" and a["State"] == "ALIVE"
            and (a.get("Name") or "").startswith(f"{controller}.shard-")]
    try:
        return sum(int(line.split()[1]) * 1024 for pid in pids for line in Path(f"/proc/{pid}/status").open()
                   if line.startswith("VmRSS:")) if pids else None
    except OSError:  # a shard on another node
        return None


def deploy_table(spec: TableSpec, shards: int) -> tuple[str, ray.actor.ActorHandle, str, str, float]:
    """A service of its own holding ``spec``, serving: its controller's name and handle, directory, data token
    and when (``time.perf_counter``) the deploy began."""
    name = f"bench-table-size-{spec.name}"
    controller = start_controller(ControllerOptions(host="127.0.0.1"), name=name)
    started = time.perf_counter()
    directory = ray.get(controller.deploy.remote([spec.to_dict()], shards))
    return name, controller, directory, ray.get(controller.connection_info.remote())["token"], started


def wait_until_filled(controller, started: float, timeout_s: float = 1800.0) -> float:
    """Seconds from ``started`` until every shard of ``controller`` reports all its rows initialised."""
    deadline = time.perf_counter() + timeout_s
    while any(shard["unfilled_rows"] for shard in ray.get(controller.status.remote())):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"rows still without their initial values after {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rows", type=int, help="rows of the large table (default: the preset's)")
    parser.add_argument("--shards", type=int, help="shards of each service (default: the preset's)")
    parser.add_argument("--address", help="a Ray cluster to run on (default: an embedded local one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[args.preset]
    shards = args.shards or preset["shards"]
    rows = args.rows or preset["rows"]
    if rows < SMALL_ROWS:
        sys.exit(f"bench.table_size: --rows must be at least the small table's {SMALL_ROWS:,}, got {rows:,}")
    host_cpu = cpu_model()
    print(f"bench.table_size --preset {args.preset}: {rows:,} rows against {SMALL_ROWS:,}, {shards} shard(s) each, "
          f"rows in huge pages: {huge_pages()}, host CPU {host_cpu} ({os.cpu_count()} cores)", flush=True)
    connect(args.address, resources={SHARD_RESOURCE: 8})
    specs = [TableSpec(name=name, rows=n, dim=64, seed=1) for name, n in (("small", SMALL_ROWS), ("large", rows))]
    rng = np.random.default_rng(0)
    services, records = [], []
    try:
        for spec in specs:
            print(describe_shard_memory(spec, shards), flush=True)
            name, controller, directory, token, started = deploy_table(spec, shards)
            serving_s = time.perf_counter() - started
            client = MemoryClient(directory, token)
            services.append((name, client))
            batches = [np.sort(rng.choice(spec.rows, BATCH, replace=False)) for _ in range(4)]
            # Fresh batches while the rows fill: each lookup fills the rows it reads that the background has not.
            filling = measure(lambda ids: client.lookup(spec.name, ids).result(),
                              [np.sort(rng.choice(spec.rows, BATCH, replace=False)) for _ in range(4)],
                              preset["repeats"], warmup=0)
            filled_s = wait_until_filled(controller, started)
            records.append({"rows": spec.rows, "deploy_s": serving_s, "filled_s": filled_s,
                            "filling_p50_ms": float(np.percentile(filling, 50) * 1e3),
                            "bytes_per_row": spec.bytes_per_row(), "bytes": spec.rows * spec.bytes_per_row(),
                            "resident_bytes": shard_resident_bytes(name), "batches": batches, "seconds": []})
            print(f"  serving in {serving_s:.1f} s, every row initialised in {filled_s:.1f} s (lookups meanwhile: "
                  f"p50 {records[-1]['filling_p50_ms']:.2f} ms)", flush=True)
        for round_ in range(preset["rounds"]):
            for (_, client), record, spec in list(zip(services, records, specs))[::1 if round_ % 2 else -1]:
                record["seconds"].extend(measure(lambda ids: client.lookup(spec.name, ids).result(),
                                                 record["batches"], preset["repeats"]))
    finally:
        for name, client in services:
            client.close()
            stop_controller(name)
    report(records, args, shards, host_cpu)


def report(records: list[dict], args, shards: int, host_cpu: str) -> None:
    for record in records:
        seconds = np.asarray(record.pop("seconds"))
        record.pop("batches")
        record.update(rows_per_s=BATCH / np.median(seconds), p50_ms=float(np.percentile(seconds, 50) * 1e3),
                      p99_ms=float(np.percentile(seconds, 99) * 1e3))
    print(f"\n{'rows':>13}{'serving s':>10}{'filled s':>10}{'B/row':>7}{'held':>11}{'resident':>11}"
          f"{'rows/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'filling p50':>12}")
    for r in records:
        resident = human_bytes(r["resident_bytes"]) if r["resident_bytes"] else "?"
        print(f"{r['rows']:>13,}{r['deploy_s']:>10.1f}{r['filled_s']:>10.1f}{r['bytes_per_row']:>7}"
              f"{human_bytes(r['bytes']):>11}{resident:>11}{r['rows_per_s']:>13,.0f}{r['p50_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}{r['filling_p50_ms']:>12.2f}")
    small, large = records
    ratio = large["rows_per_s"] / small["rows_per_s"]
    print(f"lookup rows/s of the {large['rows']:,}-row table: {ratio:.2f}x the {small['rows']:,}-row table's "
          f"(target >= 0.9); serving {large['deploy_s']:.1f} s after the deploy began (target < 60 s on the GPU "
          f"host), every row initialised after {large['filled_s']:.1f} s")
    stem = "table_size" if args.preset == "cpu" else "table_size_gpu"
    meta = {"command": " ".join(["python -m bench.table_size", *sys.argv[1:]]), "preset": args.preset,
            "host_cpu": host_cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "shards": shards,
            "dim": 64, "optimizer": "adam", "batch_rows": BATCH, "ids": "sorted unique random",
            "huge_pages": huge_pages(), "load_average": os.getloadavg()[0], "lookup_ratio": ratio}
    write_json(stem, {**meta, "results": records})
    with figure(stem, ncols=2, figsize=(9, 3.6)) as (fig, (deploy, lookup)):
        labels = [f"{r['rows'] / 1e6:g}M rows" for r in records]
        deploy.bar(labels, [r["filled_s"] for r in records], color="lightgray", label="every row initialised")
        deploy.bar(labels, [r["deploy_s"] for r in records], label="serving")
        deploy.set(ylabel="seconds", title=f"deploy on {shards} shard(s), dim 64 + Adam")
        deploy.legend()
        lookup.bar(labels, [r["rows_per_s"] / 1e6 for r in records])
        lookup.set(ylabel="M rows/s", title=f"lookup of {BATCH // 1024}K unique random ids")


if __name__ == "__main__":
    main()
