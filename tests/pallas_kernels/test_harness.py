"""The test harness itself: each of its checks can fail."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.pallas_kernels import testing


def test_assert_close_passes_within_and_fails_beyond_tolerance():
    ref = np.random.default_rng(0).standard_normal(1000)
    testing.assert_close(ref * (1 + 1e-6), ref, "x", dtype=jnp.float32)
    with pytest.raises(AssertionError, match="relative RMS error"):
        testing.assert_close(ref * (1 + 1e-3), ref, "x", dtype=jnp.float32)
    with pytest.raises(AssertionError, match="NaN"):
        testing.assert_close(np.where(ref > 2, np.nan, ref), ref, "x", dtype=jnp.float32)
    with pytest.raises(AssertionError, match="non-finite entries differ"):
        testing.assert_close(np.where(ref > 2, -np.inf, ref), ref, "x", dtype=jnp.float32)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close(ref[:-1], ref, "x", dtype=jnp.float32)


def test_assert_grads_close_catches_a_wrong_backward():
    @jax.custom_vjp
    def wrong_square(x):
        return x * x

    wrong_square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x,))  # should be 2 g x
    x = jnp.linspace(-1.0, 1.0, 16)
    testing.assert_grads_close(lambda x: x * x, lambda x: x * x, [x], argnums=(0,), dtype=jnp.float32)
    with pytest.raises(AssertionError, match="dx"):
        testing.assert_grads_close(wrong_square, lambda x: x * x, [x], argnums=(0,), dtype=jnp.float32, names=("x",))


def test_float64_context_restores_the_flag():
    before = jax.config.jax_enable_x64
    with testing.float64():
        assert jnp.zeros(1, jnp.float64).dtype == jnp.float64
    assert jax.config.jax_enable_x64 == before
