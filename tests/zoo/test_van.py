"""VAN: float64 parity of a tiny model (odd image size, a CBAM gate on every block) with the
independent numpy forward of tests/layers/van_reference.py (stage features and logits); BatchNorm
training under rematerialisation; mixer and gate swaps; FLOPs against the traced program;
parameter counts of the official models; errors. MaxViT's MBConv with the gate taken by name
("eca", "cbam" train a step; "se" is the unchanged default).

Every registered VAN preset also runs the shared contract of tests/zoo/test_vision_models.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.layers.gates import CBAM, EfficientChannelAttention
from attnzoo.layers.conv import SqueezeExcite
from attnzoo.pallas_kernels.testing import assert_close, float64
from tests.layers import van_reference as ref
from tests.layers.conv_reference import randomize_batch_stats
from tests.zoo.helpers import FAST_COMPILE, fast_jit, randomize, traced_matmul_flops

# 35 x 29 images: maps 9 x 8, 5 x 4, 3 x 2, 2 x 1 (the stride-2 embeddings of odd sizes pad both sides).
TINY = dict(img_size=(35, 29), embed_dims=(8, 12, 16, 16), depths=(1, 1, 1, 1), num_classes=5)


def _tiny(seed=0, **overrides):
    """The tiny VAN built abstractly with random parameters and running statistics, in eval mode."""
    model = nnx.eval_shape(lambda: zoo.create_model("van_b0", rngs=nnx.Rngs(0), **{**TINY, **overrides}))
    model = randomize_batch_stats(randomize(model, seed=seed, scale=0.4), seed + 1)
    model.eval()
    return model


def _shapes(fn, model, *args):
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda state, *args: fn(nnx.merge(graphdef, state), *args), state, *args)


def test_tiny_van_matches_numpy():
    with float64():
        model = _tiny(gate="cbam", gate_options=dict(reduced_channels=2, spatial_kernel_size=3),
                      param_dtype=jnp.float64, logits_dtype=jnp.float64)
        assert model.feature_sizes == ((9, 8), (5, 4), (3, 2), (2, 1))
        assert isinstance(model.stages[2].blocks[0].gate, CBAM)
        images = np.random.default_rng(3).normal(size=(2, 35, 29, 3))
        final, maps = fast_jit(lambda m, x: m.forward_intermediates(x, intermediates_only=False))(model, jnp.asarray(images))
        logits = fast_jit(lambda m, f: m.forward_head(f))(model, final)
        features, want_logits = ref.van(model, images)
        for index, (got, want) in enumerate(zip(maps, features, strict=True)):
            assert_close(got, want, f"stage {index}", dtype=jnp.float64)
        assert_close(logits, want_logits, "logits", dtype=jnp.float64)


def _train_step(graphdef, state, x):
    """Loss, parameter gradients and the running statistics after one training-mode call."""
    model = nnx.merge(graphdef, state)
    value, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    return value, nnx.state(grads, nnx.Param), nnx.state(model, nnx.BatchStat)


def test_batch_norm_training_under_remat_updates_the_same_statistics():
    """One stage in training mode (the initial mode): batch statistics, running averages updated in
    place, and the same loss, gradients and running averages with rematerialisation as without."""
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 19, 17, 3)), jnp.float32)
    options = dict(img_size=(19, 17), embed_dims=(8,), depths=(1,), mlp_ratios=2, num_classes=3)
    results, initial = {}, None
    for remat in ("none", "full"):
        model = nnx.eval_shape(lambda remat=remat: zoo.create_model("van_b0", remat=remat, rngs=nnx.Rngs(0), **options))
        model = randomize_batch_stats(randomize(model, seed=1), seed=2)
        assert model.stages[0].blocks[0].norm1.use_running_average is False
        initial = nnx.state(model, nnx.BatchStat)
        graphdef, state = nnx.split(model)
        results[remat] = jax.jit(functools.partial(_train_step, graphdef), compiler_options=FAST_COMPILE)(state, images)
    plain, remat = results["none"], results["full"]
    assert len(jax.tree.leaves(plain[2])) == 6  # patch embedding, norm1, norm2: mean and var
    jax.tree.map(lambda new, old: np.testing.assert_array_less(1e-6, np.abs(np.asarray(new) - np.asarray(old))),
                 plain[2], initial)  # every running statistic moved
    np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 remat[1], plain[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), remat[2], plain[2])


def test_feature_contract_mixer_and_gate_swaps():
    model = nnx.eval_shape(lambda: zoo.create_model("van_b0", rngs=nnx.Rngs(0), **TINY))
    assert model.feature_info == [dict(num_chs=8, reduction=4, module="stages.0"),
                                  dict(num_chs=12, reduction=8, module="stages.1"),
                                  dict(num_chs=16, reduction=16, module="stages.2"),
                                  dict(num_chs=16, reduction=32, module="stages.3")]
    images = jax.ShapeDtypeStruct((2, 35, 29, 3), jnp.float32)
    shapes = _shapes(lambda m, x: m.forward_intermediates(x, indices=[-1, 0], output_fmt="NCHW"), model, images)
    assert [s.shape for s in shapes] == [(2, 16, 2, 1), (2, 8, 9, 8)]
    backbone = nnx.eval_shape(lambda: zoo.create_model("van_b0", rngs=nnx.Rngs(0), features_only=True, **TINY))
    assert backbone.head is None and len(_shapes(lambda m, x: m(x), backbone, images)) == 4

    # Any registered mixer per stage: LKA alone, Swin windows on the map, 1-D attention on the tokens.
    mixed = nnx.eval_shape(lambda: zoo.create_model(
        "van_b0", rngs=nnx.Rngs(0), mixer=("van_lka", "van_attention", "swin_window", "attention"),
        mixer_options=({"dilation": 2}, {}, {"window_size": 2}, {"causal": False, "use_rope": False}), **TINY))
    names = [type(stage.blocks[0].mixer).__name__ for stage in mixed.stages]
    assert names == ["LargeKernelAttention", "VANAttention", "WindowAttention", "Attention"]
    assert mixed.stages[0].blocks[0].mixer.dilation == 2 and mixed.num_heads == (1, 1, 1, 1)
    assert _shapes(lambda m, x: m(x), mixed, images).shape == (2, 5)
    # Gates by name on every block's MLP branch (none by default, as the paper).
    assert all(block.gate is None for stage in model.stages for block in stage.blocks)
    for gate, cls in (("se", SqueezeExcite), ("eca", EfficientChannelAttention), ("cbam", CBAM)):
        gated = nnx.eval_shape(lambda gate=gate: zoo.create_model("van_b0", rngs=nnx.Rngs(0), gate=gate,
                                                                  gate_options={"reduced_channels": 2}
                                                                  if gate != "eca" else {}, **TINY))
        assert isinstance(gated.stages[1].blocks[0].gate, cls)
        assert gated.forward_flops() > model.forward_flops()


def test_forward_flops_count_every_matmul_and_convolution():
    model = _tiny()
    images = jnp.zeros((1, 35, 29, 3))
    # Depthwise convolutions are per-tap products (not dots): counted from their own Conv2d.flops.
    depthwise = 0
    for stage, (height, width) in zip(model.stages, model.feature_sizes, strict=True):
        for block in stage.blocks:
            lka = block.mixer.spatial_gating_unit
            depthwise += sum(conv.flops(height, width) for conv in (lka.conv0, lka.conv_spatial, block.mlp.dwconv))
    assert model.forward_flops() == traced_matmul_flops(model, images) + depthwise
    with pytest.raises(ValueError, match=r"example_shape must be \(H, W, C\) = \(35, 29, 3\)"):
        model.forward_flops((32, 32, 3))


# B2 (26,578,472) and B3 (44,765,608) are the same code with more blocks (their docstrings; their
# FLOPs are checked against the paper in test_vision_models.py).
@pytest.mark.parametrize("name, count", [("van_b0", 4_105_800), ("van_b1", 13_861_800)])
def test_parameter_counts_match_the_paper(name, count):
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == count
    # Running statistics: mean and var of each patch embedding's BatchNorm and the two per block.
    assert len(jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == 2 * (4 + 2 * sum(model.depths))


def test_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"VAN: gate must be None or one of \['cbam', 'eca', 'se'.*\], got 'sk'"):
        zoo.create_model("van_b0", gate="sk", rngs=rngs)
    with pytest.raises(TypeError, match=r"VAN: gate_options must be a dict or None, got list"):
        zoo.create_model("van_b0", gate="eca", gate_options=[3], rngs=rngs)
    with pytest.raises(ValueError, match=r"unknown mixer 'lka'"):
        zoo.create_model("van_b0", mixer="lka", rngs=rngs)
    with pytest.raises(ValueError, match=r"VAN: embed_dims and depths must be sequences of the same"):
        zoo.create_model("van_b0", depths=(1, 1), rngs=rngs)
    with pytest.raises(ValueError, match=r"VAN: mlp_ratios must be one value or a sequence of 4"):
        zoo.create_model("van_b0", mlp_ratios=(4, 4), rngs=rngs)
    with pytest.raises(ValueError, match=r"VAN: global_pool must be one of \('avg', 'max'\), got 'token'"):
        zoo.create_model("van_b0", global_pool="token", rngs=rngs)
    with pytest.raises(TypeError, match=r"van_b0: unknown argument\(s\) 'embed_dim'"):
        zoo.create_model("van_b0", embed_dim=8, rngs=rngs)
    model = _tiny()
    with pytest.raises(ValueError, match=r"VAN: images must have shape \[B,H,W,C\] = \[B, 35, 29, 3\]"):
        model(jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------------------------
# MaxViT's MBConv takes its gate by name
# ----------------------------------------------------------------------------------------------

# One stage: stem to 8 x 8, one MaxViT block (stride 2, block attention in 2 x 2 windows) on 4 x 4.
MAXVIT_TINY = dict(img_size=16, embed_dims=(16,), depths=(1,), stem_width=8, head_dim=8, window_size=2,
                   mixers=("maxvit_block",), head_hidden_size=None, num_classes=3)


def test_maxvit_default_gate_is_the_unchanged_squeeze_excite():
    default = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), **MAXVIT_TINY))
    se = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", mbconv_gate="se", rngs=nnx.Rngs(0),
                                                 **MAXVIT_TINY))
    paths = lambda m: [path for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))]  # noqa: E731
    assert paths(default) == paths(se)
    assert ("stages", 0, "blocks", 0, "mbconv", "se", "fc1", "kernel") in paths(default)
    mbconv = default.stages[0].blocks[0].mbconv
    assert isinstance(mbconv.se, SqueezeExcite) and mbconv.gate is None and mbconv.se.reduced_channels == 4


@pytest.mark.parametrize("gate, cls", [("eca", EfficientChannelAttention), ("cbam", CBAM)])
def test_maxvit_with_another_gate_trains_a_step(gate, cls):
    options = {"reduction_ratio": 8} if gate == "cbam" else None
    model = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", mbconv_gate=gate, mbconv_gate_options=options,
                                                    rngs=nnx.Rngs(0), **MAXVIT_TINY))
    model = randomize_batch_stats(randomize(model, seed=0, scale=0.2), seed=1)  # concrete, no initializer run
    mbconv = model.stages[0].blocks[0].mbconv
    assert mbconv.se is None and isinstance(mbconv.gate, cls)
    assert model.forward_flops() > 0
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray([0, 2])
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train_step(state):
        model = nnx.merge(graphdef, state)  # training mode: BatchNorm batch statistics, updated

        def loss_fn(model):
            logits = model(images)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads))
        return loss, grads, nnx.state(model)

    loss, grads, new_state = train_step(state)
    gate_grads = jax.tree.leaves(grads["stages"][0]["blocks"][0]["mbconv"]["gate"])
    assert gate_grads and all(np.any(np.asarray(g) != 0) for g in gate_grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    new_loss = train_step(new_state)[0]
    assert np.isfinite(float(loss)) and float(new_loss) < float(loss)
    timm_layout = nnx.eval_shape(lambda: zoo.create_model(
        "maxvit_tiny_tf_224", mbconv_gate=gate, rngs=nnx.Rngs(0), **{**MAXVIT_TINY, "mixers": ("maxvit_block", "maxvit_grid")}))
    with pytest.raises(TypeError, match=rf"a timm MaxViT has squeeze-excitation .* mbconv_gate is '{gate}'"):
        zoo.load_timm_weights(timm_layout, {})
