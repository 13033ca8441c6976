"""DaViT's layers against independent float64 numpy implementations: channel group attention
(several group counts, odd maps, biases and scales), DaViT's window attention (no relative position
bias, maps padded to the window), the convolutional position encoding; gradients of the input and
every parameter; argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.davit import ChannelGroupAttention, ConvPosEnc, DaViTWindowAttention
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.davit_reference import numpy_channel_group_attention, numpy_conv_pos_enc
from tests.layers.testing import as_float64, check_gradients
from tests.layers.window_reference import numpy_window_attention
from tests.zoo.helpers import build, fast_jit, traced_matmul_flops


def make(name, seed=0, **options):
    if name == "conv_pos_enc":
        factory = lambda: ConvPosEnc(rngs=nnx.Rngs(seed), **options)  # noqa: E731
    else:
        factory = lambda: layers.create_mixer(name, rngs=nnx.Rngs(seed), **options)  # noqa: E731
    return build(factory, seed=seed, scale=0.5)


apply = fast_jit(lambda module, x: module(x))

REFERENCES = {
    "davit_channel": numpy_channel_group_attention,
    "davit_window": numpy_window_attention,
    "conv_pos_enc": numpy_conv_pos_enc,
}

# (name, height, width, options): group counts 1 to 5 (group sizes 1 to 12), odd and 1-pixel maps,
# windows that divide the map, pad it, or exceed it
CASES = [
    ("davit_channel", 5, 7, dict(dim=12, num_heads=3)),
    ("davit_channel", 4, 4, dict(dim=12, num_heads=1)),
    ("davit_channel", 3, 9, dict(dim=16, num_heads=4, qkv_bias=False, out_bias=False)),
    ("davit_channel", 1, 1, dict(dim=10, num_heads=5, qk_scale=0.7)),
    ("davit_channel", 6, 5, dict(dim=8, num_heads=8)),  # one channel per group: the softmax is 1
    ("davit_window", 7, 10, dict(dim=12, num_heads=3, window_size=3)),
    ("davit_window", 9, 9, dict(dim=12, num_heads=2)),  # the default 7x7 window, padded to 14x14
    ("davit_window", 4, 5, dict(dim=8, num_heads=1, window_size=(2, 3), qkv_bias=False)),
    ("conv_pos_enc", 5, 6, dict(dim=6)),
    ("conv_pos_enc", 3, 7, dict(dim=4, kernel_size=5, act=True)),
]


@pytest.mark.parametrize("name, height, width, options", CASES)
def test_matches_numpy_reference(name, height, width, options):
    reference = REFERENCES[name]
    for seed in (0, 1):
        m = make(name, seed=seed + height * width, **options)
        x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, height, width, m.dim)), jnp.float32)
        assert_close(apply(m, x), reference(m, x), f"{name} {options} seed {seed}", dtype=jnp.float32)
    with float64():
        x = np.random.default_rng(2).normal(size=(1, height, width, m.dim))
        y = apply(as_float64(nnx.clone(m)), jnp.asarray(x))
        assert_close(y, reference(m, x), f"{name} {options} float64", dtype=jnp.float64)


def test_channel_attention_mixes_channels_not_tokens_and_the_slice_roles_matter():
    m = make("davit_channel", dim=12, num_heads=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 5, 12)), jnp.float32)
    # The scores sum over every token, so permuting the tokens permutes the output the same way.
    permutation = np.random.default_rng(1).permutation(20)
    flat = x.reshape(1, 20, 12)
    y = apply(m, x)
    permuted = apply(m, flat[:, permutation].reshape(1, 4, 5, 12)).reshape(1, 20, 12)
    np.testing.assert_allclose(np.asarray(permuted), np.asarray(y.reshape(1, 20, 12))[:, permutation], atol=1e-5)
    # A token's output depends on other tokens (unlike a per-token channel MLP) ...
    changed = x.at[0, 3, 4].add(1.0)
    assert rel_rms(apply(m, changed)[0, 0, 0], y[0, 0, 0]) > 1e-3
    # ... and the reference's slice assignment is not symmetric: the paper's textbook labelling
    # (Q, K, V = slices 0, 1, 2) gives a different map.
    swapped = nnx.clone(m)
    kernel = swapped.qkv.kernel.get_value()
    swapped.qkv.kernel.set_value(kernel[:, jnp.array([2, 0, 1])])
    swapped.qkv.bias.set_value(swapped.qkv.bias.get_value()[jnp.array([2, 0, 1])])
    assert rel_rms(numpy_channel_group_attention(swapped, x), np.asarray(y)) > 0.05


@pytest.mark.parametrize("name, options", [
    ("davit_channel", dict(dim=12, num_heads=3)),
    ("davit_window", dict(dim=8, num_heads=2, window_size=(2, 3))),
    ("conv_pos_enc", dict(dim=4, act=True)),
])
def test_gradients_of_every_parameter_and_the_input_match_finite_differences(name, options):
    """Directional derivatives of ``sum(y * cotangent)`` along a random direction of each parameter
    (and of x), by jax in float64 vs central differences of the numpy reference."""
    reference = REFERENCES[name]
    with float64():
        m = as_float64(make(name, seed=3, **options))
        x = np.random.default_rng(4).normal(size=(1, 5, 4, m.dim))
        cotangent = np.random.default_rng(5).normal(size=x.shape)
        checked = check_gradients(m, x, cotangent, reference, np.random.default_rng(6))
        expected = {"proj.kernel", "proj.bias"} | ({"qkv.kernel", "qkv.bias"} if name != "conv_pos_enc" else set())
        assert set(checked) == expected, checked


def test_flops_bfloat16_and_logical_axes():
    m = make("davit_channel", dim=12, num_heads=3, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 5, 7, 12)), jnp.float32)
    y = apply(m, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert rel_rms(y, numpy_channel_group_attention(m, x)) < 2e-2
    assert traced_matmul_flops(m, x) == m.flops(5, 7)
    window = make("davit_window", dim=12, num_heads=3, window_size=3)
    assert traced_matmul_flops(window, x) == window.flops(5, 7)  # on the map padded to 6 x 9
    specs = {
        ".".join(map(str, path)): variable.get_metadata().get("out_sharding")
        for path, variable in nnx.iter_graph(m)
        if isinstance(variable, nnx.Param)
    }
    assert specs == {
        "qkv.kernel": ("embed", None, "heads", "head_dim"),
        "qkv.bias": (None, "heads", "head_dim"),
        "proj.kernel": ("heads", "head_dim", "embed"),
        "proj.bias": ("embed",),
    }
    assert window.relative_position_bias_table is None and window.window_size == (3, 3)
    assert not any(window.shift_size) and window.partition == "window"
    assert {"davit_channel", "davit_window"} <= set(layers.list_mixers())
    assert all(layers.get_mixer_class(name).spatial_ndim == 2 for name in ("davit_channel", "davit_window"))
    assert isinstance(layers.create_mixer("davit_window", dim=4, num_heads=1, rngs=nnx.Rngs(0)), DaViTWindowAttention)
    assert window.scale == 4**-0.5


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"ChannelGroupAttention: num_heads \(5\) must divide dim \(12\)"):
        ChannelGroupAttention(12, 5, rngs=rngs)
    with pytest.raises(ValueError, match=r"ChannelGroupAttention: num_heads must be an int >= 1, got 0"):
        ChannelGroupAttention(12, 0, rngs=rngs)
    with pytest.raises(TypeError, match="ChannelGroupAttention: qkv_bias must be a bool, got int"):
        ChannelGroupAttention(12, 3, qkv_bias=1, rngs=rngs)
    with pytest.raises(ValueError, match="qk_scale must be a finite positive float"):
        ChannelGroupAttention(12, 3, qk_scale=0.0, rngs=rngs)
    with pytest.raises(ValueError, match=r"DaViTWindowAttention: window_size\[0\] must be an int >= 1, got 0"):
        DaViTWindowAttention(12, 3, window_size=(0, 3), rngs=rngs)
    with pytest.raises(ValueError, match="ConvPosEnc: kernel_size must be odd"):
        ConvPosEnc(4, 2, rngs=rngs)
    with pytest.raises(TypeError, match="ConvPosEnc: act must be a bool, got str"):
        ConvPosEnc(4, act="gelu", rngs=rngs)
    m = make("davit_channel", dim=8, num_heads=2)
    with pytest.raises(ValueError, match=r"ChannelGroupAttention: x must have shape \[B,H,W,C\] with last axis 8, "
                                         r"got \(1, 4, 8\)"):
        m(jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match=r"with last axis 8, got \(1, 2, 2, 6\)"):
        m(jnp.zeros((1, 2, 2, 6)))
    with pytest.raises(TypeError, match="ChannelGroupAttention: x must have a floating dtype, got int32"):
        m(jnp.zeros((1, 2, 2, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"ConvPosEnc: x must have shape \[B,H,W,C\] with last axis 4"):
        make("conv_pos_enc", dim=4)(jnp.zeros((1, 3, 3, 5)))
