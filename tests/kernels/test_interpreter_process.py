"""The interpreter cases in a fresh process, when this one had imported Triton before ``kernel_checks``
could set ``TRITON_INTERPRET`` (then they skip here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_checks import ON_GPU, TRITON_PREIMPORTED


@pytest.mark.skipif(ON_GPU or not TRITON_PREIMPORTED, reason="this process runs the interpreter cases itself")
def test_in_a_fresh_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreter",
                           str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
