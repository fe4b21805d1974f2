"""Rows on the wire in float32, bfloat16 and FP8 (E4M3 and a float32 scale a row): bytes per step and loss.

The CPU preset of ``bench.train_step`` (same model, data and seed) trains ``--steps`` steps on remote
tables once per lookup wire dtype (gradients travel in float32 in every run), then evaluates on the
validation batches. Reported per dtype: the rows and row bytes a step looks up (the trainer's own
count: rows x wire bytes of a row, FP8's scale included), the last steps' mean training loss, the
validation loss, the largest loss gap to the float32 run over the steps, and, on the tables the run
trained, the largest error of a looked-up value relative to its row's largest magnitude.
Run: ``python -m bench.wire_dtypes [--steps 50]``; prints a table, writes bench/results/wire_dtypes.json
and a PNG.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench.results_files import figure, write_json
from bench.train_step import PRESETS
from compute.train.config import MemoryConfig, TrainConfig, table_name
from compute.train.job import connect_ray
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy
from protos.wire import WIRE_DTYPE_BY_NAME

WIRE_DTYPES = ("float32", "bfloat16", "float8_e4m3")
LAST_STEPS = 10  # the training loss reported is the mean of these last steps'


def row_error(trainer: EngramTrainer, wire_dtype: str) -> float:
    """The largest |value in ``wire_dtype`` - float32 value| / max|row| over every row of the run's tables."""
    client, worst = trainer.runtime.client, 0.0
    for layer, spec in zip(trainer.config.engram.layer_ids, engram_table_specs(trainer.config)):
        ids = np.arange(spec.rows)
        exact = client.lookup(table_name(layer), ids, dtype=torch.float32).result()
        wire = WIRE_DTYPE_BY_NAME[wire_dtype]
        received = wire.values(client.lookup(table_name(layer), ids, dtype=wire.torch).result(), torch.float32)
        scale = exact.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, ((received - exact).abs() / scale).max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preset, device = PRESETS["cpu"], torch.device("cpu")
    base = TrainConfig(model=preset["model"], engram=preset["engram"], data=preset["data"], steps=args.steps,
                       log_every=args.steps, eval_batches=args.eval_batches,
                       output_dir=tempfile.mkdtemp(prefix="engram-wire-dtypes-"), memory=MemoryConfig(shards=args.shards))
    connect_ray(None, args.shards)
    specs = engram_table_specs(base)
    records = []
    for wire_dtype in WIRE_DTYPES:
        config = base.replace(memory__wire_dtype=wire_dtype, output_dir=f"{base.output_dir}/{wire_dtype}")
        handle = deploy(specs, args.shards, data_root=base.output_dir)  # the run's last checkpoint goes there
        trainer = EngramTrainer(config, WorkerContext(device=device, memory=handle))
        try:
            started = time.perf_counter()
            losses = trainer.train()
            seconds = time.perf_counter() - started
            metrics = dict(trainer.last_metrics)  # before the evaluation's lookups add to its counts
            validation = trainer.evaluate(args.eval_batches)
            error = row_error(trainer, wire_dtype)
        finally:
            trainer.close()
            handle.stop()
        records.append({"wire_dtype": wire_dtype, "steps": len(losses),
                        "row_bytes": {spec.name: WIRE_DTYPE_BY_NAME[wire_dtype].row_bytes(spec.dim) for spec in specs},
                        "rows_per_step": metrics["rows_looked_up"] / len(losses),
                        "row_bytes_per_step": metrics["bytes_moved"] / len(losses),
                        "train_loss_last": statistics.fmean(losses[-LAST_STEPS:]), "val_loss": validation["val_loss"],
                        "max_row_error": error, "seconds": seconds, "losses": losses})
        print(f"{wire_dtype}: {records[-1]['row_bytes_per_step'] / 1e6:.3f} MB of rows a step, "
              f"val loss {validation['val_loss']:.4f}", flush=True)
    report(records)


def report(records: list[dict]) -> None:
    reference = records[0]
    header = (f"{'wire dtype':<13}{'rows/step':>11}{'row MB/step':>13}{'vs bf16':>9}{'train loss':>12}"
              f"{'val loss':>10}{'max |gap| to f32':>18}{'max row error':>15}")
    print(header)
    bf16 = next(r for r in records if r["wire_dtype"] == "bfloat16")
    for r in records:
        r["bytes_vs_bfloat16"] = r["row_bytes_per_step"] / bf16["row_bytes_per_step"]
        r["max_loss_gap_to_float32"] = max(abs(a - b) for a, b in zip(r["losses"], reference["losses"]))
        print(f"{r['wire_dtype']:<13}{r['rows_per_step']:>11.0f}{r['row_bytes_per_step'] / 1e6:>13.3f}"
              f"{r['bytes_vs_bfloat16']:>8.3f}x{r['train_loss_last']:>12.4f}{r['val_loss']:>10.4f}"
              f"{r['max_loss_gap_to_float32']:>18.4f}{r['max_row_error']:>15.2e}")
    meta = {"command": " ".join(["python -m bench.wire_dtypes", *sys.argv[1:]]), "device": "cpu",
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "last_steps_averaged": LAST_STEPS}
    write_json("wire_dtypes", {**meta, "results": records})
    with figure("wire_dtypes", ncols=2, figsize=(10, 3.6)) as (fig, (loss_ax, bytes_ax)):
        for r in records[1:]:
            gaps = [a - b for a, b in zip(r["losses"], reference["losses"])]
            loss_ax.plot(range(1, len(gaps) + 1), gaps, label=r["wire_dtype"], linewidth=1)
        loss_ax.axhline(0, color="grey", linewidth=0.5)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel(f"training loss - {reference['wire_dtype']} run's")
        loss_ax.legend()
        loss_ax.set_title("Same run, rows looked up in each dtype")
        bytes_ax.bar([r["wire_dtype"] for r in records], [r["row_bytes_per_step"] / 1e6 for r in records],
                     color="#4c72b0")
        bytes_ax.set_ylabel("MB of rows looked up per step")
        bytes_ax.set_title("Row bytes on the wire per step")


if __name__ == "__main__":
    main()
