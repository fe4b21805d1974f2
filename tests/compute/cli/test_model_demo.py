"""`engram model-demo` runs a real sentence through a small EngramMoE, forward and backward."""
from __future__ import annotations

import re

from compute.cli import main


def test_model_demo_reports_shapes_counts_and_a_finite_loss(capsys):
    assert main(["model-demo", "--text", "The quick brown fox jumps over the lazy dog."]) == 0
    out = capsys.readouterr().out
    assert re.search(r"logits \(1, \d+, 129280\)", out)
    assert re.search(r"engram_tables\s+[\d,]+ parameters", out)
    loss = float(re.search(r"loss (\S+)", out).group(1))
    assert 0 < loss < 20
    assert "all gradients finite: True" in out
