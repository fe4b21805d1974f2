"""`engram train`, `eval`, `generate` and `tables` as docs/training.md shows them, each in its own process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.integration.tiny_runs import TINY_RUN_YAML

TINY_RUN = {**TINY_RUN_YAML, "steps": 3}


def engram(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "compute.cli", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"engram {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def last_json(stdout: str) -> dict:
    """The JSON object a command prints last (its log lines come before)."""
    start = stdout.rfind("\n{") + 1  # 0 when the object starts the output
    return json.loads(stdout[start:])


@pytest.mark.ray
def test_train_then_eval_then_generate_from_the_checkpoint(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(tmp_path / "run")}))

    summary = last_json(engram("train", "--config", str(config)).stdout)
    assert summary["step"] == 3 and summary["rows_looked_up"] > 0 and summary["bytes_moved"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step_000003" / "memory").is_dir()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

    evaluation = last_json(engram("eval", "--checkpoint", str(tmp_path / "run")).stdout)
    assert evaluation["step"] == 3
    assert abs(evaluation["val_loss"] - summary["val_loss"]) < 1e-4  # the same model on the same tables

    out = engram("generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "import os",
                 "--prompt", "def main(", "--max-new-tokens", "4").stdout
    assert out.startswith("import os") and "def main(" in out
    assert out.count("[4 tokens, length]") == 2


def test_tables_prints_the_specs_a_run_needs(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    tables = yaml.safe_load(engram("tables", "--config", str(config)).stdout)["tables"]
    assert [t["name"] for t in tables] == ["engram_layer_0", "engram_layer_1"]
    assert all(t["dim"] == 8 and t["optimizer"]["kind"] == "adam" for t in tables)


def test_a_bad_config_is_refused_with_the_field_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "memory": {"staleness": 2}}))
    result = subprocess.run([sys.executable, "-m", "compute.cli", "train", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "memory.staleness" in result.stderr


def test_an_unknown_config_name_is_refused_listing_the_shipped_ones():
    result = subprocess.run([sys.executable, "-m", "compute.cli", "train", "--config", "demo_trian"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("engram train: error: config 'demo_trian': no such file, nor a shipped config "
                                     "of that name (data_demo, demo_train, engram_demo, model_demo)")
