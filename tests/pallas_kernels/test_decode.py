"""pk.attention_decode: one query step against a KV cache with a length per row."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing

DECODE_CASES = [
    # batch, cache len, q heads, kv heads, head dim, v dim, lengths, options
    ("mha", 3, 64, 2, 2, 16, 16, [1, 30, 64], {}),
    ("gqa4_long", 2, 300, 4, 1, 16, 8, [300, 129], {}),
    ("window", 3, 200, 4, 2, 16, 16, [5, 150, 200], {"window": (20, 0)}),
    ("softcap_scale", 2, 77, 2, 1, 24, 24, [77, 10], {"softcap": 3.0, "scale": 0.2}),
    ("empty_row", 2, 40, 2, 2, 8, 8, [0, 17], {}),
]


def inputs(case, seed):
    _, batch, kv_len, q_heads, kv_heads, head_dim, v_dim, lengths, options = case
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, v_dim)), jnp.float32)
    return q, k, v, jnp.asarray(lengths, jnp.int32), options


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c[0])
def test_decode_matches_reference(case, impl):
    q, k, v, lengths, options = inputs(case, seed=0)
    sizes = pk.DecodeBlockSizes(block_kv=64 if impl == "xla" else 128)
    out = pk.attention_decode(q, k, v, lengths, impl=impl, block_sizes=sizes, **options)
    with testing.float64():
        ref = pk.attention_decode(*testing.to_float64((q, k, v)), lengths, impl="reference", **options)
    testing.assert_close(out, ref, "decode out", dtype=jnp.float32)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c[0])
def test_decode_equals_last_row_of_causal_attention(case):
    """Independent of the decode reference: row b's output is the last query of causal attention
    over its first lengths[b] cache entries."""
    q, k, v, lengths, options = inputs(case, seed=1)
    out = pk.attention_decode(q, k, v, lengths, impl="xla", **options)
    for b, length in enumerate(np.asarray(lengths)):
        if length == 0:
            np.testing.assert_array_equal(np.asarray(out[b]), 0.0)
            continue
        full = pk.attention(
            q[b : b + 1, None], k[b : b + 1, :length], v[b : b + 1, :length], causal=True,
            impl="reference", **options,
        )
        testing.assert_close(out[b], full[0, 0], f"row {b}", dtype=jnp.float32)


def test_decode_strict_interpreter():
    q, k, v, lengths, options = inputs(DECODE_CASES[2], seed=2)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")
    out = pk.attention_decode(q, k, v, lengths, impl="pallas", interpret=params, **options)
    ref = pk.attention_decode(q, k, v, lengths, impl="reference", **options)
    testing.assert_close(out, ref, "decode out", dtype=jnp.float32)


def test_decode_tpu_kernel_skips_blocks_past_length():
    """Cache slots past a row's length cannot reach the output, even when they hold NaN."""
    q, k, v, lengths, options = inputs(DECODE_CASES[1], seed=3)
    poisoned_k = k.at[1, 129:].set(jnp.nan)
    poisoned_v = v.at[1, 129:].set(jnp.nan)
    for impl in ("xla", "pallas"):
        out = pk.attention_decode(q, poisoned_k, poisoned_v, lengths, impl=impl)
        assert np.all(np.isfinite(np.asarray(out[1])))
