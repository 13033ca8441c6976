"""VAN's large kernel attention (``van_lka``) and attention mixer (``van_attention``) against an
independent float64 numpy reference (tests/layers/van_reference.py: every convolution an explicit
window sum per output pixel, the dilated one included): odd sizes, maps smaller than the kernel
footprint, other kernel / dilation settings, several seeds; the receptive field; gradients of the
input and every parameter against finite differences; FLOPs; registry entries and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers import Conv2d
from attnzoo.layers.van import LargeKernelAttention, VANAttention
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers import van_reference as ref
from tests.layers.testing import check_gradients
from tests.zoo.helpers import build, fast_jit, traced_matmul_flops


def make(name, dim, seed=0, **options):
    return build(lambda: layers.create_mixer(name, dim=dim, num_heads=1, rngs=nnx.Rngs(0), **options),
                 seed=seed, scale=0.4)


apply = fast_jit(lambda m, x: m(x))
REFERENCE = {"van_lka": ref.lka, "van_attention": ref.van_attention}

# (mixer, dim, H, W, options)
CASES = [
    ("van_lka", 6, 9, 11, {}),                                    # the paper's 5x5 + 7x7 dilation 3
    ("van_lka", 5, 4, 3, {}),                                     # map smaller than the dilated taps' reach
    ("van_lka", 4, 1, 1, {}),                                     # one pixel: only the centre taps
    ("van_lka", 8, 7, 6, dict(kernel_size=3, dilated_kernel_size=5, dilation=2)),
    ("van_attention", 6, 7, 5, {}),
    ("van_attention", 3, 5, 8, dict(dilated_kernel_size=3, dilation=4)),
]


@pytest.mark.parametrize("name, dim, height, width, options", CASES)
def test_matches_numpy(name, dim, height, width, options):
    for seed in (0, 1):
        m = make(name, dim, seed=seed + height, **options)
        x = np.random.default_rng(seed + width).normal(size=(2, height, width, dim))
        assert_close(apply(m, jnp.asarray(x, jnp.float32)), REFERENCE[name](m, x), f"{name} {options}",
                     dtype=jnp.float32)
    with float64():
        m = make(name, dim, seed=7, param_dtype=jnp.float64, **options)
        x = np.random.default_rng(8).normal(size=(1, height, width, dim))
        assert_close(apply(m, jnp.asarray(x)), REFERENCE[name](m, x), f"{name} {options} float64", dtype=jnp.float64)


@pytest.mark.parametrize("options, height, width", [
    (dict(in_features=3, out_features=5, kernel_size=7, stride=4, padding=3), 13, 10),  # VAN's first embedding
    (dict(in_features=4, out_features=8, kernel_size=3, stride=2, padding=2, dilation=2, groups=4), 9, 8),  # x2 channels
    (dict(in_features=2, out_features=1, kernel_size=5, padding=2, use_bias=False), 6, 7),  # CBAM-like 2 -> 1
])
def test_conv2d_scan_taps_is_the_same_convolution(options, height, width):
    """``Conv2d(scan_taps=True)`` (a lax.scan over kernel taps) against the unrolled taps and, where
    the reference applies (one input channel per output or dense), the numpy window sums; gradients too."""
    scanned = build(lambda: Conv2d(**options, scan_taps=True, rngs=nnx.Rngs(0)), seed=height)
    unrolled = build(lambda: Conv2d(**options, rngs=nnx.Rngs(0)), seed=height)
    x = jnp.asarray(np.random.default_rng(width).normal(size=(2, height, width, options["in_features"])), jnp.float32)
    grad = fast_jit(lambda m, x: nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(m, x))
    assert_close(apply(scanned, x), apply(unrolled, x), "scan vs unrolled", dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(grad(scanned, x)), jax.tree.leaves(grad(unrolled, x)), strict=True):
        assert_close(a, b, "gradient", dtype=jnp.float32)
    if options.get("groups", 1) == 1:
        bias = None if scanned.bias is None else np.asarray(scanned.bias[...], np.float64)
        want = ref.window_conv(np.asarray(x, np.float64), np.asarray(scanned.kernel[...], np.float64), bias,
                               stride=options.get("stride", 1), padding=options["padding"])
        assert_close(apply(scanned, x), want, "numpy", dtype=jnp.float32)


def test_receptive_field_is_the_dilated_square():
    """One output pixel of the attention map depends on exactly the 23 x 23 square around it
    (5x5 then 7x7 with dilation 3: offsets a + 3 b, |a| <= 2, |b| <= 3, cover -11..11)."""
    m = make("van_lka", 3, seed=2)
    assert m.receptive_field == 23
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 27, 27, 3)), jnp.float32)
    grad = fast_jit(lambda m, x: jax.grad(lambda x: jnp.sum(m.attention(x)[0, 13, 13]))(x))(m, x)
    reached = np.asarray(jnp.any(grad[0] != 0, axis=-1))
    want = np.zeros((27, 27), bool)
    want[2:25, 2:25] = True
    np.testing.assert_array_equal(reached, want)


def test_gradients_of_every_parameter_and_the_input_match_finite_differences():
    with float64():
        m = make("van_attention", 3, seed=4, param_dtype=jnp.float64)
        x = np.random.default_rng(5).normal(size=(2, 5, 6, 3))
        cotangent = np.random.default_rng(6).normal(size=x.shape)
        checked = check_gradients(m, x, cotangent, ref.van_attention, np.random.default_rng(7), eps=1e-6, floor=0.0)
        assert len(checked) == 10, checked  # proj_1, conv0, conv_spatial, conv1, proj_2: kernel + bias each


def test_flops_registry_dtype_and_logical_axes():
    m = make("van_attention", 8)
    x = jnp.zeros((1, 7, 5, 8))
    # The 1x1s are matmuls; the depthwise convolutions run as per-tap products (not dots).
    assert traced_matmul_flops(m, x) == 3 * 2 * 35 * 8 * 8
    assert m.flops(7, 5) == 3 * 2 * 35 * 64 + 2 * 35 * 8 * (25 + 49)
    assert m.spatial_gating_unit.flops(7, 5) == 2 * 35 * 8 * (8 + 74)
    assert {"van_lka", "van_attention"} <= set(layers.list_mixers())
    assert layers.get_mixer_class("van_lka").spatial_ndim == layers.get_mixer_class("van_attention").spatial_ndim == 2
    specs = {".".join(map(str, path)): v.get_metadata().get("out_sharding")
             for path, v in nnx.iter_graph(m) if isinstance(v, nnx.Param)}
    assert specs == {
        "proj_1.kernel": (None, "embed"), "proj_1.bias": ("embed",),
        "spatial_gating_unit.conv0.kernel": (None, None, None, "embed"), "spatial_gating_unit.conv0.bias": ("embed",),
        "spatial_gating_unit.conv_spatial.kernel": (None, None, None, "embed"),
        "spatial_gating_unit.conv_spatial.bias": ("embed",),
        "spatial_gating_unit.conv1.kernel": (None, "embed"), "spatial_gating_unit.conv1.bias": ("embed",),
        "proj_2.kernel": (None, "embed"), "proj_2.bias": ("embed",),
    }
    lka = make("van_lka", 8, dtype=jnp.bfloat16)
    xs = np.random.default_rng(1).normal(size=(2, 6, 6, 8))
    y = apply(lka, jnp.asarray(xs, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and rel_rms(y, ref.lka(lka, np.asarray(jnp.asarray(xs, jnp.bfloat16), np.float64))) < 2e-2


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"LargeKernelAttention: kernel_size must be odd \(the map keeps its size\), got 4"):
        LargeKernelAttention(8, kernel_size=4, rngs=rngs)
    with pytest.raises(ValueError, match=r"LargeKernelAttention: dilation must be an int >= 1, got 0"):
        LargeKernelAttention(8, dilation=0, rngs=rngs)
    with pytest.raises(ValueError, match=r"VANAttention: dim must be an int >= 1, got -2"):
        VANAttention(-2, rngs=rngs)
    with pytest.raises(TypeError, match=r"Conv2d: scan_taps must be a bool, got int"):
        Conv2d(2, 2, 3, scan_taps=1, rngs=rngs)
    m = make("van_lka", 4)
    with pytest.raises(ValueError, match=r"LargeKernelAttention: x must have shape \[B,H,W,C\] with last axis 4, got \(1, 5, 4\)"):
        m(jnp.zeros((1, 5, 4)))
    with pytest.raises(TypeError, match=r"VANAttention: x must have a floating dtype, got int32"):
        make("van_attention", 4)(jnp.zeros((1, 3, 3, 4), jnp.int32))
