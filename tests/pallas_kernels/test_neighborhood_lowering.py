"""pk.neighborhood_attention's Pallas path lowers for TPU (Mosaic) and GPU, forward and backward.

Lowered through the public op with ``interpret=None`` (as tests/pallas_kernels/test_lowering.py),
so the NeighborhoodMask's in-kernel arithmetic must have a lowering on both platforms.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing

LOWERING_CASES = [
    ("1d_dilated_strided", (1, 40, 2, 64), dict(kernel_size=7, dilation=2, stride=2), jnp.float32),
    ("2d_mixed_causal_bf16", (1, 14, 18, 2, 64), dict(kernel_size=(3, 5), dilation=(2, 1), is_causal=(True, False)), jnp.bfloat16),
    ("3d_causal_strided", (1, 4, 6, 8, 2, 32), dict(kernel_size=(2, 3, 3), stride=(1, 3, 2), is_causal=(True, False, False)), jnp.float32),
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c[0])
def test_neighborhood_kernels_lower(case, platform):
    _, shape, options, dtype = case
    q = jnp.zeros(shape, dtype)

    def f(q, k, v):
        return pk.neighborhood_attention(q, k, v, impl="pallas", **options)

    testing.assert_lowers(f, q, q, q, platforms=(platform,), backward=True, argnums=(0, 1, 2))
