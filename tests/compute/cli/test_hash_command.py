"""`engram hash`: its JSON equals the golden vectors; bad input exits 2 with a clear message."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compute.cli import main

ENGRAM_SCRIPT = Path(sys.executable).parent / "engram"


@pytest.fixture(scope="module")
def golden(golden_dir):
    return json.loads((golden_dir / "hash_demo_config.json").read_text())


def expected_output(case: dict) -> dict:
    return {key: case[key] for key in ("input_ids", "compressed_ids", "layers")}


def test_every_golden_text(golden, capsys):
    for case in golden["cases"]:
        assert main(["hash", "--config", "engram_demo", "--text", case["text"]]) == 0
        assert json.loads(capsys.readouterr().out) == expected_output(case)


def test_config_file_and_explicit_tokenizer(golden, capsys, tmp_path):
    from compute.hashing.tokenizer_compression import default_tokenizer_path

    config = tmp_path / "engram.yaml"
    config.write_text("engram:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in golden["config"].items()))
    case = golden["cases"][2]
    argv = ["hash", "--config", str(config), "--tokenizer", str(default_tokenizer_path()), "--text", case["text"]]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == expected_output(case)


@pytest.mark.skipif(not ENGRAM_SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_installed_console_script(golden):
    case = golden["cases"][0]
    result = subprocess.run(
        [str(ENGRAM_SCRIPT), "hash", "--config", "engram_demo", "--text", case["text"]],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(result.stdout) == expected_output(case)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (None, "no_such.yaml"),
        ("engram:\n  max_ngram_sise: 3\n", "max_ngram_sise"),
        ("engram:\n  max_ngram_size: [3\n", "--config"),
        ("engram:\n  max_ngram_size: three\n", "--config"),
    ],
)
def test_bad_config_exits_2_naming_the_problem(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "no_such.yaml"
    if yaml_text is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml_text)
    assert main(["hash", "--config", str(config), "--text", "hi"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
