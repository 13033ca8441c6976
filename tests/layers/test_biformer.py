"""BiFormer's mixers (bi-level routing attention, attention with LePE) against independent float64
numpy implementations written from the paper's formula (tests/layers/biformer_reference.py): odd
sizes with auto_pad, several seeds, routing, gradients of the input and every parameter (away from
routing ties: the routing is piecewise constant), the Pallas kernel in interpret mode, FLOPs, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.biformer import AttentionLePE, BiLevelRoutingAttention
from attnzoo.layers.window import window_partition
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.biformer_reference import numpy_attention_lepe, numpy_bra, numpy_routing
from tests.layers.testing import as_float64, check_gradients, make_mixer
from tests.zoo.helpers import build, fast_jit, traced_matmul_flops


def make(seed=0, **options):
    options = {"dim": 12, "num_heads": 2, **options}
    return make_mixer(options.pop("name", "biformer_routing"), seed, **options)


apply = fast_jit(lambda module, x: module(x))


def random_map(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def routing_margin(affinity, topk):
    """Smallest gap between the topk-th and the next affinity of any query region (inf if all routed)."""
    ordered = -np.sort(-affinity, axis=-1)
    if topk == ordered.shape[-1]:
        return np.inf
    return float(np.min(ordered[..., topk - 1] - ordered[..., topk]))


# (height, width, options): padded odd sizes, divisible sizes, qk_dim != dim, all regions routed, no LePE
BRA_CASES = [
    (7, 10, dict(n_win=3, topk=2, qk_dim=8, auto_pad=True)),
    (6, 9, dict(n_win=3, topk=1, side_dwconv=3)),
    (5, 5, dict(n_win=2, topk=4, auto_pad=True, side_dwconv=0, qkv_bias=False)),
    (9, 4, dict(n_win=2, topk=3, dim=16, num_heads=4, qk_dim=16, auto_pad=True, qk_scale=0.3, out_bias=False)),
]


@pytest.mark.parametrize("height, width, options", BRA_CASES)
def test_bra_matches_numpy_reference(height, width, options):
    m = make(seed=height * width, **options)
    x = random_map(height, (2, height, width, m.dim))
    assert_close(apply(m, jnp.asarray(x, jnp.float32)), numpy_bra(m, x), f"{options}", dtype=jnp.float32)
    with float64():
        x = random_map(height + 1, (1, height, width, m.dim))
        assert_close(apply(as_float64(nnx.clone(m)), jnp.asarray(x)), numpy_bra(m, x), f"{options} float64",
                     dtype=jnp.float64)


def test_routes_are_the_top_regions_of_the_region_means():
    with float64():
        m = as_float64(make(seed=1, n_win=3, topk=3, auto_pad=True))
        assert m.scale == 12**-0.5  # the official qk_dim ** -0.5 (all heads' width), not head_dim ** -0.5
        x = random_map(2, (2, 8, 7, 12))
        padded = jnp.pad(jnp.asarray(x), ((0, 0), (0, 1), (0, 2), (0, 0)))
        qk = m.qk(padded)
        q, k = (window_partition(qk[..., i, :, :], (3, 3)) for i in (0, 1))
        routes = np.asarray(m.routes(q, k))
        affinity, expected = numpy_routing(m, np.asarray(qk[..., 0, :, :]), np.asarray(qk[..., 1, :, :]), 3)
        assert routing_margin(affinity, 3) > 1e-6
        np.testing.assert_array_equal(np.sort(routes, -1), np.sort(expected, -1))
        assert routes.dtype == np.int32 and routes.shape == (2, 9, 3)


def test_routing_changes_the_result():
    """The layer is not plain window attention or full attention: fewer routed regions differ."""
    x = jnp.asarray(random_map(3, (1, 6, 6, 12)), jnp.float32)
    one = make(seed=4, n_win=3, topk=1)
    everything = make(seed=4, n_win=3, topk=9)
    assert rel_rms(apply(one, x), apply(everything, x)) > 0.05
    # the reference with all regions routed is the same as the layer with all routed
    assert_close(apply(everything, x), numpy_bra(everything, np.asarray(x)), "topk 9", dtype=jnp.float32)


@pytest.mark.parametrize("height, width, options", [(5, 7, dict(dim=16, num_heads=2)),
                                                    (4, 4, dict(dim=12, num_heads=3, side_dwconv=3, qkv_bias=True))])
def test_attention_lepe_matches_numpy_reference(height, width, options):
    m = make(seed=height + width, name="attention_lepe", **options)
    x = random_map(5, (2, height, width, m.dim))
    assert_close(apply(m, jnp.asarray(x, jnp.float32)), numpy_attention_lepe(m, x), f"{options}", dtype=jnp.float32)
    with float64():
        x = random_map(6, (1, height, width, m.dim))
        assert_close(apply(as_float64(nnx.clone(m)), jnp.asarray(x)), numpy_attention_lepe(m, x),
                     f"{options} float64", dtype=jnp.float64)


def _check_gradients(m, x, reference, expected_params):
    """Directional derivatives of ``sum(y * cotangent)`` along a random direction of each parameter
    (and of x): jax in float64 vs central differences of the numpy reference."""
    cotangent = np.random.default_rng(5).normal(size=reference(m, x).shape)
    checked = check_gradients(m, x, cotangent, reference, np.random.default_rng(6))
    assert sorted(checked) == sorted(expected_params)


def test_bra_gradients_of_every_parameter_and_the_input():
    with float64():
        m = as_float64(make(seed=7, n_win=2, topk=2, qk_dim=8, auto_pad=True))
        x = random_map(8, (1, 5, 3, 12))
        _, affinity, _ = numpy_bra(m, x, return_routing=True)
        # finite differences of step 1e-5 cannot flip a route with this margin
        assert routing_margin(affinity, 2) > 1e-3
        _check_gradients(m, x, numpy_bra, ["qk.kernel", "qk.bias", "v.kernel", "v.bias", "proj.kernel", "proj.bias",
                                           "lepe.kernel", "lepe.bias"])


def test_attention_lepe_gradients_of_every_parameter_and_the_input():
    with float64():
        m = as_float64(make(seed=9, name="attention_lepe", dim=8, num_heads=2, side_dwconv=3))
        x = random_map(10, (1, 3, 4, 8))
        _check_gradients(m, x, numpy_attention_lepe, ["qkv.kernel", "proj.kernel", "proj.bias", "lepe.kernel",
                                                      "lepe.bias"])


def test_pallas_kernel_in_interpret_mode_matches_xla():
    options = dict(dim=8, num_heads=2, n_win=2, topk=2, auto_pad=True)
    xla = make(seed=11, kernel="xla", **options)
    pallas = make(seed=11, kernel="pallas", interpret=True, **options)
    x = jnp.asarray(random_map(12, (1, 5, 6, 8)), jnp.float32)
    cotangent = jnp.asarray(random_map(13, (1, 5, 6, 8)), jnp.float32)

    def value_and_grads(module, x):
        return nnx.value_and_grad(lambda model, x: jnp.sum(model(x) * cotangent), argnums=(0, 1))(module, x)

    run = fast_jit(value_and_grads)
    (value_x, (grads_x, dx_x)), (value_p, (grads_p, dx_p)) = run(xla, x), run(pallas, x)
    assert_close(value_p, value_x, "loss", dtype=jnp.float32)
    assert_close(dx_p, dx_x, "dx", dtype=jnp.float32)
    jax.tree.map(lambda a, b: assert_close(a, b, "param grad", dtype=jnp.float32), grads_p, grads_x)


def test_flops_count_every_matmul_and_the_lepe():
    m = make(n_win=3, topk=2, qk_dim=8, auto_pad=True)
    x = jnp.zeros((1, 7, 8, 12))
    lepe = 2 * 9 * 9 * 25 * 12  # padded 9 x 9 map, 5 x 5 depthwise
    assert m.flops(7, 8) == traced_matmul_flops(m, x) + lepe
    full = make(name="attention_lepe", dim=16, num_heads=2)
    assert full.flops(3, 5) == traced_matmul_flops(full, jnp.zeros((1, 3, 5, 16))) + 2 * 15 * 25 * 16


def test_bfloat16_and_logical_axes():
    m = make(n_win=2, topk=2, auto_pad=True, dtype=jnp.bfloat16)
    x = random_map(14, (2, 5, 6, 12))
    y = apply(m, jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert rel_rms(y, numpy_bra(m, x)) < 3e-2
    specs = {
        ".".join(map(str, path)): variable.get_metadata().get("out_sharding")
        for path, variable in nnx.iter_graph(m)
        if isinstance(variable, nnx.Param)
    }
    assert specs == {
        "qk.kernel": ("embed", None, "heads", "head_dim"),
        "qk.bias": (None, "heads", "head_dim"),
        "v.kernel": ("embed", "heads", "head_dim"),
        "v.bias": ("heads", "head_dim"),
        "proj.kernel": ("heads", "head_dim", "embed"),
        "proj.bias": ("embed",),
        "lepe.kernel": (None, None, None, "embed"),
        "lepe.bias": ("embed",),
    }
    assert layers.get_mixer_class("biformer_routing").spatial_ndim == 2
    assert layers.get_mixer_class("attention_lepe") is AttentionLePE


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"BiLevelRoutingAttention: topk \(10\) must be at most the number of regions"):
        BiLevelRoutingAttention(8, 2, n_win=3, topk=10, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide dim \(12\) and qk_dim \(8\)"):
        BiLevelRoutingAttention(12, 3, qk_dim=8, rngs=rngs)
    with pytest.raises(ValueError, match=r"kv_downsample_mode must be one of \('identity',\), got 'ada_avgpool'"):
        BiLevelRoutingAttention(8, 2, kv_downsample_mode="ada_avgpool", rngs=rngs)
    with pytest.raises(ValueError, match=r"side_dwconv must be 0 \(no LePE\) or odd"):
        BiLevelRoutingAttention(8, 2, side_dwconv=4, rngs=rngs)
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'reference', 'xla', 'pallas'\), got 'cuda'"):
        BiLevelRoutingAttention(8, 2, kernel="cuda", rngs=rngs)
    with pytest.raises(ValueError, match=r"n_win must be an int >= 1, got 0"):
        BiLevelRoutingAttention(8, 2, n_win=0, rngs=rngs)
    with pytest.raises(TypeError, match="auto_pad must be a bool"):
        BiLevelRoutingAttention(8, 2, auto_pad=1, rngs=rngs)
    with pytest.raises(ValueError, match="qk_scale must be a finite positive float"):
        BiLevelRoutingAttention(8, 2, qk_scale=-1.0, rngs=rngs)
    with pytest.raises(ValueError, match=r"AttentionLePE: num_heads \(3\) must divide dim \(8\)"):
        AttentionLePE(8, 3, rngs=rngs)
    m = build(lambda: BiLevelRoutingAttention(8, 2, n_win=2, topk=1, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"H x W = 5 x 4 must be divisible by n_win \(2\); pass auto_pad=True"):
        m(jnp.zeros((1, 5, 4, 8)))
    with pytest.raises(ValueError, match=r"x must have shape \[B,H,W,C\] with last axis 8, got \(1, 4, 8\)"):
        m(jnp.zeros((1, 4, 8)))
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        m(jnp.zeros((1, 4, 4, 8), jnp.int32))
