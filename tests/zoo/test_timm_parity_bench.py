"""benchmarks/vision.py runs end to end at its smallest size (64 px, batch 2, one round): every
model's converted logits match timm's before anything is timed. Needs torch + timm
(``make test-timm-parity``)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[2]


def test_vision_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/vision.py", "--smoke", "--output", str(tmp_path / "table.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout
    for name in ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224"):
        assert f"check {name}: logits relative RMS error" in result.stdout
        assert f"| {name} |" in (tmp_path / "table.md").read_text()
