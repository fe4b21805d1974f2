"""`engram serve` (an HTTP endpoint on Ray Serve) and `engram generate-batch` (a JSONL file through Ray actors)."""
from __future__ import annotations

import argparse
import json
import signal
import threading

from compute.cli.train import add_cluster_arguments
from compute.generate import sampling_from_args
from compute.train.checkpoints import load_trainer_state, resolve_checkpoint
from compute.train.config import CacheConfig
from compute.train.job import connect_ray


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve a checkpoint over HTTP on Ray Serve (docs/serving.md)")
    serve.add_argument("--checkpoint", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxy listens (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    scaling = serve.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    scaling.add_argument("--autoscale", metavar="MIN:MAX", help="let Serve's autoscaler keep MIN..MAX replicas")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="cores per replica (default 1)")
    serve.add_argument("--gpus-per-replica", type=float, default=1.0,
                       help="GPUs per replica with --device cuda (0.5: two replicas share a GPU)")
    serve.add_argument("--max-batch-size", type=int, default=16, help="prompts per batched Generator call")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long a batch waits for more prompts (default 10 ms)")
    _add_memory_arguments(serve)
    serve.set_defaults(func=run_serve)

    batch = subparsers.add_parser("generate-batch", help="generate for every prompt of a JSONL file with Ray workers")
    batch.add_argument("--checkpoint", required=True)
    batch.add_argument("--input", required=True, help="JSONL, one {\"prompt\": ...} (optional \"id\") a line")
    batch.add_argument("--output", required=True, help="JSONL results in input order; an existing one is resumed")
    batch.add_argument("--workers", type=int, default=2)
    batch.add_argument("--batch-size", type=int, default=8, help="prompts per chunk (one Generator call)")
    batch.add_argument("--worker-cpus", type=float, default=1.0)
    batch.add_argument("--max-new-tokens", type=int, default=32)
    batch.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    batch.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    batch.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    batch.add_argument("--seed", type=int, default=None, help="sampling seed (chunk k uses seed + its first index)")
    _add_memory_arguments(batch)
    batch.set_defaults(func=run_generate_batch)


def _add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, help="memory shards for the serving tables (default: the run's)")
    parser.add_argument("--cache-rows", type=int, default=0,
                        help="rows of each table kept on the device by a hot-row cache, the most looked-up ones "
                             "(default 0: none)")
    add_cluster_arguments(parser, "where the model runs (default: cuda if available; cuda asks one GPU per replica)")


def _open(args: argparse.Namespace):
    from compute.serve.runtime import open_serving_memory

    checkpoint = resolve_checkpoint(args.checkpoint)
    config = load_trainer_state(checkpoint).train_config()
    connect_ray(args.address, args.shards or config.memory.shards, token=args.ray_token, verbose=args.verbose)
    memory = open_serving_memory(checkpoint, args.shards)
    print(f"memory: {memory.describe()}", flush=True)
    if memory.handle is not None:
        import ray

        address = ray.get_runtime_context().gcs_address
        shards = args.shards or config.memory.shards
        print(f"memory: controller {memory.handle.controller} on {shards} shards; to "
              f"scale it: engram memory scale --address {address} --name {memory.handle.controller} "
              f"--shards N", flush=True)
    return checkpoint, memory


def run_serve(args: argparse.Namespace) -> int:
    from compute.serve.app import build_app, parse_autoscale, start_serving, stop_serving

    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    checkpoint, memory = _open(args)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        app = build_app(checkpoint, memory.handle, device=args.device, replicas=args.replicas, autoscale=autoscale,
                        replica_cpus=args.replica_cpus, gpus_per_replica=args.gpus_per_replica,
                        max_batch_size=args.max_batch_size,
                        batch_wait_s=args.batch_wait_ms / 1000, cache=CacheConfig(rows=args.cache_rows))
        url = start_serving(app, args.host, args.port)
        scaling = (f"{autoscale[0]}..{autoscale[1]} replicas (autoscaled)" if autoscale
                   else f"{args.replicas} replica(s)")
        print(f"serving {checkpoint} at {url} ({scaling}, {args.device}): POST {url}/generate, POST {url}/stream, "
              f"GET {url}/health; Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        try:
            stop_serving()
        finally:
            memory.stop()
    print("stopped", flush=True)
    return 0


def run_generate_batch(args: argparse.Namespace) -> int:
    from compute.serve.batch import generate_batch

    sampling = sampling_from_args(args)
    checkpoint, memory = _open(args)
    try:
        summary = generate_batch(
            checkpoint, args.input, args.output, memory=memory.handle, workers=args.workers,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, sampling=sampling, device=args.device,
            worker_cpus=args.worker_cpus, cache=CacheConfig(rows=args.cache_rows),
            on_chunk=lambda s: print(f"{s['skipped'] + s['generated']}/{s['prompts']} prompts done", flush=True))
    finally:
        memory.stop()
    print(json.dumps(summary, indent=2))
    return 0
