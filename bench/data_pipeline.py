"""Data pipeline throughput: tokenizing a corpus cold and from cache, and hashed batches per second.

Run: ``python -m bench.data_pipeline`` (prints a table, writes bench/results/data_pipeline.json and
data_pipeline.png). The corpus is the stdlib's training split (``--max-files`` of it) in a fresh
cache folder, so the first pass is truly cold; batches carry the routing of two shards.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time

import numpy as np

from bench.results_files import figure, write_json
from compute.config import EngramConfig
from compute.data import DataConfig, hashed_batches, resolve_sources
from compute.data.token_stream import load_token_stream
from compute.hashing.tokenizer_compression import TokenizerCompressor, default_tokenizer_path

NUM_SLOTS, NUM_SHARDS = 1024, 2


def time_tokenization(data: DataConfig) -> list[dict]:
    """Seconds to get the token stream cold (tokenize and cache) and warm (load the cache)."""
    files = resolve_sources(data.split_sources, data.split, data.validation_fraction, data.max_files)
    megabytes = sum(f.path.stat().st_size for f in files) / 1e6
    rows = []
    for phase in ("cold: tokenize + cache", "warm: load from cache"):
        start = time.perf_counter()
        stream = load_token_stream(files, default_tokenizer_path(), data.eos_token)
        seconds = time.perf_counter() - start
        rows.append({"phase": phase, "files": len(files), "megabytes": megabytes, "tokens": len(stream),
                     "seconds": seconds, "tokens_per_s": len(stream) / seconds})
    return rows


def time_batches(data: DataConfig, engram: EngramConfig, steps: int) -> dict:
    """Hashed batches per second once the first batch (worker start-up) is out, for one worker count."""
    owners = np.arange(NUM_SLOTS) * NUM_SHARDS // NUM_SLOTS
    loader = hashed_batches(data, engram, routing={layer: owners for layer in engram.layer_ids},
                            num_steps=steps + 1, pin_memory=False)
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    seconds = time.perf_counter() - start
    tokens = count * first.input_ids.numel()
    return {"num_workers": data.num_workers, "first_batch_s": first_batch_s, "batches": count,
            "batches_per_s": count / seconds, "tokens_per_s": tokens / seconds,
            "unique_rows_per_batch": float(np.mean([len(r.unique) for r in first.layers.values()]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-files", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="model_demo", help="the Engram config (YAML path or shipped name)")
    args = parser.parse_args()
    engram = EngramConfig.from_yaml(args.config)
    TokenizerCompressor.from_file()  # the compression table is not what we time: build it first
    data = DataConfig(max_files=args.max_files, seq_len=args.seq_len, batch_size=args.batch)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ENGRAM_CACHE_DIR"] = cache
        TokenizerCompressor.from_file()
        tokenization = time_tokenization(data)
        loading = [time_batches(dataclasses.replace(data, num_workers=w), engram, args.steps) for w in args.workers]

    print(f"\nstdlib train split, {args.max_files} files, {os.cpu_count()} cores ({platform.processor() or 'cpu'})")
    print(f"{'token stream':24s} {'files':>6s} {'MB':>7s} {'tokens':>10s} {'seconds':>8s} {'Mtok/s':>8s}")
    for row in tokenization:
        print(f"{row['phase']:24s} {row['files']:6d} {row['megabytes']:7.2f} {row['tokens']:10,d} "
              f"{row['seconds']:8.3f} {row['tokens_per_s'] / 1e6:8.2f}")
    print(f"\nhashed batches of {args.batch}x{args.seq_len}, config {args.config}, {NUM_SHARDS} shards")
    print(f"{'workers':>7s} {'first batch s':>14s} {'batches/s':>10s} {'ktok/s':>8s} {'unique rows/layer':>18s}")
    for row in loading:
        print(f"{row['num_workers']:7d} {row['first_batch_s']:14.3f} {row['batches_per_s']:10.1f} "
              f"{row['tokens_per_s'] / 1e3:8.1f} {row['unique_rows_per_batch']:18.0f}")
    summary = {"command": " ".join(["python", "-m", "bench.data_pipeline", *sys.argv[1:]]), "cpus": os.cpu_count(),
               "python": platform.python_version(), "config": args.config, "batch_shape": [args.batch, args.seq_len],
               "tokenization": tokenization, "batches": loading}
    path = write_json("data_pipeline", summary)
    plot(loading, f"{args.batch}x{args.seq_len} batches, {args.config}")
    print(f"\nwrote {path} and its .png")


def plot(loading: list[dict], title: str) -> None:
    with figure("data_pipeline", figsize=(7, 3.5)) as (fig, ax):
        labels = [f"{row['num_workers']} workers" for row in loading]
        rates = [row["tokens_per_s"] / 1e3 for row in loading]
        bars = ax.bar(labels, rates, color="tab:blue")
        ax.bar_label(bars, labels=[f"{rate:.0f}" for rate in rates], padding=3)
        ax.set_ylabel("thousand tokens per second")
        ax.set_title(f"Hashed batches produced, {title}")
        ax.set_ylim(top=max(rates) * 1.2)


if __name__ == "__main__":
    main()
