"""Ops under 8-device CPU meshes (Auto and Explicit axes) give the unsharded results."""

import os
import subprocess
import sys
from pathlib import Path


def test_ops_under_meshes():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-m", "tests.pallas_kernels.sharding_check"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0 and "sharding ok" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
