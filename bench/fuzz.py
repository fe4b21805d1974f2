"""The RPC fuzzer's long run: ``tests/integration/test_memory_fuzz.py`` at many more cases, from a seed.

Same harness (``bench/rpc_fuzzing.py``: in-process shard and directory servers, every RPC of both
services, random, truncated, oversized, type-confused and hostile requests, and the same verdict after
each case), but a failing case is recorded and the run goes on instead of stopping at the first.
``--examples`` is the total, shared out over methods and kinds (oversized requests, which cost ~0.2 s
each in gRPC, get a tenth of a share); a kind whose cases run out early (a message without fields has
few) runs fewer.

Run: ``python -m bench.fuzz --examples 3000 --seed 1`` (prints a table; writes bench/results/fuzz.json
and fuzz.png). It exits 1 if any case failed: ``problems`` in the JSON lists them.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.results_files import figure, write_json
from bench.rpc_fuzzing import KINDS, METHODS, FuzzTarget, fuzz

SHORT = {"INVALID_ARGUMENT": "INVALID", "FAILED_PRECONDITION": "PRECOND", "RESOURCE_EXHAUSTED": "EXHAUSTED",
         "PERMISSION_DENIED": "DENIED", "UNAUTHENTICATED": "UNAUTH", "ALREADY_EXISTS": "EXISTS"}
SHARE = {"random": 1.0, "truncated": 1.0, "oversized": 0.1, "confused": 1.0, "hostile": 2.0}


def plan(examples: int) -> dict[str, int]:
    """Cases per (method, kind) for ``examples`` in all."""
    per_method = examples / len(METHODS)
    return {kind: max(1, round(per_method * SHARE[kind] / sum(SHARE.values()))) for kind in KINDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3000, help="cases in all (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the servicer logs every INTERNAL with its traceback
    per_kind = plan(args.examples)
    codes: dict[str, dict[str, collections.Counter]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engram-fuzz-") as work:
        target = FuzzTarget(Path(work) / "fuzz")
        cwd = os.getcwd()
        os.chdir(target.cwd)  # a file written relative to the cwd would land in the checked work folder
        try:
            for method in METHODS:
                codes[method.label] = {}
                for kind in KINDS:
                    before = collections.Counter(target.stats[method.label])
                    fuzz(target, method, kind, per_kind[kind], seed=args.seed, keep_going=True)
                    codes[method.label][kind] = target.stats[method.label] - before
                print(f"{method.label:30} {sum(target.stats[method.label].values()):6d} cases", file=sys.stderr)
            final = target.liveness_problems() + target.file_problems()
        finally:
            os.chdir(cwd)
            target.close()
    duration = time.perf_counter() - start
    problems = target.problems_found + [f"after the run: {p}" for p in final]
    report(args, codes, problems, target.resets, target.max_message_bytes, duration)
    sys.exit(1 if problems else 0)


def report(args, codes, problems, resets: int, max_message_bytes: int, duration: float) -> None:
    by_method = {label: sum(kinds.values(), collections.Counter()) for label, kinds in codes.items()}
    all_codes = sorted(set().union(*by_method.values()))
    total = sum(sum(c.values()) for c in by_method.values())
    write_json("fuzz", {
        "examples_asked": args.examples, "examples_run": total, "seed": args.seed, "duration_s": round(duration, 1),
        "max_message_bytes": max_message_bytes, "shard_resets": resets, "crashes_found": len(problems),
        "problems": problems[:50],
        "rpcs": {label: {"examples": sum(counter.values()), "codes": dict(sorted(counter.items())),
                         "by_kind": {kind: dict(sorted(c.items())) for kind, c in codes[label].items()}}
                 for label, counter in by_method.items()},
    })
    short = {code: SHORT.get(code, code[:10]) for code in all_codes}
    print(f"{'rpc':30} {'cases':>6} " + " ".join(f"{short[c]:>10}" for c in all_codes))
    for label, counter in by_method.items():
        print(f"{label:30} {sum(counter.values()):6d} " + " ".join(f"{counter.get(c, 0):10d}" for c in all_codes))
    print(f"\n{total} cases at {len(by_method)} RPCs in {duration:.1f} s (seed {args.seed}); {resets} shard rebuilds "
          f"after legitimate state changes; {len(problems)} failing cases (crashes, INTERNAL/UNKNOWN answers, "
          "changed checksums, stray files)")
    for problem in problems[:10]:
        print("  ", problem[:400])
    plot(by_method, all_codes)


def plot(by_method: dict[str, collections.Counter], all_codes: list[str]) -> None:
    labels = list(by_method)
    with figure("fuzz", figsize=(11, 5)) as (fig, ax):
        bottom = [0] * len(labels)
        for code in all_codes:
            heights = [by_method[label].get(code, 0) for label in labels]
            ax.barh(labels, heights, left=bottom, label=code)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.invert_yaxis()
        ax.set(xlabel="fuzzed requests", title="Status codes per RPC under the fuzzer")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


if __name__ == "__main__":
    main()
