"""Models with state besides their parameters (BatchNorm running averages, as in MaxViT's MBConv):
the trainer runs the train step in training mode and keeps the state the forward pass updates,
and evaluates in evaluation mode with the running averages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.configs import vit_digits
from attnzoo.train import evaluate_model, restore_model, train_and_evaluate
from attnzoo.zoo import register_model, registry

pytestmark = pytest.mark.slow


class BatchNormClassifier(nnx.Module):
    """images [B,8,8,1] -> flatten -> Dense(32) -> BatchNorm -> relu -> Dense(10)."""

    def __init__(self, num_classes=10, dtype=None, param_dtype=jnp.float32, *, rngs):
        self.hidden = nnx.Linear(64, 32, dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(32, momentum=0.5, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(32, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images):
        x = images.reshape(images.shape[0], -1)
        return self.head(jax.nn.relu(self.norm(self.hidden(x))))


def _batchnorm_classifier(*, rngs, **overrides):
    return BatchNormClassifier(**overrides, rngs=rngs)


@pytest.fixture(autouse=True)
def registered_test_model():
    """The test model is in the registry only while these tests run (other tests list the zoo)."""
    register_model("test_batchnorm_classifier")(_batchnorm_classifier)
    yield
    registry._MODELS.pop("test_batchnorm_classifier", None)


def _config(data_dir, **overrides):
    config = vit_digits.get_config()
    config.data.data_dir = data_dir
    config.model.name = "test_batchnorm_classifier"
    config.model.kwargs = {"num_classes": 10}
    config.num_steps = 4
    config.batch_size = 32
    config.eval_batch_size = 120
    config.checkpoint.every_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.optimizer.warmup_steps = 1
    config.update(overrides)
    return config


def test_running_averages_are_trained_and_used_for_eval(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = _config(data_dir)
    result = train_and_evaluate(config, str(tmp_path / "run"))
    model = restore_model(config, str(tmp_path / "run"))
    at_step_2 = restore_model(config, str(tmp_path / "run"), step=2)
    fresh = BatchNormClassifier(rngs=nnx.Rngs(0))

    mean, var = np.asarray(model.norm.mean[...]), np.asarray(model.norm.var[...])
    # The running averages moved away from their initial values (0 and 1) and kept moving.
    assert np.all(np.isfinite(mean)) and np.abs(mean).max() > 1e-3
    assert np.abs(var - 1).max() > 1e-3
    assert np.abs(mean - np.asarray(at_step_2.norm.mean[...])).max() > 1e-6
    np.testing.assert_array_equal(np.asarray(fresh.norm.mean[...]), 0)
    # The restored model is in evaluation mode: its outputs do not depend on the rest of the batch.
    assert model.norm.use_running_average
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
    np.testing.assert_allclose(np.asarray(model(images[:1])), np.asarray(model(images))[:1], rtol=1e-5, atol=1e-6)
    # The trainer's final eval used the running averages too: evaluate_model gives the same numbers.
    again = evaluate_model(config, model)
    assert again["accuracy"] == pytest.approx(result.eval_metrics["accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(result.eval_metrics["loss"], rel=1e-5)


def test_gradient_accumulation_keeps_the_state(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = _config(data_dir, grad_accum_steps=2)
    train_and_evaluate(config, str(tmp_path / "accum"))
    model = restore_model(config, str(tmp_path / "accum"))
    # 4 steps x 2 micro-batches = 8 running-average updates at momentum 0.5: the initial mean (0)
    # keeps a weight of 0.5^8, so the mean is that of the last micro-batches, away from 0.
    mean = np.asarray(model.norm.mean[...])
    assert np.all(np.isfinite(mean)) and np.abs(mean).max() > 1e-3


def test_flops_of_a_model_without_forward_flops_come_from_xla():
    from attnzoo.train import tasks

    model = nnx.eval_shape(lambda: BatchNormClassifier(rngs=nnx.Rngs(0)))
    matmuls = 2 * (64 * 32 + 32 * 10)
    flops = tasks.example_flops("classification", model, {"image": (16, 8, 8, 1)})
    assert matmuls <= flops < 1.5 * matmuls  # the matmuls plus the elementwise work
