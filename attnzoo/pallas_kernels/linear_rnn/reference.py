"""The plain recurrence of the linear-attention / delta-rule family, token by token (the oracle).

Layouts (fla's): ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, scalar log-decay ``g [B, T, H]``,
per-channel log-decay ``gk [B, T, H, K]``, delta-rule strength ``beta [B, T, H]``, states
``[N, H, K, V]``. States are kept in float32 (float64 for float64 inputs); outputs take v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels.common import check_array

OP = "linear_rnn.recurrence"


def recurrent_step(q, k, v, state, *, g=None, gk=None, beta=None, scale: float):
    """One token of the recurrence for every batch row and head.

    Args:
      q, k: ``[B, H, K]``. v: ``[B, H, V]``. state: ``[B, H, K, V]`` (the state before this token).
      g: ``[B, H]`` scalar log-decay or None. gk: ``[B, H, K]`` per-channel log-decay or None.
      beta: ``[B, H]`` delta-rule strength, or None for plain (gated) linear attention.
      scale: multiplies the readout ``S^T q``.

    Returns ``(o [B, H, V], new_state [B, H, K, V])`` in the state's dtype.
    """
    dtype = state.dtype
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if g is not None:
        state = state * jnp.exp(g.astype(dtype))[..., None, None]
    if gk is not None:
        state = state * jnp.exp(gk.astype(dtype))[..., None]
    if beta is not None:
        v = beta.astype(dtype)[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, state))
    state = state + k[..., :, None] * v[..., None, :]
    return scale * jnp.einsum("bhk,bhkv->bhv", q, state), state


def check_inputs(op, q, k, v, g, gk, beta, initial_state, cu_seqlens, *, normalize: bool = False,
                 segment_ids=None):
    """Validates a whole-sequence call; returns the number of sequences N (B, or packed ones).

    With ``normalize`` the state carries one extra value column (``[N,H,K,V+1]``).
    """
    OP = op  # noqa: N806
    check_array(OP, "q", q, ndim=4, floating=True, expected="[B,T,H,K]")
    batch, length, heads, key_dim = q.shape
    check_array(OP, "k", k, floating=True, shape=q.shape, expected="[B,T,H,K]")
    check_array(OP, "v", v, ndim=4, floating=True, shape=(batch, length, heads, None), expected="[B,T,H,V]")
    if g is not None:
        check_array(OP, "g", g, floating=True, shape=(batch, length, heads), expected="[B,T,H]")
    if gk is not None:
        # The public per-channel ops (gla, kda) call this gate ``g``.
        check_array(OP, "gk" if OP == "linear_rnn.recurrence" else "g", gk, floating=True, shape=q.shape,
                    expected="[B,T,H,K]")
    if beta is not None:
        check_array(OP, "beta", beta, floating=True, shape=(batch, length, heads), expected="[B,T,H]")
    sequences = batch
    if cu_seqlens is not None:
        check_array(OP, "cu_seqlens", cu_seqlens, ndim=1, integer=True, expected="[N+1]")
        if batch != 1:
            raise ValueError(f"{OP}: cu_seqlens packs sequences along T and needs B == 1, got B = {batch}")
        sequences = cu_seqlens.shape[0] - 1
        if sequences < 1:
            raise ValueError(f"{OP}: cu_seqlens needs at least 2 entries [0, ..., T], got {cu_seqlens.shape[0]}")
        if not isinstance(cu_seqlens, jax.core.Tracer):
            offsets = np.asarray(cu_seqlens)
            if offsets[0] != 0 or offsets[-1] != length or np.any(np.diff(offsets) < 0):
                raise ValueError(
                    f"{OP}: cu_seqlens must rise from 0 to T = {length} without decreasing, got {offsets.tolist()}"
                )
    if segment_ids is not None:
        check_array(OP, "segment_ids", segment_ids, integer=True, shape=(batch, length), expected="[B,T]")
        if cu_seqlens is not None:
            raise ValueError(f"{OP}: pass either segment_ids or cu_seqlens, not both")
    if initial_state is not None:
        value_dim = v.shape[-1] + int(normalize)
        check_array(OP, "initial_state", initial_state, floating=True,
                    shape=(sequences, heads, key_dim, value_dim), expected="[N,H,K,V+1]" if normalize else "[N,H,K,V]")
    return sequences


def check_step_inputs(op, q, k, v, state, g, gk, beta, *, normalize: bool = False):
    """Validates a one-token step: ``q, k [B,H,K]``, ``v [B,H,V]``, ``state [B,H,K,V(+1)]``."""
    check_array(op, "q", q, ndim=3, floating=True, expected="[B,H,K]")
    batch, heads, key_dim = q.shape
    check_array(op, "k", k, floating=True, shape=q.shape, expected="[B,H,K]")
    check_array(op, "v", v, ndim=3, floating=True, shape=(batch, heads, None), expected="[B,H,V]")
    value_dim = v.shape[-1] + int(normalize)
    check_array(op, "state", state, floating=True, shape=(batch, heads, key_dim, value_dim),
                expected="[B,H,K,V+1]" if normalize else "[B,H,K,V]")
    if g is not None:
        check_array(op, "g", g, floating=True, shape=(batch, heads), expected="[B,H]")
    if gk is not None:
        check_array(op, "g", gk, floating=True, shape=q.shape, expected="[B,H,K]")
    if beta is not None:
        check_array(op, "beta", beta, floating=True, shape=(batch, heads), expected="[B,H]")


def segment_restarts(segment_ids):
    """``[B,T]`` bool: the token's id differs from the previous token's (never at t = 0)."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(changed, ((0, 0), (1, 0)))


def recurrence(
    q, k, v, *, g=None, gk=None, beta=None, scale: float | None = None, initial_state=None,
    output_final_state: bool = False, cu_seqlens=None, segment_ids=None,
):
    """The recurrence over T (``lax.scan`` of :func:`recurrent_step`).

    Args:
      q, k ``[B,T,H,K]``, v ``[B,T,H,V]``; g ``[B,T,H]``, gk ``[B,T,H,K]`` log-decays and beta
      ``[B,T,H]``, each optional (see the package docstring for which op uses which).
      scale: default ``K ** -0.5``.
      initial_state: ``[N,H,K,V]`` (N = B, or the number of packed sequences), default zeros.
      output_final_state: also return the state after each sequence's last token ``[N,H,K,V]``.
      cu_seqlens: ``[N+1]`` int offsets of packed sequences along T (B == 1); the state restarts
        at each sequence's start. A sequence of length 0 returns its initial state.
      segment_ids: ``[B,T]`` ints (not with cu_seqlens): the state restarts at zero before every
        token whose id differs from the previous token's (the first token starts from
        ``initial_state``); the final state is the last segment's.

    Returns ``(o [B,T,H,V] in v's dtype, final_state or None)``; states are float32, or float64
    for float64 inputs.
    """
    sequences = check_inputs(OP, q, k, v, g, gk, beta, initial_state, cu_seqlens, segment_ids=segment_ids)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else float(scale)
    state_dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    init = (
        jnp.zeros((sequences, heads, key_dim, value_dim), state_dtype)
        if initial_state is None
        else initial_state.astype(state_dtype)
    )
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731
    xs = tuple(time_major(x) for x in (q, k, v, g, gk, beta))

    if cu_seqlens is None:
        resets = jnp.zeros((length, batch), bool) if segment_ids is None else time_major(segment_restarts(segment_ids))

        def step(state, inputs):
            (qt, kt, vt, gt, gkt, bt), reset = inputs
            state = jnp.where(reset[:, None, None, None], 0.0, state)
            out, state = recurrent_step(qt, kt, vt, state, g=gt, gk=gkt, beta=bt, scale=scale)
            return state, out

        final, out = jax.lax.scan(step, init, (xs, resets))
    else:
        # B == 1: the carry is one state; at a sequence start it is replaced by that sequence's
        # initial state, and after a sequence's last token it is recorded in the finals buffer.
        offsets = cu_seqlens.astype(jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)
        sequence_of = jnp.searchsorted(offsets, positions, side="right") - 1
        starts = positions == offsets[jnp.clip(sequence_of, 0, sequences - 1)]
        ends = positions == offsets[jnp.clip(sequence_of + 1, 0, sequences)] - 1

        def step(carry, inputs):
            state, finals = carry
            (qt, kt, vt, gt, gkt, bt), index, start, end = inputs
            state = jnp.where(start, init[index][None], state)
            out, state = recurrent_step(qt, kt, vt, state, g=gt, gk=gkt, beta=bt, scale=scale)
            finals = jnp.where(end, finals.at[index].set(state[0]), finals)
            return (state, finals), out

        (_, final), out = jax.lax.scan(step, (init[:1], init), (xs, sequence_of, starts, ends))
    out = jnp.moveaxis(out, 0, 1).astype(v.dtype)
    return out, (final if output_final_state else None)
