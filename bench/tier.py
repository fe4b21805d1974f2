"""The SSD tier: lookup and update rows/s of a table 4x its DRAM cache at several hit rates, against all-DRAM.

One shard's ShardStore in this process holds the same table twice, all in DRAM and tiered (rows and Adam
state in files under ``--tier-dir``, ``rows // 4`` rows cached). Every row is stepped once first (all
pages of rows and state touched, as in a running job) and the hot rows read once. Every call then gets a
fresh batch that draws ``hot share`` of its ids from a hot set of half the cache's size and the rest
uniformly from the whole table (sorted and unique, as the training path sends them); the hit rate is the
tier's own count of ids found cached. Both stores get the same batches, taking turns call by call so that
other load on the machine weighs on both alike, and the shares are measured in two passes (up, then
down); rows/s is of the median call, the ratio the median of tiered/DRAM speed on the same batch.

The files go through the OS page cache: where the machine's free memory holds them (the default size on a
24 GiB machine), a miss costs a copy from the page cache, not an SSD read, and the figures are the cache's
own costs (finding rows, evicting, writing back).
Run: ``python -m bench.tier [--rows N] [--tier-dir DIR]``; prints a table and writes bench/results/tier.json
and a PNG (the defaults take seconds on the 2-core development machine: 1M rows, 0.77 GB of files).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import torch

from bench.host import cpu_model
from bench.results_files import figure, write_json
from memory_service.core.table_spec import OptimizerSpec, TableSpec, TierSpec
from memory_service.row_store import ShardStore

CALLS = 24  # lookups and updates of each store at each hot share, half on the way up, half on the way down
HOT_SHARES = (0.0, 0.5, 0.9, 1.0)
DIM = 64


def batches(rng: np.random.Generator, rows: int, hot: np.ndarray, share: float, batch: int, count: int):
    """``count`` sorted unique id batches: ``share`` of ``batch`` draws from ``hot``, the rest from all rows."""
    from_hot = int(round(share * batch))
    return [np.unique(np.concatenate([rng.choice(hot, from_hot), rng.integers(0, rows, batch - from_hot)]))
            for _ in range(count)]


def timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def update(store: ShardStore, ids: np.ndarray, grads: np.ndarray) -> None:
    store.apply_update("t", store.check_update("t", ids, grads))


def measure_share(stores: dict[str, ShardStore], measured: dict, rng: np.random.Generator, hot: np.ndarray,
                  share: float, batch: int) -> None:
    """``CALLS // 2`` lookups and updates of fresh batches on each store, appended to ``measured``; the stores take
    turns on each batch, first one then the other."""
    rows = stores["dram"].spec("t").rows
    before = stores["tiered"].tier_stats("t")
    for call in range(CALLS // 2):
        lookup_ids, update_ids = batches(rng, rows, hot, share, batch, count=2)
        grads = rng.standard_normal((len(update_ids), DIM)).astype(np.float32)
        measured["lookup_ids"].append(len(lookup_ids))
        measured["update_ids"].append(len(update_ids))
        for kind in list(stores)[::1 if call % 2 else -1]:
            measured[f"{kind}_lookup"].append(timed(stores[kind].gather, "t", lookup_ids))
            measured[f"{kind}_update"].append(timed(update, stores[kind], update_ids, grads))
    after = stores["tiered"].tier_stats("t")
    measured["hits"] += after.hits - before.hits
    measured["accesses"] += after.hits + after.misses - before.hits - before.misses


def step_every_row(store: ShardStore, rows: int) -> None:
    """One zero-gradient Adam step on every row: all pages of rows and state touched, as after long training."""
    for start in range(0, rows, 1 << 16):
        ids = np.arange(start, min(rows, start + (1 << 16)))
        update(store, ids, np.zeros((len(ids), DIM), dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the table (a quarter cached)")
    parser.add_argument("--batch", type=int, default=16384, help="ids drawn for each call (fewer once unique)")
    parser.add_argument("--tier-dir", default=tempfile.gettempdir(), help="where the tiered table's files go")
    args = parser.parse_args()
    rows, batch = args.rows, args.batch
    cache_rows = rows // 4
    spec = TableSpec("t", rows=rows, dim=DIM, seed=1, optimizer=OptimizerSpec(kind="adam", lr=0.01))
    host_cpu = cpu_model()
    print(f"bench.tier: {rows:,} rows x {DIM} + Adam ({spec.bytes_per_row()} B/row), "
          f"{cache_rows:,} cached, batches of {batch:,} ids, files under {args.tier_dir}, host CPU {host_cpu} "
          f"({os.cpu_count()} cores)", flush=True)
    stores = {}
    for kind, table in (("dram", spec), ("tiered", dataclasses.replace(spec, tier=TierSpec(dram_rows=cache_rows)))):
        started = time.perf_counter()
        stores[kind] = ShardStore(tier_dir=args.tier_dir)
        stores[kind].add_table(table, range(table.num_slots))
        step_every_row(stores[kind], rows)
        print(f"  {kind}: table added and every row stepped once in {time.perf_counter() - started:.1f} s, "
              f"{stores[kind].memory_bytes() / 2**30:.2f} GiB of DRAM", flush=True)
    stores["tiered"].checksum("t")  # the cache written back,
    os.sync()  # and the files' dirty pages out to disk now, not during the measurement
    rng = np.random.default_rng(0)
    hot = rng.choice(rows, cache_rows // 2, replace=False)
    for store in stores.values():  # the hot rows read once, as a running job would have
        store.gather("t", np.sort(hot))
    kinds = [f"{kind}_{what}" for kind in stores for what in ("lookup", "update")]  # seconds per call
    calls = {share: {"lookup_ids": [], "update_ids": [], "hits": 0, "accesses": 0, **{kind: [] for kind in kinds}}
             for share in HOT_SHARES}
    for share in HOT_SHARES + HOT_SHARES[::-1]:  # up and down: a burst of other load weighs on two passes at most
        measure_share(stores, calls[share], rng, hot, share, batch)
    records = []
    for share, measured in calls.items():
        record = {"hot_share": share, "ids_per_call": float(np.mean(measured["lookup_ids"])),
                  "calls": len(measured["lookup_ids"]), "hit_rate": measured["hits"] / measured["accesses"]}
        for what in ("lookup", "update"):
            ids = np.asarray(measured[f"{what}_ids"], dtype=np.float64)
            dram, tiered = (np.asarray(measured[f"{kind}_{what}"]) for kind in ("dram", "tiered"))
            record[f"dram_{what}_rows_per_s"] = float(np.median(ids / dram))
            record[f"tiered_{what}_rows_per_s"] = float(np.median(ids / tiered))
            record[f"{what}_ratio"] = float(np.median(dram / tiered))  # tiered speed / DRAM's, call by call
        records.append(record)
        print(f"  hot share {share:.0%}: hit rate {record['hit_rate']:.1%}", flush=True)
    assert stores["tiered"].checksum("t") == stores["dram"].checksum("t"), "the tier changed the table"
    for store in stores.values():
        store.drop_table("t")
    report(records, args, spec, cache_rows, batch, host_cpu)


def report(records: list[dict], args, spec: TableSpec, cache_rows: int, batch: int, host_cpu: str) -> None:
    print(f"\n{'hot share':>10}{'hit rate':>10}{'lookup rows/s':>16}{'(DRAM)':>14}{'ratio':>7}"
          f"{'update rows/s':>16}{'(DRAM)':>14}{'ratio':>7}")
    for r in records:
        print(f"{r['hot_share']:>10.0%}{r['hit_rate']:>10.1%}{r['tiered_lookup_rows_per_s']:>16,.0f}"
              f"{r['dram_lookup_rows_per_s']:>14,.0f}{r['lookup_ratio']:>7.2f}{r['tiered_update_rows_per_s']:>16,.0f}"
              f"{r['dram_update_rows_per_s']:>14,.0f}{r['update_ratio']:>7.2f}")
    stem = "tier"
    meta = {"command": " ".join(["python -m bench.tier", *sys.argv[1:]]),
            "host_cpu": host_cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": spec.rows,
            "dim": spec.dim, "optimizer": "adam", "bytes_per_row": spec.bytes_per_row(), "cache_rows": cache_rows,
            "hot_rows": cache_rows // 2, "batch_ids": batch, "ids": "sorted unique; hot share from the hot set",
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    write_json(stem, {**meta, "results": records})
    with figure(stem, ncols=2, figsize=(9, 3.6)) as (fig, axes):
        labels = [f"{r['hit_rate']:.0%} hits" for r in records]
        x = np.arange(len(records))
        for ax, what in zip(axes, ("lookup", "update")):
            ax.bar(x - 0.2, [r[f"dram_{what}_rows_per_s"] / 1e6 for r in records], 0.4, label="all in DRAM")
            ax.bar(x + 0.2, [r[f"tiered_{what}_rows_per_s"] / 1e6 for r in records], 0.4, label="tiered (1/4 cached)")
            ax.set_xticks(x, labels)
            ax.set(ylabel="M rows/s", title=f"{what}s, {spec.rows / 1e6:g}M rows x {spec.dim} + Adam")
        axes[0].legend()


if __name__ == "__main__":
    main()
