"""`engram demo`: the whole product on one machine, in a few minutes.

Starts an embedded Ray, deploys two memory shards, trains a small EngramMoE on the built-in corpus
with its Engram rows on those shards, generates from a prompt, and prints a report.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from compute.generate import Generator, SamplingParams
from compute.runtime import load_runtime
from compute.train.config import TrainConfig
from compute.train.job import connect_ray, prepare_memory, run_training
from compute.train.loop import METRICS_FILE

DEFAULT_PROMPT = "def read_config(path):\n    "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a small Engram-MoE on remote memory, then generate")
    parser.add_argument("--config", default="demo_train", help="run YAML (default: the shipped demo_train)")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--output-dir",
                        help="where the run writes (default: a new folder under the config's output_dir)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = TrainConfig.from_yaml(args.config)
    # Each run gets a folder of its own, so demos started side by side never share a metrics log or checkpoint.
    output_dir = args.output_dir or Path(config.output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    config = config.replace(output_dir=str(output_dir), **({"steps": args.steps} if args.steps else {}))
    metrics_log = Path(config.output_dir) / METRICS_FILE
    metrics_log.unlink(missing_ok=True)
    print(f"Engram demo: a small EngramMoE trained for {config.steps} steps on the built-in corpus, its Engram rows "
          f"on {config.memory.shards} memory shards of an embedded local Ray (Ray's logs: `engram -v demo`)")
    connect_ray(None, config.memory.shards, verbose=args.verbose)
    memory = prepare_memory(config)
    try:
        summary = run_training(config, memory=memory)
        runtime = load_runtime(summary["checkpoint"], torch.device("cpu"), memory.handle)
        try:
            generator = Generator(runtime.model.eval(), runtime.compressor, runtime.hasher)
            sample = generator.generate([args.prompt], args.max_new_tokens, SamplingParams())[0]
        finally:
            runtime.close()
    finally:
        memory.close()
    losses = [json.loads(line)["loss"] for line in metrics_log.read_text().splitlines()]
    print_report(config, summary, losses, args.prompt + sample.text, time.perf_counter() - started)
    return 0 if losses[-1] < losses[0] else 1


def print_report(config: TrainConfig, summary: dict, losses: list[float], sample: str, seconds: float) -> None:
    rows = [
        ("steps", f"{summary['step']} (global batch {config.data.batch_size} x {config.data.seq_len} tokens)"),
        ("loss", " -> ".join(f"{loss:.2f}" for loss in losses)),
        ("validation", f"loss {summary['val_loss']:.3f}, perplexity {summary['val_perplexity']:.1f}"),
        ("tokens/s", f"{summary['tokens_per_s']:.0f}"),
        ("lookup wait", f"{100 * summary['lookup_wait_share']:.1f}% of step time"),
        ("rows served", f"{summary['rows_looked_up']:,d} ({summary['bytes_moved'] / 1e6:.1f} MB moved, "
                        f"{config.memory.shards} shards)"),
        ("checkpoint", summary["checkpoint"]),
        ("wall time", f"{seconds:.0f} s"),
    ]
    print("\n=== Engram demo report ===")
    for name, value in rows:
        print(f"{name:>12}  {value}")
    print(f"{'sample':>12}  {sample!r}")
