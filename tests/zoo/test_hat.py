"""HAT / HAT-S super-resolution networks (the super-resolution contract of tests/zoo/vision_cases.py's
SR_PATTERNS): official parameter counts, output shapes for x2 / x3 / x4 on sizes that are not
multiples of the window, a narrowed network against a float64 numpy forward built from the layer
references (tests/layers/hat_reference.py), FLOPs, the official weight names, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.zoo.hat import HAT, load_official_hat_weights, pixel_shuffle
from attnzoo.pallas_kernels.testing import assert_close, float64
from tests.layers.hat_reference import hat_network
from tests.layers.hat_reference import pixel_shuffle as numpy_pixel_shuffle
from tests.layers.testing import as_float64
from tests.zoo.helpers import KNOWN_LOGICAL_AXES, build, fast_jit, logical_axes, traced_matmul_flops
from tests.zoo.vision_cases import sr_models

# The official hat_arch.HAT built with the option files' settings (options/test/HAT-S_SRx*.yml,
# HAT_SRx*.yml) in torch, sum(p.numel() for p in model.parameters()). Paper: HAT-S 9.6M, HAT 20.8M (x4).
OFFICIAL_PARAMS = {
    "hat_s_x2": 9_473_471,
    "hat_s_x3": 9_658_111,
    "hat_s_x4": 9_621_183,
    "hat_x2": 20_624_795,
    "hat_x3": 20_809_435,
    "hat_x4": 20_772_507,
}

# Every preset narrows to this structure (upscale aside): two groups of 2 HABs (one shifted) + OCAB,
# 4x4 windows with 6x6 overlapping windows, CAB 12 -> 4 -> 12 channels, channel attention 12 -> 3.
SMALL = dict(embed_dim=12, depths=(2, 1), num_heads=(3, 2), window_size=4, compress_ratio=3, squeeze_factor=4,
             conv_scale=0.5, mlp_ratio=2.0)

apply = fast_jit(lambda model, x: model(x))


def small(name="hat_s_x2", seed=0, **extra):
    return build(lambda: zoo.create_model(name, rngs=nnx.Rngs(0), **{**SMALL, **extra}), seed=seed, scale=0.3)


def test_registered_super_resolution_models():
    assert sr_models() == sorted(OFFICIAL_PARAMS)


def test_parameter_counts_are_checked_against_the_official_model():
    """tests/zoo/test_models.py::test_parameter_count builds every preset with nnx.eval_shape and
    compares with its OFFICIAL_PARAMS: the same numbers."""
    from tests.zoo.test_models import OFFICIAL_PARAMS as checked

    assert {name: checked.get(name) for name in OFFICIAL_PARAMS} == OFFICIAL_PARAMS
    assert round(OFFICIAL_PARAMS["hat_s_x4"] / 1e6, 1) == 9.6 and round(OFFICIAL_PARAMS["hat_x4"] / 1e6, 1) == 20.8


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_output_shape_for_sizes_that_are_not_multiples_of_the_window(name):
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0), **SMALL))
    for size in ((9, 6), (4, 4), (2, 13)):
        out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
        assert out.shape == (2, size[0] * model.upscale, size[1] * model.upscale, 3) and out.dtype == jnp.float32


def test_narrowed_network_matches_a_float64_numpy_forward():
    """x4 (two pixel shuffles) on a 9 x 6 image (reflect-padded to 12 x 8, cropped) in float64, x3 on
    5 x 7 in float32; every parameter random, including the norms."""
    with float64():
        model = as_float64(small("hat_x4", seed=1))
        x = np.random.default_rng(2).uniform(size=(1, 9, 6, 3))
        assert_close(apply(model, jnp.asarray(x)), hat_network(model, x), "hat_x4 float64", dtype=jnp.float64)
    model = small("hat_s_x3", seed=3, in_chans=1, rgb_mean=(0.3,), img_range=255.0)
    x = np.random.default_rng(4).uniform(size=(2, 5, 7, 1)).astype(np.float32)
    y = apply(model, jnp.asarray(x))
    assert y.shape == (2, 15, 21, 1)
    assert_close(y, hat_network(model, x), "hat_s_x3 float32, one channel", dtype=jnp.float32)


def test_logical_axis_names():
    """The presets differ from the narrowed model only in sizes, so their parameters have these names."""
    model = nnx.eval_shape(lambda: zoo.create_model("hat_x4", rngs=nnx.Rngs(0), **SMALL))
    axes = logical_axes(model)
    assert len(axes) == num_params_leaves(model) > 0
    for path, (names, ndim) in axes.items():
        assert names is not None and len(names) == ndim, (path, names)
        assert set(names) <= KNOWN_LOGICAL_AXES, (path, names)
    assert axes["['layers'][0]['overlap_attn']['mixer']['qkv']['kernel']"][0] == ("embed", None, "heads", "head_dim")
    assert axes["['layers'][0]['blocks'][1]['mixer']['conv_block']['conv1']['kernel']"][0] == (None, None, "embed", "mlp")


def num_params_leaves(model) -> int:
    return len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_pixel_shuffle_and_glue():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 18)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 3)), numpy_pixel_shuffle(x, 3))
    model = nnx.eval_shape(lambda: zoo.create_model("hat_x2", rngs=nnx.Rngs(0), **SMALL))
    assert model.rgb_mean == (0.4488, 0.4371, 0.4040) and model.img_range == 1.0 and model.shift_size == 2
    assert model.upsample_factors == (2,) and model.upscale == 2
    assert nnx.eval_shape(lambda: zoo.create_model("hat_x4", rngs=nnx.Rngs(0), **SMALL)).upsample_factors == (2, 2)
    assert nnx.eval_shape(lambda: zoo.create_model("hat_s_x3", rngs=nnx.Rngs(0), **SMALL)).upsample_factors == (3,)
    # the official rule: a nominal img_size equal to the window turns the shift off
    assert nnx.eval_shape(lambda: zoo.create_model("hat_x2", rngs=nnx.Rngs(0), **SMALL, img_size=4)).shift_size == 0


def test_forward_flops_count_every_matmul_and_convolution():
    model = small("hat_s_x4")
    x = jnp.zeros((1, 9, 6, 3))
    assert traced_matmul_flops(model, x) == model.forward_flops((9, 6, 3))
    assert model.forward_flops((9, 6, 3)) == model.forward_flops((12, 8, 3))  # the padded image
    assert model.forward_flops((12, 8, 3)) < model.forward_flops((12, 12, 3))


def _official_state_dict(model: HAT) -> dict:
    """``model``'s parameters under the official names and layouts (the inverse of the loader)."""
    sd = {}

    def value(p):
        return np.asarray(p[...])

    def conv(c, name):
        sd[f"{name}.weight"] = np.transpose(value(c.kernel), (3, 2, 0, 1))
        sd[f"{name}.bias"] = value(c.bias)

    def linear(d, name):
        kernel = value(d.kernel)
        sd[f"{name}.weight"] = kernel.reshape(int(np.prod(d.in_features)), -1).T
        sd[f"{name}.bias"] = value(d.bias).reshape(-1)

    def norm(n, name):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = value(n.scale), value(n.bias)

    conv(model.conv_first, "conv_first")
    norm(model.patch_norm, "patch_embed.norm")
    for i, layer in enumerate(model.layers):
        group = f"layers.{i}.residual_group"
        for j, block in enumerate(layer.blocks):
            name = f"{group}.blocks.{j}"
            norm(block.norm1, f"{name}.norm1"), norm(block.norm2, f"{name}.norm2")
            linear(block.mlp.up, f"{name}.mlp.fc1"), linear(block.mlp.down, f"{name}.mlp.fc2")
            linear(block.mixer.attn.qkv, f"{name}.attn.qkv"), linear(block.mixer.attn.proj, f"{name}.attn.proj")
            sd[f"{name}.attn.relative_position_bias_table"] = value(block.mixer.attn.relative_position_bias_table)
            conv(block.mixer.conv_block.conv1, f"{name}.conv_block.cab.0")
            conv(block.mixer.conv_block.conv2, f"{name}.conv_block.cab.2")
            for k, fc in ((1, block.mixer.conv_block.attention.fc1), (3, block.mixer.conv_block.attention.fc2)):
                sd[f"{name}.conv_block.cab.3.attention.{k}.weight"] = value(fc.kernel).T[:, :, None, None]
                sd[f"{name}.conv_block.cab.3.attention.{k}.bias"] = value(fc.bias)
        name, block = f"{group}.overlap_attn", layer.overlap_attn
        norm(block.norm1, f"{name}.norm1"), norm(block.norm2, f"{name}.norm2")
        linear(block.mlp.up, f"{name}.mlp.fc1"), linear(block.mlp.down, f"{name}.mlp.fc2")
        linear(block.mixer.qkv, f"{name}.qkv"), linear(block.mixer.proj, f"{name}.proj")
        sd[f"{name}.relative_position_bias_table"] = value(block.mixer.relative_position_bias_table)
        conv(layer.conv, f"layers.{i}.conv")
    norm(model.norm, "norm")
    conv(model.conv_after_body, "conv_after_body")
    conv(model.conv_before_upsample, "conv_before_upsample.0")
    for k, c in enumerate(model.upsample):
        conv(c, f"upsample.{2 * k}")
    conv(model.conv_last, "conv_last")
    sd["relative_position_index_SA"] = np.zeros((16, 16), np.int64)
    sd["relative_position_index_OCA"] = np.zeros((16, 36), np.int64)
    return sd


def test_official_weight_names_round_trip_and_errors():
    """Every parameter is read from its official name (checked once against the official torch model,
    see the HAT report: max |difference| 6e-12 in float64); here: a state dict written under the
    official names loads back exactly, and missing / unknown keys raise."""
    source, target = small("hat_x4", seed=5), small("hat_x4", seed=6)
    sd = _official_state_dict(source)
    assert len(sd) == num_params_leaves(source) + 2
    unused = load_official_hat_weights(target, sd)
    assert unused == ["relative_position_index_OCA", "relative_position_index_SA"]
    for (path, a), (_, b) in zip(nnx.iter_graph(source), nnx.iter_graph(target), strict=True):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    with pytest.raises(ValueError, match=r"state_dict keys not converted: \['extra.weight'\]"):
        load_official_hat_weights(target, {**sd, "extra.weight": np.zeros(1)})
    missing = dict(sd)
    del missing["layers.1.residual_group.overlap_attn.qkv.bias"]
    with pytest.raises(KeyError, match="layers.1.residual_group.overlap_attn.qkv.bias"):
        load_official_hat_weights(target, missing)
    with pytest.raises(ValueError, match=r"'conv_first.weight' has shape \(12, 3, 3, 3\), expected \(12, 1, 3, 3\)"):
        load_official_hat_weights(small("hat_x4", in_chans=1), sd)


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"HAT: upscale must be a power of two or 3 \(the official Upsample\), got 5"):
        zoo.create_model("hat_s_x2", rngs=rngs, upscale=5)
    with pytest.raises(ValueError, match=r"HAT: rgb_mean must have in_chans \(1\) values"):
        zoo.create_model("hat_s_x2", rngs=rngs, in_chans=1, rgb_mean=(0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match=r"HAT: img_size \(8, 8\) must be at least window_size \(16\)"):
        zoo.create_model("hat_s_x2", rngs=rngs, img_size=8)
    with pytest.raises(ValueError, match=r"HAT: depths \(6, 6\) and num_heads \(6,\) must be non-empty and of equal length"):
        zoo.create_model("hat_s_x2", rngs=rngs, depths=(6, 6), num_heads=(6,))
    model = nnx.eval_shape(lambda: zoo.create_model("hat_s_x2", rngs=nnx.Rngs(0), **SMALL))
    with pytest.raises(ValueError, match=r"HAT: x must have shape \[B,H,W,C\] with last axis 3, got \(1, 8, 8, 1\)"):
        model(jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"HAT.forward_flops: in_chans must be 3, got 1"):
        model.forward_flops((8, 8, 1))
