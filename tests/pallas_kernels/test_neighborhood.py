"""pk.neighborhood_attention: NATTEN's semantics checked by hand and against transcriptions of
NATTEN's own mask formulas, then the xla and pallas (interpret) paths against the float64 reference:
1-3 spatial axes, per-axis kernels, dilation (lengths not multiples of it), stride, causal and mixed
causal axes, odd sizes, relative position bias, GQA, gradients of every input, errors."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing
from attnzoo.pallas_kernels.neighborhood import axis_specs
from attnzoo.pallas_kernels.neighborhood import pallas as na_pallas
from attnzoo.pallas_kernels.neighborhood import xla as na_xla
from attnzoo.pallas_kernels.neighborhood.reference import AxisSpec, axis_visibility, dense_visibility
from tests.zoo.helpers import FAST_COMPILE

@pytest.fixture
def x64():
    with testing.float64():
        yield


# ---------------------------------------------------------------------------------------------
# Semantics: NATTEN's formulas, transcribed independently of the implementation
# ---------------------------------------------------------------------------------------------


def natten_flex_visible(xq, xk, n, kernel, dilation, stride, causal):
    """NATTEN 0.20's flex backend mask (``single_dim_tiling_mask``) for one axis, scalar ints:
    window centre clamped into ``[left, n_g - 1 - right]``, keys within left/right of it."""
    iq, ik, gq, gk = xq // dilation, xk // dilation, xq % dilation, xk % dilation
    group_length = n // dilation + 1 - (gq + dilation - n % dilation) // dilation
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    if causal:
        leader = min((iq // stride) * stride + stride - 1, group_length - 1)
        return iq - ik >= 0 and leader - ik < kernel and gq == gk
    leader = min((iq // stride) * stride + stride // 2, group_length - 1)
    centre = min(max(leader, left), group_length - 1 - right)
    return (0 <= centre - ik <= left or 0 <= ik - centre <= right) and gq == gk


def legacy_natten_window(index, length, kernel, dilation):
    """NATTEN <= 0.15 (NAT / DiNAT): keys ``start + t * dilation`` and bias rows ``pb + t`` of a
    query (odd kernel, stride 1, not causal), absolute coordinates (``natten_cpu_commons.h``)."""
    half = kernel // 2
    if dilation == 1:
        start = max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
        pb = half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    elif index - half * dilation < 0:
        start, pb = index % dilation, kernel - 1 - index // dilation
    elif index + half * dilation >= length:
        rem, whole = index % dilation, (length // dilation) * dilation
        extra = length - whole
        start = length - extra + rem - 2 * half * dilation if rem < extra else whole + rem - kernel * dilation
        pb = (length - index - 1) // dilation
    else:
        start, pb = index - half * dilation, half
    return [start + t * dilation for t in range(kernel)], [pb + t for t in range(kernel)]


def random_axis(rng) -> AxisSpec:
    n = int(rng.integers(1, 24))
    dilation = int(rng.integers(1, n + 1)) if rng.random() < 0.5 else 1
    kernel = int(rng.integers(1, n // dilation + 1))
    stride = int(rng.integers(1, kernel + 1))
    return AxisSpec(n, kernel, dilation, stride, bool(rng.random() < 0.4))


def test_reference_windows_match_natten_flex_mask():
    rng = np.random.default_rng(0)
    for _ in range(300):
        axis = random_axis(rng)
        visible, _ = axis_visibility(axis)
        n = axis.length
        expected = np.array(
            [[natten_flex_visible(i, j, n, axis.kernel, axis.dilation, axis.stride, axis.causal) for j in range(n)] for i in range(n)]
        )
        np.testing.assert_array_equal(visible, expected, err_msg=str(axis))
        if not axis.causal:
            assert (visible.sum(1) == axis.kernel).all(), axis  # clamped, never shrunk


def test_reference_windows_and_bias_match_legacy_natten():
    for n, kernel, dilation in itertools.product((7, 10, 13), (1, 3, 5), (1, 2, 3)):
        if kernel * dilation > n:
            continue
        axis = AxisSpec(n, kernel, dilation, 1, False)
        visible, rel = axis_visibility(axis)
        for i in range(n):
            keys, bias_rows = legacy_natten_window(i, n, kernel, dilation)
            assert np.flatnonzero(visible[i]).tolist() == sorted(keys), (axis, i)
            assert [rel[i, j] for j in keys] == bias_rows, (axis, i)


# Worked out by hand: per query, the keys it sees (n = 7).
HAND_WINDOWS = [
    (dict(kernel_size=3), [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]),
    (dict(kernel_size=3, is_causal=True), [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]]),
    # groups {0,2,4,6} and {1,3,5}: the shorter group's window covers all of it
    (dict(kernel_size=3, dilation=2), [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]]),
    # stride 2: pairs share the window of the right-hand centre query (1, 3, 5; 6 for the last)
    (dict(kernel_size=3, stride=2), [[0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4], [4, 5, 6], [4, 5, 6], [4, 5, 6]]),
    # even kernel: two keys left of the query, one right
    (dict(kernel_size=4), [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6]]),
    # causal blocks of 3 (leader = last query of the block), the partial last block looks back
    (dict(kernel_size=3, stride=3, is_causal=True), [[0], [0, 1], [0, 1, 2], [3], [3, 4], [3, 4, 5], [4, 5, 6]]),
]


@pytest.mark.parametrize("options, windows", HAND_WINDOWS, ids=lambda x: str(x) if isinstance(x, dict) else "")
def test_reference_op_matches_hand_worked_windows(options, windows, x64):
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 7, 1, 4)) for _ in range(3))
    out = np.asarray(pk.neighborhood_attention(q, k, v, impl="reference", **options))
    for i, keys in enumerate(windows):
        logits = k[0, keys, 0] @ q[0, i, 0] * 0.5
        weights = np.exp(logits - logits.max())
        np.testing.assert_allclose(out[0, i, 0], weights @ v[0, keys, 0] / weights.sum(), rtol=1e-12)


def test_reference_bias_is_the_uncentred_relative_offset(x64):
    """With q = 0 the logits are the bias alone: query 0 of n = 5, K = 3 sees keys 0, 1, 2 with
    rows 2, 3, 4 of the table; query 4 sees keys 2, 3, 4 with rows 0, 1, 2."""
    rpb = np.array([[0.3, -1.0, 0.7, 2.0, -0.4]])
    v = np.random.default_rng(2).normal(size=(1, 5, 1, 3))
    out = np.asarray(pk.neighborhood_attention(np.zeros((1, 5, 1, 3)), np.zeros((1, 5, 1, 3)), v, 3,
                                               rel_pos_bias=rpb, impl="reference"))
    for i, keys, rows in [(0, [0, 1, 2], [2, 3, 4]), (2, [1, 2, 3], [1, 2, 3]), (4, [2, 3, 4], [0, 1, 2])]:
        weights = np.exp(rpb[0, rows]) / np.exp(rpb[0, rows]).sum()
        np.testing.assert_allclose(out[0, i, 0], weights @ v[0, keys, 0], rtol=1e-12)


def dense_attention(q, k, v, visible=None, scale=None):
    """Plain numpy softmax attention over flattened tokens ``[N, D]`` with an optional mask."""
    logits = q @ k.T * (q.shape[-1] ** -0.5 if scale is None else scale)
    if visible is not None:
        logits = np.where(visible, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True) @ v


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_stride_equal_to_kernel_is_blocked_attention(impl):
    """8 x 12 map, kernel = stride = (4, 3): attention inside each 4 x 3 block, computed directly."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(1, 8, 12, 1, 5)).astype(np.float32) for _ in range(3))
    out = np.asarray(pk.neighborhood_attention(q, k, v, (4, 3), stride=(4, 3), impl=impl))
    expected = np.zeros_like(out)
    for r, c in itertools.product(range(2), range(4)):
        block = (slice(4 * r, 4 * r + 4), slice(3 * c, 3 * c + 3))
        tokens = [x[0][block][:, :, 0].reshape(12, 5) for x in (q, k, v)]
        expected[0][block] = dense_attention(*tokens).reshape(4, 3, 1, 5)
    testing.assert_close(out, expected, impl, dtype=jnp.float32)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_kernel_equal_to_length_is_full_attention(impl, x64):
    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=(1, 5, 6, 1, 4)) for _ in range(3))
    tokens = [x[0, :, :, 0].reshape(30, 4) for x in (q, k, v)]
    out = pk.neighborhood_attention(q, k, v, (5, 6), impl=impl)
    testing.assert_close(out[0, :, :, 0].reshape(30, 4), dense_attention(*tokens), impl, dtype=jnp.float64)
    # 1-D causal with the whole sequence as window is causal attention
    q1, k1, v1 = (x[:, 0] for x in (q, k, v))
    out = pk.neighborhood_attention(q1, k1, v1, 6, is_causal=True, impl=impl)
    causal = np.tril(np.ones((6, 6), bool))
    testing.assert_close(out[0, :, 0], dense_attention(q1[0, :, 0], k1[0, :, 0], v1[0, :, 0], causal), impl, dtype=jnp.float64)


# ---------------------------------------------------------------------------------------------
# Implementations against the float64 reference
# ---------------------------------------------------------------------------------------------

# (spatial, q/kv heads, D, Dv, options); "rpb" adds a random relative position bias.
CASES = [
    ((29,), (2, 2), 8, 8, dict(kernel_size=5, rpb=True)),
    ((23,), (4, 2), 8, 6, dict(kernel_size=4, dilation=3, stride=2, is_causal=True)),
    ((13, 11), (2, 1), 8, 8, dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2), is_causal=(False, True), rpb=True)),
    ((12, 9), (2, 2), 4, 4, dict(kernel_size=(4, 3), dilation=(3, 2), stride=(3, 1), rpb=True)),
    ((10, 7), (1, 1), 8, 8, dict(kernel_size=(2, 7), is_causal=(True, False))),
    ((5, 6, 7), (2, 1), 4, 4, dict(kernel_size=(3, 2, 3), dilation=(1, 2, 2), stride=(2, 1, 3), is_causal=(True, False, False), rpb=True)),
]


def case_id(case):
    spatial, heads, _, _, options = case
    return "x".join(map(str, spatial)) + f"-h{heads[0]}{heads[1]}-" + "-".join(f"{k}{v}" for k, v in options.items())


def make_inputs(case, seed, dtype=np.float32):
    spatial, (hq, hkv), d, dv, options = case
    options = dict(options)
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, *spatial, hq, d))
    k = rng.normal(size=(2, *spatial, hkv, d))
    v = rng.normal(size=(2, *spatial, hkv, dv))
    inputs = [q, k, v]
    if options.pop("rpb", False):
        kernel = axis_specs(spatial, options["kernel_size"], dilation=options.get("dilation", 1),
                            stride=options.get("stride", 1))
        inputs.append(rng.normal(size=(hq, *(2 * a.kernel - 1 for a in kernel))))
    return [np.asarray(x, dtype) for x in inputs], options


def op(impl, options, **extra):
    def f(q, k, v, rpb=None):
        return pk.neighborhood_attention(q, k, v, rel_pos_bias=rpb, impl=impl, **options, **extra)

    return f


def value_and_vjp(f, inputs, cotangent):
    """``(f(*inputs), vjp(cotangent))`` compiled once (forward and backward in one program)."""
    run = jax.jit(lambda cot, *a: (f(*a), jax.vjp(f, *a)[1](cot)), compiler_options=FAST_COMPILE)
    return run(cotangent, *inputs)


def assert_matches_reference(f, f_reference, inputs, dtype, seed):
    """Output and the gradient of every input (for a random cotangent) against ``f_reference``
    run in float64."""
    inputs = [jnp.asarray(x, dtype) for x in inputs]
    shape = jax.eval_shape(f, *inputs)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed), shape.shape, jnp.float32).astype(dtype)
    out, grads = value_and_vjp(f, inputs, cotangent)
    with testing.float64():
        ref, ref_grads = value_and_vjp(f_reference, testing.to_float64(inputs), testing.to_float64(cotangent))
    assert out.dtype == dtype and out.shape == ref.shape
    testing.assert_close(out, ref, "out", dtype=dtype)
    for name, g, r in zip(("q", "k", "v", "rpb"), grads, ref_grads):
        testing.assert_close(g, r, f"d{name}", dtype=dtype)


def check(case, impl, seed, dtype, f=None):
    inputs, options = make_inputs(case, seed, dtype)
    assert_matches_reference(f or op(impl, options), op("reference", options), inputs, dtype, seed)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_xla_is_exact_in_float64(case):
    with testing.float64():
        check(case, "xla", seed=0, dtype=np.float64)


@pytest.mark.parametrize("query_tile", [1, 3])
def test_xla_small_query_tiles_float64(query_tile):
    """Tiles of 1-3 queries: many tiles, halos at every border, padding in the last tile."""
    case = CASES[3]
    _, options = make_inputs(case, 0)
    axes = axis_specs(case[0], options["kernel_size"], dilation=options["dilation"], stride=options["stride"])

    def f(q, k, v, rpb):
        return na_xla.neighborhood_attention(q, k, v, axes=axes, scale=0.5, rel_pos_bias=rpb, query_tile=query_tile)

    with testing.float64():
        inputs, _ = make_inputs(case, query_tile, np.float64)
        assert_matches_reference(f, op("reference", dict(options, scale=0.5)), inputs, np.float64, query_tile)


def test_xla_float32_and_bfloat16():
    check(CASES[2], "xla", seed=1, dtype=np.float32)
    inputs, options = make_inputs(CASES[5], 2, np.float32)
    with testing.float64():
        ref = op("reference", options)(*testing.to_float64(inputs))
    out = op("xla", options)(*[jnp.asarray(x, jnp.bfloat16) for x in inputs])
    assert out.dtype == jnp.bfloat16
    testing.assert_close(out, ref, "out", dtype=jnp.bfloat16)


def test_xla_memory_is_tokens_times_halo():
    """No intermediate of the forward or backward pass grows like tokens^2."""
    n = 2048
    q = jnp.zeros((1, n, 1, 16))
    grad = jax.grad(lambda q, k, v: jnp.sum(pk.neighborhood_attention(q, k, v, 7, impl="xla")), argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(q, q, q)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield math.prod(getattr(var.aval, "shape", ()))
            for value in eqn.params.values():
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    yield from sizes(value.jaxpr)

    largest = max(sizes(jaxpr.jaxpr))
    assert largest < 100 * n, largest  # 32-query tiles, 38-key halos, 16 features: ~40 n
    reference_jaxpr = jax.make_jaxpr(lambda q, k, v: pk.neighborhood_attention(q, k, v, 7, impl="reference"))(q, q, q)
    assert max(sizes(reference_jaxpr.jaxpr)) >= n * n  # the check can fail: the reference is dense


PALLAS_CASES = [CASES[1], CASES[2], CASES[4], CASES[5]]


@pytest.mark.parametrize("case", PALLAS_CASES, ids=case_id)
def test_pallas_interpret(case):
    spatial, heads, d, dv, options = case
    case = (spatial, heads, d, dv, {k: v for k, v in options.items() if k != "rpb"})
    check(case, "pallas", seed=3, dtype=np.float32)


def test_pallas_small_tiles_span_many_blocks():
    """Spatial tiles of 2 x 3 make the 13 x 11 map (dilated) span several 128-token blocks with
    padding inside every tile row."""
    case = (CASES[2][0], (2, 1), 8, 8, dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2), is_causal=(False, True)))
    _, options = make_inputs(case, 0)
    axes = axis_specs(case[0], **options)

    def f(q, k, v):
        return na_pallas.neighborhood_attention(q, k, v, axes=axes, scale=8**-0.5, interpret=True, tile=(2, 3))

    check(case, "pallas", seed=4, dtype=np.float32, f=f)


def test_pallas_rejects_a_bias_and_auto_uses_xla():
    inputs, options = make_inputs(CASES[0], 0)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        op("pallas", options)(*inputs)
    testing.assert_close(op("auto", options)(*inputs), op("xla", options)(*inputs), "auto", dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------
# The mask on permuted tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial, options, tile",
    [
        ((13,), dict(kernel_size=4, dilation=3, stride=2), (3,)),
        ((13, 11), dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2), is_causal=(False, True)), (4, 3)),
        ((5, 6, 7), dict(kernel_size=(3, 2, 3), dilation=(1, 2, 2), stride=(2, 1, 3), is_causal=(True, False, False)), (2, 2, 3)),
    ],
)
def test_neighborhood_mask_on_permuted_tokens(spatial, options, tile):
    axes = axis_specs(spatial, **options)
    mask = na_pallas.NeighborhoodMask(axes, tile)
    tokens = math.prod(spatial)
    # Where each input token lands in the permuted sequence (padding slots hold -1).
    where = np.asarray(na_pallas.permute(jnp.arange(1, tokens + 1).reshape(1, *spatial), mask))[0] - 1
    real = np.flatnonzero(where >= 0)
    assert sorted(where[real]) == list(range(tokens))
    p = np.arange(mask.length)
    for xp in (np, jnp):
        visible = np.asarray(mask(xp.asarray(p[:, None]), xp.asarray(p[None, :])))
        assert not visible[:, where < 0].any()  # padding keys are never visible
        order = np.argsort(where[real])
        got = visible[np.ix_(real[order], real[order])]
        np.testing.assert_array_equal(got, dense_visibility(axes)[0])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *spatial, 3)))
    np.testing.assert_array_equal(na_pallas.unpermute(na_pallas.permute(x, mask), mask), x)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes, options, error, match",
    [
        (None, dict(kernel_size=(3, 6), dilation=2), ValueError, r"kernel_size \* dilation.*axis 1 has length 11"),
        (None, dict(kernel_size=3, stride=4), ValueError, "stride must be <= kernel_size"),
        (None, dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1"),
        (None, dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a tuple of 2"),
        (None, dict(kernel_size=3, dilation=(1, 0)), ValueError, r"dilation\[1\]"),
        (None, dict(kernel_size=3, is_causal=(True, 1)), TypeError, r"is_causal\[1\] must be a bool"),
        (None, dict(kernel_size=3, scale="x"), TypeError, "scale"),
        (None, dict(kernel_size=3, impl="cuda"), ValueError, "impl"),
        (None, dict(kernel_size=3, rel_pos_bias=np.zeros((2, 5, 4), np.float32)), ValueError, r"rel_pos_bias must have shape \(2, 5, 5\)"),
        (((1, 13, 2, 8),) * 3, dict(kernel_size=3, rel_pos_bias=np.zeros((2, 5, 5), np.float32)), ValueError, r"rel_pos_bias must have shape \(2, 5\)"),
        (((1, 13, 8),) * 3, dict(kernel_size=3), ValueError, "q must have rank 4 or 5 or 6"),
        (((1, 9, 11, 2, 8), (1, 9, 10, 2, 8), (1, 9, 11, 2, 8)), dict(kernel_size=3), ValueError, "k must have shape"),
        (((1, 9, 11, 3, 8), (1, 9, 11, 2, 8), (1, 9, 11, 2, 8)), dict(kernel_size=3), ValueError, "multiple of the number of key/value heads"),
        (((1, 9, 11, 2, 8), (1, 9, 11, 2, 8), (1, 9, 11, 1, 8)), dict(kernel_size=3), ValueError, "v must have shape"),
    ],
)
def test_errors_name_the_argument(shapes, options, error, match):
    shapes = shapes or ((1, 9, 11, 2, 8),) * 3
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    options = dict(options)
    kernel = options.pop("kernel_size")
    with pytest.raises(error, match=match):
        pk.neighborhood_attention(q, k, v, kernel, **options)


def test_dtype_errors():
    q = np.zeros((1, 9, 2, 8), np.float32)
    with pytest.raises(TypeError, match="share a dtype"):
        pk.neighborhood_attention(q, q.astype(np.float16), q, 3)
    with pytest.raises(TypeError, match="floating"):
        pk.neighborhood_attention(q.astype(np.int32), q, q, 3)
