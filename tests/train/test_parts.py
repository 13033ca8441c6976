"""The trainer's pieces on their own: mesh shapes, sharding rules, optimizer, FLOP/MFU bookkeeping,
the metrics file and checkpoint fallback."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attnzoo.train import metrics, optimizer, partitioning
from attnzoo.train.checkpointing import Checkpoints


@pytest.mark.parametrize(
    "config, devices, expected",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
        ({"data": 1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
        ({"tensor": 4}, 4, (1, 1, 4)),
    ],
)
def test_mesh_shape(config, devices, expected):
    assert partitioning.mesh_shape(config, devices) == expected


@pytest.mark.parametrize(
    "config, devices, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, 8, "needs 3 devices but 8 are available"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "do not divide the 8 available devices"),
        ({"data": -1, "fsdp": -1}, 8, "at most one axis may be -1"),
        ({"data": 0}, 8, "positive or -1"),
        ({"model": 2}, 2, "unknown axes ['model']"),
    ],
)
def test_mesh_shape_errors_say_what_to_change(config, devices, message):
    with pytest.raises(ValueError, match="config.mesh") as error:
        partitioning.mesh_shape(config, devices)
    assert message in str(error.value)


def test_sharding_rules_are_checked():
    assert partitioning.logical_rules(None) == partitioning.DEFAULT_RULES
    assert partitioning.logical_rules([("embed", ["data", "fsdp"])]) == (("embed", ("data", "fsdp")),)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        partitioning.logical_rules([("embed", "model")])
    with pytest.raises(ValueError, match=r"\(logical_name, mesh_axis\)"):
        partitioning.logical_rules([("embed",)])


def test_weight_decay_mask_skips_norms_biases_and_embeddings_of_position():
    params = {
        "blocks": {"stack": {"mixer": {"q_proj": {"kernel": jnp.ones((2, 4, 4))},
                                       "q_norm": {"scale": jnp.ones((2, 4))},
                                       "A_log": jnp.ones((2, 4)), "dt_bias": jnp.ones((2, 4))},
                             "mlp_norm": {"scale": jnp.ones((2, 4))},
                             "mlp": {"up": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones((2, 8))}}}},
        "pos_embed": jnp.ones((1, 5, 4)),
        "cls_token": jnp.ones((1, 1, 4)),
        "embedding": jnp.ones((16, 4)),
        "norm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
    }
    mask = optimizer.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == ["['blocks']['stack']['mixer']['q_proj']['kernel']",
                       "['blocks']['stack']['mlp']['up']['kernel']", "['embedding']"]


def test_weight_decay_applies_only_where_the_mask_says():
    tx, _ = optimizer.make_optimizer(
        {"learning_rate": 0.1, "warmup_steps": 0, "weight_decay": 0.5, "clip_norm": 0}, num_steps=10
    )
    params = {"dense": {"kernel": jnp.ones((3, 3))}, "norm": {"scale": jnp.ones((3,))}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients Adam's step is 0, so only decoupled decay moves a parameter: -lr * wd * p.
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["scale"], np.zeros(3))


def test_learning_rate_schedule_is_warmup_then_cosine():
    schedule = optimizer.learning_rate_schedule(
        {"learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}, num_steps=110
    )
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    for step in (35, 60, 85, 110):
        progress = (step - 10) / 100
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        optimizer.learning_rate_schedule({"learning_rate": 1e-3, "warmup_steps": 200}, num_steps=100)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        optimizer.learning_rate_schedule({"learning_rate": 0.0}, num_steps=100)


def test_optimizer_matches_a_numpy_adamw_with_clipping_and_mask():
    config = {"learning_rate": 0.01, "warmup_steps": 2, "min_lr_ratio": 0.1, "b1": 0.9, "b2": 0.95,
              "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 0.5}
    tx, schedule = optimizer.make_optimizer(config, num_steps=6)
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(3, 4))}, "norm": {"scale": rng.normal(size=(4,))}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(params)
    ref = {k: np.asarray(v, np.float64) for k, v in {"kernel": params["dense"]["kernel"],
                                                      "scale": params["norm"]["scale"]}.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    for step in range(5):
        scale_of_grads = [0.1, 3.0, 0.2, 10.0, 1.0][step]  # some steps clipped, some not
        grads = {"dense": {"kernel": rng.normal(size=(3, 4)) * scale_of_grads},
                 "norm": {"scale": rng.normal(size=(4,)) * scale_of_grads}}
        g = {"kernel": grads["dense"]["kernel"], "scale": grads["norm"]["scale"]}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        factor = min(1.0, 0.5 / norm)
        lr = float(schedule(step))
        for k in ref:
            gk = g[k] * factor
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.95 * v[k] + 0.05 * gk ** 2
            mhat, vhat = m[k] / (1 - 0.9 ** (step + 1)), v[k] / (1 - 0.95 ** (step + 1))
            update = mhat / (np.sqrt(vhat) + 1e-8) + (0.1 * ref[k] if k == "kernel" else 0.0)
            ref[k] = ref[k] - lr * update
        grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["dense"]["kernel"], ref["kernel"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(params["norm"]["scale"], ref["scale"], rtol=2e-5, atol=1e-6)


def test_throughput_and_mfu_follow_the_documented_formula():
    meter = metrics.Throughput(units_per_step=1000, flops_per_step=3e9, peak_flops=1e11, first_step=0)
    meter._step, meter._time = 0, 0.0
    import time as time_module

    real = time_module.perf_counter
    try:
        time_module.perf_counter = lambda: 2.0  # 10 steps in 2 s
        rates = meter.measure(10)
    finally:
        time_module.perf_counter = real
    assert rates["step_time_s"] == pytest.approx(0.2)
    assert rates["units_per_s"] == pytest.approx(5000)
    assert rates["mfu"] == pytest.approx(3e9 / 0.2 / 1e11)


def test_peak_flops_default_and_override():
    assert metrics.peak_flops_per_device(123.0, "float32") == 123.0
    cpu = metrics.peak_flops_per_device(None, "float32")
    assert cpu == pytest.approx(metrics.CPU_HOST_PEAK["float32"] / jax.device_count())


def test_metrics_file_drops_records_past_the_resume_step(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    for step in (10, 20, 30):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "split": "tra')  # a line cut short by a kill
    writer = metrics.MetricsWriter(str(tmp_path), resume_step=20, enabled=True)
    writer.write(30, "train", {"loss": 0.5})
    writer.close()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [10, 20, 30]


def test_checkpoints_fall_back_past_an_unreadable_step(tmp_path, caplog):
    checkpoints = Checkpoints(str(tmp_path), keep=3, async_save=False)
    for step in (1, 2):
        checkpoints.save(step, {"w": jnp.full((64,), float(step))}, {"next_index": step})
    checkpoints.wait()
    with open(_largest(tmp_path / "checkpoints" / "2" / "state"), "r+b") as f:
        f.truncate(3)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=sharding)}
    with caplog.at_level("WARNING", logger="attnzoo.train"):
        step, state, data = checkpoints.restore(abstract)
    assert step == 1 and data == {"next_index": 1}
    np.testing.assert_array_equal(state["w"], np.ones(64))
    assert "checkpoint at step 2 could not be restored" in caplog.text
    assert checkpoints.steps() == [1] and len(os.listdir(tmp_path / "checkpoints_corrupt")) == 1
    checkpoints.close()


def _largest(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_a_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), keep=3, async_save=False)
    checkpoints.save(1, {"w": jnp.ones((64,))}, {})
    checkpoints.wait()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    other = {"w": jax.ShapeDtypeStruct((32,), jnp.float32, sharding=sharding)}
    from attnzoo.train.checkpointing import IncompatibleCheckpointError

    with pytest.raises(IncompatibleCheckpointError, match="step 1 .* holds a different train state"):
        checkpoints.restore(other)
    assert checkpoints.steps() == [1] and not os.path.exists(tmp_path / "checkpoints_corrupt")
    checkpoints.close()


def test_a_fresh_manager_restores_a_checkpoint_written_by_another(tmp_path):
    writer = Checkpoints(str(tmp_path), keep=3, async_save=True)
    writer.save(5, {"w": jnp.arange(8.0)}, {"next_index": 5})
    writer.close()
    reader = Checkpoints(str(tmp_path), keep=3, async_save=True)  # as in a new process
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, state, data = reader.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)})
    assert step == 5 and data == {"next_index": 5}
    np.testing.assert_array_equal(state["w"], np.arange(8.0))
    reader.close()
