"""Training step time with Engram rows on the memory service vs in-process tables.

Variants, side by side in one process on the same model, data and seed: in-process tables (the
limit, run first and again last; ratios are against the mean of the two); remote rows without
prefetch; remote rows prefetched with staleness 0 and with staleness 1, then with bfloat16
gradients on the wire, with FP8 rows on the wire, behind a hot-row cache of a tenth of each table
(its hit rate and wire bytes reported), and with a short GIL switch interval.
Run: ``python -m bench.train_step [--preset cpu|gpu]``; prints a table, writes
bench/results/train_step[_gpu].json and a PNG.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.host import cpu_model
from bench.results_files import figure, write_json
from compute.config import EngramConfig, ModelConfig
from compute.data import DataConfig
from compute.memory.cached_table import CacheStats
from compute.memory.client import MemoryClient
from compute.train.config import CacheConfig, MemoryConfig, TrainConfig
from compute.train.job import connect_ray
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy

VARIANTS = {  # name: memory settings
    "in-process tables": dict(tables="local"),
    "remote, no prefetch": dict(tables="remote", prefetch=False, staleness=0),
    "remote, prefetch, staleness 0": dict(tables="remote", prefetch=True, staleness=0),
    "remote, prefetch, staleness 1": dict(tables="remote", prefetch=True, staleness=1),
    "remote, prefetch, staleness 1, bf16 grads": dict(tables="remote", prefetch=True, staleness=1,
                                                      grad_wire_dtype="bfloat16"),
    "remote, prefetch, staleness 0, fp8 rows": dict(tables="remote", prefetch=True, staleness=0,
                                                    wire_dtype="float8_e4m3"),
    # A tenth of each table's rows on the device with their Adam state, stepped there as on the shards.
    "remote, prefetch, staleness 0, hot-row cache 10%": dict(tables="remote", prefetch=True, staleness=0,
                                                             cache_share=0.1),
    # The training thread may wait up to the interpreter's switch interval (5 ms) for the GIL after
    # each of the MoE's host syncs while the memory client's threads run Python.
    "remote, prefetch, staleness 1, GIL switch 0.1 ms": dict(tables="remote", prefetch=True, staleness=1,
                                                             switch_interval_ms=0.1),
}
# The client's calls that bring rows: lookups, the rows a push pulls back (exact mode), a cache's admissions.
ROW_FETCHES = ("lookup", "pull", "lookup_state")
PRESETS = {
    # A CPU-sized model: a few hundred ms a step on 2 cores.
    "cpu": dict(model=ModelConfig(hidden_size=64, num_layers=4, num_attention_heads=4, hc_mult=4, max_seq_len=128,
                                  num_routed_experts=8, num_experts_per_token=2, expert_hidden_size=128,
                                  tie_embeddings=True),
                engram=EngramConfig(engram_vocab_size=(20011, 20011), n_embed_per_ngram=128, n_head_per_ngram=4,
                                    layer_ids=(1, 3)),
                data=DataConfig(max_files=100, seq_len=64, batch_size=8, num_workers=1, worker_start_method="forkserver"),
                steps=24, warmup=4, device="cpu"),
    # Large enough to keep an H200 busy; tables of 3.2M rows x 64 per layer held on the host's CPU shards.
    "gpu": dict(model=ModelConfig(hidden_size=1024, num_layers=8, num_attention_heads=16, hc_mult=4, max_seq_len=1024,
                                  num_routed_experts=16, num_experts_per_token=2, expert_hidden_size=1024),
                engram=EngramConfig(engram_vocab_size=(200003, 200003), n_embed_per_ngram=512, n_head_per_ngram=8,
                                    layer_ids=(1, 5)),
                data=DataConfig(max_files=400, seq_len=1024, batch_size=8, num_workers=2,
                                worker_start_method="forkserver"),
                steps=40, warmup=8, device="cuda"),
}


def memory_overrides(settings: dict, specs) -> dict:
    """A variant's memory settings as ``TrainConfig.replace`` arguments; ``cache_share`` becomes a cache of that
    share of the largest table's rows."""
    settings = dict(settings)
    cache_share = settings.pop("cache_share", None)
    if cache_share:
        settings["cache"] = CacheConfig(rows=int(cache_share * max(spec.rows for spec in specs)))
    return {f"memory__{key}": value for key, value in settings.items()}


def row_bytes_fetched(client: MemoryClient | None) -> int:
    """Bytes of rows ``client`` fetched since it was made: lookups, rows pulled back by pushes, admissions."""
    moved = client.moved() if client else {}
    return sum(moved.get(method, {}).get("bytes", 0) for method in ROW_FETCHES)


def rows_fetched(trainer: EngramTrainer) -> dict:
    """What a run's rows cost on the wire, as its client counted (``wire``: by method; ``row_bytes_fetched``: lookups,
    pulls and admissions), and its hot-row caches' hit rate and bytes, where it has any."""
    client = trainer.runtime.client
    cached = CacheStats.of_tables(trainer.tables.values())
    return {"wire": client.moved() if client else {}, "row_bytes_fetched": row_bytes_fetched(client),
            **({"cache_hit_rate": cached.hit_rate, "cache_bytes_saved": cached.bytes_saved,
                "cache_bytes_admitted": cached.bytes_admitted} if cached else {})}


def step_times(trainer: EngramTrainer, device: torch.device) -> list[float]:
    """Wall seconds of every step (synchronised with the device), from the trainer's step callback."""
    times, last = [], [time.perf_counter()]

    def on_step(_metrics: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.train(on_step=on_step)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="steps per variant (default: the preset's)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--variants", nargs="+", type=int, metavar="INDEX",
                        help=f"run only these remote variants between the in-process baseline's two runs "
                             f"(default: all): "
                             f"{dict(enumerate(VARIANTS))}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS["gpu" if args.preset == "cuda" else args.preset]
    steps, warmup, device = args.steps or preset["steps"], preset["warmup"], torch.device(preset["device"])
    base = TrainConfig(model=preset["model"], engram=preset["engram"], data=preset["data"], steps=steps,
                       log_every=steps, final_checkpoint=False,
                       output_dir=tempfile.mkdtemp(prefix="engram-train-step-"),
                       memory=MemoryConfig(shards=args.shards))
    connect_ray(None, args.shards)
    specs = engram_table_specs(base)
    names = list(VARIANTS)
    chosen = [names[i] for i in sorted(set(args.variants)) if i] if args.variants else names[1:]
    default_switch_interval = sys.getswitchinterval()

    def run(name: str) -> dict:
        memory_settings = dict(VARIANTS[name])
        switch_interval_ms = memory_settings.pop("switch_interval_ms", None)
        sys.setswitchinterval(switch_interval_ms / 1e3 if switch_interval_ms else default_switch_interval)
        config = base.replace(**memory_overrides(memory_settings, specs))
        handle = deploy(specs, args.shards) if config.memory.tables == "remote" else None
        trainer = EngramTrainer(config, WorkerContext(device=device, memory=handle))
        try:
            times = step_times(trainer, device)[warmup:]
            wait_share = trainer.last_metrics["lookup_wait_share"]
            push_wait_share = trainer.last_metrics["push_wait_share"]
            fetched = rows_fetched(trainer)
        finally:
            trainer.close()
            if handle is not None:
                handle.stop()
            sys.setswitchinterval(default_switch_interval)
        print(f"{name}: median step {1e3 * statistics.median(times):.1f} ms over {len(times)} steps", flush=True)
        return {"variant": name, "device": device.type, "steps_timed": len(times),
                "step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * statistics.fmean(times),
                "lookup_wait_share": wait_share, "push_wait_share": push_wait_share,
                "tokens_per_step": config.data.batch_size * config.data.seq_len, **fetched}

    def run_or_record_failure(name: str) -> dict:
        """A remote variant that fails is reported as failed; the others and the baseline's second run go on."""
        try:
            return run(name)
        except Exception as error:  # noqa: BLE001 - the benchmark reports it and goes on
            logging.exception("variant %r failed", name)
            return {"variant": name, "error": f"{type(error).__name__}: {error}"}

    # The in-process baseline runs first and again last, and the ratios are against the mean of the
    # two: whatever drifts over the run (the machine's other load, the process's memory) then weighs
    # on the baseline as on the variants between.
    first = run(names[0])
    records = [first, *(run_or_record_failure(name) for name in chosen)]
    last = run(names[0])
    first["variant"], last["variant"] = f"{names[0]}, first", f"{names[0]}, last"
    records.append(last)
    baseline = (first["step_ms_median"] + last["step_ms_median"]) / 2
    for record in records:
        if "error" not in record:
            record["vs_in_process"] = record["step_ms_median"] / baseline
    report(records, "train_step" if device.type == "cpu" else "train_step_gpu", device)


def report(records: list[dict], stem: str, device: torch.device) -> None:
    header = (f"{'variant':<50}{'median ms':>11}{'mean ms':>10}{'vs local':>10}{'lookup wait':>13}{'push wait':>11}"
              f"{'cache hits':>12}{'MB fetched':>12}")
    print(header)
    for r in records:
        if "error" in r:
            print(f"{r['variant']:<50} failed: {r['error']}")
            continue
        hits = f"{100 * r['cache_hit_rate']:.1f}%" if "cache_hit_rate" in r else ""
        fetched = f"{r['row_bytes_fetched'] / 1e6:.1f}" if r["wire"] else ""
        print(f"{r['variant']:<50}{r['step_ms_median']:>11.1f}{r['step_ms_mean']:>10.1f}{r['vs_in_process']:>9.3f}x"
              f"{100 * r['lookup_wait_share']:>12.1f}%{100 * r['push_wait_share']:>10.1f}%{hits:>12}{fetched:>12}")
    report_cache_bytes(records)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device_name}; host CPU: {cpu_model()} ({os.cpu_count()} cores)")
    meta = {"command": " ".join(["python -m bench.train_step", *sys.argv[1:]]),
            "device": device_name, "host_cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    write_json(stem, {**meta, "results": records})
    with figure(stem, figsize=(8, 3.6)) as (fig, ax):
        measured = [r for r in records if "error" not in r][::-1]
        ax.barh([r["variant"] for r in measured], [r["step_ms_median"] for r in measured], color="#4c72b0")
        ax.set_xlabel(f"median step time, ms ({device_name})")
        ax.set_title("Engram training step: remote rows vs in-process tables")


def report_cache_bytes(records: list[dict]) -> None:
    """For a cached variant run beside the uncached one of its staleness: the row bytes it fetched (lookups, rows
    pulled by pushes, admissions with their optimizer state) against those, on the same data, and its hit rate."""
    uncached = {r["variant"]: r for r in records if "cache_hit_rate" not in r and "error" not in r}
    for r in records:
        base = uncached.get(r["variant"].split(", hot-row cache")[0]) if "cache_hit_rate" in r else None
        if base is None or not base["row_bytes_fetched"]:
            continue
        cut = 1 - r["row_bytes_fetched"] / base["row_bytes_fetched"]
        r["row_bytes_cut"] = cut
        admitted = r["wire"].get("lookup_state", {}).get("bytes", 0)
        print(f"{r['variant']}: fetched {r['row_bytes_fetched'] / 1e6:.1f} MB of rows (admissions {admitted / 1e6:.1f} MB)"
              f" against {base['row_bytes_fetched'] / 1e6:.1f} MB uncached: cut by {100 * cut:.1f}%, hit rate "
              f"{100 * r['cache_hit_rate']:.1f}%")


if __name__ == "__main__":
    main()
