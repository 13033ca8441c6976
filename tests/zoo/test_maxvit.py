"""MaxViT: float64 parity with an independent numpy forward (stem, MBConv, block and grid attention
window by window, head), BatchNorm training mode under rematerialisation, the feature contract,
mixer swaps, FLOPs against the traced program, parameter counts and errors.

The converter's timm parity is tests/zoo/test_timm_parity_maxvit.py; every registered MaxViT preset
also runs the shared contract of tests/zoo/test_vision_models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.layers.window import WindowAttention
from attnzoo.pallas_kernels.testing import assert_close, float64
from attnzoo.zoo.maxvit import MaxViTBlock, _apply_rematerialised
from tests.layers import conv_reference as ref
from tests.layers.numpy_layers import dense, param64
from tests.layers.window_reference import numpy_window_attention
from tests.zoo.helpers import FAST_COMPILE, fast_jit, randomize

# Stem to 32 x 48, stages 16 x 24 .. 2 x 3: (2, 3) windows (img_size // 32), a (2, 1) grid.
TINY = dict(img_size=(64, 96), embed_dims=(16, 24, 32, 32), depths=(2, 1, 1, 1), stem_width=(8, 16), head_dim=8,
            grid_size=(2, 1), head_hidden_size=20, num_classes=7)


def _tiny(seed=0, **overrides):
    """The tiny MaxViT built abstractly with random parameters and running statistics, in eval mode."""
    options = dict(TINY, **overrides)
    model = randomize(nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), **options)),
                      seed=seed, scale=0.3)
    model = ref.randomize_batch_stats(model, seed + 1)
    model.eval()
    return model


def _shapes(fn, model, *args):
    """``jax.eval_shape`` of ``fn(model, *args)`` for a model built with ``nnx.eval_shape``."""
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda state, *args: fn(nnx.merge(graphdef, state), *args), state, *args)


def _layer_norm(norm, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def numpy_maxvit(model, images):
    """timm's MaxxVit (maxvit_*_tf) forward in float64 numpy, reading the model's parameters."""
    x = np.asarray(images, np.float64)
    stem = model.stem
    x = ref.conv_same(stem.conv2, ref.gelu_tanh(ref.batch_norm_eval(stem.norm1, ref.conv_same(stem.conv1, x))))
    for stage in model.stages:
        for block in stage.blocks:
            x = ref.mbconv(block.mbconv, x)
            for attention in block.attentions:
                x = x + numpy_window_attention(attention.mixer, _layer_norm(attention.norm1, x))
                hidden = ref.gelu_tanh(dense(attention.mlp.up, _layer_norm(attention.norm2, x)))
                x = x + dense(attention.mlp.down, hidden)
    pooled = _layer_norm(model.head_norm, x.mean(axis=(1, 2)))
    return dense(model.head, np.tanh(dense(model.pre_logits, pooled)))


def test_tiny_maxvit_matches_numpy():
    with float64():
        model = _tiny(param_dtype=jnp.float64, logits_dtype=jnp.float64)
        images = np.random.default_rng(3).normal(size=(2, 64, 96, 3))
        attention = model.stages[0].blocks[1].attentions
        assert (attention[0].mixer.partition, attention[0].mixer.window_size) == ("window", (2, 3))
        assert (attention[1].mixer.partition, attention[1].mixer.window_size) == ("grid", (2, 1))
        assert attention[0].mixer.num_heads == 2 and attention[0].mixer.head_dim == 8
        logits = fast_jit(lambda m, x: m(x))(model, jnp.asarray(images))
        assert_close(logits, numpy_maxvit(model, images), "logits", dtype=jnp.float64)


def test_batch_norm_training_under_remat_updates_the_same_statistics():
    """A block in training mode: batch statistics, the running averages updated in place, and the
    same outputs, gradients and running averages with rematerialisation as without."""
    options = dict(
        mbconv_options=dict(expand_ratio=2.0, se_ratio=0.25, activation="gelu_tanh", norm_eps=1e-3, norm_momentum=0.9,
                            dtype=None, param_dtype=jnp.float32),
        attention_options=[dict(num_heads=2, mixer="maxvit_block", mixer_options=dict(window_size=2, head_dim=4),
                                mlp_dim=16, approximate_gelu=True, norm_eps=1e-5, dtype=None, param_dtype=jnp.float32)],
    )
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 6)), jnp.float32)
    results = {}
    for remat in (False, True):
        block = MaxViTBlock(6, 8, stride=1, rngs=nnx.Rngs(0), **options)
        assert block.mbconv.norm1.use_running_average is False

        graphdef, state = nnx.split(block)

        def step(state, x):
            block = nnx.merge(graphdef, state)

            def loss(block):
                y = _apply_rematerialised(block, x, None) if remat else block(x)
                return jnp.sum(y**2)

            value, grads = nnx.value_and_grad(loss)(block)
            return value, nnx.state(grads, nnx.Param), nnx.state(block, nnx.BatchStat)

        results[remat] = jax.jit(step, compiler_options=FAST_COMPILE)(state, images)
    plain, remat = results[False], results[True]
    stats = jax.tree.leaves(plain[2])
    assert any(np.any(np.asarray(s) != 0) and np.any(np.asarray(s) != 1) for s in stats)  # updated
    np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 remat[1], plain[1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), remat[2], plain[2])


def test_feature_contract_and_intermediates():
    model = _tiny()
    assert model.feature_info == [
        dict(num_chs=16, reduction=2, module="stem"), dict(num_chs=16, reduction=4, module="stages.0"),
        dict(num_chs=24, reduction=8, module="stages.1"), dict(num_chs=32, reduction=16, module="stages.2"),
        dict(num_chs=32, reduction=32, module="stages.3"),
    ]
    assert (model.num_features, model.head_width) == (32, 20)
    images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    shapes = _shapes(lambda m, x: m.forward_intermediates(x), model, images)
    assert [s.shape for s in shapes] == [(2, 32, 48, 16), (2, 16, 24, 16), (2, 8, 12, 24), (2, 4, 6, 32), (2, 2, 3, 32)]
    picked = _shapes(lambda m, x: m.forward_intermediates(x, indices=[-1, 1], output_fmt="NCHW"), model, images)
    assert [s.shape for s in picked] == [(2, 32, 2, 3), (2, 16, 16, 24)]
    assert len(_shapes(lambda m, x: m.forward_intermediates(x, indices=2), model, images)) == 2
    final, _ = _shapes(lambda m, x: m.forward_intermediates(x, indices=[0], intermediates_only=False), model, images)
    assert final.shape == (2, 2, 3, 32)
    assert _shapes(lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True), model, images).shape == (2, 20)

    # The first block of stage 0 keeps the stem's width: its shortcut only pools; later stages project.
    assert model.stages[0].blocks[0].mbconv.shortcut_proj is None
    assert model.stages[1].blocks[0].mbconv.shortcut_proj is not None
    backbone = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), features_only=True,
                                                       **TINY))
    assert backbone.head is None and backbone.pre_logits is None and backbone.head_norm is None
    assert len(_shapes(lambda m, x: m(x), backbone, images)) == 5


def test_mixers_are_swappable():
    """Any registered 2-D mixer replaces block and grid attention (options per mixer)."""
    images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    for mixers, options in [
        (("swin_window",), {"window_size": 2, "shift_size": 1}),
        (("neighborhood_attention", "maxvit_grid"), [{"kernel_size": 3}, {}]),
    ]:
        model = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), mixers=mixers,
                                                        mixer_options=options, **TINY))
        block = model.stages[1].blocks[0]
        assert len(block.attentions) == len(mixers)
        assert all(getattr(type(a.mixer), "spatial_ndim", None) == 2 for a in block.attentions)
        assert block.attentions[0].mixer.num_heads == 24 // 8
        assert _shapes(lambda m, x: m(x), model, images).shape == (2, 7)
        assert model.forward_flops() > 0
    swin = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), mixers=("swin_window",),
                                                   **TINY))
    assert isinstance(swin.stages[0].blocks[0].attentions[0].mixer, WindowAttention)
    with pytest.raises(TypeError, match=r"a timm MaxViT has block and grid attention"):
        zoo.load_timm_weights(swin, {})


def _conv_and_dot_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        out_size = int(np.prod(eqn.outvars[0].aval.shape)) if eqn.outvars else 0
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2 * out_size * int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape  # HWIO
            total += 2 * out_size * int(np.prod(kernel[:3]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _conv_and_dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _conv_and_dot_flops(sub)
    return total


def test_forward_flops_count_every_matmul_and_convolution():
    model = _tiny()
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.zeros((1, 64, 96, 3)))
    # Depthwise convolutions run as per-tap products (layers.conv.shifted_conv2d), not dots:
    # their FLOPs are the convolutions' own count at each block's input size.
    depthwise, (height, width) = 0, model.stem.conv1.output_size(64, 96)
    for stage in model.stages:
        for block in stage.blocks:
            depthwise += block.mbconv.depthwise.flops(height, width)
            height, width = block.mbconv.depthwise.output_size(height, width)
    assert depthwise > 0
    assert model.forward_flops() == _conv_and_dot_flops(jaxpr.jaxpr) + depthwise
    with pytest.raises(ValueError, match=r"example_shape must be \(H, W, C\) = \(64, 96, 3\)"):
        model.forward_flops((64, 64, 3))


# Base (119,467,708) and large (211,785,560) are the same code with more blocks (their docstrings).
@pytest.mark.parametrize("name, count", [("maxvit_tiny_tf_224", 30_916_528), ("maxvit_small_tf_224", 68_927_956)])
def test_parameter_counts_equal_timms(name, count):
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == count
    # BatchNorm running statistics: mean and var of every BatchNorm (stem, 3 per MBConv).
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert len(stats) == 2 * (1 + 3 * sum(model.depths))


def test_errors():
    make = lambda **kw: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), **{**TINY, **kw})  # noqa: E731
    abstract = lambda **kw: nnx.eval_shape(lambda: make(**kw))  # noqa: E731
    with pytest.raises(ValueError, match=r"mixer 'attention' is not a 2-D mixer"):
        abstract(mixers=("attention",))
    with pytest.raises(TypeError, match=r"mixers must be a non-empty sequence"):
        abstract(mixers="maxvit_block")
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'"):
        abstract(mixers=("nope",))
    with pytest.raises(ValueError, match=r"stage 0 has a 16 x 24 feature map .* not divisible by the maxvit_block window_size \(3, 3\)"):
        abstract(window_size=3)
    with pytest.raises(ValueError, match=r"img_size \(16, 16\) is below 32, so window_size must be given"):
        abstract(img_size=16)
    with pytest.raises(ValueError, match=r"embed_dims\[1\] = 20 must be divisible by head_dim 8"):
        abstract(embed_dims=(16, 20, 32, 32))
    with pytest.raises(TypeError, match=r"mixer_options must be None, a dict or a sequence of 2 dicts"):
        abstract(mixer_options=[{}])
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'window'"):
        abstract(window=7)
    model = abstract()
    with pytest.raises(ValueError, match=r"images must have shape \[B,H,W,C\] = \[B, 64, 96, 3\] \(NHWC\), got \(2, 96, 64, 3\)"):
        _shapes(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 96, 64, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"features must have shape \[B, h, w, 32\]"):
        model.forward_head(jnp.zeros((2, 2, 3, 16)))
    with pytest.raises(ValueError, match=r"indices must be ints in \[-5, 5\)"):
        model.forward_intermediates(jnp.zeros((1, 64, 96, 3)), indices=[5])
    with pytest.raises(ValueError, match=r"output_fmt must be 'NHWC' or 'NCHW'"):
        model.forward_intermediates(jnp.zeros((1, 64, 96, 3)), output_fmt="NLC")
    backbone = abstract(features_only=True)
    with pytest.raises(ValueError, match=r"a features_only model has no classifier"):
        backbone.reset_classifier(3)
    with pytest.raises(ValueError, match=r"a features_only model has no head"):
        backbone.forward_head(jnp.zeros((2, 2, 3, 32)))
