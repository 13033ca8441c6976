"""Checks every recurrent mixer test shares (linear attention, delta rule): a float64 numpy token
loop of the linear-RNN recurrences, decoding in pieces from a cache, gradients and call errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.layers import RecurrentCache
from tests.zoo.helpers import fast_jit


def split_case(config):
    """``{"name": mixer, **options}`` -> ``(mixer, options)``."""
    config = dict(config)
    return config.pop("name"), config


# Layer tests are dominated by XLA compile time: fast_jit skips the backend's optimisation passes
# and compiles one program per module structure (seeds share it).
_forward = fast_jit(lambda module, x, segment_ids: module(x, segment_ids=segment_ids))


def apply_mixer(module, x, segment_ids=None):
    """``module(x, segment_ids=segment_ids)`` through one cached fast-compiled program."""
    return _forward(module, x, segment_ids)


def recurrence(q, k, v, *, scale, decay=None, beta=None, segment_ids=None, normalize=False):
    """Every op of ``pk.linear_rnn`` token by token in float64, per row and head (``S [K, V]``)::

        S_t = decay_t * S_{t-1}                  (decay: None, [B,T,H] or per key channel [B,T,H,K])
        S_t = S_t + k_t w_t^T                    w_t = v_t, or beta_t (v_t - S_t^T k_t) (delta rule)
        o_t = scale * S_t^T q_t                  (/ (scale * q_t . sum_{s<=t} k_s + 1e-10) with normalize)

    q, k ``[B,T,H,K]``, v ``[B,T,H,V]``, beta ``[B,T,H]``; the state restarts at zero where the
    segment id changes. Returns ``o [B,T,H,V]``.
    """
    batch, length, heads, key_dim = q.shape
    out = np.zeros(v.shape)
    for b in range(batch):
        state = np.zeros((heads, key_dim, v.shape[-1]))
        keys = np.zeros((heads, key_dim))
        for t in range(length):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                state, keys = np.zeros_like(state), np.zeros_like(keys)
            if decay is not None:
                factor = decay[b, t]
                state = state * (factor[:, None, None] if factor.ndim == 1 else factor[:, :, None])
            write = v[b, t]
            if beta is not None:
                write = beta[b, t][:, None] * (write - np.einsum("hk,hkv->hv", k[b, t], state))
            state = state + k[b, t][:, :, None] * write[:, None, :]
            keys = keys + k[b, t]
            o = scale * np.einsum("hk,hkv->hv", q[b, t], state)
            if normalize:
                o = o / (scale * np.einsum("hk,hk->h", q[b, t], keys)[:, None] + 1e-10)
            out[b, t] = o
    return out


cached_call = fast_jit(lambda module, x, cache, valid_lengths: module(x, cache=cache, valid_lengths=valid_lengths))


def decode_in_pieces(module, x, prompt_lengths, pieces, seed=0):
    """Prefills row ``b`` with its first ``prompt_lengths[b]`` tokens of ``x [B,T,D]`` (right-padded
    with large random junk, which must not leak, and ``valid_lengths``), then feeds each row its
    next tokens in ``pieces`` (sizes; 1 is a one-token decoding step).

    Returns the prefill outputs ``[B, max(prompt_lengths), D]``, the continuation
    ``[B, sum(pieces), D]`` and the final cache, whose lengths are checked.
    """
    prompt_lengths = np.asarray(prompt_lengths, np.int32)
    batch, width = x.shape[0], int(prompt_lengths.max())
    x = np.asarray(x)
    prompt = np.array(x[:, :width])
    junk = np.random.default_rng(seed).normal(size=prompt.shape) * 100
    prompt = np.where(np.arange(width)[None, :, None] < prompt_lengths[:, None, None], prompt, junk)
    cache = module.init_cache(batch, x.shape[1])
    prefill, cache = cached_call(module, jnp.asarray(prompt, x.dtype), cache, jnp.asarray(prompt_lengths))
    outputs, start = [], prompt_lengths
    for size in pieces:
        chunk = np.stack([x[b, n : n + size] for b, n in enumerate(start)])
        y, cache = cached_call(module, jnp.asarray(chunk), cache, None)
        outputs.append(y)
        start = start + size
    np.testing.assert_array_equal(cache.lengths, start)
    return prefill, jnp.concatenate(outputs, axis=1), cache


def assert_padding_step_keeps_row(module, cache, x_t):
    """A one-token step ``x_t [B,1,D]`` with valid lengths ``[1, 0, ..., 0]`` advances row 0 and
    leaves the other rows' recurrent and convolution states and lengths untouched."""
    valid = np.zeros(x_t.shape[0], np.int32)
    valid[0] = 1
    _, after = cached_call(module, jnp.asarray(x_t), cache, jnp.asarray(valid))
    np.testing.assert_array_equal(after.lengths, cache.lengths + valid)
    np.testing.assert_array_equal(after.state[1:], cache.state[1:])
    if cache.state.size:
        assert not np.allclose(after.state[0], cache.state[0])
    for new, old in zip(after.conv, cache.conv):
        np.testing.assert_array_equal(new[1:], old[1:])
        assert not np.allclose(new[0], old[0])


def assert_gradients_reach_every_parameter(module, x):
    """Every parameter and the input get a finite, non-zero gradient of ``mean(module(x)^2)``."""

    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    grads, x_grad = fast_jit(lambda model, x: nnx.grad(loss, argnums=(0, 1))(model, x))(module, x)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree.leaves(nnx.state(module, nnx.Param)))
    name = type(module).__name__
    for path, leaf in leaves:
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), f"{name}: {jax.tree_util.keystr(path)}"
    assert np.all(np.isfinite(x_grad)) and np.any(x_grad != 0)


def assert_rejects_bad_calls(module):
    """Inputs, segment ids, valid lengths and caches a recurrent mixer must reject, with errors
    naming its class."""
    name, dim = type(module).__name__, module.dim
    x = jnp.zeros((2, 3, dim))
    with pytest.raises(ValueError, match=rf"{name}: x must have shape \[B,T,D\] with last axis {dim}, got \(2, 3, 8\)"):
        module(jnp.zeros((2, 3, 8)))
    with pytest.raises(TypeError, match=f"{name}: x must have a floating dtype, got int32"):
        module(jnp.zeros((2, 3, dim), jnp.int32))
    with pytest.raises(ValueError, match=rf"{name}: segment_ids must be an int array of shape \(2, 3\)"):
        module(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=f"{name}: valid_lengths needs a cache"):
        module(x, valid_lengths=jnp.array([1, 2]))
    cache = module.init_cache(2, 8)
    with pytest.raises(ValueError, match=f"{name}: segment_ids cannot be combined with a cache"):
        module(x, cache=cache, segment_ids=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=rf"{name}: valid_lengths must be an int array of shape \(2,\)"):
        module(x, cache=cache, valid_lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=f"{name}: cache must be a RecurrentCache"):
        module(x, cache=(cache.state,))
    with pytest.raises(ValueError, match=f"{name}: cache.state must have shape"):
        module(x, cache=module.init_cache(3, 8))
    with pytest.raises(ValueError, match=f"{name}: cache.conv must hold {len(cache.conv)} short-convolution states"):
        module(x, cache=RecurrentCache(cache.state, cache.conv + (cache.state,), cache.lengths))
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        module.init_cache(0, 8)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        module.flops(0)
    with pytest.raises(ValueError, match="kv_len must be an int >= 1"):
        module.flops(3, kv_len=0)
