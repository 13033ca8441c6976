"""The attention layer under an 8-device CPU mesh (``jax.set_mesh``) equals the unsharded layer.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX is imported, so
the checks (``mesh_check.py``) run in a fresh subprocess.
"""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("mesh_check.py")


@pytest.mark.slow
def test_attention_under_8_device_mesh():
    """xla (SPMD-partitioned) and pallas (interpret mode, wrapped in shard_map): outputs equal the
    unsharded layer; for pallas also gradients and prefill + decode (incl. MQA's head repeat)."""
    checks = ["xla:2", "pallas:1:full", "pallas:2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *checks], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    assert result.stdout.count("ok ") == len(checks), result.stdout
