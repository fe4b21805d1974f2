"""Benchmark the Engram kernels on a CUDA GPU: Triton vs PyTorch eager vs torch.compile of the reference.

    python -m bench.kernels

Times forward and backward as GPU time from CUDA-graph replays behind an L2 flush, at the paper's
and the demo's shapes in bfloat16, and sets the Triton kernels' achieved bytes/s against the card's
measured device-to-device copy bandwidth. A backward is forward+backward through autograd minus the
forward, the same way for every path, except the row gather's: that is ``scatter_row_grads`` into
float32 row gradients against the reference ``scatter_row_grads_reference``, called directly, as the
row tables run it. Also times the row gather over a random permutation of the gradient's rows, the
bandwidth that reads as random as the gather backward's reach. Prints a table, writes ``kernels.json``
and ``kernels.png``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import kernels
from bench.results_files import figure, write_json
from kernels.engram_gate_triton import EngramGate
from kernels.row_gather_triton import GatherRows, scatter_row_grads_triton
from kernels.short_conv_triton import ShortConv

log = logging.getLogger("bench.kernels")

# name: (tokens per micro-batch, hc branches, hidden D, hash heads, head dim)
CONFIGS = {"paper": (16384, 4, 2560, 16, 80), "demo": (16384, 4, 1024, 16, 64)}
SEQUENCES = 4  # the micro-batch's tokens as 4 sequences of T/4 for the short conv
DILATION, CONV_TAPS = 3, 4
DTYPE = torch.bfloat16


@dataclass
class Row:
    config: str
    kernel: str
    direction: str
    triton_ms: float
    eager_ms: float
    compiled_ms: float
    bytes_moved: int

    @property
    def triton_gbps(self) -> float:
        return self.bytes_moved / self.triton_ms / 1e6


REPLAYS, CALLS_PER_GRAPH = 25, 10
FLUSH_BYTES = 256 << 20  # larger than the H200's 50 MB L2: every call starts from DRAM


def _graph(body) -> torch.cuda.CUDAGraph:
    """``CALLS_PER_GRAPH`` calls of ``body`` captured in one CUDA graph (after a warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            body()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    """Median GPU time of one call in ``graph``, over ``REPLAYS`` replays."""
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GRAPH)
    return statistics.median(times)


def median_ms(fn) -> float:
    """GPU time of ``fn`` from a cold L2, without the host's launch overhead.

    Kernels of ~20 us finish faster than Python launches them, so host-timed loops measure the
    launcher. Each call is instead replayed from a CUDA graph behind an L2 flush, and the flush's
    own time (a graph of flushes alone) is subtracted.
    """
    fn()  # compile and autotune outside the capture
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    # bitwise_not_ runs as a kernel through L2 (a graph's memset node need not evict it).
    with_call = _graph(lambda: (flush.bitwise_not_(), fn()))
    flush_only = _graph(flush.bitwise_not_)
    ms = _replay_ms(with_call) - _replay_ms(flush_only)
    del with_call, flush_only
    torch.cuda.empty_cache()
    return max(ms, 0.0)


def copy_bandwidth_gbps(num_bytes: int = 4 << 30) -> float:
    """Device-to-device copy by the SMs, counting bytes read plus bytes written. Host-timed: a 2 ms
    call dwarfs its launch, and a graph would turn the copy into a copy-engine memcpy node."""
    from triton.testing import do_bench

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * num_bytes / do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median") / 1e6


def _sizes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Case:
    """One kernel at one shape: the Triton path and the reference, with the bytes each pass must move.

    ``backward`` (Triton fn, reference fn, args), when given, is timed on its own instead of through
    autograd: the row gather's backward as the row tables run it, ``scatter_row_grads`` into float32
    row gradients. Through autograd the float32 gradient of bfloat16 rows is cast to bfloat16 (a
    kernel the training step never runs), and torch.compile's reference backward returns bfloat16.
    """

    name: str
    fast: Callable
    reference: Callable
    inputs: list[torch.Tensor]
    args: tuple
    forward_bytes: int
    backward_bytes: int
    deterministic: bool = False
    backward: tuple[Callable, Callable, tuple] | None = None


def kernel_cases(tokens, hc, dim, heads, head_dim):
    """Each kernel's cases at one shape."""
    make = lambda *shape, dtype=DTYPE: torch.randn(*shape, dtype=dtype, device="cuda")  # noqa: E731
    num_rows = tokens * heads // 4
    rows, inverse = make(num_rows, head_dim), torch.randint(0, num_rows, (tokens, heads), device="cuda")
    embeddings, grad = torch.empty(tokens, heads * head_dim, dtype=DTYPE), make(tokens, heads * head_dim)
    f32_rows = torch.empty(num_rows, head_dim, dtype=torch.float32)
    segments = kernels.row_segments(inverse, num_rows)
    gather_bytes = _sizes(rows, inverse, embeddings), _sizes(embeddings, inverse, f32_rows)
    # As the row tables run it: segments built ahead on a side stream; then without them (float32
    # atomics), and without them under deterministic mode (the backward sorts).
    for name, given, deterministic in (("gather_rows", segments, False), ("gather_rows[atomic]", None, False),
                                       ("gather_rows[det]", None, True)):
        backward = (scatter_row_grads_triton, kernels.scatter_row_grads_reference,
                    (grad, inverse, num_rows, given))
        yield Case(name, GatherRows.apply, kernels.gather_rows_reference, [rows], (inverse, DTYPE, given),
                   *gather_bytes, deterministic, backward)

    key, hidden, value = make(tokens, hc, dim), make(tokens, hc, dim), make(tokens, dim)
    key_w, hidden_w = make(hc, dim, dtype=torch.float32), make(hc, dim, dtype=torch.float32)
    yield Case("engram_gate", EngramGate.apply, kernels.engram_gate_reference,
               [key, hidden, value, key_w, hidden_w], (), _sizes(key, hidden, value, key),
               _sizes(key, hidden, value, key, key, hidden, value))

    conv_in = make(SEQUENCES, tokens // SEQUENCES, hc, dim)
    norm_w, conv_w = make(hc, dim, dtype=torch.float32), make(hc * dim, CONV_TAPS, dtype=torch.float32)
    yield Case("short_conv", ShortConv.apply, kernels.short_conv_reference, [conv_in, norm_w, conv_w],
               (DILATION,), _sizes(conv_in, conv_in), _sizes(conv_in, conv_in, conv_in))


def time_paths(case: Case) -> dict[str, tuple[float, float]]:
    """(forward ms, backward ms) for each path: Triton, and the reference eager and under torch.compile."""
    leaves = [t.requires_grad_() for t in case.inputs]
    fast_backward, reference_backward, backward_args = case.backward or (None, None, ())
    results = {}
    for path, fn, backward in (("triton", case.fast, fast_backward),
                               ("eager", case.reference, reference_backward),
                               ("compiled", torch.compile(case.reference),
                                reference_backward and torch.compile(reference_backward))):
        grad_out = torch.randn_like(fn(*leaves, *case.args))
        fwd = median_ms(lambda: fn(*leaves, *case.args))
        if backward is None:  # forward and backward through autograd, less the forward
            both = median_ms(lambda: torch.autograd.grad(fn(*leaves, *case.args), leaves, grad_out))
            results[path] = (fwd, max(both - fwd, 0.0))
        else:
            results[path] = (fwd, median_ms(lambda: backward(*backward_args)))
    return results


def tuned_configs() -> dict[str, str]:
    """The configuration each autotuned kernel settled on (for its last tuning key)."""
    import importlib

    found = {}
    for module in ("row_gather_triton", "engram_gate_triton", "short_conv_triton"):
        for name, obj in vars(importlib.import_module(f"kernels.{module}")).items():
            if getattr(obj, "best_config", None) is not None:
                found[name] = str(obj.best_config)
    return found


def row_segments_ms(tokens: int, heads: int) -> float:
    """What building the backward's row segments ahead costs (on the row tables' copy stream)."""
    num_rows = tokens * heads // 4
    inverse = torch.randint(0, num_rows, (tokens, heads), device="cuda")
    return median_ms(lambda: kernels.row_segments(inverse, num_rows))


def random_row_copy_gbps(tokens: int, heads: int, head_dim: int) -> float:
    """The row gather over a random permutation of the gradient's ``tokens * heads`` rows: each row read
    once, in random order, and written in order. The gather backward must read every gradient row in
    the order of its unique row, as random as this, so this copy, not the sequential one, is the
    bandwidth its reads can reach."""
    rows = torch.randn(tokens * heads, head_dim, dtype=DTYPE, device="cuda")
    permutation = torch.randperm(tokens * heads, device="cuda")[:, None]
    ms = median_ms(lambda: GatherRows.apply(rows, permutation, DTYPE))
    return (2 * _sizes(rows) + _sizes(permutation)) / ms / 1e6


def run() -> dict:
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbps()
    log.info("device-to-device copy: %.0f GB/s", bandwidth)
    segments_ms = {config: row_segments_ms(shape[0], shape[3]) for config, shape in CONFIGS.items()}
    log.info("row_segments (built ahead, off the step): %s ms", segments_ms)
    random_copy = {config: random_row_copy_gbps(shape[0], shape[3], shape[4]) for config, shape in CONFIGS.items()}
    log.info("random row copy: %s GB/s", random_copy)
    rows: list[Row] = []
    for config, shape in CONFIGS.items():
        for case in kernel_cases(*shape):
            torch.use_deterministic_algorithms(case.deterministic)
            times = time_paths(case)
            torch.use_deterministic_algorithms(False)
            passes = (("forward", case.forward_bytes), ("backward", case.backward_bytes))
            for i, (direction, moved) in enumerate(passes):
                rows.append(Row(config, case.name, direction, times["triton"][i], times["eager"][i],
                                times["compiled"][i], moved))
            torch.cuda.empty_cache()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": str(DTYPE),
        "copy_bandwidth_gbps": bandwidth,
        "row_segments_ms": segments_ms,
        "random_row_copy_gbps": random_copy,
        "configs": {name: dict(zip(("tokens", "hc", "dim", "heads", "head_dim"), s)) for name, s in CONFIGS.items()},
        "tuned_configs": tuned_configs(),
        "rows": [asdict(r) | {"triton_gbps": r.triton_gbps, "fraction_of_copy": r.triton_gbps / bandwidth}
                 for r in rows],
    }
    write_json("kernels", report)
    print_table(report)
    log.info("tuned configs: %s", report["tuned_configs"])
    plot(report)
    return report


def print_table(report: dict) -> None:
    print(f"{report['device']}, {report['dtype']}, copy bandwidth {report['copy_bandwidth_gbps']:.0f} GB/s")
    print("row_segments, built ahead on a side stream: "
          + ", ".join(f"{config} {ms:.3f} ms" for config, ms in report["row_segments_ms"].items()))
    print("random row copy (the gather over a permutation of the gradient rows): " + ", ".join(
        f"{config} {gbps:.0f} GB/s ({100 * gbps / report['copy_bandwidth_gbps']:.1f}% of copy)"
        for config, gbps in report["random_row_copy_gbps"].items()))
    header = (f"{'config':6} {'kernel':19} {'pass':8} {'triton ms':>9} {'eager ms':>9} {'compile ms':>10} "
              f"{'x eager':>7} {'x compile':>9} {'GB/s':>6} {'% copy':>6}")
    print(header)
    for r in report["rows"]:
        print(f"{r['config']:6} {r['kernel']:19} {r['direction']:8} {r['triton_ms']:9.3f} {r['eager_ms']:9.3f} "
              f"{r['compiled_ms']:10.3f} {r['eager_ms'] / r['triton_ms']:7.2f} "
              f"{r['compiled_ms'] / r['triton_ms']:9.2f} {r['triton_gbps']:6.0f} {100 * r['fraction_of_copy']:6.1f}")


def plot(report: dict) -> None:
    rows = report["rows"]
    labels = [f"{r['config']} {r['kernel']} {r['direction']}" for r in rows]
    with figure("kernels", nrows=2, figsize=(14, 8)) as (fig, (speed, band)):
        width = 0.4
        x = range(len(rows))
        speed.bar([i - width / 2 for i in x], [r["eager_ms"] / r["triton_ms"] for r in rows], width, label="vs eager")
        speed.bar([i + width / 2 for i in x], [r["compiled_ms"] / r["triton_ms"] for r in rows], width,
                  label="vs torch.compile")
        speed.axhline(1.0, color="grey", linewidth=0.8)
        speed.set_ylabel("Triton speed-up")
        speed.set_xticks(list(x), labels, fontsize=7, rotation=60, ha="right")
        speed.legend()
        band.bar(list(x), [100 * r["fraction_of_copy"] for r in rows])
        band.axhline(70, color="red", linewidth=0.8, label="70% target")
        band.set_ylabel("% of copy bandwidth")
        band.set_xticks(list(x), labels, fontsize=7, rotation=60, ha="right")
        band.legend()
        fig.suptitle(f"Engram kernels, {report['device']}, {report['dtype']}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels needs a CUDA GPU")
    run()


if __name__ == "__main__":
    main()
