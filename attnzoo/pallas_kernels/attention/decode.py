"""One decoding step: a query per batch row against a KV cache with a valid length per row.

* ``xla``: a ``fori_loop`` over key blocks up to the longest row's length (blocks past every row's
  length are never read), online softmax in float32.
* TPU kernel: grid ``(B, Hkv, kv_blocks)`` with the lengths prefetched into SMEM; blocks past a
  row's length (or before its window) map to an already-loaded block and are skipped, so their
  copy is never issued. All ``G`` query heads of a key/value head are computed together.

Both are forward-only (inference); differentiate through ``impl="reference"`` if needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnzoo.pallas_kernels.attention.flash_common import MASK_VALUE, NT
from attnzoo.pallas_kernels.common import fit_block, pad_axis



def _first_visible(lengths, window_left):
    if window_left is None:
        return jnp.zeros_like(lengths)
    return jnp.maximum(lengths - 1 - window_left, 0)


def decode_xla(q, k_cache, v_cache, lengths, *, window_left, scale, softcap, block_kv):
    """q ``[B,Hq,D]``, caches ``[B,S,Hkv,*]``, lengths ``[B]`` -> ``[B,Hq,Dv]``."""
    batch, q_heads, head_dim = q.shape
    kv_len, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    group = q_heads // kv_heads
    acc = jnp.promote_types(q.dtype, jnp.float32)
    block = min(block_kv, kv_len)
    qg = q.reshape(batch, kv_heads, group, head_dim)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)
    first = _first_visible(lengths, window_left)
    start_block = jnp.min(first) // block
    end_block = -(-jnp.max(lengths) // block)

    def body(j, carry):
        m, l, o = carry
        start = jnp.minimum(j * block, kv_len - block)  # the last block may overlap the previous
        k = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=1)
        v = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=1)
        s = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=acc) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        pos = start + jnp.arange(block)
        visible = (pos >= j * block) & (pos < lengths[:, None]) & (pos >= first[:, None])
        visible = visible[:, None, None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, MASK_VALUE), axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        # Unwritten cache slots may hold anything (even NaN): 0 * NaN must not reach the output.
        v = jnp.where((pos < lengths[:, None])[:, :, None, None], v, 0)
        o = o * alpha[..., None] + jnp.einsum(
            "bhgs,bshd->bhgd", p.astype(v.dtype), v, preferred_element_type=acc
        )
        return m_new, l * alpha + jnp.sum(p, axis=-1), o

    init = (
        jnp.full((batch, kv_heads, group), MASK_VALUE, acc),
        jnp.zeros((batch, kv_heads, group), acc),
        jnp.zeros((batch, kv_heads, group, dv), acc),
    )
    _, l, o = jax.lax.fori_loop(start_block, end_block, body, init)
    o = jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return o.reshape(batch, q_heads, dv).astype(q.dtype)


def _decode_kernel(
    lengths_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr,
    *, block_kv, window_left, scale, softcap,
):
    b, j = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]
    first = 0 if window_left is None else jnp.maximum(length - 1 - window_left, 0)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((j * block_kv < length) & ((j + 1) * block_kv > first))
    def _visit():
        q = q_ref[...]
        s = jax.lax.dot_general(q, k_ref[...], NT, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        pos = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = (pos < length) & (pos >= first)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(jnp.where(visible, s, MASK_VALUE), axis=1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        # Unwritten cache slots may hold anything (even NaN): 0 * NaN must not reach the output.
        key_pos = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
        v = jnp.where(key_pos < length, v_ref[...], 0)
        acc_scr[...] = alpha * acc_scr[...] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        m_scr[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = jnp.where(l > 0, acc_scr[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def decode_tpu(q, k_cache, v_cache, lengths, *, window_left, scale, softcap, block_kv, interpret):
    """TPU decode kernel; same contract as :func:`decode_xla`. ``block_kv`` rounded to 128."""
    batch, q_heads, head_dim = q.shape
    kv_len, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    group = q_heads // kv_heads
    bk = fit_block(-(-block_kv // 128) * 128, kv_len, 128)
    kh = pad_axis(k_cache, 1, bk).transpose(0, 2, 1, 3)  # [B, Hkv, S', D]
    vh = pad_axis(v_cache, 1, bk).transpose(0, 2, 1, 3)
    qg = q.reshape(batch, kv_heads, group, head_dim)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)
    num_blocks = kh.shape[2] // bk

    def kv_map(b, h, j, lengths_ref):
        length = lengths_ref[b]
        last = jax.lax.div(jnp.maximum(length - 1, 0), bk)
        if window_left is None:
            return (b, h, jnp.minimum(j, last), 0)
        first = jax.lax.div(jnp.maximum(length - 1 - window_left, 0), bk)
        return (b, h, jnp.clip(j, first, last), 0)

    head_map = lambda b, h, j, lengths_ref: (b, h, 0, 0)
    out = pl.pallas_call(
        functools.partial(
            _decode_kernel, block_kv=bk, window_left=window_left, scale=scale, softcap=softcap
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, kv_heads, num_blocks),
            in_specs=[
                pl.BlockSpec((None, None, group, head_dim), head_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map),
                pl.BlockSpec((None, None, bk, dv), kv_map),
            ],
            out_specs=pl.BlockSpec((None, None, group, dv), head_map),
            scratch_shapes=[
                pltpu.VMEM((group, 1), jnp.float32),
                pltpu.VMEM((group, 1), jnp.float32),
                pltpu.VMEM((group, dv), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, dv), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="attnzoo_flash_decode",
    )(lengths, qg, kh, vh)
    return out.reshape(batch, q_heads, dv)
