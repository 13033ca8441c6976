"""pk.attention: every implementation and mask kind against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing
from tests.pallas_kernels.attention_cases import CASES, Case, op, random_case

# Small tiles so that every case spans several query and key blocks.
XLA_BLOCKS = pk.XlaBlockSizes(block_q=16, block_kv=16, scores_per_step=1 << 14)
# Tiles larger than every case: the xla path's direct single-tile computation.
XLA_ONE_TILE = pk.XlaBlockSizes(block_q=1 << 12, block_kv=1 << 12)
PALLAS_BLOCKS = pk.BlockSizes(block_q=16, block_kv=128)


def reference64(case_inputs, options):
    with testing.float64():
        q, k, v = testing.to_float64(case_inputs)
        return jax.tree.map(np.asarray, op("reference", options)(q, k, v))


def check_forward_and_grads(case: Case, impl: str, seed: int, dtype=jnp.float32, **extra):
    inputs, options = case.inputs(seed, dtype)
    out, lse = op(impl, options, **extra)(*inputs)
    ref_out, ref_lse = reference64(inputs, options)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert lse.shape == (case.batch, case.q_heads, case.q_len)
    testing.assert_close(out, ref_out, "out", dtype=dtype)
    testing.assert_close(lse, ref_lse, "lse", dtype=jnp.float32 if dtype != jnp.float64 else dtype)
    testing.assert_grads_close(
        op(impl, options, **extra), op("reference", options), list(inputs),
        argnums=(0, 1, 2), dtype=dtype, names=("q", "k", "v"), key=jax.random.PRNGKey(seed),
    )


# The xla path over many small tiles (blockwise scan) and with the whole score matrix as one tile.
XLA_TILINGS = {"blockwise": XLA_BLOCKS, "one_tile": XLA_ONE_TILE}


@pytest.mark.parametrize("tiling", XLA_TILINGS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_xla_float32(case, tiling):
    check_forward_and_grads(case, "xla", seed=0, block_sizes=XLA_TILINGS[tiling])


@pytest.mark.parametrize("tiling", XLA_TILINGS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_xla_is_exact_in_float64(case, tiling):
    """In float64 the xla paths must agree to rounding: any masking or merge bug shows."""
    with testing.float64():
        check_forward_and_grads(case, "xla", seed=1, dtype=jnp.float64, block_sizes=XLA_TILINGS[tiling])


@pytest.mark.parametrize("tiling", XLA_TILINGS)
@pytest.mark.parametrize("seed", range(12))
def test_xla_random_sweep(seed, tiling):
    case = random_case(seed if tiling == "blockwise" else 200 + seed)
    with testing.float64():
        check_forward_and_grads(case, "xla", seed=seed, dtype=jnp.float64, block_sizes=XLA_TILINGS[tiling])


def test_xla_takes_the_single_tile_path_only_when_the_scores_fit_one_tile():
    """The direct path has no loop; the blockwise one scans its tile list (forward and backward)."""
    q = k = v = jnp.zeros((1, 40, 2, 8), jnp.float32)

    def loops(block_sizes):
        f = lambda q, k, v: jnp.sum(pk.attention(q, k, v, causal=True, impl="xla", block_sizes=block_sizes))
        return str(jax.make_jaxpr(jax.grad(f, (0, 1, 2)))(q, k, v)).count("scan[")

    assert loops(XLA_ONE_TILE) == 0
    assert loops(pk.XlaBlockSizes(block_q=40, block_kv=40)) == 0
    assert loops(XLA_BLOCKS) >= 2


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pallas_interpret(case):
    check_forward_and_grads(case, "pallas", seed=2, block_sizes=PALLAS_BLOCKS)


@pytest.mark.parametrize("seed", range(4))
def test_pallas_random_sweep(seed):
    check_forward_and_grads(random_case(100 + seed), "pallas", seed=seed, block_sizes=PALLAS_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal_gqa2_dv", "packed_causal", "empty_rows"])
def test_pallas_strict_interpreter(name):
    """The TPU interpreter with race detection, NaN-filled uninitialised memory and OOB checks."""
    params = pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise"
    )
    case = next(c for c in CASES if c.name == name)
    check_forward_and_grads(case, "pallas", seed=3, block_sizes=PALLAS_BLOCKS, interpret=params)


@pytest.mark.parametrize("impl", ["xla", "xla_one_tile", "pallas"])
@pytest.mark.parametrize("name", ["causal_gqa2_dv", "packed_causal", "window_left_gqa4"])
def test_bfloat16(impl, name):
    case = next(c for c in CASES if c.name == name)
    blocks = {"xla": XLA_BLOCKS, "xla_one_tile": XLA_ONE_TILE, "pallas": PALLAS_BLOCKS}[impl]
    impl = impl.removesuffix("_one_tile")
    check_forward_and_grads(case, impl, seed=4, dtype=jnp.bfloat16, block_sizes=blocks)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_fully_masked_rows_are_zero_without_nan(impl):
    case = next(c for c in CASES if c.name == "empty_rows")
    (q, k, v), options = case.inputs(5)
    out, lse = op(impl, options)(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, :, :5])))
    grads = jax.grad(lambda *a: jnp.sum(op(impl, options)(*a)[0] ** 2), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0][:, :5]), 0.0)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_equals_repeated_kv_heads(group):
    """GQA with ratio G equals MHA on keys/values repeated G times (independent of the reference)."""
    rng = np.random.default_rng(group)
    q = jnp.asarray(rng.standard_normal((2, 37, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 37, 8 // group, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 37, 8 // group, 16)), jnp.float32)
    for impl in ("xla", "pallas"):
        gqa = pk.attention(q, k, v, causal=True, impl=impl)
        mha = pk.attention(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), causal=True, impl=impl)
        testing.assert_close(gqa, mha, f"{impl} gqa", dtype=jnp.float32)


def test_reference_matches_textbook_softmax():
    """The oracle itself against a numpy transcription of softmax(QK^T/sqrt(d) + mask) V."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 9, 1, 4)) for _ in range(3))
    with testing.float64():
        out = pk.attention(q, k, v, causal=True, impl="reference")
    s = q[0, :, 0] @ k[0, :, 0].T / 2.0
    s = np.where(np.tril(np.ones((9, 9), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v[0, :, 0]
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], expected, rtol=1e-12, atol=1e-12)


def test_mask_changes_are_detected():
    """The comparison can fail: a wrong mask is caught by the harness."""
    case = next(c for c in CASES if c.name == "window_left_gqa4")
    inputs, options = case.inputs(0)
    out, _ = op("xla", options, block_sizes=XLA_BLOCKS)(*inputs)
    wrong, _ = reference64(inputs, {"window": (6, 0)})
    with pytest.raises(AssertionError, match="relative RMS error"):
        testing.assert_close(out, wrong, "out", dtype=jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_padding_does_not_change_results(impl):
    """Lengths that do not divide the block size give the same rows as a longer, unpadded call."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 50, 2, 16)), jnp.float32) for _ in range(3))
    blocks = XLA_BLOCKS if impl == "xla" else PALLAS_BLOCKS
    short = pk.attention(q[:, :37], k[:, :37], v[:, :37], causal=True, impl=impl, block_sizes=blocks)
    long = pk.attention(q, k, v, causal=True, impl=impl, block_sizes=blocks)
    testing.assert_close(short, long[:, :37], "prefix rows", dtype=jnp.float32)


def test_jit_and_vmap_compose():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 20, 2, 8)), jnp.float32) for _ in range(3))
    f = jax.jit(jax.vmap(lambda q, k, v: pk.attention(q, k, v, causal=True, impl="xla")))
    expected = jnp.stack([pk.attention(q[i], k[i], v[i], causal=True, impl="reference") for i in range(3)])
    testing.assert_close(f(q, k, v), expected, "vmapped", dtype=jnp.float32)


def test_auto_picks_xla_on_cpu():
    from attnzoo.pallas_kernels.common import resolve_impl

    assert resolve_impl("auto", "attention") == "xla"
