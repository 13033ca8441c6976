"""The linear-attention / delta-rule oracle against an independent float64 numpy loop.

The numpy loop uses the delta rule's other algebraic form, ``S = (I - beta k k^T) D S + beta k v^T``
(``D`` the decay), so the two agree only if both implement the same recurrence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.pallas_kernels.linear_rnn import recurrence, recurrent_step
from attnzoo.pallas_kernels.testing import float64

# op name -> which of (g, gk, beta) it uses
OPS = {
    "linear_attention": (False, False, False),
    "simple_gla": (True, False, False),
    "gla": (False, True, False),
    "delta_rule": (False, False, True),
    "gated_delta_rule": (True, False, True),
    "kda": (False, True, True),
}


def numpy_recurrence(q, k, v, g, gk, beta, scale, initial_state):
    batch, length, heads, key_dim = q.shape
    out = np.zeros(v.shape)
    state = initial_state.copy()
    for t in range(length):
        for b in range(batch):
            for h in range(heads):
                decay = np.ones(key_dim)
                if g is not None:
                    decay = decay * np.exp(g[b, t, h])
                if gk is not None:
                    decay = decay * np.exp(gk[b, t, h])
                s = decay[:, None] * state[b, h]
                kt = k[b, t, h]
                if beta is not None:
                    s = (np.eye(key_dim) - beta[b, t, h] * np.outer(kt, kt)) @ s + beta[b, t, h] * np.outer(kt, v[b, t, h])
                else:
                    s = s + np.outer(kt, v[b, t, h])
                state[b, h] = s
                out[b, t, h] = scale * s.T @ q[b, t, h]
    return out, state


def make_inputs(seed, op, batch, length, heads, key_dim, value_dim):
    use_g, use_gk, use_beta = OPS[op]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, key_dim))
    k = rng.normal(size=(batch, length, heads, key_dim))
    if use_beta:  # the delta rule is stable for L2-normalised keys and beta in (0, 1), as its layers use
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, heads, value_dim))
    g = -rng.uniform(0.01, 0.5, size=(batch, length, heads)) if use_g else None
    gk = -rng.uniform(0.01, 0.5, size=(batch, length, heads, key_dim)) if use_gk else None
    beta = rng.uniform(0.05, 0.95, size=(batch, length, heads)) if use_beta else None
    state = rng.normal(size=(batch, heads, key_dim, value_dim))
    return q, k, v, g, gk, beta, state


def as_jax(*arrays):
    return [None if a is None else jnp.asarray(a) for a in arrays]


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("seed, shape", [(0, (2, 7, 3, 5, 4)), (1, (1, 1, 2, 8, 3)), (2, (1, 13, 1, 3, 6))])
def test_recurrence_matches_numpy(op, seed, shape):
    with float64():
        q, k, v, g, gk, beta, state = make_inputs(seed, op, *shape)
        scale = 0.7
        want_out, want_state = numpy_recurrence(q, k, v, g, gk, beta, scale, state)
        jq, jk, jv, jg, jgk, jbeta, jstate = as_jax(q, k, v, g, gk, beta, state)
        out, final = recurrence(jq, jk, jv, g=jg, gk=jgk, beta=jbeta, scale=scale, initial_state=jstate,
                                output_final_state=True)
        assert out.dtype == jnp.float64 and final.dtype == jnp.float64
        np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(final, want_state, rtol=1e-10, atol=1e-10)
        # The check can fail: another scale changes the output.
        other, _ = recurrence(jq, jk, jv, g=jg, gk=jgk, beta=jbeta, scale=0.5, initial_state=jstate)
        assert not np.allclose(other, want_out, rtol=1e-6)


@pytest.mark.parametrize("op", sorted(OPS))
def test_default_scale_state_and_float32_dtypes(op):
    q, k, v, g, gk, beta, _ = make_inputs(3, op, 1, 5, 2, 4, 3)
    want_out, want_state = numpy_recurrence(q, k, v, g, gk, beta, 4**-0.5, np.zeros((1, 2, 4, 3)))
    args = [None if a is None else jnp.asarray(a, jnp.float32) for a in (q, k, v, g, gk, beta)]
    out, final = recurrence(*args[:3], g=args[3], gk=args[4], beta=args[5], output_final_state=True)
    assert out.dtype == jnp.float32 and final.dtype == jnp.float32
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(final, want_state, rtol=1e-4, atol=1e-5)
    assert recurrence(*args[:3], g=args[3], gk=args[4], beta=args[5])[1] is None


@pytest.mark.parametrize("op", sorted(OPS))
def test_packed_sequences_equal_separate_runs(op):
    with float64():
        lengths = [3, 0, 6, 1]
        total = sum(lengths)
        q, k, v, g, gk, beta, _ = make_inputs(4, op, 1, total, 2, 4, 3)
        states = np.random.default_rng(5).normal(size=(len(lengths), 2, 4, 3))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        jargs = as_jax(q, k, v, g, gk, beta)
        out, final = recurrence(*jargs[:3], g=jargs[3], gk=jargs[4], beta=jargs[5], initial_state=jnp.asarray(states),
                                scale=0.5, output_final_state=True, cu_seqlens=jnp.asarray(offsets, jnp.int32))
        for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            cut = lambda x: None if x is None else x[:, start:end]  # noqa: E731
            want_out, want_state = numpy_recurrence(cut(q), cut(k), cut(v), cut(g), cut(gk), cut(beta), 0.5,
                                                    states[n:n + 1].copy())
            np.testing.assert_allclose(out[:, start:end], want_out, rtol=1e-10, atol=1e-10, err_msg=f"seq {n}")
            np.testing.assert_allclose(final[n], want_state[0], rtol=1e-10, atol=1e-10, err_msg=f"seq {n}")


@pytest.mark.parametrize("op", sorted(OPS))
def test_step_is_one_token_of_the_recurrence(op):
    with float64():
        q, k, v, g, gk, beta, state = make_inputs(6, op, 2, 1, 3, 4, 5)
        jargs = as_jax(q, k, v, g, gk, beta, state)
        out, final = recurrence(*jargs[:3], g=jargs[3], gk=jargs[4], beta=jargs[5], initial_state=jargs[6],
                                output_final_state=True)
        first = lambda x: None if x is None else x[:, 0]  # noqa: E731
        step_out, step_state = recurrent_step(*(first(x) for x in jargs[:3]), jargs[6], g=first(jargs[3]),
                                              gk=first(jargs[4]), beta=first(jargs[5]), scale=4**-0.5)
        np.testing.assert_allclose(step_out, out[:, 0], rtol=1e-12)
        np.testing.assert_allclose(step_state, final, rtol=1e-12)


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule", "kda"])
def test_gradients_match_finite_differences(op):
    """Directional derivatives of every input (autodiff vs central differences, float64)."""
    with float64():
        q, k, v, g, gk, beta, state = make_inputs(7, op, 1, 6, 2, 3, 2)
        names = ["q", "k", "v", "g", "gk", "beta", "initial_state"]
        inputs = {n: a for n, a in zip(names, (q, k, v, g, gk, beta, state)) if a is not None}
        weights = np.random.default_rng(8).normal(size=(1, 6, 2, 2))
        final_weights = np.random.default_rng(9).normal(size=(1, 2, 3, 2))

        def loss(arrays):
            out, final = recurrence(arrays["q"], arrays["k"], arrays["v"], g=arrays.get("g"), gk=arrays.get("gk"),
                                    beta=arrays.get("beta"), initial_state=arrays["initial_state"],
                                    output_final_state=True)
            return jnp.sum(out * weights) + jnp.sum(final * final_weights)

        arrays = {n: jnp.asarray(a) for n, a in inputs.items()}
        grads = jax.grad(loss)(arrays)
        rng = np.random.default_rng(10)
        for name in arrays:
            direction = rng.normal(size=arrays[name].shape)
            eps = 1e-6
            plus = dict(arrays, **{name: arrays[name] + eps * direction})
            minus = dict(arrays, **{name: arrays[name] - eps * direction})
            numeric = (loss(plus) - loss(minus)) / (2 * eps)
            analytic = float(jnp.sum(grads[name] * direction))
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, numeric, analytic)


def test_bad_inputs_name_the_argument():
    q = jnp.zeros((1, 4, 2, 3))
    v = jnp.zeros((1, 4, 2, 5))
    with pytest.raises(ValueError, match=r"k must have shape \(1, 4, 2, 3\)"):
        recurrence(q, jnp.zeros((1, 4, 2, 4)), v)
    with pytest.raises(ValueError, match=r"g must have shape \(1, 4, 2\)"):
        recurrence(q, q, v, g=jnp.zeros((1, 4, 2, 3)))
    with pytest.raises(ValueError, match="needs B == 1"):
        recurrence(jnp.zeros((2, 4, 2, 3)), jnp.zeros((2, 4, 2, 3)), jnp.zeros((2, 4, 2, 5)),
                   cu_seqlens=jnp.array([0, 4]))
    with pytest.raises(ValueError, match="rise from 0 to T = 4"):
        recurrence(q, q, v, cu_seqlens=jnp.array([0, 3, 2, 4]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 2, 3, 5\)"):
        recurrence(q, q, v, cu_seqlens=jnp.array([0, 2, 4]), initial_state=jnp.zeros((1, 2, 3, 5)))
