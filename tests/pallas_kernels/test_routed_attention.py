"""pk routed_attention (BiFormer's routed block-sparse attention): every impl against float64.

The reference is checked against an independent numpy loop (per image, query region and head,
an explicit softmax over the concatenated routed key regions); xla and the Pallas kernels (TPU
kernels in the TPU interpreter, GPU kernels in the generic interpreter) are checked against the
reference in float64, outputs and the gradients of q, k and v.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.pallas_kernels import testing
from attnzoo.pallas_kernels.attention import routed_attention
from attnzoo.pallas_kernels.attention import routed_pallas


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    num_q: int  # query regions R
    num_kv: int  # key regions Rk
    q_region: int
    kv_region: int
    topk: int
    head_dim: int = 5
    v_dim: int = 7
    seed: int = 0
    same_route: int | None = None  # every route on this key region (the worst case of the lists)

    def __str__(self):
        return (f"B{self.batch}H{self.heads}R{self.num_q}x{self.q_region}"
                f"_Rk{self.num_kv}x{self.kv_region}_top{self.topk}_s{self.seed}"
                + ("" if self.same_route is None else f"_all{self.same_route}"))

    def inputs(self, dtype=jnp.float32):
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((self.batch, self.num_q * self.q_region, self.heads, self.head_dim))
        k = rng.standard_normal((self.batch, self.num_kv * self.kv_region, self.heads, self.head_dim))
        v = rng.standard_normal((self.batch, self.num_kv * self.kv_region, self.heads, self.v_dim))
        routes = rng.integers(0, self.num_kv, (self.batch, self.num_q, self.topk))
        routes[0, 0, -1] = routes[0, 0, 0]  # always at least one repeated route
        if self.same_route is not None:
            routes[...] = self.same_route
        q, k, v = (jnp.asarray(x, jnp.float32).astype(dtype) for x in (q, k, v))
        return q, k, v, jnp.asarray(routes, jnp.int32)


# Odd region sizes (q_region 3, kv_region 5: padded to kernel blocks), topk 1..3, R 4..7, H 1..3.
CASES = [
    Case(2, 2, 5, 6, 3, 5, 3, seed=0),
    Case(1, 3, 4, 7, 3, 5, 2, seed=1),
    Case(2, 1, 7, 4, 3, 5, 1, seed=2),
    Case(1, 2, 4, 5, 8, 8, 2, head_dim=8, v_dim=8, seed=3),  # regions = blocks: FULL tiles
]
# The interpreted kernels are slow: two small cases for them, padded regions (PARTIAL tiles) with
# random routes, and unpadded regions (FULL tiles) with every route on one key region (each query
# region lists it twice: the longest transposed tile list there is).
KERNEL_CASES = [
    Case(1, 2, 4, 5, 3, 5, 2, seed=5),
    Case(1, 1, 3, 4, 8, 8, 2, head_dim=8, v_dim=8, seed=6, same_route=2),
]
# xla: the padded multi-head case, the unpadded case and topk 1 (bfloat16 below).
XLA_CASES = [CASES[0], CASES[2], CASES[3]]


def numpy_loop(q, k, v, routes, q_region, kv_region, scale=None):
    """Independent float64 oracle: explicit loops and softmax, routed keys concatenated."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    routes = np.asarray(routes)
    batch, q_len, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    for b in range(batch):
        for r in range(q_len // q_region):
            keys = np.concatenate([np.arange(j * kv_region, (j + 1) * kv_region) for j in routes[b, r]])
            rows = slice(r * q_region, (r + 1) * q_region)
            for h in range(heads):
                logits = q[b, rows, h] @ k[b, keys, h].T * scale
                weights = np.exp(logits - logits.max(axis=1, keepdims=True))
                weights /= weights.sum(axis=1, keepdims=True)
                out[b, rows, h] = weights @ v[b, keys, h]
    return out


def _fn(case: Case, impl: str, routes, **extra):
    return lambda q, k, v: routed_attention(
        q, k, v, routes, q_region=case.q_region, kv_region=case.kv_region, impl=impl, **extra
    )


def _kernel_fn(case: Case, platform: str, routes):
    run = routed_pallas.gpu_routed_attention if platform == "gpu" else routed_pallas.tpu_routed_attention
    return lambda q, k, v: run(
        q, k, v, routes, q_region=case.q_region, kv_region=case.kv_region,
        scale=case.head_dim**-0.5, interpret=True,
    )


def _check_against_reference(f, case: Case, dtype=jnp.float32):
    q, k, v, routes = case.inputs(dtype)
    out = f(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape[:3] + (case.v_dim,)
    with testing.float64():
        q64, k64, v64 = testing.to_float64((q, k, v))
        ref = np.asarray(_fn(case, "reference", routes)(q64, k64, v64))
    testing.assert_close(out, ref, "out", dtype=dtype)
    testing.assert_grads_close(
        f, _fn(case, "reference", routes), [q, k, v], argnums=(0, 1, 2), dtype=dtype,
        names=("q", "k", "v"), key=jax.random.PRNGKey(case.seed),
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_numpy_loop(case):
    q, k, v, routes = case.inputs()
    with testing.float64():
        q64, k64, v64 = testing.to_float64((q, k, v))
        out = routed_attention(q64, k64, v64, routes, q_region=case.q_region, kv_region=case.kv_region, impl="reference")
        assert out.dtype == jnp.float64
    testing.assert_close(out, numpy_loop(q64, k64, v64, routes, case.q_region, case.kv_region), "out", dtype=jnp.float64)


def test_reference_scale_argument():
    case = CASES[1]
    q, k, v, routes = case.inputs()
    with testing.float64():
        q64, k64, v64 = testing.to_float64((q, k, v))
        out = _fn(case, "reference", routes, scale=0.37)(q64, k64, v64)
    testing.assert_close(out, numpy_loop(q64, k64, v64, routes, case.q_region, case.kv_region, 0.37), "out", dtype=jnp.float64)


@pytest.mark.parametrize("case", XLA_CASES, ids=str)
def test_xla_float32(case):
    q, k, v, routes = case.inputs()
    _check_against_reference(_fn(case, "xla", routes), case)


def test_xla_bfloat16():
    case = CASES[1]
    _check_against_reference(_fn(case, "xla", case.inputs()[3]), case, dtype=jnp.bfloat16)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_pallas_kernels_interpreted(case, platform):
    routes = case.inputs()[3]
    _check_against_reference(_kernel_fn(case, platform, routes), case)


def test_pallas_public_entry_point_in_image_chunks(monkeypatch):
    """impl="pallas" on CPU (interpret=None) runs the TPU kernels in the interpreter; batches whose
    routes exceed the SMEM budget run one chunk of images per kernel launch (here one image).
    (Each chunk is the custom-VJP kernel call whose gradients the tests above check.)"""
    case = Case(2, 1, 3, 4, 3, 5, 1, seed=7)
    monkeypatch.setattr(routed_pallas, "TPU_SMEM_ROUTES", case.num_q * case.topk)
    q, k, v, routes = case.inputs()
    f = _fn(case, "pallas", routes)
    text = testing.lowered_text(f, q, k, v, platform="tpu")
    assert text.count("tpu_custom_call") == case.batch  # one forward kernel per image
    testing.assert_close(f(q, k, v), numpy_loop(q, k, v, routes, case.q_region, case.kv_region), "out", dtype=jnp.float32)


def test_repeated_route_counts_twice():
    """A route listed twice puts its keys twice into the softmax, like the official gather."""
    case = Case(1, 1, 2, 3, 3, 4, 3)
    q, k, v, _ = case.inputs()
    twice = jnp.asarray([[[1, 1, 2], [0, 2, 0]]], jnp.int32)
    expected = numpy_loop(q, k, v, twice, case.q_region, case.kv_region)
    for impl in ("reference", "xla"):
        testing.assert_close(_fn(case, impl, twice)(q, k, v), expected, impl, dtype=jnp.float32)
    # The repeated region weighs double: listing it once gives another output in every region.
    once = numpy_loop(q, k, v, jnp.asarray([[[1, 2], [0, 2]]]), case.q_region, case.kv_region)
    assert np.abs(expected - once).reshape(2, -1).max(axis=1).min() > 1e-3


def test_route_order_does_not_matter():
    case = CASES[0]
    q, k, v, routes = case.inputs()
    permuted = routes[:, :, ::-1]
    for impl in ("reference", "xla"):
        a = _fn(case, impl, routes)(q, k, v)
        b = _fn(case, impl, permuted)(q, k, v)
        testing.assert_close(b, a, impl, dtype=jnp.float32)


def test_changing_one_route_changes_only_its_region():
    """The check can fail: a different route gives a different output for that region only."""
    case = CASES[2]
    q, k, v, routes = case.inputs()
    changed = routes.at[1, 3, 0].set((routes[1, 3, 0] + 1) % case.num_kv)
    for impl in ("reference", "xla"):
        a = np.asarray(_fn(case, impl, routes)(q, k, v))
        b = np.asarray(_fn(case, impl, changed)(q, k, v))
        rows = slice(3 * case.q_region, 4 * case.q_region)
        assert np.abs(a[1, rows] - b[1, rows]).min() > 1e-6
        untouched = np.ones(a.shape[:2], bool)
        untouched[1, rows] = False
        np.testing.assert_array_equal(a[untouched], b[untouched])
        with pytest.raises(AssertionError, match="relative RMS error"):
            testing.assert_close(b, a, impl, dtype=jnp.float32)


def test_out_of_range_routes():
    """Concrete out-of-range routes are rejected; under jit they are clamped in every impl."""
    case = CASES[2]
    q, k, v, routes = case.inputs()
    bad = routes.at[0, 1, 0].set(case.num_kv + 3).at[1, 2, 0].set(-2)
    with pytest.raises(ValueError, match=r"routes must be key region indices in \[0, 3\].*got values in \[-2, 7\]"):
        routed_attention(q, k, v, bad, q_region=case.q_region, kv_region=case.kv_region)
    clamped = jnp.clip(bad, 0, case.num_kv - 1)
    expected = numpy_loop(q, k, v, clamped, case.q_region, case.kv_region)
    for impl in ("reference", "xla"):
        out = jax.jit(lambda r, impl=impl: _fn(case, impl, r)(q, k, v))(bad)
        testing.assert_close(out, expected, impl, dtype=jnp.float32)


Q = jnp.zeros((2, 12, 2, 8))
K = jnp.zeros((2, 10, 2, 8))
V = jnp.zeros((2, 10, 2, 6))
ROUTES = jnp.zeros((2, 4, 2), jnp.int32)

BAD_CALLS = [
    ("q rank", dict(q=jnp.zeros((12, 2, 8))), ValueError, r"q must have rank 4 \[B,Tq,H,D\], got shape \(12, 2, 8\)"),
    ("q dtype", dict(q=jnp.zeros((2, 12, 2, 8), jnp.int32)), TypeError, r"q must have a floating dtype, got int32"),
    ("k heads", dict(k=jnp.zeros((2, 10, 3, 8))), ValueError, r"k must have shape \(2, \*, 2, 8\).*got \(2, 10, 3, 8\)"),
    ("v length", dict(v=jnp.zeros((2, 9, 2, 6))), ValueError, r"v must have shape \(2, 10, 2, \*\)"),
    ("mixed dtypes", dict(k=jnp.zeros((2, 10, 2, 8), jnp.bfloat16)), TypeError, r"q, k and v must share a dtype"),
    ("q_region value", dict(q_region=0), ValueError, r"q_region must be an int >= 1, got 0"),
    ("q_region type", dict(q_region=3.0), ValueError, r"q_region must be an int >= 1, got 3.0"),
    ("q_region divides", dict(q_region=5), ValueError, r"q_region \(5\) must divide the query length Tq=12"),
    ("kv_region divides", dict(kv_region=4), ValueError, r"kv_region \(4\) must divide the key length Tk=10"),
    ("routes dtype", dict(routes=jnp.zeros((2, 4, 2))), TypeError, r"routes must have an integer dtype, got float32"),
    ("routes rank", dict(routes=jnp.zeros((2, 4), jnp.int32)), ValueError, r"routes must have rank 3"),
    ("routes regions", dict(routes=jnp.zeros((2, 3, 2), jnp.int32)), ValueError, r"routes must have shape \(2, 4, \*\) \[B,Tq//q_region,topk\] = \[2,4,topk\], got \(2, 3, 2\)"),
    ("routes topk", dict(routes=jnp.zeros((2, 4, 0), jnp.int32)), ValueError, r"routes must have topk >= 1 routes per query region, got shape \(2, 4, 0\)"),
    ("routes range", dict(routes=ROUTES.at[0, 0, 0].set(5)), ValueError, r"routes must be key region indices in \[0, 1\]"),
    ("routes not array", dict(routes=[[0]]), TypeError, r"routes must be an array, got list"),
    ("scale", dict(scale="0.1"), TypeError, r"scale must be a float or None, got str"),
    ("impl", dict(impl="triton"), ValueError, r"impl must be one of .*got 'triton'"),
    ("interpret", dict(interpret="yes"), TypeError, r"interpret must be None, a bool or pltpu.InterpretParams"),
]


@pytest.mark.parametrize("label,overrides,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments(label, overrides, error, message):
    args = dict(q=Q, k=K, v=V, routes=ROUTES, q_region=3, kv_region=5)
    args.update(overrides)
    q, k, v, routes = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("routes")
    with pytest.raises(error, match=r"^routed_attention: " + message):
        routed_attention(q, k, v, routes, **args)


# BiFormer-like region sizes: 49-token query regions (7x7, padded to 56 / 64 rows) against 4-token
# key regions (padded to 8 / 16 rows, PARTIAL tiles) in bfloat16, with tile lists whose lengths
# are not powers of two, and 16-token regions on both sides (FULL tiles) in float32.
LOWERING_CASES = [
    ("q49_kv4_bf16", (2, 147, 2, 32), (2, 36, 2, 32), 49, 4, 3, jnp.bfloat16),
    ("q16_kv16_f32", (1, 64, 2, 64), (1, 64, 2, 64), 16, 16, 2, jnp.float32),
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c[0])
def test_kernels_lower(case, platform):
    _, q_shape, k_shape, q_region, kv_region, topk, dtype = case
    q = jnp.zeros(q_shape, dtype)
    k = jnp.zeros(k_shape, dtype)
    routes = jnp.zeros((q_shape[0], q_shape[1] // q_region, topk), jnp.int32)

    def f(q, k, v, routes):
        return routed_attention(q, k, v, routes, q_region=q_region, kv_region=kv_region, impl="pallas")

    testing.assert_lowers(f, q, k, k, routes, platforms=(platform,), backward=True, argnums=(0, 1, 2))
