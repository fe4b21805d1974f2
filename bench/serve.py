"""`engram serve` under load: tokens/s and request latency (p50/p99) against N concurrent HTTP clients.

For 1 and 2 model replicas, the same-shaped model on remote read-only serving tables (bfloat16 rows on
the CPU memory shards, looked up each step) and on in-process tables (in each replica's memory: on a
GPU host, resident on the GPU). Each client posts greedy requests (one prompt, ``max_new_tokens`` new
tokens) back to back for ``seconds``; tokens/s counts the tokens the server returned.
Run: ``python -m bench.serve [--preset cpu|gpu] [--device cuda]``; prints a table and writes
bench/results/serve[_gpu].json and a PNG.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from ray import serve

from bench.host import cpu_model
from bench.prompts import PROMPTS
from bench.results_files import figure, write_json
from bench.train_step import PRESETS as TRAIN_PRESETS
from compute.data import DataConfig
from compute.serve.app import APP_NAME, build_app, start_serving, stop_serving
from compute.serve.runtime import open_serving_memory
from compute.train.config import MemoryConfig, OptimConfig, TrainConfig
from compute.train.job import connect_ray
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy

PRESETS = {
    # Runs in under 3 minutes on 2 cores: bench.train_step's CPU model, short requests.
    "cpu": dict(model=TRAIN_PRESETS["cpu"]["model"], engram=TRAIN_PRESETS["cpu"]["engram"],
                device="cpu", clients=(1, 4, 8), replicas=(1, 2), seconds=4.0, max_new_tokens=16, replica_cpus=1.0,
                gpus_per_replica=0.0, max_batch_size=8),
    # An H100/H200 host: bench.train_step's GPU model, tables of 3.2M rows x 64 per layer on the host's CPU shards.
    "gpu": dict(model=TRAIN_PRESETS["gpu"]["model"], engram=TRAIN_PRESETS["gpu"]["engram"],
                device="cuda", clients=(1, 4, 8, 16), replicas=(1, 2), seconds=15.0, max_new_tokens=64,
                replica_cpus=2.0, gpus_per_replica=0.5, max_batch_size=16),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(preset: dict, tables: str, root: Path, device: str, shards: int) -> Path:
    """One training step of the preset's model (seed 0) on ``tables``: a checkpoint to serve."""
    config = TrainConfig(model=preset["model"], engram=preset["engram"],
                         data=DataConfig(max_files=3, seq_len=32, batch_size=2, num_workers=0),
                         optim=OptimConfig(lr=1e-3, warmup_steps=1),
                         memory=MemoryConfig(tables=tables, shards=shards), steps=1, eval_batches=1,
                         use_gpu=device == "cuda", output_dir=str(root / tables))
    handle = deploy(engram_table_specs(config), shards, data_root=root) if tables == "remote" else None
    try:
        trainer = EngramTrainer(config, WorkerContext(memory=handle, device=torch.device(device)))
        try:
            trainer.train()
            return trainer.last_checkpoint
        finally:
            trainer.close()
    finally:
        if handle is not None:
            handle.stop()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def load(url: str, clients: int, seconds: float, max_new_tokens: int) -> dict:
    """``clients`` threads posting back to back for ``seconds``: tokens/s and latency percentiles."""
    deadline = time.monotonic() + seconds

    def client(index: int) -> list[tuple[float, int, bool]]:
        done = []
        while time.monotonic() < deadline:
            prompt = PROMPTS[(index + len(done)) % len(PROMPTS)]
            start = time.perf_counter()
            try:
                tokens = len(post(f"{url}/generate", {"prompt": prompt, "max_new_tokens": max_new_tokens})
                             ["completions"][0]["token_ids"])
                done.append((time.perf_counter() - start, tokens, True))
            except (OSError, urllib.error.HTTPError, KeyError, ValueError):
                done.append((time.perf_counter() - start, 0, False))
        return done

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results if r[2])
    tokens = sum(r[1] for r in results)
    p = lambda q: 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return {"clients": clients, "requests": len(results), "failed": sum(not r[2] for r in results),
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": tokens / wall,
            "p50_ms": p(0.50), "p99_ms": p(0.99), "mean_ms": 1e3 * statistics.fmean(latencies) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--seconds", type=float, help="load per (tables, replicas, clients) cell")
    parser.add_argument("--clients", type=int, nargs="+", help="override the preset's client counts")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--address", help="a Ray cluster to run on (default: an embedded local one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[args.preset]
    device = args.device or preset["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench.serve: --device cuda but no CUDA GPU here")
    seconds = args.seconds or preset["seconds"]
    clients = tuple(args.clients or preset["clients"])
    device_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    host_cpu = cpu_model()
    print(f"bench.serve --preset {args.preset}: device {device} ({device_name}), host CPU {host_cpu} "
          f"({os.cpu_count()} cores), {seconds:.0f} s per cell", flush=True)
    connect_ray(args.address, args.shards)
    records = []
    port = free_port()  # Serve's proxy keeps the port it started on
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        try:
            for tables in ("remote", "local"):
                checkpoint = make_checkpoint(preset, tables, root, device, args.shards)
                memory = open_serving_memory(checkpoint, args.shards)
                print(f"{tables} tables: {memory.describe()}", flush=True)
                try:
                    for replicas in preset["replicas"]:
                        app = build_app(checkpoint, memory.handle, device=device, replicas=replicas,
                                        replica_cpus=preset["replica_cpus"],
                                        gpus_per_replica=preset["gpus_per_replica"] or 1.0,
                                        max_batch_size=preset["max_batch_size"], batch_wait_s=0.005)
                        url = start_serving(app, "127.0.0.1", port)
                        for warm in range(2):
                            post(f"{url}/generate", {"prompt": PROMPTS[warm], "max_new_tokens": 4})
                        for count in clients:
                            record = {"tables": tables, "replicas": replicas,
                                      **load(url, count, seconds, preset["max_new_tokens"])}
                            records.append(record)
                            # Saved after every cell: a run cut short keeps the cells it measured.
                            save(records, args, preset, device, device_name, host_cpu, seconds)
                            print(f"  {tables:<6} tables, {replicas} replica(s), {count:>2} clients: "
                                  f"{record['tokens_per_s']:8.1f} tokens/s  p50 {record['p50_ms']:7.1f} ms  "
                                  f"p99 {record['p99_ms']:7.1f} ms  ({record['requests']} requests, "
                                  f"{record['failed']} failed)", flush=True)
                finally:
                    serve.delete(APP_NAME)  # before its tables go
                    memory.stop()
        finally:
            stop_serving()
    report(records, args, preset, device, device_name, host_cpu, seconds)


def report(records: list[dict], args, preset: dict, device: str, device_name: str, host_cpu: str,
           seconds: float) -> None:
    print(f"\n{'tables':<8}{'replicas':>9}{'clients':>9}{'tokens/s':>11}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'requests':>10}{'failed':>8}")
    for r in records:
        print(f"{r['tables']:<8}{r['replicas']:>9}{r['clients']:>9}{r['tokens_per_s']:>11.1f}{r['p50_ms']:>10.1f}"
              f"{r['p99_ms']:>10.1f}{r['requests']:>10}{r['failed']:>8}")
    save(records, args, preset, device, device_name, host_cpu, seconds)


def save(records: list[dict], args, preset: dict, device: str, device_name: str, host_cpu: str,
         seconds: float) -> None:
    """The cells measured so far as bench/results/serve[_gpu].json and a PNG."""
    stem = "serve" if args.preset == "cpu" else "serve_gpu"
    meta = {"command": " ".join(["python -m bench.serve", *sys.argv[1:]]), "preset": args.preset, "device": device,
            "device_name": device_name, "host_cpu": host_cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "seconds_per_cell": seconds, "max_new_tokens": preset["max_new_tokens"], "shards": args.shards,
            "replica_cpus": preset["replica_cpus"], "max_batch_size": preset["max_batch_size"],
            "model": {"hidden_size": preset["model"].hidden_size, "num_layers": preset["model"].num_layers,
                      "engram_vocab_size": list(preset["engram"].engram_vocab_size)}}
    write_json(stem, {**meta, "results": records})
    with figure(stem, ncols=2, figsize=(10, 3.8)) as (fig, (throughput, latency)):
        for tables in ("remote", "local"):
            for replicas in preset["replicas"]:
                rows = [r for r in records if r["tables"] == tables and r["replicas"] == replicas]
                label = f"{tables} tables, {replicas} replica(s)"
                style = "-" if tables == "remote" else "--"
                throughput.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], style, marker="o",
                                label=label)
                latency.plot([r["clients"] for r in rows], [r["p99_ms"] for r in rows], style, marker="o", label=label)
        throughput.set(xlabel="concurrent clients", ylabel="tokens/s", title=f"engram serve throughput ({device_name})")
        latency.set(xlabel="concurrent clients", ylabel="p99 latency, ms", title="request latency (p99)")
        throughput.legend(fontsize=8)


if __name__ == "__main__":
    main()
