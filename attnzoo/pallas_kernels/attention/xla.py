"""Blockwise softmax attention in pure JAX with O(T) memory in forward and backward.

The score matrix is cut into ``block_q x block_kv`` tiles; the mask's block metadata lists the
visible tiles as (query block, key block) pairs, FULL tiles apart from PARTIAL ones. A ``lax.scan``
walks the pair lists a few pairs at a time:

* forward: each pair yields a tile-local row max, row sum and unnormalised output, merged into
  per-query-block running statistics with scatter-max / scatter-add (the online softmax of
  "Self-attention does not need O(n^2) memory" and FlashAttention-2, over an arbitrary tile list);
* backward (custom VJP): tiles are recomputed from q, k and the saved log-sum-exp, and dq, dk, dv
  are scatter-added per tile, so nothing of size T x S is ever stored.

Empty tiles are never visited and FULL tiles skip the element mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels.attention.masks import Mask, block_metadata
from attnzoo.pallas_kernels.common import fit_block, pad_axis

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class XlaBlockSizes:
    """Tiles of the blockwise XLA path.

    ``block_q``/``block_kv`` are shrunk to the sequence lengths (rounded up to 8).
    ``scores_per_step`` bounds the float32 score elements materialised per scan step (across
    batch and heads); the number of tiles per step follows from it.
    """

    block_q: int = 512
    block_kv: int = 512
    scores_per_step: int = 1 << 22


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    q_len: int
    kv_len: int
    scale: float
    softcap: float | None
    block_q: int
    block_kv: int
    scores_per_step: int
    use_segments: bool
    acc: jnp.dtype = jnp.float32  # float32, or float64 for float64 inputs


def _blocks(x, block):
    """[B, L, H, D] -> [L/block, B, H, block, D] (L already padded)."""
    batch, length, heads, dim = x.shape
    x = x.reshape(batch, length // block, block, heads, dim)
    return x.transpose(1, 0, 3, 2, 4)


def _prepare(q, k, v, q_seg, kv_seg, st: _Static):
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    qb = _blocks(pad_axis(q, 1, st.block_q), st.block_q)  # [nq, B, Hq, bq, D]
    nq = qb.shape[0]
    qb = qb.reshape(nq, batch, kv_heads, group, st.block_q, head_dim)
    kb = _blocks(pad_axis(k, 1, st.block_kv), st.block_kv)  # [nk, B, Hkv, bk, D]
    vb = _blocks(pad_axis(v, 1, st.block_kv), st.block_kv)
    qs = pad_axis(q_seg, 1, st.block_q, -1).reshape(batch, nq, st.block_q).transpose(1, 0, 2)
    ks = pad_axis(kv_seg, 1, st.block_kv, -2).reshape(batch, -1, st.block_kv).transpose(1, 0, 2)
    return qb, kb, vb, qs, ks


def _pair_chunks(pairs: np.ndarray, per_step: int):
    """[P, 2] pairs -> (qi, kj, valid) each [steps, per_step]; padding pairs are invalid."""
    count = pairs.shape[0]
    per_step = max(1, min(per_step, count))
    steps = -(-count // per_step)
    padded = np.zeros((steps * per_step, 2), np.int32)
    padded[:count] = pairs
    valid = np.zeros(steps * per_step, bool)
    valid[:count] = True
    shape = (steps, per_step)
    return (
        jnp.asarray(padded[:, 0].reshape(shape)),
        jnp.asarray(padded[:, 1].reshape(shape)),
        jnp.asarray(valid.reshape(shape)),
    )


def _tile_scores(qc, kc, qi, kj, valid, qs, ks, st: _Static, masked: bool):
    """Scores of C tiles ``[C, B, Hkv, G, bq, bk]`` (float32, soft-capped) and their visibility."""
    s = jnp.einsum("cbhgqd,cbhkd->cbhgqk", qc, kc, preferred_element_type=st.acc) * st.scale
    if st.softcap is not None:
        s = st.softcap * jnp.tanh(s / st.softcap)
    visible = valid[:, None, None, None, None, None]
    if masked:
        q_abs = qi[:, None] * st.block_q + jnp.arange(st.block_q, dtype=jnp.int32)[None, :]
        k_abs = kj[:, None] * st.block_kv + jnp.arange(st.block_kv, dtype=jnp.int32)[None, :]
        element = st.mask(q_abs[:, :, None], k_abs[:, None, :]) & (k_abs[:, None, :] < st.kv_len)
        element = jnp.broadcast_to(element, (qi.shape[0], st.block_q, st.block_kv))
        element = element[:, None]
        if st.use_segments:
            element = element & (qs[qi][:, :, :, None] == ks[kj][:, :, None, :])
        visible = visible & element[:, :, None, None]
    return s, visible


def _forward(q, k, v, q_seg, kv_seg, st: _Static):
    qb, kb, vb, qs, ks = _prepare(q, k, v, q_seg, kv_seg, st)
    nq, batch, kv_heads, group, bq, _ = qb.shape
    dv = vb.shape[-1]
    meta = block_metadata(st.mask, st.q_len, st.kv_len, st.block_q, st.block_kv, st.use_segments)
    per_step = max(1, st.scores_per_step // (batch * kv_heads * group * bq * st.block_kv))

    m = jnp.full((nq, batch, kv_heads, group, bq), MASK_VALUE, st.acc)
    l = jnp.zeros_like(m)
    acc = jnp.zeros((nq, batch, kv_heads, group, bq, dv), st.acc)

    def step(carry, chunk, masked):
        m, l, acc = carry
        qi, kj, valid = chunk
        s, visible = _tile_scores(qb[qi], kb[kj], qi, kj, valid, qs, ks, st, masked)
        s = jnp.where(visible, s, MASK_VALUE)
        m_tile = jnp.max(s, axis=-1)
        p = jnp.where(visible, jnp.exp(s - m_tile[..., None]), 0.0)
        l_tile = jnp.sum(p, axis=-1)
        o_tile = jnp.einsum(
            "cbhgqk,cbhkd->cbhgqd", p.astype(vb.dtype), vb[kj], preferred_element_type=st.acc
        )
        m_new = m.at[qi].max(m_tile)
        alpha = jnp.exp(m - m_new)
        beta = jnp.exp(m_tile - m_new[qi])
        acc = (acc * alpha[..., None]).at[qi].add(o_tile * beta[..., None])
        l = (l * alpha).at[qi].add(l_tile * beta)
        return (m_new, l, acc), None

    carry = (m, l, acc)
    for pairs, masked in ((meta.full_pairs, False), (meta.partial_pairs, True)):
        if pairs.shape[0]:
            carry, _ = jax.lax.scan(
                functools.partial(step, masked=masked), carry, _pair_chunks(pairs, per_step)
            )
    m, l, acc = carry
    has_any = l > 0
    safe_l = jnp.where(has_any, l, 1.0)
    out = acc / safe_l[..., None]
    lse = jnp.where(has_any, m + jnp.log(safe_l), -jnp.inf)
    # [nq, B, Hkv, G, bq, Dv] -> [B, T, Hq, Dv]; lse -> [B, Hq, T]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, nq * bq, kv_heads * group, dv)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(batch, kv_heads * group, nq * bq)
    return out[:, : st.q_len].astype(q.dtype), lse[:, :, : st.q_len]


def _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, st: _Static):
    qb, kb, vb, qs, ks = _prepare(q, k, v, q_seg, kv_seg, st)
    nq, batch, kv_heads, group, bq, head_dim = qb.shape
    meta = block_metadata(st.mask, st.q_len, st.kv_len, st.block_q, st.block_kv, st.use_segments)
    per_step = max(1, st.scores_per_step // (batch * kv_heads * group * bq * st.block_kv))

    delta = jnp.sum(d_out.astype(st.acc) * out.astype(st.acc), axis=-1)  # [B, T, Hq]
    delta = delta.transpose(0, 2, 1) - d_lse  # [B, Hq, T]

    def rows(x):  # [B, Hq, T] -> [nq, B, Hkv, G, bq]
        x = pad_axis(x, 2, st.block_q).reshape(batch, kv_heads, group, nq, bq)
        return x.transpose(3, 0, 1, 2, 4)

    lse_b = rows(jnp.where(jnp.isfinite(lse), lse, 0.0))
    delta_b = rows(delta)
    dob = _blocks(pad_axis(d_out, 1, st.block_q), st.block_q)
    dob = dob.reshape(nq, batch, kv_heads, group, bq, d_out.shape[-1])

    dq = jnp.zeros(qb.shape, st.acc)
    dk = jnp.zeros(kb.shape, st.acc)
    dv = jnp.zeros(vb.shape, st.acc)

    def step(carry, chunk, masked):
        dq, dk, dv = carry
        qi, kj, valid = chunk
        qc, kc, vc, doc = qb[qi], kb[kj], vb[kj], dob[qi]
        s, visible = _tile_scores(qc, kc, qi, kj, valid, qs, ks, st, masked)
        p = jnp.where(visible, jnp.exp(s - lse_b[qi][..., None]), 0.0)
        dv_tile = jnp.einsum(
            "cbhgqk,cbhgqd->cbhkd", p.astype(doc.dtype), doc, preferred_element_type=st.acc
        )
        dp = jnp.einsum("cbhgqd,cbhkd->cbhgqk", doc, vc, preferred_element_type=st.acc)
        ds = p * (dp - delta_b[qi][..., None])
        if st.softcap is not None:
            ds = ds * (1.0 - jnp.square(s / st.softcap))
        ds = ds * st.scale
        dq_tile = jnp.einsum(
            "cbhgqk,cbhkd->cbhgqd", ds.astype(kc.dtype), kc, preferred_element_type=st.acc
        )
        dk_tile = jnp.einsum(
            "cbhgqk,cbhgqd->cbhkd", ds.astype(qc.dtype), qc, preferred_element_type=st.acc
        )
        return (dq.at[qi].add(dq_tile), dk.at[kj].add(dk_tile), dv.at[kj].add(dv_tile)), None

    carry = (dq, dk, dv)
    for pairs, masked in ((meta.full_pairs, False), (meta.partial_pairs, True)):
        if pairs.shape[0]:
            carry, _ = jax.lax.scan(
                functools.partial(step, masked=masked), carry, _pair_chunks(pairs, per_step)
            )
    dq, dk, dv = carry

    def unblock(x, length, dtype):  # [n, B, H, blk, D] -> [B, length, H, D]
        n, b, h, blk, d = x.shape
        return x.transpose(1, 0, 3, 2, 4).reshape(b, n * blk, h, d)[:, :length].astype(dtype)

    dq = unblock(dq.reshape(nq, batch, kv_heads * group, bq, head_dim), st.q_len, q.dtype)
    return dq, unblock(dk, st.kv_len, k.dtype), unblock(dv, st.kv_len, v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, q_seg, kv_seg, st: _Static):
    return _forward(q, k, v, q_seg, kv_seg, st)


def _attention_fwd(q, k, v, q_seg, kv_seg, st: _Static):
    out, lse = _forward(q, k, v, q_seg, kv_seg, st)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(st: _Static, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, st)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, mask: Mask, segment_ids, scale, softcap, block_sizes: XlaBlockSizes):
    """Blockwise attention; same contract as the reference: ``(out [B,T,Hq,Dv], lse [B,Hq,T])``."""
    q_len, kv_len = q.shape[1], k.shape[1]
    st = _Static(
        mask=mask,
        q_len=q_len,
        kv_len=kv_len,
        scale=float(scale),
        softcap=softcap,
        block_q=fit_block(block_sizes.block_q, q_len, 8),
        block_kv=fit_block(block_sizes.block_kv, kv_len, 8),
        scores_per_step=block_sizes.scores_per_step,
        use_segments=segment_ids is not None,
        acc=jnp.promote_types(q.dtype, jnp.float32),
    )
    if segment_ids is None:
        q_seg = jnp.zeros((q.shape[0], q_len), jnp.int32)
        kv_seg = jnp.zeros((q.shape[0], kv_len), jnp.int32)
    else:
        q_seg, kv_seg = (s.astype(jnp.int32) for s in segment_ids)
    return _attention(q, k, v, q_seg, kv_seg, st)
