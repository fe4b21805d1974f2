"""The GPU preset's memory traffic replayed on a CPU host, without the model.

``bench.train_step --preset gpu`` runs a model that keeps a GPU busy for ~380 ms a step while its
Engram rows come from and go back to the memory shards. This benchmark keeps everything of that step
but the model: the same tables (two 3.2M-row x 64 layers on two shards), the same batches from the
real loader (8 x 1024 tokens, their unique rows and shard splits), the same training loop
(``EngramTrainer``: prefetch, staleness, pushes, their waits), and in place of the model a stand-in
that waits for each Engram layer's rows where the model would and "computes" for the measured step
time, forward and then backward layer by layer, the rows' gradients appearing as the backward passes
their layers: a share of it holding the GIL in Python (as the model's kernel launches do), the rest asleep
(as the training thread is while it waits for the GPU). Gradients are random, of the real shapes.

A remote step's ratio is its median step time over the compute alone (``--compute-ms``), which is what
the step would take if rows cost nothing; on a GPU host that is the in-process step. So the cause of a
slow remote step can be found, and guarded, on a machine without a GPU. Each variant's row bytes fetched
(lookups, rows pulled back by pushes, a hot-row cache's admissions) are as the client counted them: they do
not depend on the host, so a long run here says what a cache saves on the GPU preset's traffic.
Run: ``python -m bench.memory_traffic [--compute-ms 380] [--python-share 0.3] [--variants I ...] [--stem NAME]``;
prints a table and writes bench/results/memory_traffic.json (or NAME.json) and a PNG.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from bench.host import cpu_model
from bench.results_files import figure, write_json
from bench.train_step import PRESETS, memory_overrides, report_cache_bytes, rows_fetched, step_times
from compute.config import ModelConfig
from compute.train.config import MemoryConfig, TrainConfig
from compute.train.job import connect_ray
from compute.train.loop import EngramTrainer, WorkerContext
from compute.train.tables import engram_table_specs
from memory_service.deploy import deploy

VARIANTS = {  # name: memory settings
    "remote, no prefetch": dict(prefetch=False, staleness=0),
    "remote, prefetch, staleness 0": dict(prefetch=True, staleness=0),
    "remote, prefetch, staleness 1": dict(prefetch=True, staleness=1),
    "remote, prefetch, staleness 1, bf16 grads": dict(prefetch=True, staleness=1, grad_wire_dtype="bfloat16"),
    # A tenth of each table's rows with their Adam state on the compute side: its rows fetched against variant 1's.
    "remote, prefetch, staleness 0, hot-row cache 10%": dict(prefetch=True, staleness=0, cache_share=0.1),
}
# The GPU preset's tables, batches and loader; a model just big enough to own its Engram layers.
STAND_IN_MODEL = ModelConfig(hidden_size=32, num_layers=PRESETS["gpu"]["model"].num_layers, num_attention_heads=2,
                             hc_mult=1, max_seq_len=PRESETS["gpu"]["model"].max_seq_len, num_routed_experts=2,
                             num_experts_per_token=1, expert_hidden_size=32)


def compute(seconds: float, python_share: float) -> None:
    """Stand in for ``seconds`` of a step's compute: ``python_share`` of it spent holding the GIL, the rest
    asleep with the GIL released, interleaved in 1 ms slices as kernel launches and device waits are."""
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        slice_end = min(end, now + 1e-3 * python_share)
        while time.perf_counter() < slice_end:
            pass
        time.sleep(max(0.0, min(end - time.perf_counter(), 1e-3 * (1 - python_share))))


class _BackwardCompute(torch.autograd.Function):
    """The identity, whose backward stands in for one layer's share of the backward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, seconds: float, python_share: float) -> torch.Tensor:
        ctx.seconds, ctx.python_share = seconds, python_share
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        compute(ctx.seconds, ctx.python_share)
        return grad, None, None


class StandInModel:
    """Called as the trainer calls its model: the forward waits for each Engram layer's rows in layer order and
    computes in between; the backward computes layer by layer from the last, and each Engram layer's rows get
    their gradient (of the rows' shape) when the backward reaches that layer, as the model's do. The loss is 0."""

    def __init__(self, engram_layers: list[int], num_layers: int, compute_s: float, python_share: float):
        self.engram_layers, self.num_layers = set(engram_layers), num_layers
        self.compute_s, self.python_share = compute_s, python_share
        self.forward_share = 1 / 3  # forward:backward as 1:2, as the GPU profile measured
        # Gradients are slices of one random block: drawing them anew each step would cost the training thread
        # tens of milliseconds that the GPU spends on the model's.
        self._gradients = torch.randn((0, 0))

    def __call__(self, input_ids, engram_rows, labels):
        layer_forward_s = self.compute_s * self.forward_share / self.num_layers
        layer_backward_s = self.compute_s * (1 - self.forward_share) / self.num_layers
        hidden = torch.zeros((), requires_grad=True)
        for layer in range(self.num_layers):
            hidden = _BackwardCompute.apply(hidden, layer_backward_s, self.python_share)
            if layer in self.engram_layers:
                rows = engram_rows[layer].result().unique_rows
                hidden = hidden + (rows * self._gradients_for(rows)).sum()
            compute(layer_forward_s, self.python_share)
        loss = hidden - hidden.detach()  # 0, with the graph behind it
        return SimpleNamespace(loss=loss, lm_loss=loss.detach())

    def _gradients_for(self, rows: torch.Tensor) -> torch.Tensor:
        if self._gradients.shape[0] < rows.shape[0] or self._gradients.shape[1] != rows.shape[1]:
            generator = torch.Generator().manual_seed(0)
            self._gradients = torch.randn((2 * rows.shape[0], rows.shape[1]), generator=generator) * 1e-3
        return self._gradients[:rows.shape[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-ms", type=float, default=380.0,
                        help="a step's compute (default: the in-process GPU step on an H100 or H200 host)")
    parser.add_argument("--python-share", type=float, default=0.3,
                        help="share of the compute that holds the GIL (the rest waits for the device)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--variants", nargs="+", type=int, metavar="INDEX",
                        help=f"run only these variants (default: all): {dict(enumerate(VARIANTS))}")
    parser.add_argument("--stem", default="memory_traffic", help="name of the results' JSON and PNG in bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS["gpu"]
    data = preset["data"]
    base = TrainConfig(model=STAND_IN_MODEL, engram=preset["engram"], data=data, steps=args.steps,
                       log_every=args.steps, final_checkpoint=False,
                       output_dir=tempfile.mkdtemp(prefix="engram-memory-traffic-"),
                       memory=MemoryConfig(shards=args.shards))
    connect_ray(None, args.shards)
    names = [name for i, name in enumerate(VARIANTS) if not args.variants or i in args.variants]
    compute_s = args.compute_ms / 1e3
    alone = []
    for _ in range(8):  # the compute alone, as the stand-in runs it
        start = time.perf_counter()
        compute(compute_s, args.python_share)
        alone.append(time.perf_counter() - start)
    reference_ms = 1e3 * statistics.median(alone)
    started = time.perf_counter()
    specs = engram_table_specs(base)
    handle = deploy(specs, args.shards)
    print(f"tables deployed in {time.perf_counter() - started:.1f} s", flush=True)
    records = []
    try:
        for index, name in enumerate(names):
            # One deployment serves every variant: each continues the shards' step count where the last ended.
            config = base.replace(steps=(index + 1) * args.steps, **memory_overrides(VARIANTS[name], specs))
            trainer = EngramTrainer(config, WorkerContext(memory=handle))
            trainer.step = index * args.steps
            trainer.forward_model = StandInModel(list(config.engram.layer_ids), config.model.num_layers, compute_s,
                                                 args.python_share)
            try:
                times = step_times(trainer, torch.device("cpu"))[args.warmup:]
                metrics, fetched = trainer.last_metrics, rows_fetched(trainer)
            finally:
                trainer.close()
            median_ms = 1e3 * statistics.median(times)
            records.append({"variant": name, "steps_timed": len(times), "step_ms_median": median_ms,
                            "vs_compute": median_ms / reference_ms, "lookup_wait_share": metrics["lookup_wait_share"],
                            "push_wait_share": metrics["push_wait_share"],
                            "rows_per_step": metrics["rows_looked_up"] / args.steps, **fetched})
            print(f"{name}: median step {median_ms:.1f} ms ({median_ms / reference_ms:.3f}x the compute)", flush=True)
    finally:
        handle.stop()
    report(records, reference_ms, args)


def report(records: list[dict], reference_ms: float, args) -> None:
    print(f"\ncompute alone: {reference_ms:.1f} ms a step ({args.python_share:.0%} of it holding the GIL); "
          f"host CPU: {cpu_model()}")
    print(f"{'variant':<50}{'median ms':>11}{'vs compute':>12}{'lookup wait':>13}{'push wait':>11}{'rows/step':>11}"
          f"{'MB fetched':>12}{'cache hits':>12}")
    for r in records:
        hits = f"{r['cache_hit_rate']:.1%}" if "cache_hit_rate" in r else ""
        print(f"{r['variant']:<50}{r['step_ms_median']:>11.1f}{r['vs_compute']:>11.3f}x"
              f"{r['lookup_wait_share']:>12.1%}{r['push_wait_share']:>11.1%}{r['rows_per_step']:>11.0f}"
              f"{r['row_bytes_fetched'] / 1e6:>12.1f}{hits:>12}")
    report_cache_bytes(records)
    write_json(args.stem, {"command": " ".join(["python -m bench.memory_traffic", *sys.argv[1:]]),
        "host_cpu": cpu_model(), "compute_ms": reference_ms, "python_share": args.python_share,
        "results": records})
    with figure(args.stem) as (_, ax):
        ax.barh([r["variant"] for r in records][::-1], [r["vs_compute"] for r in records][::-1], color="#4c72b0")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("median step / compute alone (1.0 = rows cost nothing)")
        ax.set_title(f"GPU preset's memory traffic replayed on {cpu_model()}")


if __name__ == "__main__":
    main()
