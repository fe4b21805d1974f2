"""Batched greedy generation, tokens/s: remote rows (read-only serving tables on memory shards), read out of the
shards' shared memory, asked for, and asked for behind a hot-row cache on the device, vs in-process tables.

One process, one model (seed 0), the same prompts. In-process tables (on a GPU host, resident on the
GPU) and remote rows, from the same tables deployed as serving tables (bfloat16 rows on the CPU
shards, bfloat16 on the wire): ``remote`` reads them itself out of the co-located shards' shared memory
(``memory.read_shared_rows``, the default on the shards' machine), ``remote, asked`` asks the shards for
them, and ``remote, asked, cached`` does so through a ``CachedRowTable`` holding ``--cache-share`` of each
table's rows. They alternate call by call at each batch size, in-process first and last; each figure is a
median over its calls. The cache starts empty and is kept from one batch size to the next; its hit rate,
the row bytes each remote runtime fetched over the wire (counted by its client) and the cached one's cut
against the uncached one that asks are over each batch size's calls, the warm-up call included. Every call
at a batch size repeats the same prompts, so the cache soon holds nearly every row they touch: a best case
for its hit rate (``bench.row_skew`` measures fresh text's). The in-process tables hold the serving tables'
rows rounded to bfloat16, so all sides compute on the same values and greedy decoding must give the same
tokens: the benchmark reports the share that do. It times whole ``generate_ids`` calls (prefill plus
``max_new_tokens`` tokens, no stop at EOS), a prefill alone (one new token), whence a decode step's
time, and one decode step's lookups of every Engram layer, awaited alone.
Run: ``python -m bench.generate [--preset cpu|gpu]``; prints a table, writes
bench/results/generate[_gpu].json and a PNG.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.host import cpu_model
from bench.results_files import figure, write_json
from bench.prompts import PROMPTS
from bench.train_step import PRESETS as TRAIN_PRESETS, row_bytes_fetched
from compute.generate import Generator
from compute.memory.cached_table import CacheStats
from compute.runtime import EngramRuntime, build_runtime
from compute.train.config import CacheConfig, MemoryConfig, TrainConfig
from compute.train.job import connect_ray
from compute.train.tables import engram_table_specs
from memory_service.deploy import MemoryHandle, deploy

PRESETS = {
    # About 2 minutes on 2 cores: bench.train_step's CPU model.
    "cpu": dict(model=TRAIN_PRESETS["cpu"]["model"], engram=TRAIN_PRESETS["cpu"]["engram"],
                data=TRAIN_PRESETS["cpu"]["data"], device="cpu",
                batches=(1, 4, 16), max_new_tokens=24, repeats=4),
    # An H100/H200 host: bench.train_step's GPU model, tables of 3.2M rows x 64 per layer on the host's CPU shards.
    # Five calls a cell: with three, a cell's ratio moved by up to 0.26 between runs on hosts of one kind.
    "gpu": dict(model=TRAIN_PRESETS["gpu"]["model"], engram=TRAIN_PRESETS["gpu"]["engram"],
                data=TRAIN_PRESETS["gpu"]["data"], device="cuda",
                batches=(1, 8, 32), max_new_tokens=64, repeats=5),
}
IN_PROCESS, REMOTE, ASKED, CACHED = "in-process", "remote", "remote, asked", "remote, asked, cached"


def serving_runtimes(config: TrainConfig, device: torch.device, shards: int) -> tuple[EngramRuntime, EngramRuntime,
                                                                                      MemoryHandle]:
    """The same model (``config.seed``) twice: on in-process tables holding the serving tables' bfloat16 rows,
    and on those serving tables deployed on ``shards`` memory shards (Ray connected); and the service."""
    local = build_runtime(config.replace(memory__tables="local", memory__cache=CacheConfig()), device, None)
    with torch.no_grad():
        for table in local.tables.values():
            table.weight.copy_(table.weight.to(torch.bfloat16))
    specs = [dataclasses.replace(spec, storage_dtype="bfloat16") for spec in engram_table_specs(config)]
    handle = deploy(specs, shards)
    try:
        remote = build_runtime(config.replace(memory__tables="remote", memory__wire_dtype="bfloat16"), device, handle)
    except BaseException:
        handle.stop()
        raise
    for runtime in (local, remote):
        runtime.model.eval()
    return local, remote, handle


def batch_prompts(runtime: EngramRuntime, batch: int) -> list[list[int]]:
    """``batch`` token-id prompts, cycling through bench.serve's."""
    return [runtime.compressor.encode(PROMPTS[i % len(PROMPTS)]).tolist() for i in range(batch)]


def seconds_of(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def compare(runtimes: dict[str, EngramRuntime], batch: int, preset: dict) -> list[dict]:
    """Generation tokens/s, decode step time and one step's lookup time of ``batch`` prompts on each of
    ``runtimes`` (in-process tables first), the share of each one's tokens equal to the in-process ones, and
    for a cached one its hit rate and the wire bytes it saved over these calls.

    They alternate call by call, in-process first and last, and each figure is a median over its
    calls: whatever drifts over the run (the machine's other load) weighs on all alike.
    """
    max_new_tokens, repeats = preset["max_new_tokens"], preset["repeats"]
    local = runtimes[IN_PROCESS]
    device = local.model.embed.weight.device
    prompts = batch_prompts(local, batch)
    # One decode step's row ids: the first prompt token's n-grams, one position per row.
    firsts = local.compressor.compress(np.array([prompt[:1] for prompt in prompts]))
    row_ids = {layer: torch.from_numpy(ids) for layer, ids in local.hasher.row_ids(firsts).items()}
    stats_before = {name: CacheStats.of_tables(runtime.tables.values()) for name, runtime in runtimes.items()}
    fetched_before = {name: row_bytes_fetched(runtime.client) for name, runtime in runtimes.items()}
    generators = {name: Generator(rt.model, rt.compressor, rt.hasher) for name, rt in runtimes.items()}
    tokens = {name: generator.generate_ids(prompts, max_new_tokens, stop_at_eos=False)  # untimed: warms up
              for name, generator in generators.items()}

    @torch.inference_mode()  # as generation runs them
    def lookup(runtime: EngramRuntime) -> None:
        for rows in runtime.model.lookup_rows(row_ids).values():
            rows.result()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: {"generate": [], "prefill": [], "lookup": []} for name in runtimes}
    for name in list(runtimes) * repeats + [IN_PROCESS]:
        generator, measured = generators[name], times[name]
        measured["generate"].append(seconds_of(
            lambda: generator.generate_ids(prompts, max_new_tokens, stop_at_eos=False)))
        measured["prefill"].append(seconds_of(lambda: generator.generate_ids(prompts, 1, stop_at_eos=False)))
        measured["lookup"].extend(seconds_of(lambda: lookup(runtimes[name])) for _ in range(5))
    records = []
    for name, measured in times.items():
        seconds, prefill_s = statistics.median(measured["generate"]), statistics.median(measured["prefill"])
        records.append({"tables": name, "batch": batch, "new_tokens": batch * max_new_tokens, "calls":
                        len(measured["generate"]), "seconds": seconds,
                        "tokens_per_s": batch * max_new_tokens / seconds, "prefill_ms": 1e3 * prefill_s,
                        "decode_step_ms": 1e3 * (seconds - prefill_s) / (max_new_tokens - 1),
                        "lookup_ms": 1e3 * statistics.median(measured["lookup"]), "seconds_each": measured["generate"],
                        "row_bytes_fetched": row_bytes_fetched(runtimes[name].client) - fetched_before[name]})
    in_process = records[0]
    for record in records:
        record["vs_in_process"] = record["tokens_per_s"] / in_process["tokens_per_s"]
        name = record["tables"]
        if name != IN_PROCESS:
            same = [a == b for ra, rb in zip(tokens[IN_PROCESS], tokens[name]) for a, b in zip(ra, rb)]
            record["identical_tokens"] = sum(same) / len(same)
        stats = CacheStats.of_tables(runtimes[name].tables.values())
        if stats is not None:
            rows, hits, saved, admitted = (after - before for after, before in
                                           zip(dataclasses.astuple(stats), dataclasses.astuple(stats_before[name])))
            record.update(cache_hit_rate=hits / rows, cache_bytes_saved=saved, cache_bytes_admitted=admitted)
            # The same calls on the same tokens as the uncached runtime that asks: the same rows looked up.
            uncached = next(r for r in records if r["tables"] == ASKED)["row_bytes_fetched"]
            record["row_bytes_cut"] = 1 - record["row_bytes_fetched"] / uncached if uncached else 0.0
    for r in records:
        cache = f", {100 * r['cache_hit_rate']:.0f}% of rows from the cache" if "cache_hit_rate" in r else ""
        print(f"  {r['tables']:<21} batch {batch:>3}: {r['tokens_per_s']:8.1f} tokens/s ({r['vs_in_process']:.3f}x), "
              f"decode step {r['decode_step_ms']:6.2f} ms, lookup {r['lookup_ms']:5.2f} ms{cache}", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--address", help="a Ray cluster to run on (default: an embedded local one)")
    parser.add_argument("--cache-share", type=float, default=0.1,
                        help="rows of each table the cached variant keeps on the device, as a share (default 0.1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[args.preset]
    device = torch.device(preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.generate: the gpu preset needs a CUDA GPU")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    host_cpu = cpu_model()
    print(f"bench.generate --preset {args.preset}: device {device} ({device_name}), host CPU {host_cpu} "
          f"({os.cpu_count()} cores)", flush=True)
    connect_ray(args.address, args.shards)
    config = TrainConfig(model=preset["model"], engram=preset["engram"], data=preset["data"],
                         memory=MemoryConfig(shards=args.shards))
    local, remote, handle = serving_runtimes(config, device, args.shards)
    runtimes = {IN_PROCESS: local, REMOTE: remote}
    try:
        cache_rows = int(args.cache_share * max(spec.rows for spec in engram_table_specs(config)))
        asked = remote.config.replace(memory__read_shared_rows=False)
        for name, variant in ((ASKED, asked), (CACHED, asked.replace(memory__cache=CacheConfig(rows=cache_rows)))):
            runtimes[name] = build_runtime(variant, device, handle)
            runtimes[name].model.eval()
        records = [record for batch in preset["batches"] for record in compare(runtimes, batch, preset)]
    finally:
        for runtime in runtimes.values():
            runtime.close()
        handle.stop()
    report(records, args, preset, device_name, host_cpu)


def report(records: list[dict], args, preset: dict, device_name: str, host_cpu: str) -> None:
    print(f"\n{'tables':<23}{'batch':>6}{'tokens/s':>11}{'vs local':>10}{'step ms':>9}{'prefill ms':>12}"
          f"{'lookup ms':>11}{'same tokens':>13}{'cache hits':>12}{'MB fetched':>12}{'cut':>7}{'MB admitted':>13}")
    for r in records:
        same = f"{100 * r['identical_tokens']:.1f}%" if "identical_tokens" in r else ""
        hits = f"{100 * r['cache_hit_rate']:.1f}%" if "cache_hit_rate" in r else ""
        fetched = f"{r['row_bytes_fetched'] / 1e6:.2f}" if r["tables"] != IN_PROCESS else ""
        cut = f"{100 * r['row_bytes_cut']:.1f}%" if "row_bytes_cut" in r else ""
        admitted = f"{r['cache_bytes_admitted'] / 1e6:.2f}" if "cache_bytes_admitted" in r else ""
        print(f"{r['tables']:<23}{r['batch']:>6}{r['tokens_per_s']:>11.1f}{r['vs_in_process']:>9.3f}x"
              f"{r['decode_step_ms']:>9.2f}{r['prefill_ms']:>12.1f}{r['lookup_ms']:>11.2f}{same:>13}{hits:>12}"
              f"{fetched:>12}{cut:>7}{admitted:>13}")
    stem = "generate" if args.preset == "cpu" else "generate_gpu"
    meta = {"command": " ".join(["python -m bench.generate", *sys.argv[1:]]), "preset": args.preset,
            "device_name": device_name, "host_cpu": host_cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "shards": args.shards, "cache_share": args.cache_share, "max_new_tokens": preset["max_new_tokens"], "repeats": preset["repeats"],
            "model": {"hidden_size": preset["model"].hidden_size, "num_layers": preset["model"].num_layers,
                      "engram_vocab_size": list(preset["engram"].engram_vocab_size),
                      "engram_layer_ids": list(preset["engram"].layer_ids)}}
    write_json(stem, {**meta, "results": records})
    with figure(stem, figsize=(7, 3.8)) as (fig, ax):
        for tables, style in ((IN_PROCESS, "--"), (REMOTE, "-"), (ASKED, "-."), (CACHED, ":")):
            rows = [r for r in records if r["tables"] == tables]
            ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], style, marker="o",
                    label=f"{tables} tables")
        ax.set(xscale="log", xlabel="batch (prompts per generate call)", ylabel="tokens/s",
               title=f"greedy generation: remote rows, cached or not, vs in-process tables ({device_name})")
        ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
