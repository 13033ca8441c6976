"""Twins' LSA and GSA mixers and the PEG against independent float64 numpy implementations
(tests/layers/twins_reference.py): padded and non-dividing sizes, sr_ratio 1 and > 1, rectangular
windows and strides, gradients of every parameter and the input, dtypes, logical axes, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.twins import GlobalSubsampledAttention, LocallyGroupedAttention, PositionalEncodingGenerator
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.testing import as_float64, check_gradients, make_mixer, parameters
from tests.layers.twins_reference import numpy_global_subsampled, numpy_locally_grouped, numpy_peg
from tests.zoo.helpers import build, fast_jit

LSA, GSA = "twins_locally_grouped", "twins_global_subsampled"
REFERENCES = {LSA: numpy_locally_grouped, GSA: numpy_global_subsampled}


def make(name, seed=0, **options):
    options = {"dim": 12, "num_heads": 3, **options}
    return make_mixer(name, seed, **options)


apply = fast_jit(lambda module, x: module(x))


# (mixer, height, width, options): dividing and padded windows, sub-sampling that drops rows and
# columns, rectangular windows and strides, sr_ratio 1, maps no larger than the window / stride.
CASES = [
    (LSA, 8, 8, dict(window_size=4)),
    (LSA, 7, 10, dict(window_size=3)),  # padded in both axes
    (LSA, 5, 7, dict(window_size=(3, 4), qkv_bias=False, out_bias=False)),
    (LSA, 2, 3, dict(window_size=4, dim=10, num_heads=2, head_dim=3)),  # map smaller than the window
    (GSA, 8, 8, dict(sr_ratio=2)),
    (GSA, 9, 7, dict(sr_ratio=2)),  # the last row and column are dropped by the strided conv
    (GSA, 7, 10, dict(sr_ratio=(3, 2), qkv_bias=False, qk_scale=0.3)),
    (GSA, 5, 6, dict(sr_ratio=1)),  # global attention over all tokens
    (GSA, 4, 5, dict(sr_ratio=4, dim=8, num_heads=2, head_dim=5)),  # one key
]


@pytest.mark.parametrize("name, height, width, options", CASES)
def test_matches_numpy(name, height, width, options):
    m = make(name, seed=height * width, **options)
    x = jnp.asarray(np.random.default_rng(height + width).normal(size=(2, height, width, m.dim)), jnp.float32)
    assert_close(apply(m, x), REFERENCES[name](m, x), f"{name} {options}", dtype=jnp.float32)
    with float64():
        x = np.random.default_rng(1).normal(size=(1, height, width, m.dim))
        y = apply(as_float64(nnx.clone(m)), jnp.asarray(x))
        assert_close(y, REFERENCES[name](m, x), f"{name} {options} float64", dtype=jnp.float64)


def test_peg_matches_numpy():
    peg = build(lambda: PositionalEncodingGenerator(6, rngs=nnx.Rngs(0)), scale=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 6)), jnp.float32)
    assert_close(apply(peg, x), numpy_peg(peg, x), "peg", dtype=jnp.float32)
    wide = build(lambda: PositionalEncodingGenerator(4, kernel_size=5, rngs=nnx.Rngs(0)), scale=0.5)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 6, 4)), jnp.float32)
    assert_close(apply(wide, x), numpy_peg(wide, x), "peg k=5", dtype=jnp.float32)


def test_the_reference_can_tell_the_mixers_apart():
    """Sub-sampling and windows change the result: the assertions above can fail."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 12)), jnp.float32)
    lsa = make(LSA, window_size=4)
    assert rel_rms(apply(lsa, x), numpy_locally_grouped(make(LSA, window_size=(4, 2)), x)) > 0.1
    gsa = make(GSA, sr_ratio=2)
    swapped = nnx.clone(gsa)
    swapped.sr.kernel.set_value(jnp.transpose(gsa.sr.kernel.get_value(), (1, 0, 2, 3)))
    assert rel_rms(apply(gsa, x), numpy_global_subsampled(swapped, x)) > 0.05


# (module factory, map size, number of parameters): padded LSA, non-dividing GSA, global GSA, PEG
GRADIENT_CASES = [
    (lambda: LocallyGroupedAttention(12, 3, window_size=3, rngs=nnx.Rngs(0)), (5, 7), numpy_locally_grouped, 4),
    (lambda: GlobalSubsampledAttention(12, 3, sr_ratio=2, rngs=nnx.Rngs(0)), (5, 7), numpy_global_subsampled, 10),
    (lambda: GlobalSubsampledAttention(12, 3, sr_ratio=1, rngs=nnx.Rngs(0)), (3, 4), numpy_global_subsampled, 6),
    (lambda: PositionalEncodingGenerator(5, rngs=nnx.Rngs(0)), (4, 6), numpy_peg, 2),
]


@pytest.mark.parametrize("factory, size, reference, count", GRADIENT_CASES)
def test_gradients_of_every_parameter_and_the_input_match_finite_differences(factory, size, reference, count):
    """Directional derivatives of ``sum(y * cotangent)`` along a random direction of each parameter
    (and of x), by jax in float64 vs central differences of the numpy reference."""
    with float64():
        m = as_float64(build(factory, seed=3, scale=0.5))
        x = np.random.default_rng(4).normal(size=(2, *size, m.dim))
        cotangent = np.random.default_rng(5).normal(size=x.shape)
        checked = check_gradients(m, x, cotangent, reference, np.random.default_rng(6))
        assert len(checked) == count, checked


def test_bfloat16_flops_and_logical_axes():
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 8, 8, 12)), jnp.float32)
    for name, options, reference in ((LSA, dict(window_size=4), numpy_locally_grouped),
                                     (GSA, dict(sr_ratio=2), numpy_global_subsampled)):
        m = make(name, dtype=jnp.bfloat16, **options)
        y = apply(m, x)
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape
        assert rel_rms(y, reference(m, x)) < 2e-2
        assert layers.get_mixer_class(name).spatial_ndim == 2
    gsa = make(GSA, sr_ratio=2)
    specs = {".".join(map(str, p)): v.get_metadata().get("out_sharding") for p, v in parameters(gsa)}
    assert specs == {
        "q.kernel": ("embed", "heads", "head_dim"),
        "q.bias": ("heads", "head_dim"),
        "kv.kernel": ("embed", None, "heads", "head_dim"),
        "kv.bias": (None, "heads", "head_dim"),
        "proj.kernel": ("heads", "head_dim", "embed"),
        "proj.bias": ("embed",),
        "sr.kernel": (None, None, None, "embed"),
        "sr.bias": ("embed",),
        "norm.scale": ("norm",),
        "norm.bias": ("norm",),
    }
    lsa = make(LSA, window_size=3)
    assert {".".join(map(str, p)) for p, _ in parameters(lsa)} == {"qkv.kernel", "qkv.bias", "proj.kernel", "proj.bias"}
    # flops: qkv on the 9 x 9 padded map, 9-token windows, projection of the 8 x 8 map (A = D = 12)
    assert lsa.flops(8, 8) == 2 * 81 * 12 * 36 + 4 * 81 * 9 * 12 + 2 * 64 * 12 * 12
    # q, conv (16 keys of 2x2x12x12), kv, attention over 16 keys, projection
    assert gsa.flops(8, 8) == (2 * 64 * 144 + 2 * 16 * 4 * 144 + 2 * 16 * 12 * 24 + 4 * 64 * 16 * 12
                               + 2 * 64 * 144)


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"LocallyGroupedAttention: num_heads \(5\) must divide dim \(12\)"):
        LocallyGroupedAttention(12, 5, rngs=rngs)
    with pytest.raises(ValueError, match=r"window_size\[1\] must be an int >= 1, got 0"):
        LocallyGroupedAttention(12, 3, window_size=(2, 0), rngs=rngs)
    with pytest.raises(ValueError, match=r"window_size must be an int or a \(height, width\) pair"):
        LocallyGroupedAttention(12, 3, window_size=(2, 2, 2), rngs=rngs)
    with pytest.raises(ValueError, match=r"GlobalSubsampledAttention: sr_ratio must be an int >= 1, got 0"):
        GlobalSubsampledAttention(12, 3, sr_ratio=0, rngs=rngs)
    with pytest.raises(TypeError, match="GlobalSubsampledAttention: qkv_bias must be a bool, got int"):
        GlobalSubsampledAttention(12, 3, qkv_bias=1, rngs=rngs)
    with pytest.raises(ValueError, match="qk_scale must be a finite positive float"):
        GlobalSubsampledAttention(12, 3, qk_scale=-1.0, rngs=rngs)
    with pytest.raises(ValueError, match="sr_norm_eps must be a finite positive float"):
        GlobalSubsampledAttention(12, 3, sr_norm_eps=0.0, rngs=rngs)
    with pytest.raises(ValueError, match="PositionalEncodingGenerator: kernel_size must be odd"):
        PositionalEncodingGenerator(4, kernel_size=2, rngs=rngs)
    gsa = build(lambda: GlobalSubsampledAttention(8, 2, sr_ratio=4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"a 3 x 5 map is smaller than sr_ratio \(4, 4\)"):
        gsa(jnp.zeros((1, 3, 5, 8)))
    with pytest.raises(ValueError, match=r"x must have shape \[B,H,W,C\] with last axis 8, got \(1, 4, 8\)"):
        gsa(jnp.zeros((1, 4, 8)))
    lsa = build(lambda: LocallyGroupedAttention(8, 2, window_size=2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="LocallyGroupedAttention: x must have a floating dtype, got int32"):
        lsa(jnp.zeros((1, 4, 4, 8), jnp.int32))
    with pytest.raises(ValueError, match="unknown mixer 'twins_local'"):
        layers.create_mixer("twins_local", dim=8, num_heads=2, rngs=rngs)
