"""Every Pallas kernel of the attention ops lowers for TPU (Mosaic) and GPU, forward and backward.

The op is lowered through its public entry point with ``interpret=None``, so this also checks that
``platform_dependent`` picks the compiled kernel for each platform.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing

LOWERING_CASES = [
    ("causal_gqa", (1, 256, 4, 64), (1, 256, 2, 64), 64, dict(causal=True)),
    ("window_bf16", (2, 300, 2, 128), (2, 300, 2, 128), 128, dict(window=(64, 0), dtype=jnp.bfloat16)),
    ("chunked_softcap", (1, 200, 2, 48), (1, 200, 2, 48), 32, dict(mask=pk.ChunkedCausalMask(64), softcap=30.0)),
    ("segments_cross", (2, 100, 2, 64), (2, 260, 1, 64), 64, dict(segments=True)),
    ("mask_mod", (1, 128, 2, 64), (1, 128, 2, 64), 64, dict(mask=lambda i, j: (i - j) % 3 != 1)),
    ("t1", (1, 1, 2, 64), (1, 1, 2, 64), 64, dict(causal=True)),
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c[0])
def test_attention_kernels_lower(case, platform):
    _, q_shape, k_shape, v_dim, options = case
    options = dict(options)
    dtype = options.pop("dtype", jnp.float32)
    q = jnp.zeros(q_shape, dtype)
    k = jnp.zeros(k_shape, dtype)
    v = jnp.zeros(k_shape[:3] + (v_dim,), dtype)
    if options.pop("segments", False):
        options["segment_ids"] = (jnp.zeros(q_shape[:2], jnp.int32), jnp.zeros(k_shape[:2], jnp.int32))

    def f(q, k, v):
        return pk.attention(q, k, v, impl="pallas", return_lse=True, **options)

    testing.assert_lowers(f, q, k, v, platforms=(platform,), backward=True, argnums=(0, 1, 2))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("window", [None, (100, 0)])
def test_decode_kernel_lowers(platform, window):
    q = jnp.zeros((2, 8, 64), jnp.bfloat16)
    k = jnp.zeros((2, 1000, 2, 64), jnp.bfloat16)
    lengths = jnp.array([3, 1000], jnp.int32)

    def f(q, k, v, lengths):
        return pk.attention_decode(q, k, v, lengths, impl="pallas", window=window)

    testing.assert_lowers(f, q, k, k, lengths, platforms=(platform,), backward=False)


def test_lowering_check_can_fail():
    """A function without a Pallas kernel is rejected by the check."""
    q = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(AssertionError, match="has no Pallas kernel"):
        testing.assert_lowers(lambda q: pk.attention(q, q, q, impl="xla"), q, platforms=("tpu",), backward=False)
