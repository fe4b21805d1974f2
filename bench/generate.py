"""Batched greedy generation, tokens/s: remote rows (read-only serving tables on memory shards) vs in-process tables.

One process, one model (seed 0), the same prompts. At each batch size, in-process tables (on a GPU
host, resident on the GPU) run first and again last, and the ratios are against the mean of the two;
remote rows run between, from the same tables deployed as serving tables (bfloat16 rows on the CPU
shards, bfloat16 on the wire). The in-process tables hold those rows rounded to bfloat16 too, so both
sides compute on the same values and greedy decoding must give the same tokens: the benchmark reports
the share that do.
Per batch size it times whole ``generate_ids`` calls (prefill plus ``max_new_tokens`` tokens, no stop
at EOS), a prefill alone (one new token) to get the time of a decode step, and one decode step's
lookups of every Engram layer awaited alone.
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
from bench.serve import PROMPTS
from bench.train_step import PRESETS as TRAIN_PRESETS
from compute.generate import Generator
from compute.runtime import EngramRuntime, build_runtime
from compute.train.config import MemoryConfig, TrainConfig
from compute.train.job import connect_ray
from compute.train.tables import engram_table_specs
from memory_service.deploy import MemoryHandle, deploy

PRESETS = {
    # About 2 minutes on 2 cores: bench.train_step's CPU model.
    "cpu": dict(model=TRAIN_PRESETS["cpu"]["model"], engram=TRAIN_PRESETS["cpu"]["engram"],
                data=TRAIN_PRESETS["cpu"]["data"], device="cpu",
                batches=(1, 4, 16), max_new_tokens=24, repeats=3),
    # An H100/H200 host: bench.train_step's GPU model, tables of 3.2M rows x 64 per layer on the host's CPU shards.
    "gpu": dict(model=TRAIN_PRESETS["gpu"]["model"], engram=TRAIN_PRESETS["gpu"]["engram"],
                data=TRAIN_PRESETS["gpu"]["data"], device="cuda",
                batches=(1, 8, 32), max_new_tokens=64, repeats=3),
}
IN_PROCESS, REMOTE = "in-process", "remote"


def serving_runtimes(config: TrainConfig, device: torch.device, shards: int) -> tuple[EngramRuntime, EngramRuntime,
                                                                                      MemoryHandle]:
    """The same model (``config.seed``) twice: on in-process tables holding the serving tables' bfloat16 rows,
    and on those serving tables deployed on ``shards`` memory shards (Ray connected); and the service."""
    local = build_runtime(config.replace(memory__tables="local"), device, None)
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


def timed(call, repeats: int) -> tuple[float, object]:
    """The median wall seconds of ``repeats`` calls, after one untimed call, and the last call's result."""
    result = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(runtime: EngramRuntime, tables: str, batch: int, preset: dict) -> dict:
    """Generation tokens/s, decode step time and lookup time of ``batch`` prompts on ``runtime``'s tables."""
    generator = Generator(runtime.model, runtime.compressor, runtime.hasher)
    max_new_tokens, repeats, device = preset["max_new_tokens"], preset["repeats"], runtime.model.embed.weight.device
    prompts = batch_prompts(runtime, batch)
    seconds, tokens = timed(lambda: generator.generate_ids(prompts, max_new_tokens, stop_at_eos=False), repeats)
    prefill_s, _ = timed(lambda: generator.generate_ids(prompts, 1, stop_at_eos=False), repeats)
    # One decode step's row ids: the first prompt token's n-grams, one position per row.
    firsts = runtime.compressor.compress(np.array([prompt[:1] for prompt in prompts]))
    row_ids = {layer: torch.from_numpy(ids) for layer, ids in runtime.hasher.row_ids(firsts).items()}

    def lookup() -> None:
        for rows in runtime.model.lookup_rows(row_ids).values():
            rows.result()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    lookup_s, _ = timed(lookup, 5 * repeats)
    record = {"tables": tables, "batch": batch, "new_tokens": batch * max_new_tokens, "seconds": seconds,
              "tokens_per_s": batch * max_new_tokens / seconds, "prefill_ms": 1e3 * prefill_s,
              "decode_step_ms": 1e3 * (seconds - prefill_s) / (max_new_tokens - 1),
              "lookup_ms": 1e3 * lookup_s, "tokens": tokens}
    print(f"  {tables:<16} batch {batch:>3}: {record['tokens_per_s']:8.1f} tokens/s, decode step "
          f"{record['decode_step_ms']:6.2f} ms, lookup {record['lookup_ms']:5.2f} ms", flush=True)
    return record


def compare(local: EngramRuntime, remote: EngramRuntime, batch: int, preset: dict) -> list[dict]:
    """In-process tables first, remote rows, in-process tables last, at one batch size: the ratios are against
    the mean of the two baselines, so whatever drifts meanwhile weighs on them as on the remote rows; and the
    share of the remote run's tokens equal to the first baseline's."""
    first = measure(local, f"{IN_PROCESS}, first", batch, preset)
    between = measure(remote, REMOTE, batch, preset)
    last = measure(local, f"{IN_PROCESS}, last", batch, preset)
    baseline = (first["tokens_per_s"] + last["tokens_per_s"]) / 2
    for record in (first, between, last):
        record["vs_in_process"] = record["tokens_per_s"] / baseline
    same = [a == b for ra, rb in zip(first["tokens"], between["tokens"]) for a, b in zip(ra, rb)]
    between["identical_tokens"] = sum(same) / len(same)
    for record in (first, between, last):
        del record["tokens"]
    return [first, between, last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--address", help="a Ray cluster to run on (default: an embedded local one)")
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
    try:
        records = [record for batch in preset["batches"] for record in compare(local, remote, batch, preset)]
    finally:
        for runtime in (local, remote):
            runtime.close()
        handle.stop()
    report(records, args, preset, device_name, host_cpu)


def report(records: list[dict], args, preset: dict, device_name: str, host_cpu: str) -> None:
    print(f"\n{'tables':<22}{'batch':>6}{'tokens/s':>11}{'vs local':>10}{'step ms':>9}{'prefill ms':>12}"
          f"{'lookup ms':>11}{'same tokens':>13}")
    for r in records:
        same = f"{100 * r['identical_tokens']:.1f}%" if "identical_tokens" in r else ""
        print(f"{r['tables']:<22}{r['batch']:>6}{r['tokens_per_s']:>11.1f}{r['vs_in_process']:>9.3f}x"
              f"{r['decode_step_ms']:>9.2f}{r['prefill_ms']:>12.1f}{r['lookup_ms']:>11.2f}{same:>13}")
    stem = "generate" if args.preset == "cpu" else "generate_gpu"
    meta = {"command": " ".join(["python -m bench.generate", *sys.argv[1:]]), "preset": args.preset,
            "device_name": device_name, "host_cpu": host_cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "shards": args.shards, "max_new_tokens": preset["max_new_tokens"], "repeats": preset["repeats"],
            "model": {"hidden_size": preset["model"].hidden_size, "num_layers": preset["model"].num_layers,
                      "engram_vocab_size": list(preset["engram"].engram_vocab_size),
                      "engram_layer_ids": list(preset["engram"].layer_ids)}}
    write_json(stem, {**meta, "results": records})
    with figure(stem, figsize=(7, 3.8)) as (fig, ax):
        for tables, style in ((f"{IN_PROCESS}, first", "--"), (REMOTE, "-"), (f"{IN_PROCESS}, last", ":")):
            rows = [r for r in records if r["tables"] == tables]
            ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], style, marker="o",
                    label=f"{tables} tables")
        ax.set(xscale="log", xlabel="batch (prompts per generate call)", ylabel="tokens/s",
               title=f"greedy generation: remote rows vs in-process tables ({device_name})")
        ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
