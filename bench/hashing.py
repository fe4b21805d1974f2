"""Hashing throughput on one core: compression + row ids of every Engram layer, vs the demo's numpy code.

Run: ``python -m bench.hashing`` (prints a table, writes bench/results/hashing.json and hashing.png).
Tokens come from encoding the Python standard library's source with the DeepSeek tokenizer
(``--source random`` draws ids uniformly instead); they are hashed in training-sized batches.
"""
from __future__ import annotations

import os

# One core: BLAS and OpenMP pools must be single-threaded before numpy is imported.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.host import cpu_model  # noqa: E402
from bench.results_files import figure, write_json  # noqa: E402
from compute.config import EngramConfig  # noqa: E402
from compute.hashing.ngram_hash import NgramHasher  # noqa: E402
from compute.hashing.tokenizer_compression import TokenizerCompressor  # noqa: E402

TARGET_TOKENS_PER_S = 10e6


def naive_row_ids(compressor: TokenizerCompressor, hasher: NgramHasher, input_ids: np.ndarray) -> np.ndarray:
    """The demo's algorithm transcribed straight to numpy: masked lookup, padded shifts, int64 `%`."""
    ids = np.asarray(input_ids, dtype=np.int64)
    compressed = ids.copy()
    valid = ids >= 0
    compressed[valid] = compressor.table[ids[valid]]
    batch, length = compressed.shape
    pad = hasher.compressed_pad_id
    per_layer = []
    for layer_id in hasher.layer_ids:
        multipliers = hasher.multipliers[layer_id]
        shifts = [
            np.pad(compressed, ((0, 0), (k, 0)), constant_values=pad)[:, :length]
            for k in range(hasher.config.max_ngram_size)
        ]
        heads = []
        for n, primes in enumerate(hasher.head_primes[layer_id], start=2):
            mix = shifts[0] * multipliers[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
            heads += [mix % int(p) for p in primes]
        per_layer.append(np.stack(heads, axis=2) + hasher.head_offsets[layer_id])
    return np.stack(per_layer)


def assert_identical(compressor: TokenizerCompressor, hasher: NgramHasher, batches: list[np.ndarray]) -> None:
    """Every layer's rows of every token: the fast path against the naive one."""
    for batch in batches:
        expected = naive_row_ids(compressor, hasher, batch)
        got = hasher.row_ids(compressor.compress(batch))
        for index, layer_id in enumerate(hasher.layer_ids):
            np.testing.assert_array_equal(got[layer_id], expected[index])


def stdlib_token_ids(compressor: TokenizerCompressor, tokens: int) -> np.ndarray:
    """At least `tokens` ids from encoding the standard library's .py files, in a fixed order."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        chunks.append(compressor.encode(path.read_text(errors="replace")))
        total += len(chunks[-1])
        if total >= tokens:
            return np.concatenate(chunks)[:tokens]
    raise RuntimeError(f"the standard library holds only {total} tokens")


def interleaved_passes(systems: dict) -> dict[str, tuple[list[float], float]]:
    """Per system, seconds of each pass over its batches and page faults per pass.

    Systems take turns, one pass each per round (after one warm-up pass each), so that a busy machine
    slows them alike and the ratios stay fair.
    """
    for run, batches, _ in systems.values():
        for batch in batches:
            run(batch)
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    faults = dict.fromkeys(systems, 0)
    for round_ in range(max(repeats for _, _, repeats in systems.values())):
        for name, (run, batches, repeats) in systems.items():
            if round_ >= repeats:
                continue
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            seconds[name].append(time.perf_counter() - start)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return {name: (seconds[name], faults[name] / len(seconds[name])) for name in systems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="engram_demo", help="Engram YAML config (default: the demo's)")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="tokens hashed per pass")
    parser.add_argument("--batch", type=int, default=8, help="sequences per call")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--source", choices=["stdlib", "random"], default="stdlib")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--naive-repeats", type=int, default=3)
    args = parser.parse_args()
    if args.tokens % (args.batch * args.seq_len):
        parser.error("--tokens must be a multiple of --batch x --seq-len (the reused output has one shape)")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})

    config = EngramConfig.from_yaml(args.config)
    compressor = TokenizerCompressor.from_file()
    hasher = NgramHasher.from_compressor(config, compressor)
    sequences = args.tokens // args.seq_len
    if args.source == "stdlib":
        ids = stdlib_token_ids(compressor, sequences * args.seq_len)
    else:
        ids = np.random.default_rng(0).integers(0, compressor.vocab_size, size=sequences * args.seq_len)
    ids = ids.reshape(sequences, args.seq_len)
    batches = [ids[start : start + args.batch] for start in range(0, sequences, args.batch)]
    tokens = ids.size
    out = np.empty((len(hasher.layer_ids), args.batch, args.seq_len, config.heads_per_layer), dtype=np.int64)

    assert_identical(compressor, hasher, batches)
    print(f"identical row ids for all {tokens:,} tokens and {len(hasher.layer_ids)} layers")

    compressed = [compressor.compress(batch) for batch in batches]
    # Groups of systems, each run as interleaved passes; name: (run one batch, its batches, repeats).
    # The baseline runs alone first: after the fast path's allocations its own would page-fault more.
    baseline = {
        "naive numpy (demo transcription)": (
            lambda b: naive_row_ids(compressor, hasher, b), batches, args.naive_repeats),
    }
    batched = {
        "compress + row_ids": (lambda b: hasher.row_ids(compressor.compress(b)), batches, args.repeats),
        "compress + row_ids(out=reused)": (
            lambda b: hasher.row_ids(compressor.compress(b), out=out), batches, args.repeats),
        "compress only": (compressor.compress, batches, args.repeats),
        "row_ids(out=reused) only": (lambda b: hasher.row_ids(b, out=out), compressed, args.repeats),
    }
    # The same work as one call on all tokens: intermediates and the fresh output no longer fit in cache.
    one_call = {
        "naive numpy, one call on all tokens": (
            lambda b: naive_row_ids(compressor, hasher, b), [ids], args.naive_repeats),
        "compress + row_ids, one call on all tokens": (
            lambda b: hasher.row_ids(compressor.compress(b)), [ids], args.repeats),
    }
    results = [
        {"system": name, "best_s": min(seconds), "median_s": float(np.median(seconds)), "page_faults_per_pass": faults}
        for group in (baseline, batched, one_call)
        for name, (seconds, faults) in interleaved_passes(group).items()
    ]
    naive_best = results[0]["best_s"]
    for row in results:
        row["tokens_per_s"] = tokens / row["best_s"]
        row["tokens_per_s_median"] = tokens / row["median_s"]
        row["ns_per_token"] = row["best_s"] / tokens * 1e9
        row["speedup_vs_naive"] = naive_best / row["best_s"]

    print(f"\n{tokens:,} tokens ({args.source}), batches of {args.batch}x{args.seq_len}, config {args.config}, "
          f"{len(hasher.layer_ids)} layers x {config.heads_per_layer} heads, one core ({cpu_model()})")
    print(f"{'system':44s} {'Mtok/s best':>12s} {'Mtok/s median':>14s} {'ns/token':>9s} {'vs naive':>9s} "
          f"{'faults/pass':>12s}")
    for row in results:
        print(f"{row['system']:44s} {row['tokens_per_s'] / 1e6:12.2f} {row['tokens_per_s_median'] / 1e6:14.2f} "
              f"{row['ns_per_token']:9.1f} {row['speedup_vs_naive']:8.1f}x {row['page_faults_per_pass']:12.0f}")

    summary = {
        "command": " ".join(["python", "-m", "bench.hashing", *sys.argv[1:]]),
        "tokens": tokens, "batch_shape": [args.batch, args.seq_len], "source": args.source,
        "config": args.config, "layers": len(hasher.layer_ids), "heads_per_layer": config.heads_per_layer,
        "cpu": cpu_model(), "numpy": np.__version__, "python": platform.python_version(), "threads": 1,
        "target_tokens_per_s": TARGET_TOKENS_PER_S, "results": results,
    }
    path = write_json("hashing", summary)
    plot(results, f"{tokens:,} tokens, {args.config}, one core")
    print(f"\nwrote {path} and its .png")


def plot(results: list[dict], title: str) -> None:
    with figure("hashing", figsize=(10, 4)) as (fig, ax):
        names = [row["system"] for row in results]
        rates = [row["tokens_per_s"] / 1e6 for row in results]
        bars = ax.barh(names, rates, color=["tab:gray" if "naive" in name else "tab:blue" for name in names])
        ax.bar_label(bars, labels=[f"{rate:.1f}" for rate in rates], padding=3)
        ax.axvline(TARGET_TOKENS_PER_S / 1e6, color="tab:red", linestyle="--", label="target: 10M tokens/s")
        ax.set_xscale("log")
        ax.set_xlim(right=max(rates) * 3)  # room for the labels
        ax.invert_yaxis()
        ax.set_xlabel("million tokens per second, best of repeats (log scale)")
        ax.set_title(f"Compression + n-gram hashing, {title}")
        ax.legend(loc="lower right")


if __name__ == "__main__":
    main()
