"""A run's progress on the driver: rank 0 writes its latest step to a file, the driver draws it.

Ray's worker output stays in Ray's log files (``-v`` forwards it), so the driver shows the progress
itself: a tqdm bar of steps fed by ``progress.json``, and a line per step that the run logs to
``metrics.jsonl``. Both files live in the run's output folder, which the driver reads for the summary too.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

PROGRESS_FILE = "progress.json"
POLL_S = 0.5


class ProgressFile:
    """On rank 0, rewrites ``<output_dir>/progress.json`` after every step (atomically); elsewhere a no-op."""

    def __init__(self, output_dir: str | Path, rank: int):
        self.path = Path(output_dir) / PROGRESS_FILE if rank == 0 else None

    def __call__(self, metrics: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(metrics))
        os.replace(partial, self.path)


class DriverProgress:
    """While the run trains: a bar of its steps, and a line for each step it logs to ``metrics_file``."""

    def __init__(self, output_dir: str | Path, total_steps: int, metrics_file: str):
        self.progress = Path(output_dir) / PROGRESS_FILE
        self.metrics = Path(output_dir) / metrics_file
        self.total_steps = total_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="train-progress", daemon=True)

    def __enter__(self) -> DriverProgress:
        self.progress.unlink(missing_ok=True)
        self._metrics_offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        from tqdm import tqdm

        self.bar = tqdm(total=self.total_steps, desc="train", unit="step", file=sys.stdout, ncols=100,
                        mininterval=1.0, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self._refresh()

    def _refresh(self) -> None:
        for record in self._new_metrics():
            wait = 100 * record["lookup_wait_share"]
            self.bar.write(f"step {record['step']:>6}  loss {record['loss']:7.3f}  "
                           f"tokens/s {record['tokens_per_s']:8.0f}  lookup wait {wait:5.1f}%")
        latest = _read_json(self.progress)
        if latest and latest["step"] > self.bar.n:
            self.bar.update(latest["step"] - self.bar.n)
            self.bar.set_postfix_str(f"loss {latest['loss']:.3f}", refresh=False)

    def _new_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics) as f:
            f.seek(self._metrics_offset)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next poll
        self._metrics_offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
