"""Fault injection: every scenario of ``bench/fault_injection.py`` against its fault-free twin, then a soak.

For each scenario (a shard's primary or replica SIGKILLed, a primary SIGSTOPped, the controller
SIGKILLed or SIGSTOPped for 3 s, every TCP connection dropped three times (where ``ss -K`` may, as
root), a worker dying mid-step, a shard with no replica SIGKILLed): failed requests, whether the
final tables equal the fault-free run's (so no acknowledged update was lost), whether every group's
copies are bit-identical again, failover time (signal to clients routed around the shard) and
recovery time (signal to every copy back; for the controller, to its directory serving again); for
the dead worker, how soon its steps were aborted and what the shards hold after. The soak
runs several ranks and a reader for ``--soak-s`` seconds on two copies and samples the shards' memory.
Run: ``python -m bench.faults [--steps 60] [--soak-s 120]``; prints a table, writes
bench/results/faults.json and faults.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time

from bench.fault_injection import SCENARIOS, Workload, can_drop_connections, fault_free_checksums, run_scenario, soak
from bench.host import cpu_model
from bench.results_files import figure, write_json
from compute.train.job import connect_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="synchronous steps per run (default 60)")
    parser.add_argument("--ranks", type=int, default=2, help="pushing ranks, each with a client (default 2)")
    parser.add_argument("--soak-s", type=float, default=120.0, help="soak length in seconds; 0 skips it")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), help="default: all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    connect_ray(None, 16)
    workload = Workload(steps=args.steps, ranks=args.ranks)
    names = args.scenarios or [name for name, scenario in SCENARIOS.items()
                               if scenario.target != "connections" or can_drop_connections()]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engram-faults-") as root:
        expected = fault_free_checksums(workload, os.path.join(root, "twin"))
        records = []
        for index, name in enumerate(names):
            print(f"{name} ...", file=sys.stderr, flush=True)
            records.append(run_scenario(SCENARIOS[name], workload, expected, os.path.join(root, str(index))))
        soaked = soak(dataclasses.replace(workload, steps=10**9), args.soak_s, os.path.join(root, "soak")) \
            if args.soak_s else None
    report(records, soaked, args, workload, time.perf_counter() - start)


def report(records: list[dict], soaked: dict | None, args, workload: Workload, elapsed_s: float) -> None:
    header = f"{'scenario':<26}{'copies':>7}{'failed':>7}{'pushes':>7}{'lookups':>8}{'p99 ms':>8}" \
             f"{'equal':>7}{'identical':>10}{'failover s':>11}{'recovered s':>12}"
    print(header)
    for r in records:
        recovered = r["recovered_s"] if r.get("controller_back_s") is None else r["controller_back_s"]
        print(f"{r['scenario']:<26}{r['replicas']:>7}{r['failed_requests']:>7}{r['pushes']:>7}{r['lookups']:>8}"
              f"{r['lookup_p99_ms']:>8.1f}{str(r['tables_equal']):>7}{str(r['copies_identical']):>10}"
              f"{_seconds(r['failover_s']):>11}{_seconds(recovered):>12}")
        if "steps_cleared_s" in r:
            print(f"  {r['aborted_steps']} steps aborted (step timeout {r['step_timeout_s']:.0f} s); none pending "
                  f"{_seconds(r['steps_cleared_s'])} s after the last push; shard bytes "
                  f"{r['held_bytes_before']} before, {r['held_bytes_after']} after")
    if soaked:
        print(f"soak {soaked['seconds']:.0f} s, {soaked['ranks']} ranks + a reader: {soaked['failed_requests']} failed, "
              f"{soaked['steps']} steps, {soaked['lookups']} lookups, p99 {soaked['lookup_p99_ms']:.1f} ms, shard "
              f"rows {soaked['shard_bytes_first'] / 2**20:.1f} -> {soaked['shard_bytes_last'] / 2**20:.1f} MiB, "
              f"resident {soaked['shard_rss'][0] / 2**20:.0f} -> {soaked['shard_rss'][-1] / 2**20:.0f} MiB")
    write_json("faults", {"command": " ".join(["python -m bench.faults", *sys.argv[1:]]), "host_cpu": cpu_model(),
                          "cpu_count": os.cpu_count(), "workload": dataclasses.asdict(workload) | {
                              "table": workload.table.to_dict()}, "elapsed_s": elapsed_s,
                          "scenarios": records, "soak": soaked})
    with figure("faults", 1, 2, figsize=(11, 4)) as (_, (times, memory)):
        labels = [r["scenario"].replace("shard ", "") for r in records]
        positions = range(len(records))
        times.barh([p + 0.2 for p in positions], [r["failover_s"] or 0 for r in records], height=0.4,
                   label="failover (routed around)")
        times.barh([p - 0.2 for p in positions], [r.get("controller_back_s") or r["recovered_s"] or 0 for r in records],
                   height=0.4, label="all copies back (controller: serving again)")
        times.set_yticks(list(positions), labels)
        times.set_xlabel("seconds after the signal")
        times.legend(fontsize=8)
        times.set_title("failover and recovery")
        if soaked:
            memory.plot(soaked["sample_s"], [b / 2**20 for b in soaked["shard_bytes"]], label="rows + state")
            memory.plot(soaked["sample_s"], [b / 2**20 for b in soaked["shard_rss"]], label="shard processes' RSS")
            memory.set_xlabel("seconds into the soak")
            memory.set_ylabel("MiB, all shards")
            memory.legend(fontsize=8)
            memory.set_title(f"soak: p99 lookup {soaked['lookup_p99_ms']:.1f} ms, {soaked['failed_requests']} failed")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
