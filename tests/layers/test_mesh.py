"""Mixers under an 8-device CPU mesh (``jax.set_mesh``) equal the unsharded layers.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX is imported, so
the checks (``mesh_check.py``) run in a fresh subprocess.
"""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("mesh_check.py")


def run_checks(checks, timeout):
    """Runs ``mesh_check.py`` with ``checks`` on 8 simulated devices; asserts every one printed ok."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *checks], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    assert result.stdout.count("ok ") == len(checks), result.stdout


@pytest.mark.slow
def test_attention_under_8_device_mesh():
    """xla (SPMD-partitioned) and pallas (interpret mode, wrapped in shard_map): outputs equal the
    unsharded layer; for pallas also gradients and prefill + decode (incl. MQA's head repeat)."""
    run_checks(["xla:2", "pallas:1:full", "pallas:2"], timeout=600)


@pytest.mark.slow
def test_recurrent_mixers_under_8_device_mesh():
    """Gated DeltaNet (scalar decay, delta rule) and GLA (per-channel decay) with impl="pallas"
    (interpret mode, shard_map over batch and heads) and GatedDeltaNet with xla (partitioner), T = 40
    in chunks of 16: outputs and every parameter gradient with segment_ids, and two prefills (the
    second from the first's state) + one-token steps equal the unsharded layer."""
    run_checks(["recurrent:gated_deltanet:pallas", "recurrent:gla:pallas", "recurrent:gated_deltanet:xla"],
               timeout=900)
