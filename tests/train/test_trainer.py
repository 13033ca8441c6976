"""End-to-end trainer tests: each run is a fresh process (trainer_run.py) with 1, 4 or 8 simulated
CPU devices, training a tiny MQAR model for a few steps.

Tolerances: runs that differ only in how the same math is partitioned (data / fsdp / tensor
parallel, gradient accumulation) agree to 2e-5 relative in the per-step loss over 12 steps (float32
sums in a different order); a resumed run is bitwise equal to an uninterrupted one; a checkpoint
restored onto another device count is bitwise equal.
"""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

RUNNER = os.path.join(os.path.dirname(__file__), "trainer_run.py")
LOSS_RTOL = 2e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "tfds_trainer")


def tiny(data_dir, **overrides):
    """A ~30k-parameter MQAR run: 12 steps of batch 16, a checkpoint every 4 steps."""
    config = {
        "data.data_dir": data_dir,
        "model.kwargs.dim": 32,
        "model.kwargs.num_heads": 2,
        "batch_size": 16,
        "eval_batch_size": 40,
        "eval_max_batches": 2,
        "num_steps": 12,
        "log_every_steps": 1,
        "checkpoint.every_steps": 4,
        "eval_every_steps": 0,
        "optimizer.warmup_steps": 2,
    }
    config.update(overrides)
    return config


def start(workdir, overrides, *, devices=1, action="train", dump=None, imports=(), env=None):
    spec = {"action": action, "workdir": str(workdir), "overrides": overrides, "devices": devices,
            "imports": list(imports)}
    if dump:
        spec["dump"] = str(dump)
    return subprocess.Popen(
        [sys.executable, RUNNER, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=None if env is None else {**os.environ, **env},
    )


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise AssertionError(f"run failed (exit {process.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["stdout"], result["stderr"] = out, err
    return result


def run(workdir, overrides, **kwargs):
    return finish(start(workdir, overrides, **kwargs))


def losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in records if r["split"] == "train"]


def load(path):
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def assert_params_equal(left, right):
    assert left.keys() == right.keys()
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


# ------------------------------------------------------------------------------------------------


def test_parallelism_gives_the_one_device_loss_trajectory(tmp_path, data_dir):
    reference = run(tmp_path / "one", tiny(data_dir))
    assert reference["devices"] == 1
    expected = losses(tmp_path / "one")
    assert len(expected) == 12 and expected[-1] < expected[0]
    meshes = {
        "data8": {"data": 8, "fsdp": 1, "tensor": 1},
        "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
        "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
    }
    for name, mesh in meshes.items():
        overrides = tiny(data_dir, **{f"mesh.{axis}": size for axis, size in mesh.items()})
        result = run(tmp_path / name, overrides, devices=8)
        assert result["devices"] == 8
        np.testing.assert_allclose(losses(tmp_path / name), expected, rtol=LOSS_RTOL, err_msg=name)
    # The comparison can fail: a different seed gives a different trajectory.
    run(tmp_path / "seed1", tiny(data_dir, seed=1))
    assert not np.allclose(losses(tmp_path / "seed1"), expected, rtol=LOSS_RTOL)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, data_dir):
    run(tmp_path / "full", tiny(data_dir))
    run(tmp_path / "accum", tiny(data_dir, grad_accum_steps=4))
    np.testing.assert_allclose(losses(tmp_path / "accum"), losses(tmp_path / "full"), rtol=LOSS_RTOL)


def _wait_for_checkpoint(workdir, process, minimum_step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                 if os.path.basename(p).isdigit()]
        if steps and max(steps) >= minimum_step:
            return max(steps)
        if process.poll() is not None:
            raise AssertionError("the run ended before it could be interrupted:\n" + process.stderr.read()[-3000:])
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_killed_and_terminated_runs_resume_exactly(tmp_path, data_dir):
    overrides = tiny(data_dir, num_steps=150, log_every_steps=10, **{"checkpoint.every_steps": 5})
    reference = start(tmp_path / "reference", overrides, dump=tmp_path / "reference.npz")

    killed = start(tmp_path / "killed", overrides)
    seen = _wait_for_checkpoint(tmp_path / "killed", killed, 10)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert seen < 150

    terminated = start(tmp_path / "terminated", overrides)
    _wait_for_checkpoint(tmp_path / "terminated", terminated, 5)
    terminated.send_signal(signal.SIGTERM)
    stopped = finish(terminated)
    assert stopped["stopped_by_signal"] == "SIGTERM", stopped["stdout"][-2000:]
    assert "Run the same command to resume" in stopped["stdout"]
    assert os.path.isdir(tmp_path / "terminated" / "checkpoints" / str(stopped["step"]))

    finish(reference)
    expected = load(tmp_path / "reference.npz")
    for name in ("killed", "terminated"):
        resumed = run(tmp_path / name, overrides, dump=tmp_path / f"{name}.npz")
        assert "resumed from the checkpoint at step" in resumed["stderr"]
        assert resumed["step"] == 150
        assert_params_equal(load(tmp_path / f"{name}.npz"), expected)
        # The loss curve has one record per logged step, with no duplicates from the first attempt.
        steps = [json.loads(line)["step"] for line in open(tmp_path / name / "metrics.jsonl")
                 if json.loads(line)["split"] == "train"]
        assert steps == list(range(10, 151, 10))
        # keep-N: of the 30 checkpoints written (every 5 steps), the newest 3 remain.
        assert sorted(int(p) for p in os.listdir(tmp_path / name / "checkpoints")) == [140, 145, 150]


def test_a_signal_stops_the_run_within_a_step_or_two(tmp_path, data_dir):
    """The host may not run far ahead of the device: a SIGTERM must not wait for a long queue of
    dispatched steps. The run logs and checkpoints only every 1000 steps, so only the trainer's own
    bound on steps in flight paces it. The probe sends SIGTERM when batch 40 is asked for."""
    signal_at = 40
    probe = tmp_path / "probe.json"
    overrides = tiny(data_dir, num_steps=1000, log_every_steps=1000, batch_size=64,
                     **{"checkpoint.every_steps": 1000, "model.kwargs.dim": 64})
    result = finish(start(tmp_path / "run", overrides, imports=["pacing_probe"],
                          env={"PACING_PROBE_SIGNAL_AT": str(signal_at), "PACING_PROBE_OUTPUT": str(probe)}))
    assert result["stopped_by_signal"] == "SIGTERM" and result["step"] == signal_at, result["stdout"][-2000:]
    record = json.load(open(probe))
    requests = np.array(record["requests"])
    assert len(requests) == signal_at
    assert [step for step, _ in record["saves"]] == [signal_at]
    saved_at = record["saves"][0][1]
    # Batch 2 is asked for once step 1 (with its compile) has finished. If steps were only dispatched,
    # batches 2..40 would be asked for within milliseconds and the device would still owe ~38 steps
    # when the signal came: nearly all of the time from batch 2 to the save would come after it.
    after_signal = saved_at - requests[-1]
    from_second_batch = saved_at - requests[1]
    gaps = np.diff(requests[1:])
    assert after_signal < 0.25 * from_second_batch, (after_signal, from_second_batch, gaps)


def test_checkpoint_from_8_devices_restores_on_1_and_4(tmp_path, data_dir):
    workdir = tmp_path / "run"
    overrides = tiny(data_dir, num_steps=4, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    run(workdir, overrides, devices=8, dump=tmp_path / "eight.npz")
    eight = load(tmp_path / "eight.npz")
    for devices, mesh in ((1, {"fsdp": 1, "tensor": 1}), (4, {"fsdp": 2, "tensor": 2})):
        restore = dict(overrides, **{f"mesh.{axis}": size for axis, size in mesh.items()})
        result = run(workdir, restore, devices=devices, action="restore", dump=tmp_path / f"{devices}.npz")
        assert result["devices"] == devices
        assert_params_equal(load(tmp_path / f"{devices}.npz"), eight)


def _corrupt(step_dir):
    files = sorted((p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
                    if os.path.isfile(p)), key=os.path.getsize)
    with open(files[-1], "r+b") as f:  # the largest file holds the array data
        f.truncate(os.path.getsize(files[-1]) // 2)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, data_dir):
    workdir = tmp_path / "run"
    run(workdir, tiny(data_dir, num_steps=8))
    _corrupt(workdir / "checkpoints" / "8")
    result = run(workdir, tiny(data_dir, num_steps=12), dump=tmp_path / "final.npz")
    assert "checkpoint at step 8 could not be restored" in result["stderr"]
    assert "resumed from the checkpoint at step 4" in result["stderr"]
    assert result["step"] == 12
    assert glob.glob(str(workdir / "checkpoints_corrupt" / "8-*"))
    assert all(np.isfinite(v).all() for v in load(tmp_path / "final.npz").values())


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = tmp_path / "run"
    overrides = tiny(data_dir, **{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0,
                                  "optimizer.clip_norm": 0.0, "checkpoint.every_steps": 1})
    result = run(workdir, overrides, dump=tmp_path / "last.npz")
    assert "became non-finite at step" in result["nonfinite_error"]
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints" / "*")))
    failed_at = int(result["nonfinite_error"].split("at step ")[1].split()[0])
    assert saved and max(saved) < failed_at
    assert all(np.isfinite(v).all() for v in load(tmp_path / "last.npz").values())


def test_bad_configs_fail_before_compiling_with_a_fix(tmp_path, data_dir):
    cases = [
        ({"model.name": "vit_tiny_patch17"}, 1, "vit_tiny_patch16_224"),
        ({"model.kwargs.pattern": "attn,mamba9"}, 1, "mamba9"),
        ({"mesh.data": 3}, 8, "needs 3 devices but 8 are available"),
        ({"mesh.data": -1, "mesh.fsdp": 3}, 8, "do not divide the 8 available devices"),
        ({"mesh.data": 2, "mesh.tensor": 2, "mesh.fsdp": 1}, 8, "needs 4 devices but 8"),
        ({"mesh.data": 8, "batch_size": 12}, 8, "config.batch_size=12 must divide by the batch shards"),
        ({"data.name": "cifar10", "task": "classification"}, 1, "tfds build cifar10"),
        ({"early_stop.metric": "psnr", "early_stop.threshold": 30.0, "eval_every_steps": 4}, 1,
         "config.early_stop.metric must be an eval metric of task 'mqar' (loss, accuracy), got 'psnr'"),
        ({"early_stop.metric": "accuracy", "early_stop.threshold": 0.99}, 1,
         "config.early_stop needs periodic evals: set config.eval_every_steps >= 1, got 0"),
        ({"early_stop.metric": "accuracy", "eval_every_steps": 4}, 1,
         "config.early_stop.threshold must be a finite number, got None"),
        ({"early_stop.metric": "loss", "early_stop.threshold": 1.0, "early_stop.mode": "below", "eval_every_steps": 4},
         1, "config.early_stop.mode must be 'max' or 'min', got 'below'"),
    ]
    processes = [(start(tmp_path / str(i), tiny(data_dir, **o), devices=d), want) for i, (o, d, want) in
                 enumerate(cases)]
    for process, want in processes:
        result = finish(process)
        assert want in result.get("config_error", ""), (want, result.get("config_error"), result["stderr"][-2000:])
        assert "Compiling" not in result["stderr"]


def test_metrics_files_and_resume_of_a_finished_run(tmp_path, data_dir):
    workdir = tmp_path / "run"
    first = run(workdir, tiny(data_dir, eval_every_steps=8))
    assert "Compiling" in first["stderr"]  # so its absence in the bad-config test means something
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [8, 12]
    for key in ("loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "step_time_s"):
        assert key in train[-1] and np.isfinite(train[-1][key]), key
    assert 0 < train[-1]["mfu"] < 1
    tags = _tensorboard_tags(workdir / "tensorboard")
    assert {"train/loss", "train/mfu", "eval/accuracy"} <= tags
    # Running the finished run again evaluates the final checkpoint instead of training again.
    again = run(workdir, tiny(data_dir, eval_every_steps=8))
    assert again["step"] == 12
    assert "resumed from the checkpoint at step 12" in again["stderr"]
    assert again["eval"] == pytest.approx(first["eval"], rel=1e-6)
    # A workdir of another model is refused before compiling, and its checkpoints stay in place.
    other = run(workdir, tiny(data_dir, **{"model.kwargs.dim": 48}))
    assert "holds a different train state" in other["config_error"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]


def test_early_stop_at_a_periodic_eval_and_on_rerun(tmp_path, data_dir):
    """Stops (checkpoint saved) at the first eval meeting config.early_stop; a rerun of that
    workdir evaluates the checkpoint and stops again without training; an unmet threshold (or the
    "min" mode against a loss it never reaches) trains to num_steps."""
    early = {"eval_every_steps": 4, "checkpoint.every_steps": 0, "early_stop.metric": "accuracy",
             "early_stop.threshold": 0.0}
    workdir = tmp_path / "early"
    first = run(workdir, tiny(data_dir, **early))
    assert first["early_stopped"] and first["step"] == 4, first["stdout"][-2000:]
    assert "early stop at step 4: accuracy" in first["stderr"] + first["stdout"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [4]
    again = run(workdir, tiny(data_dir, **early))
    assert again["early_stopped"] and again["step"] == 4
    assert again["eval"] == pytest.approx(first["eval"], rel=1e-6)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    assert [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "train"] == [1, 2, 3, 4]

    unmet = run(tmp_path / "unmet", tiny(data_dir, **{**early, "early_stop.threshold": 1.01}))
    assert not unmet["early_stopped"] and unmet["step"] == 12
    low_loss = run(tmp_path / "min", tiny(data_dir, **{**early, "early_stop.metric": "loss", "early_stop.mode": "min",
                                                       "early_stop.threshold": 1e-3}))
    assert not low_loss["early_stopped"] and low_loss["step"] == 12
    high_loss = run(tmp_path / "min_met", tiny(data_dir, **{**early, "early_stop.metric": "loss",
                                                            "early_stop.mode": "min", "early_stop.threshold": 1e3}))
    assert high_loss["early_stopped"] and high_loss["step"] == 4


def _tensorboard_tags(directory):
    """Scalar tags in TensorBoard event files, read from the TFRecord framing directly."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12: offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_bfloat16_compute_trains(tmp_path, data_dir):
    run(tmp_path / "bf16", tiny(data_dir, dtype="bfloat16", num_steps=24, **{"optimizer.learning_rate": 3e-3}))
    curve = losses(tmp_path / "bf16")
    assert all(np.isfinite(curve)) and np.mean(curve[-4:]) < np.mean(curve[:4])
