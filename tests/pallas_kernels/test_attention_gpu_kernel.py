"""The GPU (Pallas Triton) attention kernels, run in the Pallas interpreter on CPU and lowered for CUDA.

Every comparison is against ``reference`` evaluated in float64 with the per-dtype relative-RMS
tolerance of ``testing.TOLERANCE``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.pallas_kernels import testing
from attnzoo.pallas_kernels.attention import BlockSizes
from attnzoo.pallas_kernels.attention import gpu, reference
from attnzoo.pallas_kernels.attention import attention as public_attention
from attnzoo.pallas_kernels.attention import attention_decode as public_attention_decode
from attnzoo.pallas_kernels.attention.masks import (
    ChunkedCausalMask,
    FunctionMask,
    Mask,
    PrefixLMMask,
    build_mask,
)


def _causal(window=None):
    return lambda t, s: build_mask(causal=True, window=window, mask=None, q_len=t, kv_len=s)


def _full(t, s):
    return build_mask(causal=False, window=None, mask=None, q_len=t, kv_len=s)


_BAND_OR_SINK = FunctionMask(lambda q, k: (((q - k) <= 3) & ((k - q) <= 3)) | (k < 5))
_HOLE = FunctionMask(lambda q, k: (k <= q) & (q != 5) & (q != 20))  # rows 5 and 20 see nothing


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    s: int
    hq: int
    hkv: int
    d: int
    dv: int
    mask: Callable[[int, int], Mask]
    segments: str | None = None  # None | "self" | "cross" (a query segment no key has)
    softcap: float | None = None
    blocks: tuple[int, int] = (16, 16)
    seed: int = 0


CASES = {
    "causal_gqa2_d48_dv24": Case(37, 37, 4, 2, 48, 24, _causal(), seed=1),
    "causal_129_mha": Case(129, 129, 2, 2, 32, 32, _causal(), blocks=(32, 64), seed=2),
    "window_gqa4": Case(129, 129, 4, 1, 16, 32, _causal((20, 0)), blocks=(16, 32), seed=3),
    "window_two_sided": Case(70, 70, 2, 1, 16, 16, lambda t, s: build_mask(causal=False, window=(9, 13), mask=None, q_len=t, kv_len=s), seed=4),
    "chunked_causal_softcap": Case(70, 70, 2, 2, 32, 16, lambda t, s: ChunkedCausalMask(24), softcap=1.5, seed=5),
    "prefix_lm": Case(37, 37, 2, 1, 16, 48, lambda t, s: PrefixLMMask(11), seed=6),
    "segments_self": Case(37, 37, 4, 2, 16, 16, _full, segments="self", seed=7),
    "segments_cross_causal": Case(37, 70, 2, 1, 32, 16, _causal(), segments="cross", blocks=(16, 32), seed=8),
    "lambda_band_sink": Case(64, 64, 2, 1, 16, 16, lambda t, s: _BAND_OR_SINK, seed=9),
    "lambda_empty_rows": Case(37, 37, 2, 2, 16, 16, lambda t, s: _HOLE, seed=10),
    "full_t37_s129_blocks_24_48": Case(37, 129, 2, 1, 16, 24, _full, blocks=(24, 48), seed=12),
    "causal_t129_s37_empty_rows": Case(129, 37, 2, 1, 16, 16, _causal(), blocks=(64, 16), seed=13),
    "t1_s37_causal": Case(1, 37, 4, 4, 16, 16, _causal(), seed=14),
    "t1_s1": Case(1, 1, 2, 1, 8, 8, _full, seed=15),
}

# Gradients of q, k and v (and through the lse output) for these cases.
GRAD_CASES = [
    "causal_gqa2_d48_dv24",
    "window_gqa4",
    "chunked_causal_softcap",
    "segments_cross_causal",
    "lambda_empty_rows",
]
SLOW_GRAD_CASES = [name for name in CASES if name not in GRAD_CASES]


def _inputs(case: Case, batch: int = 2, dtype=jnp.float32):
    kq, kk, kv, ks = jax.random.split(jax.random.PRNGKey(case.seed), 4)
    q = jax.random.normal(kq, (batch, case.t, case.hq, case.d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, case.s, case.hkv, case.d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, case.s, case.hkv, case.dv), jnp.float32).astype(dtype)
    if case.segments is None:
        segments = None
    else:
        ka, kb = jax.random.split(ks)
        q_ids = jnp.sort(jax.random.randint(ka, (batch, case.t), 0, 3), axis=1).astype(jnp.int32)
        if case.segments == "self":
            kv_ids = q_ids
        else:  # keys never carry segment 3, so queries of segment 3 see nothing
            q_ids = q_ids.at[:, 3:6].set(3)
            kv_ids = jnp.sort(jax.random.randint(kb, (batch, case.s), 0, 3), axis=1).astype(jnp.int32)
        segments = (q_ids, kv_ids)
    return (q, k, v), segments


def _functions(case: Case, segments, *, interpret=True):
    mask = case.mask(case.t, case.s)
    scale = case.d**-0.5
    blocks = BlockSizes(*case.blocks)

    def kernel(q, k, v):
        if segments is None:
            q_seg = jnp.zeros(q.shape[:2], jnp.int32)
            kv_seg = jnp.zeros(k.shape[:2], jnp.int32)
        else:
            q_seg, kv_seg = segments
        return gpu.flash_attention(
            q, k, v, q_seg, kv_seg, mask=mask, use_segments=segments is not None, scale=scale,
            softcap=case.softcap, block_sizes=blocks, interpret=interpret,
        )

    def ref(q, k, v):
        return reference.attention(q, k, v, mask=mask, segment_ids=segments, scale=scale, softcap=case.softcap)

    return kernel, ref


def _check_forward(case: Case, dtype=jnp.float32):
    args, segments = _inputs(case, dtype=dtype)
    kernel, ref = _functions(case, segments)
    out, lse = jax.jit(kernel)(*args)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert out.shape == (2, case.t, case.hq, case.dv) and lse.shape == (2, case.hq, case.t)
    with testing.float64():
        ref_out, ref_lse = jax.jit(ref)(*testing.to_float64(args))
    testing.assert_close(out, ref_out, "out", dtype=dtype)
    testing.assert_close(lse, ref_lse, "lse", dtype=dtype)
    return out, lse, ref_lse


SLOW_FORWARD_CASES = ["causal_129_mha"]  # 129 and GQA ratio 1 are covered by faster cases too


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FORWARD_CASES else n for n in CASES],
)
def test_forward_matches_reference(name):
    case = CASES[name]
    out, lse, ref_lse = _check_forward(case)
    empty = ~np.isfinite(np.asarray(ref_lse))  # [B, Hq, T]: rows that see no key
    if name in ("lambda_empty_rows", "segments_cross_causal", "causal_t129_s37_empty_rows"):
        assert empty.any(), "the case is meant to have fully masked rows"
    assert np.all(np.asarray(lse)[empty] == -np.inf)
    out_rows = np.asarray(out).transpose(0, 2, 1, 3)[empty]
    assert np.all(out_rows == 0.0)


def test_forward_bfloat16():
    _check_forward(CASES["causal_gqa2_d48_dv24"], dtype=jnp.bfloat16)


def _check_grads(name):
    case = CASES[name]
    args, segments = _inputs(case)
    kernel, ref = _functions(case, segments)
    # assert_close inside also rejects NaN and non-finite entries the reference does not have.
    return testing.assert_grads_close(
        jax.jit(kernel), jax.jit(ref), args, argnums=(0, 1, 2), dtype=jnp.float32,
        key=jax.random.PRNGKey(case.seed + 100), names=("q", "k", "v"),
    )


@pytest.mark.parametrize("name", GRAD_CASES)
def test_grads_match_reference(name):
    _check_grads(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_GRAD_CASES)
def test_grads_match_reference_more(name):
    _check_grads(name)


def test_empty_tiles_are_never_read():
    """Keys that no query sees lie in EMPTY tiles: NaN there must not reach outputs or gradients."""
    case = Case(32, 96, 2, 1, 16, 16, lambda t, s: FunctionMask(lambda q, k: k < 48), blocks=(16, 16), seed=21)
    (q, k, v), _ = _inputs(case)
    kernel, ref = _functions(case, None)
    poison = jnp.arange(case.s)[None, :, None, None] >= 48
    k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    out, lse = jax.jit(kernel)(q, k_nan, v_nan)
    with testing.float64():
        ref_out, ref_lse = jax.jit(ref)(*testing.to_float64((q, k, v)))
    testing.assert_close(out, ref_out, "out", dtype=jnp.float32)
    testing.assert_close(lse, ref_lse, "lse", dtype=jnp.float32)
    dq, dk, dv = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a)[0]), argnums=(0, 1, 2)))(q, k_nan, v_nan)
    assert np.isfinite(np.asarray(dq)).all()
    assert np.all(np.asarray(dk)[:, 48:] == 0) and np.all(np.asarray(dv)[:, 48:] == 0)


class _FullRowsButElementsHidden(Mask):
    """Inconsistent on purpose: tiles classify FULL, the element function hides everything."""

    def __call__(self, q_idx, kv_idx):
        return (q_idx < 0) & (kv_idx < 0)

    def row_interval(self, q_idx, kv_len):
        return np.zeros_like(q_idx), np.full_like(q_idx, kv_len - 1)


def test_full_tiles_skip_the_element_mask():
    """FULL tiles are computed without the element mask (whose all-False value would give zeros)."""
    case = Case(32, 32, 2, 1, 16, 16, lambda t, s: _FullRowsButElementsHidden(), seed=22)
    args, _ = _inputs(case)
    out, lse = jax.jit(_functions(case, None)[0])(*args)
    with testing.float64():
        ref_out, ref_lse = jax.jit(
            lambda *a: reference.attention(*a, mask=_full(32, 32), segment_ids=None, scale=16**-0.5, softcap=None)
        )(*testing.to_float64(args))
    testing.assert_close(out, ref_out, "out", dtype=jnp.float32)
    testing.assert_close(lse, ref_lse, "lse", dtype=jnp.float32)


def test_block_sizes():
    f32, bf16 = jnp.float32, jnp.bfloat16
    # Powers of two >= 16, shrunk for short sequences.
    assert gpu.fit_blocks(24, 48, 37, 129, 16, 24, f32) == (32, 64)
    assert gpu.fit_blocks(128, 128, 1, 37, 16, 16, f32) == (16, 64)
    assert gpu.fit_blocks(8, 8, 1000, 1000, 16, 16, f32) == (16, 16)
    # Shared-memory budget: the larger block halves first.
    assert gpu.fit_blocks(128, 128, 4096, 4096, 64, 64, bf16) == (128, 128)
    assert gpu.fit_blocks(128, 128, 4096, 4096, 128, 128, bf16) == (64, 64)
    assert gpu.fit_blocks(128, 128, 4096, 4096, 128, 128, f32) == (32, 32)
    for d in (16, 48, 64, 128, 256):
        bq, bk = gpu.fit_blocks(128, 128, 8192, 8192, d, d, bf16)
        assert gpu._smem_estimate(bq, bk, gpu._padded_dim(d), gpu._padded_dim(d), 2) <= gpu.SMEM_BUDGET
    # Decode: never above the cache length rounded down to a power of two.
    assert gpu.fit_decode_block(512, 37, 16, 16, f32) == 32
    assert gpu.fit_decode_block(512, 8, 16, 16, f32) == 16
    assert gpu.fit_decode_block(512, 4096, 128, 128, bf16) == 64
    assert gpu.fit_decode_block(20, 4096, 64, 64, bf16) == 32


# ---------------------------------------------------------------------------------- decode

DECODE_CASES = {
    # (S, Hq, Hkv, D, Dv, window_left, softcap, block_kv, lengths)
    "mha_s37": (37, 2, 2, 16, 16, None, None, 512, (37, 0, 1, 20)),
    "gqa2_window_dv": (70, 4, 2, 48, 24, 9, None, 16, (70, 5, 33, 0)),
    "gqa4_softcap": (37, 8, 2, 32, 32, None, 2.0, 16, (36, 16, 17, 3)),
    "gqa2_s64_aligned": (64, 4, 2, 16, 16, 20, None, 16, (64, 40, 0, 17)),
    "gqa3_window_s8": (8, 3, 1, 16, 32, 2, None, 512, (8, 1, 0, 5)),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_reference(name):
    s, hq, hkv, d, dv, window_left, softcap, block_kv, lengths = DECODE_CASES[name]
    batch = len(lengths)
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(s + hq + d), 3)
    q = jax.random.normal(kq, (batch, hq, d), jnp.float32)
    k = jax.random.normal(kk, (batch, s, hkv, d), jnp.float32)
    v = jax.random.normal(kv, (batch, s, hkv, dv), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    options = dict(window_left=window_left, scale=d**-0.5, softcap=softcap)
    # Keys at or past a row's length are unused: NaN there must not matter.
    unused = jnp.arange(s)[None, :, None, None] >= lengths[:, None, None, None]
    poisoned = jax.jit(
        lambda q, k, v, n: gpu.flash_decode(
            q, jnp.where(unused, jnp.nan, k), jnp.where(unused, jnp.nan, v), n,
            block_kv=block_kv, interpret=True, **options,
        )
    )
    out = poisoned(q, k, v, lengths)
    assert out.shape == (batch, hq, dv) and out.dtype == jnp.float32
    with testing.float64():
        ref = jax.jit(lambda *a: reference.attention_decode(*a, **options))(*testing.to_float64((q, k, v)), lengths)
    testing.assert_close(out, ref, "out", dtype=jnp.float32)
    assert np.all(np.asarray(out)[np.asarray(lengths) == 0] == 0.0)


# -------------------------------------------------------------------------------- lowering

LOWER_CASES = [
    "causal_gqa2_d48_dv24",
    "window_gqa4",
    "chunked_causal_softcap",
    "segments_cross_causal",
    "lambda_band_sink",
    "t1_s1",
]


@pytest.mark.parametrize("name", LOWER_CASES)
def test_attention_kernels_lower_for_cuda(name):
    case = CASES[name]
    args, segments = _inputs(case, dtype=jnp.bfloat16 if name == "window_gqa4" else jnp.float32)
    kernel, _ = _functions(case, segments, interpret=False)
    testing.assert_lowers(kernel, *args, platforms=("cuda",), backward=True, argnums=(0, 1, 2))


@pytest.mark.parametrize("name", ["gqa2_window_dv", "gqa3_window_s8"])
def test_decode_kernel_lowers_for_cuda(name):
    s, hq, hkv, d, dv, window_left, softcap, block_kv, lengths = DECODE_CASES[name]
    batch = len(lengths)
    args = (
        jnp.zeros((batch, hq, d)), jnp.zeros((batch, s, hkv, d)), jnp.zeros((batch, s, hkv, dv)),
        jnp.asarray(lengths, jnp.int32),
    )
    fn = lambda *a: gpu.flash_decode(
        *a, window_left=window_left, scale=0.5, softcap=softcap, block_kv=block_kv, interpret=False
    )
    testing.assert_lowers(fn, *args, platforms=("cuda",), backward=False)


def test_public_ops_pick_the_triton_kernels_for_cuda():
    """``impl="pallas"`` with ``interpret=None`` lowers to the Triton kernels for CUDA."""
    q, k, v = jnp.zeros((1, 37, 4, 48)), jnp.zeros((1, 37, 2, 48)), jnp.zeros((1, 37, 2, 24))
    attn = lambda q, k, v: public_attention(
        q, k, v, causal=True, window=(16, 0), impl="pallas", block_sizes=BlockSizes(16, 16)
    )
    testing.assert_lowers(attn, q, k, v, platforms=("cuda",), backward=True, argnums=(0, 1, 2))
    decode = lambda q, kc, vc, n: public_attention_decode(q, kc, vc, n, window=(8, 0), impl="pallas")
    testing.assert_lowers(
        decode, jnp.zeros((2, 4, 48)), k.repeat(2, 0), v.repeat(2, 0), jnp.array([3, 37]),
        platforms=("cuda",), backward=False,
    )
