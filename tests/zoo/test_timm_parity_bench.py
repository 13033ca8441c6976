"""benchmarks/vision.py runs end to end at its smallest size (64 px, batch 2, one round): every
default model's converted logits match timm's before anything is timed; so does its attention ablation,
and benchmarks/vision_matmuls.py, whose gradients must match torch's, and
benchmarks/attention_products.py, whose products must match float64. Needs torch + timm
(``make test-timm-parity``)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[2]


# The default models in two groups, so pytest-xdist's two workers share them: the first took 254 s
# and the second 169 s beside other jobs, and the worker with the second also runs the other tests.
SMOKE_MODEL_GROUPS = (
    ("vit_tiny_patch16_224", "maxvit_tiny_tf_224", "twins_svt_small"),
    ("swin_tiny_patch4_window7_224", "twins_pcpvt_small", "davit_tiny"),
)


def test_smoke_groups_are_the_default_models():
    """The groups cover benchmarks/vision.py's DEFAULT_MODELS exactly (read from its source)."""
    tree = ast.parse((ROOT / "benchmarks" / "vision.py").read_text())
    defaults = next(node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DEFAULT_MODELS")
    assert sorted(name for group in SMOKE_MODEL_GROUPS for name in group) == sorted(ast.literal_eval(defaults))


@pytest.mark.parametrize("models", SMOKE_MODEL_GROUPS, ids=lambda models: models[0].split("_")[0])
def test_vision_benchmark_smoke(tmp_path, models):
    result = subprocess.run(
        [sys.executable, "benchmarks/vision.py", "--smoke", "--models", ",".join(models),
         "--output", str(tmp_path / "table.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout
    for name in models:
        assert f"check {name}: logits relative RMS error" in result.stdout
        assert f"| {name} |" in (tmp_path / "table.md").read_text()


def test_vision_benchmark_without_attention_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/vision.py", "--smoke", "--models", "vit_tiny_patch16_224", "--without-attention",
         "--output", str(tmp_path / "table.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check vit_tiny_patch16_224: logits relative RMS error" in result.stdout and "FAIL" not in result.stdout
    table = (tmp_path / "table.md").read_text()
    assert "attention replaced by v + 0 * (q + k)" in table and "| vit_tiny_patch16_224 |" in table
    refused = subprocess.run(
        [sys.executable, "benchmarks/vision.py", "--smoke", "--models", "swin_tiny_patch4_window7_224", "--without-attention"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert refused.returncode != 0 and "ViT models only" in refused.stderr


def test_vision_matmuls_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/vision_matmuls.py", "--smoke", "--output", str(tmp_path / "table.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": gradients relative RMS error") == 5 and "FAIL" not in result.stdout
    table = (tmp_path / "table.md").read_text()
    for name in ("qkv x 2", "attention out x 2", "mlp up x 2", "mlp down x 2", "patch embedding x 1", "| all |"):
        assert name in table


def test_attention_products_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/attention_products.py", "--smoke", "--output", str(tmp_path / "table.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": relative RMS error to float64") == 6 and "FAIL" not in result.stdout
    table = (tmp_path / "table.md").read_text()
    for shape in ("ViT-Ti", "Swin-T stage 1", "MaxViT-T stage 1"):
        for product in ("scores Q K^T", "output P V"):
            assert f"| {shape} | {product} |" in table
