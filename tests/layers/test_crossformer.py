"""CrossFormer's LSDA (SDA / LDA with the dynamic position bias) and cross-scale embedding against an
independent float64 numpy implementation written from the official code's semantics
(tests/layers/crossformer_reference.py): padded odd sizes, rectangular maps, the small-map rule,
both DPB branches, gradients of every parameter and the input, and argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.crossformer import CrossFormerAttention, CrossScaleEmbedding, cel_channels, relative_offsets
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.crossformer_reference import lsda_groups, numpy_cel, numpy_lsda
from tests.layers.testing import as_float64, check_gradients, make_mixer, random_map
from tests.zoo.helpers import build, fast_jit


def make(seed=0, **options):
    options = {"dim": 32, "num_heads": 2, **options}
    return make_mixer("crossformer_lsda", seed, **options)


def make_cel(seed=0, **options):
    return build(lambda: CrossScaleEmbedding(rngs=nnx.Rngs(seed), **options), seed=seed, scale=0.5)


apply = fast_jit(lambda module, x: module(x))


# (height, width, options): dividing and padded sizes, both modes, the small-map rule. Compared in
# float64 (seed = H * W); the float32 path is compared in the masking test and, in bfloat16, below.
CASES = [
    (6, 6, dict(group_size=3, mode="sda")),
    (6, 6, dict(group_size=3, interval=2, mode="lda")),  # one region: a strided 3 x 3 grid
    (7, 10, dict(group_size=3, interval=2, mode="lda", dpb_residual=True)),  # padded to 12 x 12: 2 x 2 regions
    (9, 5, dict(group_size=4, mode="sda", qkv_bias=False, dim=24, num_heads=3)),  # rectangular, padded
    (11, 8, dict(group_size=2, interval=3, mode="lda", dpb_dim=3)),  # padded rows only to 12
    (4, 9, dict(group_size=5, interval=2, mode="lda")),  # min(H, W) <= G: SDA with G = 4, padded to 12
    (5, 7, dict(group_size=3, interval=2, mode="lda", shrink_group=False, position_bias=False, qk_scale=0.3)),
]


@pytest.mark.parametrize("height, width, options", CASES)
def test_lsda_matches_numpy_reference(height, width, options):
    m = make(seed=height * width, **options)
    with float64():
        x = np.random.default_rng(height + width).normal(size=(2, height, width, m.dim))
        y = apply(as_float64(nnx.clone(m)), jnp.asarray(x))
        assert_close(y, numpy_lsda(m, x), f"{options} float64", dtype=jnp.float64)


def test_groups_follow_the_official_layout_and_the_modes_differ():
    # LDA at 14 x 14 with G 7, I 2: one region; group (a, b) holds tokens (2 i + a, 2 j + b).
    groups, padded, group = lsda_groups(14, 14, "lda", 7, 2)
    assert padded == (14, 14) and group == 7 and len(groups) == 4
    assert groups[1][:3] == [(0, 1), (0, 3), (0, 5)] and groups[2][7] == (3, 0)
    m = make(group_size=3, interval=2, mode="lda")
    assert m.layout(7, 10) == ("lda", 3, 2, (12, 12)) and m.layout(3, 10) == ("sda", 3, 1, (3, 12))
    x = random_map(0, (1, 6, 6, 32))
    sda = nnx.clone(m)
    sda.mode = "sda"
    assert rel_rms(apply(m, x), apply(sda, x)) > 0.1
    # the DPB matters: without it (same weights) the output moves far beyond the float32 tolerance (2e-5)
    plain = nnx.clone(m)
    plain.pos = None
    assert rel_rms(apply(m, x), apply(plain, x)) > 1e-3
    # padded keys are masked: attending the zero-padded 12 x 12 map (no padding, so no mask) differs
    x = random_map(1, (1, 7, 10, 32))
    unmasked = apply(m, jnp.pad(x, ((0, 0), (0, 5), (0, 2), (0, 0))))[:, :7, :10]
    assert rel_rms(apply(m, x), unmasked) > 0.05
    assert_close(apply(m, x), numpy_lsda(m, x), "masked", dtype=jnp.float32)


def test_relative_offsets_and_channel_split():
    offsets, index = relative_offsets((2, 3))
    assert offsets.shape == (15, 2) and index.shape == (6, 6)
    # query (1, 2), key (0, 0): offset (1, 2)
    np.testing.assert_array_equal(offsets[index[5, 0]], [1.0, 2.0])
    np.testing.assert_array_equal(offsets[index[0, 5]], [-1.0, -2.0])
    assert cel_channels(64, 4) == (32, 16, 8, 8) and cel_channels(192, 2) == (96, 96)
    assert cel_channels(96, 4) == (48, 24, 12, 12)


CEL_CASES = [
    dict(in_features=3, out_features=16, kernel_sizes=(4, 8, 16), stride=4, norm="after", image=(2, 13, 18)),
    dict(in_features=8, out_features=16, kernel_sizes=(2, 4), stride=2, norm="before", image=(2, 7, 6)),
    dict(in_features=5, out_features=12, kernel_sizes=(3, 5), stride=1, norm="none", image=(1, 4, 5)),
]


@pytest.mark.parametrize("case", CEL_CASES)
def test_cel_matches_numpy_reference(case):
    case = dict(case)
    batch, height, width = case.pop("image")
    cel = make_cel(seed=height, **case)
    x = random_map(height, (batch, height, width, cel.in_features))
    y = apply(cel, x)
    assert y.shape == (batch, height // cel.stride, width // cel.stride, cel.out_features)
    assert_close(y, numpy_cel(cel, x), f"{case}", dtype=jnp.float32)  # float64 gradients: see below


def _check_gradients(m, x, reference, expected_params):
    """Directional derivatives of ``sum(y * cotangent)`` along a random direction of each parameter
    (and of x), by jax in float64 vs central differences of the numpy reference."""
    cotangent = np.random.default_rng(5).normal(size=reference(m, x).shape)
    checked = check_gradients(m, x, cotangent, reference, np.random.default_rng(6))
    assert len(checked) == expected_params, checked


@pytest.mark.parametrize("options", [dict(mode="lda", interval=2), dict(mode="sda", dpb_residual=True)])
def test_lsda_gradients_of_every_parameter_and_the_input(options):
    with float64():
        m = as_float64(make(seed=3, dim=16, dpb_dim=4, group_size=3, **options))
        x = np.random.default_rng(4).normal(size=(1, 5, 7, 16))
        # qkv, proj, pos_proj, fc1-3 (kernel + bias each) and norm1-3 (scale + bias)
        _check_gradients(m, x, numpy_lsda, expected_params=18)


def test_cel_gradients_of_every_parameter_and_the_input():
    with float64():
        cel = as_float64(make_cel(seed=4, in_features=3, out_features=8, kernel_sizes=(2, 4), stride=2, norm="before"))
        x = np.random.default_rng(7).normal(size=(1, 5, 6, 3))
        _check_gradients(cel, x, numpy_cel, expected_params=6)


def test_jit_bfloat16_and_logical_axes():
    m = make(group_size=3, interval=2, mode="lda", dtype=jnp.bfloat16)
    x = random_map(7, (2, 7, 10, 32))
    y = apply(m, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert rel_rms(y, numpy_lsda(m, x)) < 2e-2
    specs = {
        ".".join(map(str, path)): variable.get_metadata().get("out_sharding")
        for path, variable in nnx.iter_graph(m)
        if isinstance(variable, nnx.Param)
    }
    assert specs["qkv.kernel"] == ("embed", None, "heads", "head_dim")
    assert specs["proj.kernel"] == ("heads", "head_dim", "embed")
    assert specs["pos.fc3.kernel"] == (None, "heads")
    assert len(specs) == 18
    assert layers.get_mixer_class("crossformer_lsda").spatial_ndim == 2
    assert m.flops(7, 10) > m.flops(6, 6)


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"CrossFormerAttention: mode must be one of \('sda', 'lda'\), got 'long'"):
        CrossFormerAttention(32, 2, mode="long", rngs=rngs)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide dim \(32\)"):
        CrossFormerAttention(32, 3, rngs=rngs)
    with pytest.raises(ValueError, match=r"interval must be an int >= 1, got 0"):
        CrossFormerAttention(32, 2, interval=0, rngs=rngs)
    with pytest.raises(ValueError, match=r"default dpb_dim = dim // 16 is 0 for dim 8; pass dpb_dim"):
        CrossFormerAttention(8, 2, rngs=rngs)
    with pytest.raises(TypeError, match="dpb_residual must be a bool"):
        CrossFormerAttention(32, 2, dpb_residual=1, rngs=rngs)
    m = make()
    with pytest.raises(ValueError, match=r"CrossFormerAttention: x must have shape \[B,H,W,C\] with last axis 32, got \(1, 4, 8\)"):
        m(jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match=r"kernel_sizes\[1\] = 3 must be >= stride \(2\) with k - stride even"):
        CrossScaleEmbedding(3, 8, kernel_sizes=(2, 3), stride=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"kernel_sizes must be strictly increasing"):
        CrossScaleEmbedding(3, 8, kernel_sizes=(4, 2), stride=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"out_features \(10\) must be divisible by 2\*\*\(num_kernels - 1\) = 4"):
        CrossScaleEmbedding(3, 10, kernel_sizes=(2, 4, 6), stride=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"norm must be one of \('after', 'before', 'none'\)"):
        CrossScaleEmbedding(3, 8, kernel_sizes=(2, 4), stride=2, norm="pre", rngs=rngs)
    cel = make_cel(in_features=3, out_features=8, kernel_sizes=(4, 8), stride=4)
    with pytest.raises(ValueError, match=r"a 3 x 9 map is smaller than the stride 4"):
        cel(jnp.zeros((1, 3, 9, 3)))
