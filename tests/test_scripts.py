"""The README's demo and the attention benchmark run end to end (smallest size), so they never rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_runs_and_every_implementation_agrees():
    result = run("-m", "attnzoo.demo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "agree with the float64 reference" in result.stdout


@pytest.mark.slow
def test_attention_benchmark_smoke(tmp_path):
    result = run("benchmarks/attention.py", "--smoke", "--output", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout and "| xla |" in result.stdout
