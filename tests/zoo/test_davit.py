"""DaViT-specific behaviour the shared vision tests do not reach: swapping each stage's mixers by name
(2-D and token mixers), stochastic depth in training mode, and argument errors. Model structure and
shapes are checked abstractly (``nnx.eval_shape`` / ``jax.eval_shape``: nothing is compiled)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers, zoo
from attnzoo.layers.davit import ChannelGroupAttention, DaViTWindowAttention
from attnzoo.zoo.davit import DaViTBlock

SMALL = dict(img_size=32, embed_dims=(8, 16), depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=3)


def abstract(**overrides):
    return nnx.eval_shape(lambda: zoo.create_model("davit_tiny", rngs=nnx.Rngs(0), **dict(SMALL, **overrides)))


def abstract_logits(model):
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, *model.img_size, 3), jnp.float32)
    return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, images)


def mixers_of(model):
    return [[type(block.mixer) for block in stage.blocks] for stage in model.stages]


def test_default_dual_blocks_alternate_window_and_channel_attention():
    model = abstract()
    assert mixers_of(model) == [[DaViTWindowAttention, ChannelGroupAttention],
                                [DaViTWindowAttention, ChannelGroupAttention] * 2]
    window = model.stages[1].blocks[2].mixer
    assert window.window_size == (4, 4) and window.num_heads == 2 and window.relative_position_bias_table is None
    assert model.resolutions == ((8, 8), (4, 4))


def test_mixers_swap_by_name_per_stage_with_their_options():
    model = abstract(
        mixers=(("neighborhood_attention", "davit_channel"), ("attention", "davit_window", "swin_window")),
        mixer_options=({"neighborhood_attention": {"kernel_size": 3}},
                       {"swin_window": {"shift_size": 2}, "davit_window": {"window_size": 2}}),
    )
    names = [[type(block.mixer).__name__ for block in stage.blocks] for stage in model.stages]
    neighborhood = layers.get_mixer_class("neighborhood_attention").__name__
    attention = layers.get_mixer_class("attention").__name__
    assert names == [[neighborhood, "ChannelGroupAttention"],
                     [attention, "DaViTWindowAttention", "WindowAttention"] * 2]
    assert model.stages[0].blocks[0].mixer.kernel_size in (3, (3, 3))
    assert model.stages[1].blocks[1].mixer.window_size == (2, 2)
    assert model.stages[1].blocks[2].mixer.shift_size == (2, 2) and model.stages[1].blocks[2].mixer.window_size == (4, 4)
    assert not model.stages[1].blocks[0].spatial  # the token mixer sees [B, h*w, C]
    assert abstract_logits(model).shape == (2, 3)
    assert model.forward_flops() > abstract().forward_flops() > 0
    # One mixer everywhere, by name.
    only = abstract(mixers="davit_channel")
    assert mixers_of(only) == [[ChannelGroupAttention], [ChannelGroupAttention] * 2]
    assert abstract_logits(only).shape == (2, 3)


def test_drop_path_only_in_training_mode():
    kwargs = dict(SMALL, drop_path_rate=0.5)
    model = nnx.eval_shape(lambda: zoo.create_model("davit_tiny", rngs=nnx.Rngs(params=0, dropout=1), **kwargs))
    rates = [None if block.drop_path is None else block.drop_path.rate for stage in model.stages for block in stage.blocks]
    assert rates == [None, None, 0.25, 0.25, 0.5, 0.5]  # timm: linspace over dual blocks, shared inside one
    block = DaViTBlock(4, 2, mixer="davit_channel", mixer_options={}, mlp_ratio=2.0, norm_eps=1e-5, cpe_act=False,
                       drop_path=0.5, dtype=None, param_dtype=jnp.float32, rngs=nnx.Rngs(params=0, dropout=1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 3, 4)), jnp.float32)
    forward = nnx.jit(lambda block, x: block(x))
    block.eval()
    first, second = forward(block, x), forward(block, x)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    block.train()
    trained = np.asarray(forward(block, x))
    # Each sample keeps or drops each branch: some samples differ from the eval output.
    differs = [not np.allclose(trained[i], np.asarray(first)[i], atol=1e-6) for i in range(8)]
    assert any(differs) and not np.allclose(trained, np.asarray(forward(block, x)))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'"):
        abstract(mixers=("davit_window", "nope"))
    with pytest.raises(ValueError, match=r"DaViT: mixers must be a mixer name, a sequence of names"):
        abstract(mixers=(("davit_window",),) * 3)
    with pytest.raises(ValueError, match=r"DaViT: mixer_options names \['swin_window'\], which no stage uses"):
        abstract(mixer_options={"swin_window": {"shift_size": 1}})
    with pytest.raises(ValueError, match=r"DaViT: mixer_options\[1\] names \['davit_channel'\], which stage 1 does not"):
        abstract(mixers=(("davit_channel",), ("davit_window",)), mixer_options=(None, {"davit_channel": {}}))
    with pytest.raises(ValueError, match=r"DaViT: num_heads must be 2 ints \(one per stage\), got \(1, 2, 4\)"):
        abstract(num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match=r"DaViT: depths\[1\] must be an int >= 1, got 0"):
        abstract(depths=(1, 0))
    with pytest.raises(ValueError, match=r"DaViT: global_pool must be one of \('avg', 'max'\), got 'token'"):
        abstract(global_pool="token")
    with pytest.raises(ValueError, match=r"DaViT: drop_path_rate must be in \[0, 1\), got 1.0"):
        abstract(drop_path_rate=1.0)
    with pytest.raises(TypeError, match="DaViT: cpe_act must be a bool, got str"):
        abstract(cpe_act="gelu")
    with pytest.raises(ValueError, match=r"DaViTWindowAttention: num_heads \(3\) must divide dim \(16\)"):
        abstract(num_heads=(1, 3))
    with pytest.raises(TypeError, match=r"davit_tiny: unknown argument\(s\) 'embed_dim'"):
        abstract(embed_dim=8)
    model = abstract()
    with pytest.raises(ValueError, match=r"DaViT: images must have shape \[B,H,W,C\] = \[B, 32, 32, 3\]"):
        jax.eval_shape(model, jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32))
    with pytest.raises(ValueError, match=r"DaViT.forward_flops: example_shape must be \(H, W, C\) = \(32, 32, 3\)"):
        model.forward_flops((224, 224, 3))
