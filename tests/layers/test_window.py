"""Window attention (Swin W-MSA / SW-MSA, MaxViT block and grid) against an independent float64 numpy
implementation that walks the windows one by one: shift masks, padding of odd sizes, grid
partition, gradients of every parameter and the input, and argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.window import (
    WindowAttention,
    grid_partition,
    grid_reverse,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.testing import as_float64, check_gradients, make_mixer, random_map
from tests.layers.window_reference import numpy_window_attention
from tests.zoo.helpers import build, fast_jit


def make(seed=0, **options):
    options = {"dim": 12, "num_heads": 3, **options}
    return make_mixer(options.pop("name", "swin_window"), seed, **options)


apply = fast_jit(lambda module, x: module(x))


# (height, width, options): divisible and padded sizes, square and rectangular windows and shifts
CASES = [
    (8, 8, dict(window_size=4)),
    (8, 8, dict(window_size=4, shift_size=2)),
    (7, 10, dict(window_size=3, shift_size=1)),  # padded in both axes, shifted
    (9, 6, dict(window_size=(4, 3), shift_size=(2, 0))),  # shift along one axis only
    (5, 7, dict(window_size=(3, 4), shift_size=(1, 3), qkv_bias=False, rel_pos_bias=False)),
    (2, 3, dict(window_size=4)),  # map smaller than the window
    (8, 12, dict(name="maxvit_grid", dim=64, num_heads=2, window_size=4)),  # head_dim 32, strided grid
    (6, 9, dict(name="maxvit_grid", dim=16, num_heads=2, head_dim=5, window_size=(2, 3))),
    (7, 6, dict(name="maxvit_block", dim=16, num_heads=1, window_size=3, out_bias=False, qk_scale=0.3)),
]


@pytest.mark.parametrize("height, width, options", CASES)
def test_matches_numpy_window_loop(height, width, options):
    m = make(seed=height * width, **options)
    x = random_map(0, (2, height, width, m.dim))
    assert_close(apply(m, x), numpy_window_attention(m, x), f"{options}", dtype=jnp.float32)
    with float64():
        x = np.random.default_rng(1).normal(size=(1, height, width, m.dim))
        y = apply(as_float64(nnx.clone(m)), jnp.asarray(x))
        assert_close(y, numpy_window_attention(m, x), f"{options} float64", dtype=jnp.float64)


def test_shift_changes_the_result_and_the_mask_matters():
    x = random_map(0, (1, 8, 8, 12))
    plain = make(window_size=4)
    shifted = make(window_size=4, shift_size=2)
    assert rel_rms(plain(x), shifted(x)) > 0.1
    # Without Swin's mask (a roll of the map around the unshifted layer) the result differs too.
    unmasked = jnp.roll(plain(jnp.roll(x, (-2, -2), axis=(1, 2))), (2, 2), axis=(1, 2))
    assert rel_rms(unmasked, shifted(x)) > 0.05
    mask = shifted_window_mask((8, 8), 4, 2)
    assert mask.shape == (4, 16, 16) and set(np.unique(mask)) == {0.0, -100.0}
    assert not mask[0].any() and mask[3].any()  # only windows that wrap around are masked


def test_partitions_are_inverse_and_laid_out_as_documented():
    x = jnp.arange(2 * 6 * 8 * 3, dtype=jnp.float32).reshape(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (2, 4, 12, 3)
    # window r*(W/pw)+c holds x[r*ph+i, c*pw+j] as token i*pw+j
    np.testing.assert_array_equal(windows[1, 1 * 2 + 1, 2 * 4 + 3], x[1, 3 + 2, 4 + 3])
    np.testing.assert_array_equal(window_reverse(windows, (3, 4), (6, 8)), x)
    grid = grid_partition(x, (3, 2))  # strides (2, 4)
    assert grid.shape == (2, 8, 6, 3)
    # window a*sw+b holds x[i*sh+a, j*sw+b] as token i*gw+j
    np.testing.assert_array_equal(grid[0, 1 * 4 + 3, 2 * 2 + 1], x[0, 2 * 2 + 1, 1 * 4 + 3])
    np.testing.assert_array_equal(grid_reverse(grid, (3, 2), (6, 8)), x)


def test_gradients_of_every_parameter_and_the_input_match_finite_differences():
    """Directional derivatives of ``sum(y * cotangent)`` along a random direction of each parameter
    (and of x), by jax in float64 vs central differences of the numpy reference."""
    with float64():
        m = as_float64(make(seed=3, window_size=3, shift_size=1))
        x = np.random.default_rng(4).normal(size=(1, 5, 7, 12))
        cotangent = np.random.default_rng(5).normal(size=x.shape)
        checked = check_gradients(m, x, cotangent, numpy_window_attention, np.random.default_rng(6))
        assert len(checked) == 5, checked  # qkv kernel/bias, proj kernel/bias, bias table


def test_jit_bfloat16_and_logical_axes():
    m = make(window_size=4, shift_size=2, dtype=jnp.bfloat16)
    x = random_map(7, (2, 8, 8, 12))
    y = apply(m, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert rel_rms(y, numpy_window_attention(m, x)) < 2e-2
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
    assert layers.get_mixer_class("maxvit_grid").spatial_ndim == 2
    assert {"swin_window", "maxvit_block", "maxvit_grid"} <= set(layers.list_mixers())


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"WindowAttention: shift_size \(4, 4\) must be smaller than window_size \(4, 4\)"):
        WindowAttention(8, 2, window_size=4, shift_size=4, rngs=rngs)
    with pytest.raises(ValueError, match=r"needs partition='window'"):
        WindowAttention(8, 2, window_size=4, shift_size=1, partition="grid", rngs=rngs)
    with pytest.raises(ValueError, match=r"partition must be one of \('window', 'grid'\), got 'blocks'"):
        WindowAttention(8, 2, partition="blocks", rngs=rngs)
    with pytest.raises(ValueError, match=r"window_size must be an int or a \(height, width\) pair"):
        WindowAttention(8, 2, window_size=(2, 2, 2), rngs=rngs)
    with pytest.raises(ValueError, match=r"window_size\[1\] must be an int >= 1, got 0"):
        WindowAttention(8, 2, window_size=(2, 0), rngs=rngs)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide dim \(8\)"):
        WindowAttention(8, 3, rngs=rngs)
    with pytest.raises(TypeError, match="rel_pos_bias must be a bool"):
        WindowAttention(8, 2, rel_pos_bias=1, rngs=rngs)
    with pytest.raises(ValueError, match="qk_scale must be a finite positive float"):
        WindowAttention(8, 2, qk_scale=-1.0, rngs=rngs)
    m = build(lambda: WindowAttention(8, 2, window_size=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"WindowAttention: x must have shape \[B,H,W,C\] with last axis 8, got \(1, 4, 8\)"):
        m(jnp.zeros((1, 4, 8)))
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        m(jnp.zeros((1, 4, 4, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"window_partition: H x W = 5 x 4 must be divisible by the window_size \(2, 2\)"):
        window_partition(jnp.zeros((1, 5, 4, 1)), 2)
    with pytest.raises(ValueError, match=r"grid_reverse: windows must have shape \[B, 4, 4, ...\]"):
        grid_reverse(jnp.zeros((1, 3, 4, 1)), 2, (4, 4))
