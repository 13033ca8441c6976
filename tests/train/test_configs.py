"""Every config file: loads, names a registered model that builds (abstractly) with its kwargs,
valid sharding rules and optimizer settings, and a docstring with its command and expected result."""

import importlib
import pkgutil

import jax
import pytest
from flax import nnx

import attnzoo.configs
from attnzoo import zoo
from attnzoo.train import optimizer, partitioning, tasks
from attnzoo.train.train import model_kwargs

CONFIGS = sorted(
    info.name for info in pkgutil.iter_modules(attnzoo.configs.__path__) if info.name not in ("common",)
)


def test_the_expected_configs_exist():
    assert {"mqar", "stdlib_bytes", "vit_digits", "swin_digits", "vit_cifar10", "vit_imagenet", "lm1b",
            "hat_digits"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_complete_and_builds(name):
    module = importlib.import_module(f"attnzoo.configs.{name}")
    doc = module.__doc__
    assert f"python -m attnzoo.train --config attnzoo/configs/{name}.py" in doc
    assert "Expected" in doc
    config = module.get_config()
    tasks.check_task(config.task)
    partitioning.logical_rules(config.sharding_rules)
    optimizer.make_optimizer(config.optimizer, config.num_steps)
    assert config.batch_size % config.grad_accum_steps == 0
    model = nnx.eval_shape(lambda: zoo.create_model(config.model.name, rngs=nnx.Rngs(0), **model_kwargs(config)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
    if config.task in ("lm", "mqar"):
        assert model.forward_flops(config.data.seq_len) > 0


def test_vit_imagenet_variants():
    module = importlib.import_module("attnzoo.configs.vit_imagenet")
    assert module.get_config("ti").model.name == "vit_tiny_patch16_224"
    with pytest.raises(ValueError, match="variant must be one of"):
        module.get_config("xl")
