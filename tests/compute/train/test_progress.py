"""The driver's view of a run: rank 0's progress file feeds the bar, each logged step becomes one line."""
from __future__ import annotations

import json

from compute.train.progress import PROGRESS_FILE, DriverProgress, ProgressFile


def metrics(step: int) -> dict:
    return {"step": step, "loss": 10.0 / step, "tokens_per_s": 100.0 * step, "lookup_wait_share": 0.01}


def test_the_driver_shows_each_logged_step_once_and_the_bar_reaches_the_last_step(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(metrics(99)) + "\n")  # an earlier run's line: not shown
    with DriverProgress(tmp_path, total_steps=3, metrics_file="metrics.jsonl") as progress:
        on_step = ProgressFile(tmp_path, rank=0)
        with open(tmp_path / "metrics.jsonl", "a") as log:
            for step in (1, 2, 3):
                on_step(metrics(step))
                if step != 2:
                    log.write(json.dumps(metrics(step)) + "\n")
                    log.flush()
            log.write('{"step": 4, "lo')  # a line still being written waits for its end
            log.flush()
    lines = [line.strip() for line in capsys.readouterr().out.replace("\r", "\n").splitlines()]
    logged = [line for line in lines if line.startswith("step ")]
    assert logged == ["step      1  loss  10.000  tokens/s      100  lookup wait   1.0%",
                      "step      3  loss   3.333  tokens/s      300  lookup wait   1.0%"]
    assert progress.bar.n == 3


def test_only_rank_0_writes_the_progress_file(tmp_path):
    ProgressFile(tmp_path, rank=1)(metrics(1))
    assert not (tmp_path / PROGRESS_FILE).exists()
    ProgressFile(tmp_path, rank=0)(metrics(1))
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["step"] == 1
