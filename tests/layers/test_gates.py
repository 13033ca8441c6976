"""Channel / spatial gates (squeeze-excitation, ECA, CBAM) against independent float64 numpy references
(tests/layers/van_reference.py): ECA's kernel size rule and 1-D channel convolution, CBAM's channel and
spatial gates (BatchNorm in evaluation and training mode), odd sizes and several seeds, gradients of
the input and every parameter against finite differences, the gate registry and argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.layers.conv import SqueezeExcite
from attnzoo.layers.gates import CBAM, EfficientChannelAttention, eca_kernel_size, list_gates, make_gate
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers import van_reference as ref
from tests.layers.conv_reference import randomize_batch_stats
from tests.layers.testing import check_gradients
from tests.zoo.helpers import fast_jit, randomize


def _gate(name, channels, seed, **options):
    """The gate built abstractly with random parameters (and running statistics), evaluation mode."""
    module = nnx.eval_shape(lambda: make_gate(name, channels, rngs=nnx.Rngs(0), **options))
    module = randomize_batch_stats(randomize(module, seed=seed, scale=0.5), seed + 1)
    module.eval()
    return module


apply = fast_jit(lambda m, x: m(x))


def test_eca_kernel_size_follows_the_paper():
    # |log2(C)/2 + 1/2|_odd, computed by hand: C = 16 -> 2.5 -> 3; 64 -> 3.5 -> 3; 128 -> 4 -> 5;
    # 256 -> 4.5 -> 5; 512 -> 5 -> 5; 1024 -> 5.5 -> 5; 2048 -> 6 -> 7; 4 -> 1.5 -> 1 (no floor of 3).
    table = {4: 1, 16: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in table} == table
    for channels in (3, 7, 40, 100, 160, 320, 4096):
        assert eca_kernel_size(channels) == ref.eca_kernel_size(channels)
    assert eca_kernel_size(256, gamma=1.0, b=0.0) == 9  # log2(256) = 8 -> odd 9
    assert make_gate("eca", 256, rngs=nnx.Rngs(0)).kernel.shape == (5,)


# (gate, channels, H, W, options): odd sizes, several kernel sizes, and a single pixel
CASES = [
    ("eca", 64, 5, 7, {}),
    ("eca", 7, 3, 1, dict(kernel_size=5)),
    ("eca", 9, 1, 1, dict(kernel_size=9)),  # the kernel as wide as the channels: every tap reaches padding
    ("cbam", 32, 9, 6, {}),
    ("cbam", 12, 3, 5, dict(reduction_ratio=4, spatial_kernel_size=3)),  # kernel wider than half the map
    ("cbam", 16, 4, 4, dict(reduced_channels=3, use_spatial=False)),
    ("se", 24, 5, 3, {}),
    ("se", 6, 2, 7, dict(reduced_channels=4, activation="silu")),
]


@pytest.mark.parametrize("name, channels, height, width, options", CASES)
def test_gates_match_numpy(name, channels, height, width, options):
    for seed in (0, 1):
        m = _gate(name, channels, seed=10 * seed + height, **options)
        x = np.random.default_rng(seed + width).normal(size=(2, height, width, channels)) * 1.5
        assert_close(apply(m, jnp.asarray(x, jnp.float32)), ref.gate(m, x), f"{name} {options}", dtype=jnp.float32)
    with float64():
        m = _gate(name, channels, seed=3, param_dtype=jnp.float64, **options)
        x = np.random.default_rng(4).normal(size=(3, height, width, channels))
        assert_close(apply(m, jnp.asarray(x)), ref.gate(m, x), f"{name} {options} float64", dtype=jnp.float64)


def test_cbam_training_mode_uses_batch_statistics():
    with float64():
        m = _gate("cbam", 16, seed=5, reduction_ratio=4, spatial_kernel_size=3, param_dtype=jnp.float64)
        m.train()
        x = np.random.default_rng(6).normal(size=(2, 5, 7, 16))
        mean0 = np.asarray(m.spatial_norm.mean[...])
        y = m(jnp.asarray(x))
        assert_close(y, ref.cbam(m, x, training=True), "cbam train", dtype=jnp.float64)
        assert not np.allclose(np.asarray(m.spatial_norm.mean[...]), mean0)  # running mean updated
        m.eval()
        assert rel_rms(m(jnp.asarray(x)), y) > 1e-3  # running statistics differ from the batch's


@pytest.mark.parametrize("name, options, count", [
    ("eca", dict(kernel_size=3), 1),
    ("cbam", dict(reduction_ratio=4, spatial_kernel_size=3), 7),  # fc1, fc2 (kernel + bias), conv, BN scale + bias
    ("se", dict(reduced_channels=3), 4),
])
def test_gradients_of_every_parameter_and_the_input_match_finite_differences(name, options, count):
    with float64():
        m = _gate(name, 8, seed=7, param_dtype=jnp.float64, **options)
        x = np.random.default_rng(8).normal(size=(2, 3, 5, 8))
        cotangent = np.random.default_rng(9).normal(size=x.shape)
        checked = check_gradients(m, x, cotangent, ref.gate, np.random.default_rng(10), eps=1e-6, floor=0.0)
        assert len(checked) == count, checked


def test_registry_dtypes_flops_and_logical_axes():
    assert {"se", "eca", "cbam"} <= set(list_gates())
    assert make_gate(None, 8, rngs=nnx.Rngs(0)) is None
    se = make_gate("se", 64, rngs=nnx.Rngs(0))
    assert isinstance(se, SqueezeExcite) and (se.reduced_channels, se.activation) == (4, "relu")  # r = 16, ReLU
    cbam = nnx.eval_shape(lambda: make_gate("cbam", 64, channel_axis="embed", rngs=nnx.Rngs(0)))
    assert isinstance(cbam, CBAM) and cbam.reduced_channels == 4
    axes = {".".join(map(str, path)): v.get_metadata().get("out_sharding")
            for path, v in nnx.iter_graph(cbam) if isinstance(v, nnx.Param)}
    assert axes == {"fc1.kernel": ("embed", None), "fc1.bias": (None,), "fc2.kernel": (None, "embed"),
                    "fc2.bias": ("embed",), "spatial_conv.kernel": (None, None, None, None),
                    "spatial_norm.scale": (None,), "spatial_norm.bias": (None,)}
    eca = make_gate("eca", 64, rngs=nnx.Rngs(0))
    assert isinstance(eca, EfficientChannelAttention) and eca.kernel.get_metadata()["out_sharding"] == ("conv_kernel",)
    assert eca.flops(5, 5) == 2 * 64 * 3
    assert cbam.flops(5, 6) == 8 * 64 * 4 + 2 * 30 * 49 * 2
    assert se.flops(5, 6) == 4 * 64 * 4
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5, 64)), jnp.bfloat16)
    for name, options in (("eca", {}), ("cbam", dict(spatial_kernel_size=3))):
        m = _gate(name, 64, seed=1, dtype=jnp.bfloat16, **options)
        y = apply(m, x)
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape
        assert rel_rms(y, ref.gate(m, np.asarray(x, np.float64))) < 2e-2


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"make_gate: gate must be None or one of \['cbam', 'eca', 'se'.*\], got 'sk'"):
        make_gate("sk", 8, rngs=rngs)
    with pytest.raises(ValueError, match=r"EfficientChannelAttention: kernel_size must be odd, got 4"):
        EfficientChannelAttention(8, kernel_size=4, rngs=rngs)
    with pytest.raises(ValueError, match=r"eca_kernel_size: channels must be an int >= 1, got 0"):
        eca_kernel_size(0)
    with pytest.raises(ValueError, match=r"CBAM: channels // reduction_ratio = 8 // 16 is 0; pass reduced_channels"):
        CBAM(8, rngs=rngs)
    with pytest.raises(ValueError, match=r"make_gate\('se'\): channels // reduction_ratio = 8 // 16 is 0"):
        make_gate("se", 8, rngs=rngs)
    with pytest.raises(ValueError, match=r"CBAM: spatial_kernel_size must be odd, got 6"):
        CBAM(32, spatial_kernel_size=6, rngs=rngs)
    with pytest.raises(TypeError, match=r"CBAM: use_spatial must be a bool, got int"):
        CBAM(32, use_spatial=1, rngs=rngs)
    with pytest.raises(ValueError, match=r"CBAM: activation must be one of \[.*\], got 'tanh'"):
        CBAM(32, activation="tanh", rngs=rngs)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bogus'"):
        make_gate("eca", 8, bogus=1, rngs=rngs)
    m = _gate("eca", 8, seed=0)
    with pytest.raises(ValueError, match=r"EfficientChannelAttention: x must have shape \[B,H,W,C\] with last axis 8, got \(2, 3, 3, 7\)"):
        m(jnp.zeros((2, 3, 3, 7)))
    with pytest.raises(TypeError, match=r"CBAM: x must have a floating dtype, got int32"):
        _gate("cbam", 32, seed=0)(jnp.zeros((1, 2, 2, 32), jnp.int32))
