"""Flash attention kernels for GPU (Pallas Triton backend), block-sparse through tile lists.

Same contracts as the TPU kernels in :mod:`.tpu` and :func:`.decode.decode_tpu`; the mask is
compiled to the same tile lists (``masks.block_metadata``), the scores of a tile come from the
shared :func:`.tpu.tile_scores`.

* forward, grid ``(q_blocks, B, Hq)``: one program per query block walks only the key blocks its
  tile list names, in two ``fori_loop``\\ s with trip counts read from the list: first the FULL
  tiles (no element mask), then the PARTIAL ones (mask, key padding and segment ids evaluated
  elementwise). Online softmax in float32 registers; writes out and lse.
* dq, same grid and walk: recomputes each tile from q, k and lse and accumulates ``dS K``.
* dk/dv, grid ``(kv_blocks, B, Hkv)``: walks the transposed tile list for each of the ``G``
  query heads of the key/value head in turn and accumulates ``dS^T Q`` and ``P^T dO``.
* decode, grid ``(B, Hkv)``: one program per key/value head computes its ``G`` query heads
  together, looping over the key blocks between the row's window start and its length only.

Triton wants power-of-two tensor shapes of at least 16 along matmul dimensions, so block sizes
are rounded up to powers of two (at least 16), sequences are zero-padded to the block size and
head dims to a power of two (zero columns of q and k leave scores unchanged; padded v columns
are sliced off). Blocks are also halved while their pipelined tiles would not fit a shared
memory budget (:func:`fit_blocks`). Tile lists are int32 arrays in global memory read with scalar
loads.

Float32 inputs use IEEE float32 matmuls (Triton's default would be TF32, about 1e-3 relative
error, outside the float32 tolerance of the op contract); bf16/f16 inputs use the tensor cores'
native precision.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnzoo.pallas_kernels.attention.masks import EMPTY, FULL, block_metadata, floor_div
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
from attnzoo.pallas_kernels.common import pad_axis

MIN_BLOCK = 16  # Triton's tl.dot needs every matmul dimension >= 16


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _prev_power_of_2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _padded_dim(d: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(d))


# Shared memory the pipelined operand tiles of one program may use (estimated as below). Well
# inside an A100's 164 KiB and an H100's 228 KiB per block, leaving room for the scratch Triton
# adds for layout conversions and reductions.
SMEM_BUDGET = 100 * 1024
NUM_STAGES = 2


def _smem_estimate(bq: int, bk: int, dp: int, dvp: int, itemsize: int) -> int:
    """Bytes of operand tiles of the busiest pass: loop-loaded tiles times the pipeline stages
    plus the tiles a program keeps for its whole loop."""
    rows = dp + dvp
    forward = NUM_STAGES * bk * rows * itemsize + bq * dp * itemsize  # streams k, v; keeps q
    dq = NUM_STAGES * bk * rows * itemsize + bq * rows * itemsize  # streams k, v; keeps q, dO
    dkv = NUM_STAGES * bq * rows * itemsize + bk * rows * itemsize  # streams q, dO; keeps k, v
    return max(forward, dq, dkv)


def fit_blocks(block_q: int, block_kv: int, q_len: int, kv_len: int, head_dim: int, v_dim: int, dtype):
    """The ``(block_q, block_kv)`` the kernels use.

    Each is rounded up to a power of two >= 16 and shrunk to the sequence length rounded up to a
    power of two; then the larger (``block_kv`` on a tie) is halved while the tiles would exceed
    :data:`SMEM_BUDGET` (e.g. bf16 with head dim 128 runs 64 x 64 tiles).
    """
    bq = max(MIN_BLOCK, min(next_power_of_2(block_q), next_power_of_2(q_len)))
    bk = max(MIN_BLOCK, min(next_power_of_2(block_kv), next_power_of_2(kv_len)))
    dp, dvp, itemsize = _padded_dim(head_dim), _padded_dim(v_dim), jnp.dtype(dtype).itemsize
    while _smem_estimate(bq, bk, dp, dvp, itemsize) > SMEM_BUDGET and max(bq, bk) > MIN_BLOCK:
        if bk >= bq:
            bk //= 2
        else:
            bq //= 2
    return bq, bk


def fit_decode_block(block_kv: int, cache_len: int, head_dim: int, v_dim: int, dtype) -> int:
    """Decode tile length: a power of two >= 16, at most the cache length rounded down to a power
    of two (so the cache is never padded along its length unless shorter than 16), halved while
    the pipelined k and v tiles exceed :data:`SMEM_BUDGET`."""
    bk = max(MIN_BLOCK, min(next_power_of_2(block_kv), _prev_power_of_2(max(cache_len, MIN_BLOCK))))
    row_bytes = (_padded_dim(head_dim) + _padded_dim(v_dim)) * jnp.dtype(dtype).itemsize
    while NUM_STAGES * bk * row_bytes > SMEM_BUDGET and bk > MIN_BLOCK:
        bk //= 2
    return bk


def _params():
    return plgpu.CompilerParams(num_warps=4, num_stages=NUM_STAGES)


def _precision(dtype):
    """Matmul precision while tracing the kernels: IEEE float32 for float32 inputs.

    Other dtypes keep whatever precision is configured (the tensor cores' native one by default).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=256)
def _walks(mask, q_len, kv_len, block_q, block_kv, dense):
    """Tile lists ordered FULL first, then PARTIAL, with per-row counts.

    Returns ``(kv_index [nq*steps], kv_counts [nq*2], q_index [nk*qsteps], q_counts [nk*2],
    steps, qsteps)``; ``counts[2r]`` is the number of FULL tiles of row ``r`` and
    ``counts[2r+1]`` the number of visible (FULL or PARTIAL) ones. Within a kind, blocks keep
    their ascending order.
    """
    meta = block_metadata(mask, q_len, kv_len, block_q, block_kv, dense)

    def order(index, kind):
        perm = np.argsort(-kind, axis=1, kind="stable")
        index = np.take_along_axis(index, perm, axis=1)
        kind = np.take_along_axis(kind, perm, axis=1)
        counts = np.stack([(kind == FULL).sum(axis=1), (kind != EMPTY).sum(axis=1)], axis=1)
        return (
            np.ascontiguousarray(index, np.int32).reshape(-1),
            np.ascontiguousarray(counts, np.int32).reshape(-1),
            index.shape[1],
        )

    kv_index, kv_counts, steps = order(meta.kv_index, meta.kv_kind)
    q_index, q_counts, qsteps = order(meta.q_index, meta.q_kind)
    return kv_index, kv_counts, q_index, q_counts, steps, qsteps


def _walk(counts_ref, row, body, carry):
    """Runs ``body(step, carry, masked)`` over the FULL then the PARTIAL steps of ``row``."""
    n_full = counts_ref[2 * row]
    n_visible = counts_ref[2 * row + 1]
    carry = jax.lax.fori_loop(0, n_full, lambda s, c: body(s, c, False), carry)
    return jax.lax.fori_loop(n_full, n_visible, lambda s, c: body(s, c, True), carry)


def _probs(sc, lse, visible, masked):
    p = jnp.exp(sc - lse[:, None])
    return jnp.where(visible, p, 0.0) if masked else p


def _dscores(p, dp, delta, sc, cfg: KernelConfig):
    ds = p * (dp - delta[:, None])
    if cfg.softcap is not None:
        ds = ds * (1.0 - jnp.square(sc / cfg.softcap))
    return ds


# ----------------------------------------------------------------------------------- kernels


def _forward_kernel(
    kv_index_ref, counts_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
    *, cfg: KernelConfig, steps: int,
):
    i = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_kv
    q = q_ref[...]
    q_seg = q_seg_ref[...][:, None] if cfg.use_segments else None

    def body(s, carry, masked):
        m_prev, l_prev, acc = carry
        k_start = pl.multiple_of(kv_index_ref[i * steps + s] * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        kv_seg = kv_seg_ref[pl.ds(k_start, bk)][None, :] if cfg.use_segments else None
        sc, visible = tile_scores(q, k, i * bq, k_start, q_seg, kv_seg, cfg, masked)
        masked_sc = jnp.where(visible, sc, MASK_VALUE) if masked else sc
        m_new = jnp.maximum(m_prev, jnp.max(masked_sc, axis=1))
        p = jnp.exp(sc - m_new[:, None])
        if masked:
            p = jnp.where(visible, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        v = v_ref[pl.ds(k_start, bk), :]
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

    init = (
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
    )
    m, l, acc = _walk(counts_ref, i, body, init)
    has_any = l > 0.0
    safe_l = jnp.where(has_any, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_any, m + jnp.log(safe_l), -jnp.inf)


def _dq_kernel(
    kv_index_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
    dq_ref, *, cfg: KernelConfig, steps: int,
):
    i = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_kv
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_seg = q_seg_ref[...][:, None] if cfg.use_segments else None

    def body(s, dq, masked):
        k_start = pl.multiple_of(kv_index_ref[i * steps + s] * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        kv_seg = kv_seg_ref[pl.ds(k_start, bk)][None, :] if cfg.use_segments else None
        sc, visible = tile_scores(q, k, i * bq, k_start, q_seg, kv_seg, cfg, masked)
        p = _probs(sc, lse, visible, masked)
        dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = _dscores(p, dp, delta, sc, cfg)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * cfg.scale

    dq = _walk(counts_ref, i, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
    dk_ref, dv_ref, *, cfg: KernelConfig, steps: int, group: int,
):
    j = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_kv
    k = k_ref[...]
    v = v_ref[...]
    k_start = j * bk
    kv_seg = kv_seg_ref[...][None, :] if cfg.use_segments else None

    def head(g, carry):
        def body(s, carry, masked):
            dk, dv = carry
            q_start = pl.multiple_of(q_index_ref[j * steps + s] * bq, bq)
            q = q_ref[pl.ds(q_start, bq), g, :]
            do = do_ref[pl.ds(q_start, bq), g, :]
            lse = lse_ref[g, pl.ds(q_start, bq)]
            delta = delta_ref[g, pl.ds(q_start, bq)]
            q_seg = q_seg_ref[pl.ds(q_start, bq)][:, None] if cfg.use_segments else None
            sc, visible = tile_scores(q, k, q_start, k_start, q_seg, kv_seg, cfg, masked)
            p = _probs(sc, lse, visible, masked)
            dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
            dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
            ds = _dscores(p, dp, delta, sc, cfg)
            dk = dk + jax.lax.dot_general(
                ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32
            ) * cfg.scale
            return dk, dv

        return _walk(counts_ref, j, body, carry)

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, group, head, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ pallas calls


def _pad(x, seq_block, dim):
    """[B, L, H, d] -> zero-padded [B, L', H, dim] with L' a multiple of ``seq_block``."""
    return pad_axis(pad_axis(x, 1, seq_block), 3, dim)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _layout(q, k, v, q_seg, kv_seg, cfg: KernelConfig):
    dp, dvp = _padded_dim(q.shape[-1]), _padded_dim(v.shape[-1])
    qp = _pad(q, cfg.block_q, dp)
    kp = _pad(k, cfg.block_kv, dp)
    vp = _pad(v, cfg.block_kv, dvp)
    qs = pad_axis(q_seg, 1, cfg.block_q, -1)
    ks = pad_axis(kv_seg, 1, cfg.block_kv, -2)
    return qp, kp, vp, qs, ks


def _forward(q, k, v, q_seg, kv_seg, cfg: KernelConfig, interpret):
    qp, kp, vp, qs, ks = _layout(q, k, v, q_seg, kv_seg, cfg)
    batch, tq, q_heads, dp = qp.shape
    sk, kv_heads, dvp = kp.shape[1], kp.shape[2], vp.shape[-1]
    group = q_heads // kv_heads
    bq = cfg.block_q
    kv_index, kv_counts, _, _, steps, _ = _walks(
        cfg.mask, cfg.q_len, cfg.kv_len, bq, cfg.block_kv, cfg.use_segments
    )
    kv_map = lambda i, b, h: (b, 0, floor_div(h, group), 0)
    q_map = lambda i, b, h: (b, i, h, 0)
    with _precision(q.dtype):
        out, lse = pl.pallas_call(
            functools.partial(_forward_kernel, cfg=cfg, steps=steps),
            grid=(tq // bq, batch, q_heads),
            in_specs=[
                _whole(kv_index.shape),
                _whole(kv_counts.shape),
                pl.BlockSpec((None, bq, None, dp), q_map),
                pl.BlockSpec((None, sk, None, dp), kv_map),
                pl.BlockSpec((None, sk, None, dvp), kv_map),
                pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((None, sk), lambda i, b, h: (b, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, bq, None, dvp), q_map),
                pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((batch, tq, q_heads, dvp), q.dtype),
                jax.ShapeDtypeStruct((batch, q_heads, tq), jnp.float32),
            ],
            compiler_params=_params(),
            interpret=interpret,
            name="attnzoo_flash_fwd_gpu",
        )(jnp.asarray(kv_index), jnp.asarray(kv_counts), qp, kp, vp, qs, ks)
    return out[:, : cfg.q_len, :, : v.shape[-1]], lse[:, :, : cfg.q_len]


def _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg: KernelConfig, interpret):
    qp, kp, vp, qs, ks = _layout(q, k, v, q_seg, kv_seg, cfg)
    batch, tq, q_heads, dp = qp.shape
    sk, kv_heads, dvp = kp.shape[1], kp.shape[2], vp.shape[-1]
    group = q_heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_kv
    kv_index, kv_counts, q_index, q_counts, steps, qsteps = _walks(
        cfg.mask, cfg.q_len, cfg.kv_len, bq, bk, cfg.use_segments
    )

    delta, lse_rows = backward_rows(out, lse, d_out, d_lse, bq)  # [B, Hq, T']
    dop = _pad(d_out, bq, dvp)

    q_map = lambda i, b, h: (b, i, h, 0)
    kv_map = lambda i, b, h: (b, 0, floor_div(h, group), 0)
    row_map = lambda i, b, h: (b, h, i)
    with _precision(q.dtype):
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg, steps=steps),
            grid=(tq // bq, batch, q_heads),
            in_specs=[
                _whole(kv_index.shape),
                _whole(kv_counts.shape),
                pl.BlockSpec((None, bq, None, dp), q_map),
                pl.BlockSpec((None, sk, None, dp), kv_map),
                pl.BlockSpec((None, sk, None, dvp), kv_map),
                pl.BlockSpec((None, bq, None, dvp), q_map),
                pl.BlockSpec((None, None, bq), row_map),
                pl.BlockSpec((None, None, bq), row_map),
                pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((None, sk), lambda i, b, h: (b, 0)),
            ],
            out_specs=pl.BlockSpec((None, bq, None, dp), q_map),
            out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
            compiler_params=_params(),
            interpret=interpret,
            name="attnzoo_flash_dq_gpu",
        )(jnp.asarray(kv_index), jnp.asarray(kv_counts), qp, kp, vp, dop, lse_rows, delta, qs, ks)

        # dk, dv: one program per key block and key/value head; its G query heads in turn.
        kv_own = lambda j, b, h: (b, j, h, 0)
        group_map = lambda j, b, h: (b, 0, h, 0)
        dk, dv = pl.pallas_call(
            functools.partial(_dkv_kernel, cfg=cfg, steps=qsteps, group=group),
            grid=(sk // bk, batch, kv_heads),
            in_specs=[
                _whole(q_index.shape),
                _whole(q_counts.shape),
                pl.BlockSpec((None, tq, group, dp), group_map),
                pl.BlockSpec((None, bk, None, dp), kv_own),
                pl.BlockSpec((None, bk, None, dvp), kv_own),
                pl.BlockSpec((None, tq, group, dvp), group_map),
                pl.BlockSpec((None, group, tq), lambda j, b, h: (b, h, 0)),
                pl.BlockSpec((None, group, tq), lambda j, b, h: (b, h, 0)),
                pl.BlockSpec((None, tq), lambda j, b, h: (b, 0)),
                pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
            ],
            out_specs=[
                pl.BlockSpec((None, bk, None, dp), kv_own),
                pl.BlockSpec((None, bk, None, dvp), kv_own),
            ],
            out_shape=[
                jax.ShapeDtypeStruct(kp.shape, k.dtype),
                jax.ShapeDtypeStruct(vp.shape, v.dtype),
            ],
            compiler_params=_params(),
            interpret=interpret,
            name="attnzoo_flash_dkv_gpu",
        )(jnp.asarray(q_index), jnp.asarray(q_counts), qp, kp, vp, dop, lse_rows, delta, qs, ks)
    dq = dq[:, : cfg.q_len, :, : q.shape[-1]]
    dk = dk[:, : cfg.kv_len, :, : k.shape[-1]]
    dv = dv[:, : cfg.kv_len, :, : v.shape[-1]]
    return dq, dk, dv


_flash = flash_vjp(_forward, _backward)


def flash_attention(q, k, v, q_seg, kv_seg, *, mask, use_segments, scale, softcap, block_sizes, interpret):
    """GPU flash attention on ``[B,T,H,D]`` inputs; returns ``(out, lse [B,Hq,T] float32)``.

    ``block_q`` and ``block_kv`` are rounded up to powers of two (at least 16) and shrunk to the
    sequence lengths rounded up to a power of two.
    """
    block_q, block_kv = fit_blocks(
        block_sizes.block_q, block_sizes.block_kv, q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], q.dtype
    )
    cfg = config_for(
        q, k, mask=mask, use_segments=use_segments, scale=scale, softcap=softcap,
        block_q=block_q, block_kv=block_kv,
    )
    return _flash(q, k, v, q_seg, kv_seg, cfg, interpret)


# ------------------------------------------------------------------------------------ decode


def _decode_kernel(
    lengths_ref, q_ref, k_ref, v_ref, o_ref, *, block_kv, window_left, scale, softcap,
):
    b = pl.program_id(0)
    bk = block_kv
    cache_len = k_ref.shape[0]
    length = lengths_ref[b]
    first = 0 if window_left is None else jnp.maximum(length - 1 - window_left, 0)
    q = q_ref[...]

    def body(j, carry):
        m_prev, l_prev, acc = carry
        if cache_len % bk == 0:
            start = pl.multiple_of(j * bk, bk)
        else:  # the last block overlaps its predecessor instead of reading past the cache
            start = jnp.minimum(j * bk, cache_len - bk)
        k = k_ref[pl.ds(start, bk), :]
        s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        pos = start + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
        used = (pos >= j * bk) & (pos < length) & (pos >= first)
        visible = used[None, :]
        m_new = jnp.maximum(m_prev, jnp.max(jnp.where(visible, s, MASK_VALUE), axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        # Unused cache entries may hold anything (even NaN, e.g. uninitialised memory): zero them
        # so that 0 * garbage cannot reach the output.
        v = jnp.where(used[:, None], v_ref[pl.ds(start, bk), :], 0)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

    rows = q.shape[0]
    init = (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, o_ref.shape[-1]), jnp.float32),
    )
    lo = jax.lax.div(first, bk)
    hi = jax.lax.div(length + (bk - 1), bk)
    _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = jnp.where(
        (l > 0)[:, None], acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0
    ).astype(o_ref.dtype)


def flash_decode(q, k_cache, v_cache, lengths, *, window_left, scale, softcap, block_kv, interpret):
    """GPU decode kernel; same contract as :func:`.decode.decode_tpu`.

    ``block_kv`` is chosen by :func:`fit_decode_block`: the last block overlaps its predecessor
    instead of the cache being padded, so the cache is copied only when it is shorter than 16 or
    a head dim is not a power of two >= 16.
    """
    batch, q_heads, head_dim = q.shape
    kv_len, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    group = q_heads // kv_heads
    dp, dvp = _padded_dim(head_dim), _padded_dim(dv)
    rows = _padded_dim(group)
    seq_multiple = MIN_BLOCK if kv_len < MIN_BLOCK else 1
    kp = pad_axis(pad_axis(k_cache, 3, dp), 1, seq_multiple)  # [B, S', Hkv, Dp]
    vp = pad_axis(pad_axis(v_cache, 3, dvp), 1, seq_multiple)
    cache_len = kp.shape[1]
    bk = fit_decode_block(block_kv, cache_len, head_dim, dv, q.dtype)
    qg = q.reshape(batch, kv_heads, group, head_dim)
    qg = pad_axis(pad_axis(qg, 2, rows), 3, dp)  # [B, Hkv, G', Dp]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)
    with _precision(q.dtype):
        out = pl.pallas_call(
            functools.partial(
                _decode_kernel, block_kv=bk, window_left=window_left, scale=scale, softcap=softcap
            ),
            grid=(batch, kv_heads),
            in_specs=[
                _whole(lengths.shape),
                pl.BlockSpec((None, None, rows, dp), lambda b, h: (b, h, 0, 0)),
                pl.BlockSpec((None, cache_len, None, dp), lambda b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, cache_len, None, dvp), lambda b, h: (b, 0, h, 0)),
            ],
            out_specs=pl.BlockSpec((None, None, rows, dvp), lambda b, h: (b, h, 0, 0)),
            out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows, dvp), q.dtype),
            compiler_params=_params(),
            interpret=interpret,
            name="attnzoo_flash_decode_gpu",
        )(lengths, qg, kp, vp)
    return out[:, :, :group, :dv].reshape(batch, q_heads, dv)
