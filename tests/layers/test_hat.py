"""HAT's mixers (``hat_hybrid``, ``hat_overlapping_cross_attention``) and the channel attention block
against independent float64 numpy implementations (tests/layers/hat_reference.py): odd sizes,
shifted and unshifted windows, rectangular and non-overlapping windows, several seeds, gradients of
every parameter and the input, FLOPs, argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.hat import (
    ChannelAttentionBlock,
    HybridAttention,
    OverlappingCrossAttention,
    overlap_relative_position_index,
    overlapping_windows,
)
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.hat_reference import (
    channel_attention_block,
    hybrid_attention,
    official_oca_index,
    overlapping_cross_attention,
)
from tests.layers.testing import as_float64, check_gradients, make_mixer, random_map
from tests.zoo.helpers import build, fast_jit, traced_matmul_flops

apply = fast_jit(lambda module, x: module(x))

HYBRID = dict(dim=12, num_heads=3, compress_ratio=3, squeeze_factor=4, conv_scale=0.5)
OVERLAP = dict(dim=12, num_heads=3)

# (height, width, options)
HYBRID_CASES = [
    (8, 8, dict(window_size=4)),
    (8, 8, dict(window_size=4, shift_size=2)),
    (7, 10, dict(window_size=3, shift_size=1)),  # padded inside the window attention, shifted
    (9, 6, dict(window_size=(4, 3), shift_size=(2, 1), qkv_bias=False, compress_ratio=2, squeeze_factor=12)),
]
OVERLAP_CASES = [
    (8, 8, dict(window_size=4, overlap_ratio=0.5)),  # HAT's ratio: 4x4 queries, 6x6 keys
    (6, 10, dict(window_size=(2, 4), overlap_ratio=1.0, qkv_bias=False)),  # rectangular, 4x8 keys
    (7, 9, dict(window_size=3, overlap_ratio=0.7)),  # 5x5 keys, map padded to 9x9
    (5, 6, dict(window_size=3, overlap_ratio=0.0, qk_scale=0.4)),  # no overlap: M_o = M
]


@pytest.mark.parametrize("height, width, options", HYBRID_CASES)
def test_hybrid_matches_numpy(height, width, options):
    m = make_mixer("hat_hybrid", height * width, **{**HYBRID, **options})
    x = random_map(height + width, (2, height, width, 12))
    assert_close(apply(m, x), hybrid_attention(m, x), f"{options}", dtype=jnp.float32)
    with float64():
        x = np.random.default_rng(height).normal(size=(1, height, width, 12))
        y = apply(as_float64(nnx.clone(m)), jnp.asarray(x))
        assert_close(y, hybrid_attention(m, x), f"{options} float64", dtype=jnp.float64)


@pytest.mark.parametrize("height, width, options", OVERLAP_CASES)
def test_overlapping_cross_attention_matches_numpy(height, width, options):
    m = make_mixer("hat_overlapping_cross_attention", height * width + 1, **{**OVERLAP, **options})
    x = random_map(height * 3 + width, (2, height, width, 12))
    assert_close(apply(m, x), overlapping_cross_attention(m, x), f"{options}", dtype=jnp.float32)
    with float64():
        x = np.random.default_rng(width).normal(size=(1, height, width, 12))
        y = apply(as_float64(nnx.clone(m)), jnp.asarray(x))
        assert_close(y, overlapping_cross_attention(m, x), f"{options} float64", dtype=jnp.float64)


def test_channel_attention_block_matches_numpy():
    for seed, (dim, ratio, squeeze) in enumerate(((12, 3, 4), (10, 4, 5))):
        m = build(lambda d=dim, r=ratio, s=squeeze: ChannelAttentionBlock(d, compress_ratio=r, squeeze_factor=s,
                                                                         rngs=nnx.Rngs(0)), seed=seed, scale=0.5)
        assert m.conv1.kernel.shape == (3, 3, dim, dim // ratio) and m.attention.fc1.kernel.shape == (dim, dim // squeeze)
        x = random_map(seed, (2, 5, 7, dim))
        assert_close(apply(m, x), channel_attention_block(m, x), f"cab {seed}", dtype=jnp.float32)


def test_overlap_reaches_exactly_the_neighbouring_pixels():
    """With M = 4 and M_o = 6 the queries of window (0, 0) see one pixel beyond the window's edge,
    but no further; the reference agrees and the overlap changes the result of plain window attention."""
    m = make_mixer("hat_overlapping_cross_attention", 3, dim=12, num_heads=3, window_size=4, overlap_ratio=0.5)
    x = np.asarray(random_map(0, (1, 8, 8, 12)))
    base = np.asarray(apply(m, jnp.asarray(x)))
    inside = x.copy()
    inside[:, 4, 2] += 1.0  # row 4 is the first row of the next window: inside the 6x6 overlap
    beyond = x.copy()
    beyond[:, 5, 2] += 1.0  # two rows below: outside it
    assert np.abs(np.asarray(apply(m, jnp.asarray(inside)))[:, :4, :4] - base[:, :4, :4]).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(apply(m, jnp.asarray(beyond)))[:, :4, :4], base[:, :4, :4])
    no_overlap = make_mixer("hat_overlapping_cross_attention", 3, dim=12, num_heads=3, window_size=4, overlap_ratio=0.0)
    assert np.asarray(apply(no_overlap, jnp.asarray(inside)))[:, :4, :4] == pytest.approx(
        np.asarray(apply(no_overlap, jnp.asarray(x)))[:, :4, :4])


def test_overlapping_windows_layout_and_relative_index():
    x = jnp.arange(1 * 4 * 6 * 2, dtype=jnp.float32).reshape(1, 4, 6, 2) + 1.0
    windows = overlapping_windows(x, (2, 3), (4, 5))  # padding (1, 1)
    assert windows.shape == (1, 4, 20, 2)
    # window r*(W/pw)+c, token i*ow+j holds x[r*ph - 1 + i, c*pw - 1 + j] (zero outside)
    np.testing.assert_array_equal(windows[0, 1 * 2 + 1, 2 * 5 + 3], x[0, 2 - 1 + 2, 3 - 1 + 3])
    np.testing.assert_array_equal(windows[0, 0, 0], 0.0)
    assert int(jnp.sum(windows[0, 0, :, 0] == 0)) == 5 + 4 - 1  # the top row and left column of window 0 are padding
    for window, overlap in (((4, 4), (6, 6)), ((16, 16), (24, 24)), ((2, 4), (4, 8)), ((3, 3), (3, 3))):
        ours = overlap_relative_position_index(window, overlap)
        size = (window[0] + overlap[0] - 1) * (window[1] + overlap[1] - 1)
        official = official_oca_index(window, overlap)
        assert official.min() >= -size  # a valid torch index
        np.testing.assert_array_equal(ours, np.mod(official, size))
        # a function of the relative offset only, and every offset gets its own row of the table
        assert len(np.unique(ours)) == size


def test_gradients_of_every_parameter_and_the_input_match_finite_differences():
    with float64():
        m = as_float64(make_mixer("hat_hybrid", 3, **{**HYBRID, "window_size": 3, "shift_size": 1}))
        x = np.random.default_rng(4).normal(size=(1, 5, 7, 12))
        cotangent = np.random.default_rng(5).normal(size=x.shape)
        checked = check_gradients(m, x, cotangent, hybrid_attention, np.random.default_rng(6))
        assert len(checked) == 13, checked  # attention 5, CAB convs 4, channel attention 4
        m = as_float64(make_mixer("hat_overlapping_cross_attention", 7, **OVERLAP, window_size=3, overlap_ratio=0.7))
        x = np.random.default_rng(8).normal(size=(1, 5, 7, 12))
        checked = check_gradients(m, x, np.random.default_rng(9).normal(size=x.shape), overlapping_cross_attention,
                                  np.random.default_rng(10))
        assert len(checked) == 5, checked  # qkv kernel/bias, proj kernel/bias, bias table


def test_flops_count_every_matmul_and_logical_axes():
    m = make_mixer("hat_overlapping_cross_attention", 0, **OVERLAP, window_size=4, overlap_ratio=0.5)
    x = random_map(0, (1, 8, 12, 12))
    assert traced_matmul_flops(m, x) == m.flops(8, 12)
    h = make_mixer("hat_hybrid", 0, **HYBRID, window_size=4, shift_size=2)
    assert traced_matmul_flops(h, x) == h.flops(8, 12)
    assert layers.get_mixer_class("hat_hybrid").spatial_ndim == 2
    assert layers.get_mixer_class("hat_overlapping_cross_attention").spatial_ndim == 2
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
        "relative_position_bias_table": (None, "heads"),
    }
    assert m.relative_position_bias_table.shape == ((4 + 6 - 1) ** 2, 3)


def test_bfloat16():
    m = make_mixer("hat_overlapping_cross_attention", 1, **OVERLAP, window_size=4, dtype=jnp.bfloat16)
    x = random_map(2, (1, 8, 8, 12))
    y = apply(m, x)
    assert y.dtype == jnp.bfloat16 and rel_rms(y, overlapping_cross_attention(m, x)) < 2e-2


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"OverlappingCrossAttention: the overlap int\(overlap_ratio \* window_size\) = 1"):
        OverlappingCrossAttention(12, 3, window_size=3, overlap_ratio=0.5, rngs=rngs)
    with pytest.raises(ValueError, match=r"overlap_ratio must be >= 0, got -0.5"):
        OverlappingCrossAttention(12, 3, window_size=4, overlap_ratio=-0.5, rngs=rngs)
    with pytest.raises(ValueError, match=r"OverlappingCrossAttention: num_heads \(5\) must divide dim \(12\)"):
        OverlappingCrossAttention(12, 5, rngs=rngs)
    with pytest.raises(TypeError, match="OverlappingCrossAttention: qkv_bias must be a bool"):
        OverlappingCrossAttention(12, 3, qkv_bias=1, rngs=rngs)
    with pytest.raises(ValueError, match=r"ChannelAttentionBlock: squeeze_factor \(30\) must be at most dim \(12\)"):
        HybridAttention(12, 3, squeeze_factor=30, rngs=rngs)
    with pytest.raises(ValueError, match=r"ChannelAttentionBlock: compress_ratio must be an int >= 1, got 0"):
        HybridAttention(12, 3, compress_ratio=0, rngs=rngs)
    with pytest.raises(TypeError, match="HybridAttention: conv_scale must be a float"):
        HybridAttention(12, 3, conv_scale="0.01", rngs=rngs)
    with pytest.raises(ValueError, match=r"WindowAttention: shift_size \(4, 4\) must be smaller than window_size \(4, 4\)"):
        HybridAttention(12, 3, window_size=4, shift_size=4, squeeze_factor=4, rngs=rngs)
    m = build(lambda: OverlappingCrossAttention(12, 3, window_size=4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"OverlappingCrossAttention: x must have shape \[B,H,W,C\] with last axis 12"):
        m(jnp.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"overlapping_windows: H x W = 5 x 4 must be divisible by window_size \(2, 2\)"):
        overlapping_windows(jnp.zeros((1, 5, 4, 1)), (2, 2), (4, 4))
