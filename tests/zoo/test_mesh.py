"""Zoo models (ViT, Swin, DiNAT, MaxViT, LM) built under an 8-device CPU mesh are sharded as the logical rules say and
compute what the unsharded models compute.

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
def test_models_under_8_device_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    assert result.stdout.count("ok ") == 5, result.stdout
