"""Flash attention kernels for TPU (Mosaic), block-sparse through scalar-prefetched tile lists.

Three kernels share one tile list built from the mask (``masks.block_metadata``):

* forward, grid ``(B, Hq, q_blocks, steps)``: step ``s`` of query block ``i`` visits key block
  ``kv_index[i, s]``; padded steps repeat the previous index (no new copy) and are skipped, FULL
  tiles skip the element mask. Online softmax in float32 VMEM scratch; writes out and lse.
* dq, same grid: recomputes the tile from q, k and lse and accumulates ``dS K``.
* dk/dv, grid ``(B, Hkv, kv_blocks, G * steps)``: walks the transposed tile list for every query
  head of the group and accumulates ``dS^T Q`` and ``P^T dO`` in scratch.

The tile lists are int32 arrays prefetched into SMEM and read by the BlockSpec index maps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnzoo.pallas_kernels.attention.flash_common import (
    MASK_VALUE,
    NT,
    TN,
    KernelConfig,
    backward_rows,
    config_for,
    flash_vjp,
    tile_scores,
)
from attnzoo.pallas_kernels.attention.masks import FULL, PARTIAL, block_metadata, floor_div
from attnzoo.pallas_kernels.common import fit_block, pad_axis

def _when_visible(kind, body):
    """Runs ``body(masked)`` for FULL and PARTIAL tiles; EMPTY (padding) steps do nothing."""
    pl.when(kind == FULL)(lambda: body(False))
    pl.when(kind == PARTIAL)(lambda: body(True))


def _forward_kernel(
    kv_index_ref, kv_kind_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref,
    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: KernelConfig, steps: int,
):
    i, s = pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked):
        j = kv_index_ref[i * steps + s]
        sc, visible = tile_scores(
            q_ref[...], k_ref[...], i * cfg.block_q, j * cfg.block_kv,
            q_seg_ref[...], kv_seg_ref[...], cfg, masked,
        )
        m_prev = m_scr[...]
        masked_sc = jnp.where(visible, sc, MASK_VALUE) if masked else sc
        m_new = jnp.maximum(m_prev, jnp.max(masked_sc, axis=1, keepdims=True))
        p = jnp.exp(sc - m_new)
        if masked:
            p = jnp.where(visible, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = alpha * acc_scr[...] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        m_scr[...] = m_new

    _when_visible(kv_kind_ref[i * steps + s], body)

    @pl.when(s == steps - 1)
    def _finish():
        l = l_scr[...]
        has_any = l > 0.0
        safe_l = jnp.where(has_any, l, 1.0)
        o_ref[...] = (acc_scr[...] / safe_l).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_any, m_scr[...] + jnp.log(safe_l), -jnp.inf)


def _dq_kernel(
    kv_index_ref, kv_kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
    dq_ref, dq_scr, *, cfg: KernelConfig, steps: int,
):
    i, s = pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def body(masked):
        j = kv_index_ref[i * steps + s]
        k = k_ref[...]
        sc, visible = tile_scores(
            q_ref[...], k, i * cfg.block_q, j * cfg.block_kv,
            q_seg_ref[...], kv_seg_ref[...], cfg, masked,
        )
        p = jnp.exp(sc - lse_ref[...])
        if masked:
            p = jnp.where(visible, p, 0.0)
        do = do_ref[...]
        dp = jax.lax.dot_general(do, v_ref[...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        if cfg.softcap is not None:
            ds = ds * (1.0 - jnp.square(sc / cfg.softcap))
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * cfg.scale

    _when_visible(kv_kind_ref[i * steps + s], body)

    @pl.when(s == steps - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, q_kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
    dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: KernelConfig, steps: int, group: int,
):
    j, t = pl.program_id(2), pl.program_id(3)
    s = jax.lax.rem(t, steps)

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked):
        i = q_index_ref[j * steps + s]
        q = q_ref[...]
        sc, visible = tile_scores(
            q, k_ref[...], i * cfg.block_q, j * cfg.block_kv,
            q_seg_ref[...], kv_seg_ref[...], cfg, masked,
        )
        p = jnp.exp(sc - lse_ref[...])
        if masked:
            p = jnp.where(visible, p, 0.0)
        do = do_ref[...]
        dv_scr[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32
        )
        dp = jax.lax.dot_general(do, v_ref[...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        if cfg.softcap is not None:
            ds = ds * (1.0 - jnp.square(sc / cfg.softcap))
        dk_scr[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32
        ) * cfg.scale

    _when_visible(q_kind_ref[j * steps + s], body)

    @pl.when(t == group * steps - 1)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _layout(q, k, v, q_seg, kv_seg, cfg: KernelConfig):
    """[B,T,H,D] -> padded [B,H,T',D]; segments -> [B,T',1] and [B,1,S']."""
    qh = pad_axis(q, 1, cfg.block_q).transpose(0, 2, 1, 3)
    kh = pad_axis(k, 1, cfg.block_kv).transpose(0, 2, 1, 3)
    vh = pad_axis(v, 1, cfg.block_kv).transpose(0, 2, 1, 3)
    qs = pad_axis(q_seg, 1, cfg.block_q, -1)[:, :, None]
    ks = pad_axis(kv_seg, 1, cfg.block_kv, -2)[:, None, :]
    return qh, kh, vh, qs, ks


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, q_seg, kv_seg, cfg: KernelConfig, interpret):
    qh, kh, vh, qs, ks = _layout(q, k, v, q_seg, kv_seg, cfg)
    batch, q_heads, tq, head_dim = qh.shape
    kv_heads, dv = kh.shape[1], vh.shape[-1]
    group = q_heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_kv
    meta = block_metadata(cfg.mask, cfg.q_len, cfg.kv_len, bq, bk, cfg.use_segments)
    steps = meta.kv_index.shape[1]

    def kv_map(b, h, i, s, kv_index, kv_kind):
        return (b, floor_div(h, group), kv_index[i * steps + s], 0)

    def kv_seg_map(b, h, i, s, kv_index, kv_kind):
        return (b, 0, kv_index[i * steps + s])

    q_map = lambda b, h, i, s, *_: (b, h, i, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, q_heads, tq // bq, steps),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_map),
            pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, bk, dv), kv_map),
            pl.BlockSpec((None, bq, 1), lambda b, h, i, s, *_: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), kv_seg_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, dv), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, steps=steps),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((batch, q_heads, tq, dv), q.dtype),
            jax.ShapeDtypeStruct((batch, q_heads, tq, 1), jnp.float32),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="attnzoo_flash_fwd",
    )(jnp.asarray(meta.kv_index.reshape(-1)), jnp.asarray(meta.kv_kind.reshape(-1)), qh, kh, vh, qs, ks)
    out = out[:, :, : cfg.q_len].transpose(0, 2, 1, 3)
    return out, lse[:, :, : cfg.q_len, 0]


def _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg: KernelConfig, interpret):
    qh, kh, vh, qs, ks = _layout(q, k, v, q_seg, kv_seg, cfg)
    batch, q_heads, tq, head_dim = qh.shape
    kv_heads, sk, dv = kh.shape[1], kh.shape[2], vh.shape[-1]
    group = q_heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_kv
    meta = block_metadata(cfg.mask, cfg.q_len, cfg.kv_len, bq, bk, cfg.use_segments)

    delta, lse_rows = backward_rows(out, lse, d_out, d_lse, bq)
    delta, lse_rows = delta[..., None], lse_rows[..., None]  # [B, Hq, T', 1]
    doh = pad_axis(d_out, 1, bq).transpose(0, 2, 1, 3)

    # dq: the forward's tile order.
    steps = meta.kv_index.shape[1]

    def kv_map(b, h, i, s, kv_index, kv_kind):
        return (b, floor_div(h, group), kv_index[i * steps + s], 0)

    q_map = lambda b, h, i, s, *_: (b, h, i, 0)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, q_heads, tq // bq, steps),
            in_specs=[
                pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map),
                pl.BlockSpec((None, None, bk, dv), kv_map),
                pl.BlockSpec((None, None, bq, dv), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                pl.BlockSpec((None, bq, 1), lambda b, h, i, s, *_: (b, i, 0)),
                pl.BlockSpec((None, 1, bk), lambda b, h, i, s, kv_index, _: (b, 0, kv_index[i * steps + s])),
            ],
            out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="attnzoo_flash_dq",
    )(
        jnp.asarray(meta.kv_index.reshape(-1)), jnp.asarray(meta.kv_kind.reshape(-1)),
        qh, kh, vh, doh, lse_rows, delta, qs, ks,
    )

    # dk, dv: the transposed tile order, every query head of the group in turn.
    qsteps = meta.q_index.shape[1]

    def qrow_map(b, h, j, t, q_index, q_kind):
        return (b, h * group + jax.lax.div(t, qsteps), q_index[j * qsteps + jax.lax.rem(t, qsteps)], 0)

    kv_own = lambda b, h, j, t, *_: (b, h, j, 0)
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, steps=qsteps, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads, sk // bk, group * qsteps),
            in_specs=[
                pl.BlockSpec((None, None, bq, head_dim), qrow_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_own),
                pl.BlockSpec((None, None, bk, dv), kv_own),
                pl.BlockSpec((None, None, bq, dv), qrow_map),
                pl.BlockSpec((None, None, bq, 1), qrow_map),
                pl.BlockSpec((None, None, bq, 1), qrow_map),
                pl.BlockSpec((None, bq, 1), lambda b, h, j, t, q_index, _: (b, q_index[j * qsteps + jax.lax.rem(t, qsteps)], 0)),
                pl.BlockSpec((None, 1, bk), lambda b, h, j, t, *_: (b, 0, j)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bk, head_dim), kv_own),
                pl.BlockSpec((None, None, bk, dv), kv_own),
            ],
            scratch_shapes=[
                pltpu.VMEM((bk, head_dim), jnp.float32),
                pltpu.VMEM((bk, dv), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(kh.shape, k.dtype),
            jax.ShapeDtypeStruct(vh.shape, v.dtype),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="attnzoo_flash_dkv",
    )(
        jnp.asarray(meta.q_index.reshape(-1)), jnp.asarray(meta.q_kind.reshape(-1)),
        qh, kh, vh, doh, lse_rows, delta, qs, ks,
    )
    dq = dq[:, :, : cfg.q_len].transpose(0, 2, 1, 3)
    dk = dk[:, :, : cfg.kv_len].transpose(0, 2, 1, 3)
    dv_ = dv_[:, :, : cfg.kv_len].transpose(0, 2, 1, 3)
    return dq, dk, dv_


_flash = flash_vjp(_forward, _backward)


def flash_attention(q, k, v, q_seg, kv_seg, *, mask, use_segments, scale, softcap, block_sizes, interpret):
    """TPU flash attention on ``[B,T,H,D]`` inputs; returns ``(out, lse [B,Hq,T] float32)``.

    ``block_q`` is rounded to a multiple of 8 and ``block_kv`` to a multiple of 128 (TPU tiling).
    """
    cfg = config_for(
        q, k, mask=mask, use_segments=use_segments, scale=scale, softcap=softcap,
        block_q=fit_block(-(-block_sizes.block_q // 8) * 8, q.shape[1], 8),
        block_kv=fit_block(-(-block_sizes.block_kv // 128) * 128, k.shape[1], 128),
    )
    return _flash(q, k, v, q_seg, kv_seg, cfg, interpret)
