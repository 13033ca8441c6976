"""Reference softmax attention: materialised scores, the oracle every other path is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.pallas_kernels.attention.masks import Mask


def visibility(mask: Mask, q_len: int, kv_len: int, segment_ids) -> jax.Array:
    """Boolean ``[B or 1, T, S]`` visibility from a mask object and optional (q_ids, kv_ids)."""
    q_idx = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    visible = jnp.broadcast_to(jnp.asarray(mask(q_idx, kv_idx), bool), (q_len, kv_len))[None]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        visible = visible & (q_ids[:, :, None] == kv_ids[:, None, :])
    return visible


def _masked_softmax(scores, visible):
    """Softmax over the last axis restricted to ``visible``; rows with nothing visible give 0.

    Returns ``(probs, lse)``, lse -inf on empty rows.
    """
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    has_any = denom > 0
    safe_denom = jnp.where(has_any, denom, 1.0)
    lse = jnp.where(has_any, jnp.log(safe_denom) + row_max, -jnp.inf)[..., 0]
    return weights / safe_denom, lse


def attention(q, k, v, *, mask: Mask, segment_ids, scale: float, softcap: float | None):
    """Returns ``(out [B,T,Hq,Dv] in q.dtype, lse [B,Hq,T] float32-or-wider)``.

    Rows with no visible key give output 0 and lse -inf.
    """
    batch, q_len, q_heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(acc_dtype).reshape(batch, q_len, kv_heads, group, q.shape[-1])
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(acc_dtype)) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    visible = visibility(mask, q_len, kv_len, segment_ids)[:, None, None]
    probs, lse = _masked_softmax(scores, visible)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(acc_dtype))
    out = out.reshape(batch, q_len, q_heads, v.shape[-1]).astype(q.dtype)
    return out, lse.reshape(batch, q_heads, q_len)


def attention_decode(q, k_cache, v_cache, lengths, *, window_left, scale, softcap):
    """One query per row against a cache. q ``[B,Hq,D]``, caches ``[B,S,Hkv,*]``, lengths ``[B]``.

    Position ``lengths[b] - 1`` is the query's own position; keys at ``>= lengths[b]`` are unused.
    """
    batch, q_heads, _ = q.shape
    kv_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(acc_dtype).reshape(batch, kv_heads, group, q.shape[-1])
    scores = jnp.einsum("bhgd,bshd->bhgs", qg, k_cache.astype(acc_dtype)) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    pos = jnp.arange(kv_len)[None, :]
    visible = pos < lengths[:, None]
    if window_left is not None:
        visible = visible & (pos >= lengths[:, None] - 1 - window_left)
    visible = visible[:, None, None, :]
    probs, _ = _masked_softmax(scores, visible)
    out = jnp.einsum("bhgs,bshd->bhgd", probs, v_cache.astype(acc_dtype))
    return out.reshape(batch, q_heads, v_cache.shape[-1]).astype(q.dtype)
