"""Zoo models built under an 8-device CPU mesh are sharded as the logical rules say and compute what
the unsharded models compute.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX is imported, so
the checks (``mesh_check.py``) run in fresh subprocesses, one per group of models (the groups run
in parallel under pytest-xdist, so they are sized to take similar times).
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("mesh_check.py")

GROUPS = {
    "core": ("vit", "swin", "dinat", "maxvit", "lm"),
    "breadth_1": ("twins", "davit", "crossformer", "van"),
    "breadth_2": ("agent_swin", "agent_deit", "biformer", "hat"),
}


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_models_under_8_device_mesh(group):
    cases = GROUPS[group]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(SCRIPT), *cases], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    for case in cases:
        assert f"ok {case}:" in result.stdout, result.stdout


def test_groups_cover_every_case():
    """Every case in mesh_check.CASES runs in exactly one group (read from the script's source: it
    cannot be imported in a process whose JAX is already initialised)."""
    tree = ast.parse(SCRIPT.read_text())
    cases = next(node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CASES")
    grouped = [name for cases_ in GROUPS.values() for name in cases_]
    assert sorted(grouped) == sorted(key.value for key in cases.keys)
