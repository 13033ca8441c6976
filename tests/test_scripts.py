"""The README's demo and the attention, recurrent and kernel benchmarks run end to end (smallest size), so they never rot."""

import json
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


@pytest.mark.slow
def test_recurrent_benchmark_smoke(tmp_path):
    result = run("benchmarks/recurrent.py", "--smoke", "--output", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout and "| gated_delta_rule |" in result.stdout and "Crossover" in result.stdout
    records = json.loads((tmp_path / "table.json").read_text())
    assert len(records) == 1 and set(records[0]["results"]["256"]) == {
        "attention", "linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "ssd", "selective_scan"
    }


def test_recurrent_benchmark_compares_selective_scan_with_its_cu_seqlens_path(tmp_path):
    result = run("benchmarks/recurrent.py", "--smoke", "--batch", "3", "--ops",
                 "selective_scan,selective_scan_cu_seqlens", "--output", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout and "| selective_scan_cu_seqlens |" in result.stdout
    assert "T=256: selective_scan" in result.stdout and "the batch packed with cu_seqlens" in result.stdout
    records = json.loads((tmp_path / "table.json").read_text())
    assert set(records[0]["results"]["256"]) == {"attention", "selective_scan", "selective_scan_cu_seqlens"}


@pytest.mark.slow
def test_kernels_benchmark_smoke(tmp_path):
    """Every op's row: checked against float64, timed, and its Pallas kernels lowered for both platforms."""
    result = run("benchmarks/kernels.py", "--smoke", "--output", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    ops = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert ops == {"attention", "attention_decode", "neighborhood_attention", "routed_attention", "linear_attention",
                   "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "ssd", "selective_scan"}
    assert "FAIL" not in result.stdout and " no (" not in result.stdout
    assert (tmp_path / "table.md").read_text().startswith("`python benchmarks/kernels.py --smoke")


@pytest.mark.slow
def test_routed_attention_benchmark_smoke(tmp_path):
    """Each BiFormer stage: both impls checked against float64 before they are timed."""
    result = run("benchmarks/routed_attention.py", "--smoke", "--output", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| stage") and not line.startswith("| stage |")]
    assert len(rows) == 6 and "FAIL" not in result.stdout, result.stdout
    assert (tmp_path / "table.md").exists()


def test_results_page_is_up_to_date():
    """docs/results.md is what benchmarks/results_page.py assembles from benchmarks/results/ now."""
    result = run("benchmarks/results_page.py", "--check", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def train_cli(workdir, config, *overrides, data_dir):
    return run(
        "-m", "attnzoo.train", "--config", config, "--workdir", str(workdir),
        f"--config.data.data_dir={data_dir}", *overrides,
    )


@pytest.mark.slow
def test_train_command_trains_then_resumes_instead_of_starting_over(tmp_path):
    args = ("attnzoo/configs/mqar.py", "--config.num_steps=30", "--config.optimizer.warmup_steps=5",
            "--config.log_every_steps=10", "--config.checkpoint.every_steps=10", "--config.eval_every_steps=0")
    first = train_cli(tmp_path / "run", *args, data_dir=tmp_path / "tfds")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "step 30/30" in first.stdout and "final eval at step 30: accuracy" in first.stdout
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10", "20", "30"]
    second = train_cli(tmp_path / "run", *args, data_dir=tmp_path / "tfds")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from the checkpoint at step 30" in second.stderr
    assert "step 10/30" not in second.stdout and "final eval at step 30" in second.stdout


@pytest.mark.slow
def test_vit_digits_config_trains(tmp_path):
    result = train_cli(tmp_path / "run", "attnzoo/configs/vit_digits.py", "--config.num_steps=20",
                       "--config.optimizer.warmup_steps=5", "--config.eval_every_steps=0",
                       data_dir=tmp_path / "tfds")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "final eval at step 20: accuracy" in result.stdout


@pytest.mark.slow
def test_swin_digits_config_trains_with_either_mixer(tmp_path):
    for mixer in ("window", "neighborhood"):
        result = train_cli(tmp_path / mixer, f"attnzoo/configs/swin_digits.py:{mixer}", "--config.num_steps=10",
                           "--config.optimizer.warmup_steps=2", "--config.eval_every_steps=0",
                           data_dir=tmp_path / "tfds")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "final eval at step 10: accuracy" in result.stdout


def test_train_command_rejects_a_bad_config_with_exit_status_2(tmp_path):
    result = train_cli(tmp_path / "run", "attnzoo/configs/mqar.py", "--config.model.name=lm_nanoo",
                       data_dir=tmp_path / "tfds")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config error" in result.stderr and "lm_nano" in result.stderr


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "colab" / "quickstart.ipynb", as_version=4)
    env = {"QUICKSTART_STEPS": "40", "TFDS_DATA_DIR": str(tmp_path / "tfds"), "PYTHONPATH": str(ROOT)}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "restored eval" in outputs and "final train loss" in outputs


@pytest.mark.slow
def test_mqar_benchmark_smoke(tmp_path):
    """Two mixers train and evaluate through the trainer, in two worker processes; the CSV, table and plot are
    written, and a rerun (in one process) skips them."""
    args = ("benchmarks/mqar.py", "--smoke", "--output", str(tmp_path / "mqar.md"), "--data-dir", str(tmp_path / "tfds"))
    result = run(*args, "--workers", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 points to train, 2 at a time" in result.stdout
    for slot in (0, 1):
        assert f"[slot {slot}] finished" in result.stdout and f"[slot {slot}]   accuracy" in result.stdout
    assert "| attention |" in result.stdout and "| linear_attention |" in result.stdout
    assert "projected full sweep" in result.stdout
    rows = (tmp_path / "mqar.csv").read_text().splitlines()
    assert rows[0].startswith("mixer,pattern,layers,mlp,width,seq_len,num_kv_pairs") and len(rows) == 3
    assert all(",ok," in row for row in rows[1:])
    assert (tmp_path / "mqar.md").read_text().startswith("### MQAR")
    assert (tmp_path / "mqar.png").stat().st_size > 0
    again = run(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 of 2 selected runs already in the CSV; at most 0 to run" in again.stdout
    assert len((tmp_path / "mqar.csv").read_text().splitlines()) == 3
