"""Every hybrid LM preset trains through the trainer (attnzoo/configs/hybrid_lm.py): a few steps of a
narrowed copy of its tiny size on the byte-level corpus, with finite and falling loss."""

import json
import math

import pytest

from attnzoo import zoo
from attnzoo.configs import hybrid_lm
from attnzoo.train import train_and_evaluate
from attnzoo.zoo.hybrid_lm import HYBRID_PRESETS
from tests.train.presets_testing import narrowed_preset_config

PRESETS = sorted(HYBRID_PRESETS) + ["zamba_lm"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "tfds_hybrid")


def test_every_preset_is_registered_in_both_sizes():
    for name in PRESETS:
        assert {f"{name}_tiny", f"{name}_small"} <= set(zoo.list_models(f"{name}_*"))
    assert hybrid_lm.get_config().model.name == hybrid_lm.DEFAULT_MODEL


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_through_the_trainer(name, tmp_path, data_dir):
    config = narrowed_preset_config(f"{name}_tiny", data_dir, num_steps=12)
    config.optimizer.learning_rate = 3e-3
    config.log_every_steps = 1
    config.eval_every_steps = 0
    workdir = tmp_path / name
    run = train_and_evaluate(config, str(workdir))
    assert run.step == 12
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") == "train"]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses), (name, losses)
    assert losses[-1] < losses[0] < 1.2 * math.log(256), (name, losses)


@pytest.mark.parametrize("size, depth", [("tiny", 8), ("small", 16)])
def test_minimax_lightning_layers_decay_by_depth(size, depth):
    """Every lightning layer l of minimax_lm has MiniMax's slopes for depth l of L layers (the
    softmax layers sit at l = 7, 15, ...), not layer 0's: the model is one super-block."""
    import numpy as np
    from flax import nnx

    from attnzoo.layers.linear import lightning_slopes

    lm = zoo.create_model(f"minimax_lm_{size}", dim=32, num_heads=2, rngs=nnx.Rngs(0))
    assert lm.depth == depth and lm.num_repeats == 1
    mixers = [block.mixer for block in lm.blocks.layers.blocks]
    for index, mixer in enumerate(mixers):
        if index % 8 == 7:
            assert type(mixer).__name__ == "Attention"
            continue
        np.testing.assert_allclose(mixer.slopes, lightning_slopes(2, index, depth), rtol=1e-12)
    assert mixers[0].slopes != mixers[6].slopes
