"""Pallas path of :func:`.routed.routed_attention`: the flash-attention engine with routes as tile list.

The kernel bodies are the engine's own (:mod:`.tpu` and :mod:`.gpu`), unchanged; this module only
builds their grids, BlockSpecs and tile lists from the (runtime) routes. See the module docstring of
:mod:`.routed` for the design; in short:

* Regions are padded to kernel blocks: ``bq = round_up(q_region, 8)``, ``bk = round_up(kv_region, 8)``
  on TPU, powers of two >= 16 on GPU. Padded keys are masked by :class:`RegionKeyMask` (the tiles
  are then PARTIAL); with no key padding every routed tile is FULL and runs without a mask.
* The engine's kernels index their tile list by ``row * steps + step``; the routed list also
  depends on the batch element, so the kernels receive :class:`_BatchView`\\ s of the flat lists
  that add ``b * stride`` to every index (``b`` = the batch grid index). The index maps read the
  flat lists directly.
* TPU: forward and dq on grid ``(B, H, R, topk)`` with ``routes`` scalar-prefetched for the K/V
  index maps (batches whose routes exceed :data:`TPU_SMEM_ROUTES` entries run in chunks). dk/dv on grid ``(B, H, R * topk, 1)``: the engine's dk/dv kernel with a one-step
  list per (query region, route) pair writes that pair's float32 dK/dV tile, and XLA sums the
  tiles into their key regions (``segment_sum`` over the routes). This keeps the grid at
  ``R * topk`` steps, where a transposed list would need the worst case ``R * topk`` steps for
  each of the ``Rk`` key regions (Mosaic grids cannot have data-dependent lengths). The price is
  float32 ``[B, H, R * topk * bk, D + Dv]`` of partial tiles, the size of the gathered K/V that
  the xla path (and the official code) materialises in its forward.
* GPU: forward and dq walk ``topk`` routes per query region. dk/dv walk, per key region, the
  transposed list built at run time in XLA (a stable sort of the routes by key region, with
  per-region counts): Triton loops have data-dependent trip counts, so padding costs nothing.
  The list holds ``B * Rk * R * topk`` int32 (each key region's list is sized for the worst case,
  every route of the image naming it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.attention import gpu, tpu
from attnzoo.pallas_kernels.attention.flash_common import KernelConfig, backward_rows, flash_vjp
from attnzoo.pallas_kernels.attention.masks import FULL, PARTIAL, Mask


@dataclasses.dataclass(frozen=True)
class RegionKeyMask(Mask):
    """Keys ``0 .. kv_region - 1`` of every ``block``-row key region are real, the rest padding."""

    kv_region: int
    block: int

    def __call__(self, q_idx, kv_idx):
        if isinstance(kv_idx, jax.Array):
            within = jax.lax.rem(kv_idx, jnp.asarray(self.block, kv_idx.dtype))
        else:
            within = np.remainder(kv_idx, self.block)
        return (within < self.kv_region) & (q_idx >= 0)


class _BatchView:
    """Index-only view of a flat int32 ref: ``view[i]`` reads ``ref[offset + i]``."""

    def __init__(self, ref, offset):
        self.ref, self.offset = ref, offset

    def __getitem__(self, index):
        return self.ref[self.offset + index]


def _config(q_len, kv_len, kv_region, bq, bk, scale) -> KernelConfig:
    mask = RegionKeyMask(kv_region, bk)
    return KernelConfig(
        mask=mask, q_len=q_len, kv_len=kv_len, scale=float(scale), softcap=None,
        block_q=bq, block_kv=bk, use_segments=False,
    )


def _tile_kind(cfg: KernelConfig) -> int:
    return FULL if cfg.mask.kv_region == cfg.block_kv else PARTIAL


def _pad_regions(x, region, block):
    """``[B, n*region, H, E]`` -> ``[B, n*block, H, E]``, each region zero-padded to ``block`` rows."""
    batch, length, heads, dim = x.shape
    if region == block:
        return x
    x = x.reshape(batch, length // region, region, heads, dim)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, block - region), (0, 0), (0, 0)))
    return x.reshape(batch, -1, heads, dim)


def _unpad_regions(x, region, block):
    batch, length, heads, dim = x.shape
    if region == block:
        return x
    x = x.reshape(batch, length // block, block, heads, dim)[:, :, :region]
    return x.reshape(batch, -1, heads, dim)


# --------------------------------------------------------------------------------------- TPU


def _tpu_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _tpu_forward(q, k, v, routes, dummy, cfg: KernelConfig, interpret):
    batch, tq, heads, head_dim = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_kv
    num_q, topk = routes.shape[1], routes.shape[2]
    stride = num_q * topk
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    kinds = jnp.full((stride,), _tile_kind(cfg), jnp.int32)

    def kernel(routes_ref, kind_ref, *refs):
        view = _BatchView(routes_ref, pl.program_id(0) * stride)
        tpu._forward_kernel(view, kind_ref, *refs, cfg=cfg, steps=topk)

    q_map = lambda b, h, i, s, *_: (b, h, i, 0)
    kv_map = lambda b, h, i, s, r, _: (b, h, r[b * stride + i * topk + s], 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, heads, num_q, topk),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_map),
            pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, bk, dv), kv_map),
            pl.BlockSpec((None, bq, 1), lambda b, *_: (b, 0, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, *_: (b, 0, 0)),
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
    q_seg, kv_seg = _tpu_dummy_segments(batch, bq, bk)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, tq, dv), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, tq, 1), jnp.float32),
        ],
        compiler_params=_tpu_params(),
        interpret=interpret,
        name="attnzoo_routed_fwd",
    )(routes.reshape(-1), kinds, qh, kh, vh, q_seg, kv_seg)
    return out.transpose(0, 2, 1, 3), lse[..., 0]


def _tpu_dummy_segments(batch, bq, bk):
    """Segment-id operands of the engine's kernels (unused: ``use_segments`` is False)."""
    return jnp.zeros((batch, bq, 1), jnp.int32), jnp.zeros((batch, 1, bk), jnp.int32)


def _tpu_backward(q, k, v, routes, dummy, out, lse, d_out, d_lse, cfg: KernelConfig, interpret):
    batch, tq, heads, head_dim = q.shape
    num_kv_blocks, dv = k.shape[1] // cfg.block_kv, v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_kv
    num_q, topk = routes.shape[1], routes.shape[2]
    stride = num_q * topk
    qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, d_out))
    delta, lse_rows = backward_rows(out, lse, d_out, d_lse, bq)
    delta, lse_rows = delta[..., None], lse_rows[..., None]  # [B, H, Tq, 1]
    flat_routes = routes.reshape(-1)
    kinds = jnp.full((stride,), _tile_kind(cfg), jnp.int32)
    q_seg, kv_seg = _tpu_dummy_segments(batch, bq, bk)

    # dq: the forward's walk.
    def dq_kernel(routes_ref, kind_ref, *refs):
        view = _BatchView(routes_ref, pl.program_id(0) * stride)
        tpu._dq_kernel(view, kind_ref, *refs, cfg=cfg, steps=topk)

    q_map = lambda b, h, i, s, *_: (b, h, i, 0)
    kv_map = lambda b, h, i, s, r, _: (b, h, r[b * stride + i * topk + s], 0)
    seg_maps = [
        pl.BlockSpec((None, bq, 1), lambda b, *_: (b, 0, 0)),
        pl.BlockSpec((None, 1, bk), lambda b, *_: (b, 0, 0)),
    ]
    dq = pl.pallas_call(
        dq_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, num_q, topk),
            in_specs=[
                pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map),
                pl.BlockSpec((None, None, bk, dv), kv_map),
                pl.BlockSpec((None, None, bq, dv), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                *seg_maps,
            ],
            out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_tpu_params(),
        interpret=interpret,
        name="attnzoo_routed_dq",
    )(flat_routes, kinds, qh, kh, vh, doh, lse_rows, delta, q_seg, kv_seg)

    # dk, dv: one float32 tile per (query region, route) pair, summed into key regions below.
    # The engine's dk/dv kernel with one step per "key block" p = i * topk + s: its list names
    # query block i (q_index) and the pair's kind.
    pair_q = jnp.asarray(np.arange(stride, dtype=np.int32) // topk)

    # The kernel takes its grid index p for the key block (key positions p * bk + ...), so the
    # key-padding check ``k_idx < kv_len`` must cover all P blocks; RegionKeyMask is periodic.
    pair_cfg = dataclasses.replace(cfg, kv_len=max(stride, num_kv_blocks) * bk)

    def dkv_kernel(routes_ref, q_index_ref, kind_ref, *refs):
        tpu._dkv_kernel(q_index_ref, kind_ref, *refs, cfg=pair_cfg, steps=1, group=1)

    qrow_map = lambda b, h, p, t, *_: (b, h, jax.lax.div(p, topk), 0)
    kv_pair_map = lambda b, h, p, t, r, *_: (b, h, r[b * stride + p], 0)
    pair_out = lambda b, h, p, t, *_: (b, h, p, 0)
    dk_pairs, dv_pairs = pl.pallas_call(
        dkv_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, stride, 1),
            in_specs=[
                pl.BlockSpec((None, None, bq, head_dim), qrow_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_pair_map),
                pl.BlockSpec((None, None, bk, dv), kv_pair_map),
                pl.BlockSpec((None, None, bq, dv), qrow_map),
                pl.BlockSpec((None, None, bq, 1), qrow_map),
                pl.BlockSpec((None, None, bq, 1), qrow_map),
                *seg_maps,
            ],
            out_specs=[
                pl.BlockSpec((None, None, bk, head_dim), pair_out),
                pl.BlockSpec((None, None, bk, dv), pair_out),
            ],
            scratch_shapes=[
                pltpu.VMEM((bk, head_dim), jnp.float32),
                pltpu.VMEM((bk, dv), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, stride * bk, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, stride * bk, dv), jnp.float32),
        ],
        compiler_params=_tpu_params(),
        interpret=interpret,
        name="attnzoo_routed_dkv",
    )(flat_routes, pair_q, kinds, qh, kh, vh, doh, lse_rows, delta, q_seg, kv_seg)

    def to_regions(pairs, dtype):  # [B, H, P * bk, E] -> [B, Tk, H, E]
        dim = pairs.shape[-1]
        pairs = pairs.reshape(batch, heads, stride, bk, dim).transpose(0, 2, 3, 1, 4)
        summed = jax.vmap(
            lambda x, r: jax.ops.segment_sum(x, r, num_segments=num_kv_blocks)
        )(pairs, routes.reshape(batch, stride))  # [B, Rk, bk, H, E]
        return summed.reshape(batch, num_kv_blocks * bk, heads, dim).astype(dtype)

    return dq.transpose(0, 2, 1, 3), to_regions(dk_pairs, k.dtype), to_regions(dv_pairs, v.dtype)


_tpu_flash = flash_vjp(_tpu_forward, _tpu_backward)


# --------------------------------------------------------------------------------------- GPU


def _gpu_forward(q, k, v, routes, dummy, cfg: KernelConfig, interpret):
    batch, tq, heads, head_dim = q.shape
    dp, dvp = gpu._padded_dim(head_dim), gpu._padded_dim(v.shape[-1])
    qp, kp, vp = gpu._pad(q, 1, dp), gpu._pad(k, 1, dp), gpu._pad(v, 1, dvp)
    sk = kp.shape[1]
    bq = cfg.block_q
    num_q, topk = routes.shape[1], routes.shape[2]
    stride = num_q * topk
    counts = _gpu_row_counts(jnp.full((num_q,), topk, jnp.int32), cfg)
    qs, ks = jnp.zeros((batch, tq), jnp.int32), jnp.zeros((batch, sk), jnp.int32)

    def kernel(routes_ref, counts_ref, *refs):
        view = _BatchView(routes_ref, pl.program_id(1) * stride)
        gpu._forward_kernel(view, counts_ref, *refs, cfg=cfg, steps=topk)

    q_map = lambda i, b, h: (b, i, h, 0)
    kv_map = lambda i, b, h: (b, 0, h, 0)
    with gpu._precision(q.dtype):
        out, lse = pl.pallas_call(
            kernel,
            grid=(num_q, batch, heads),
            in_specs=[
                gpu._whole((batch * stride,)),
                gpu._whole(counts.shape),
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
                jax.ShapeDtypeStruct((batch, tq, heads, dvp), q.dtype),
                jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32),
            ],
            compiler_params=gpu._params(),
            interpret=interpret,
            name="attnzoo_routed_fwd_gpu",
        )(routes.reshape(-1), counts, qp, kp, vp, qs, ks)
    return out[..., : v.shape[-1]], lse


def _gpu_row_counts(visible, cfg: KernelConfig):
    """``[..., n]`` visible-tile counts -> the engine's ``[..., 2n]`` (FULL, FULL + PARTIAL) pairs."""
    full = visible if _tile_kind(cfg) == FULL else jnp.zeros_like(visible)
    return jnp.stack([full, visible], axis=-1).reshape(-1)


def _gpu_transposed(routes, num_kv_blocks):
    """Per key region, the query regions routing to it: ``(q_index [B*Rk*P], count [B, Rk])``.

    ``P = R * topk`` entries per key region (the worst case); entries past the count are padding
    that the kernels never read. A region routed twice by one query region is listed twice.
    """
    batch, num_q, topk = routes.shape
    pairs = num_q * topk
    flat = routes.reshape(batch, pairs)
    order = jnp.argsort(flat, axis=1, stable=True)  # pairs sorted by key region
    q_sorted = (order // topk).astype(jnp.int32)
    count = jax.vmap(lambda r: jnp.bincount(r, length=num_kv_blocks))(flat).astype(jnp.int32)
    start = jnp.cumsum(count, axis=1) - count  # [B, Rk]
    slot = jnp.minimum(start[:, :, None] + jnp.arange(pairs, dtype=jnp.int32), pairs - 1)
    q_index = jnp.take_along_axis(q_sorted[:, None, :], slot, axis=2)  # [B, Rk, P]
    return q_index.reshape(-1), count


def _gpu_backward(q, k, v, routes, dummy, out, lse, d_out, d_lse, cfg: KernelConfig, interpret):
    batch, tq, heads, head_dim = q.shape
    dp, dvp = gpu._padded_dim(head_dim), gpu._padded_dim(v.shape[-1])
    qp, kp, vp = gpu._pad(q, 1, dp), gpu._pad(k, 1, dp), gpu._pad(v, 1, dvp)
    dop = gpu._pad(d_out, 1, dvp)
    sk = kp.shape[1]
    bq, bk = cfg.block_q, cfg.block_kv
    num_q, topk = routes.shape[1], routes.shape[2]
    num_kv_blocks = sk // bk
    stride, pairs = num_q * topk, num_q * topk
    delta, lse_rows = backward_rows(out, lse, d_out, d_lse, bq)  # [B, H, Tq]
    qs, ks = jnp.zeros((batch, tq), jnp.int32), jnp.zeros((batch, sk), jnp.int32)
    counts = _gpu_row_counts(jnp.full((num_q,), topk, jnp.int32), cfg)

    def dq_kernel(routes_ref, counts_ref, *refs):
        view = _BatchView(routes_ref, pl.program_id(1) * stride)
        gpu._dq_kernel(view, counts_ref, *refs, cfg=cfg, steps=topk)

    q_map = lambda i, b, h: (b, i, h, 0)
    kv_map = lambda i, b, h: (b, 0, h, 0)
    row_map = lambda i, b, h: (b, h, i)
    q_index, q_count = _gpu_transposed(routes, num_kv_blocks)
    q_counts = _gpu_row_counts(q_count, cfg)  # [B * Rk * 2]

    def dkv_kernel(q_index_ref, counts_ref, *refs):
        b = pl.program_id(1)
        gpu._dkv_kernel(
            _BatchView(q_index_ref, b * num_kv_blocks * pairs),
            _BatchView(counts_ref, b * num_kv_blocks * 2),
            *refs, cfg=cfg, steps=pairs, group=1,
        )

    kv_own = lambda j, b, h: (b, j, h, 0)
    group_map = lambda j, b, h: (b, 0, h, 0)
    with gpu._precision(q.dtype):
        dq = pl.pallas_call(
            dq_kernel,
            grid=(num_q, batch, heads),
            in_specs=[
                gpu._whole((batch * stride,)),
                gpu._whole(counts.shape),
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
            compiler_params=gpu._params(),
            interpret=interpret,
            name="attnzoo_routed_dq_gpu",
        )(routes.reshape(-1), counts, qp, kp, vp, dop, lse_rows, delta, qs, ks)

        dk, dv = pl.pallas_call(
            dkv_kernel,
            grid=(num_kv_blocks, batch, heads),
            in_specs=[
                gpu._whole(q_index.shape),
                gpu._whole(q_counts.shape),
                pl.BlockSpec((None, tq, 1, dp), group_map),
                pl.BlockSpec((None, bk, None, dp), kv_own),
                pl.BlockSpec((None, bk, None, dvp), kv_own),
                pl.BlockSpec((None, tq, 1, dvp), group_map),
                pl.BlockSpec((None, 1, tq), lambda j, b, h: (b, h, 0)),
                pl.BlockSpec((None, 1, tq), lambda j, b, h: (b, h, 0)),
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
            compiler_params=gpu._params(),
            interpret=interpret,
            name="attnzoo_routed_dkv_gpu",
        )(q_index, q_counts, qp, kp, vp, dop, lse_rows, delta, qs, ks)
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., : v.shape[-1]]


_gpu_flash = flash_vjp(_gpu_forward, _gpu_backward)


# ----------------------------------------------------------------------------------- entry

# The TPU kernels prefetch the routes of all their images into SMEM (a few hundred KiB at most):
# batches whose routes exceed this many entries (64 KiB) run in chunks of images, one kernel
# launch per chunk.
TPU_SMEM_ROUTES = 1 << 14


def _blocks(platform: str, q_region: int, kv_region: int) -> tuple[int, int]:
    if platform == "gpu":
        return (max(gpu.MIN_BLOCK, gpu.next_power_of_2(q_region)),
                max(gpu.MIN_BLOCK, gpu.next_power_of_2(kv_region)))
    return common.round_up(q_region, 8), common.round_up(kv_region, 8)


def _run(q, k, v, routes, *, platform, q_region, kv_region, scale, interpret):
    """Pads regions to blocks, runs the platform's kernels, drops the padding."""
    bq, bk = _blocks(platform, q_region, kv_region)
    qp = _pad_regions(q, q_region, bq)
    kp = _pad_regions(k, kv_region, bk)
    vp = _pad_regions(v, kv_region, bk)
    cfg = _config(qp.shape[1], kp.shape[1], kv_region, bq, bk, scale)
    flash = _gpu_flash if platform == "gpu" else _tpu_flash
    dummy = jnp.zeros((1,), jnp.int32)
    batch, per_image = routes.shape[0], routes.shape[1] * routes.shape[2]
    chunk = batch if platform == "gpu" else max(1, min(batch, TPU_SMEM_ROUTES // per_image))
    outs = [
        flash(qp[b : b + chunk], kp[b : b + chunk], vp[b : b + chunk], routes[b : b + chunk], dummy, cfg, interpret)[0]
        for b in range(0, batch, chunk)
    ]
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return _unpad_regions(out, q_region, bq)


def tpu_routed_attention(q, k, v, routes, *, q_region, kv_region, scale, interpret):
    """TPU (Mosaic) kernels; ``interpret=True`` runs them in the Pallas TPU interpreter."""
    return _run(q, k, v, routes, platform="tpu", q_region=q_region, kv_region=kv_region,
                scale=scale, interpret=interpret)


def gpu_routed_attention(q, k, v, routes, *, q_region, kv_region, scale, interpret):
    """GPU (Triton) kernels; ``interpret=True`` runs them in the generic Pallas interpreter."""
    return _run(q, k, v, routes, platform="gpu", q_region=q_region, kv_region=kv_region,
                scale=scale, interpret=interpret)


def routed_attention(q, k, v, routes, *, q_region, kv_region, scale, interpret):
    """``[B,Tq,H,Dv]``: the kernel for the platform being lowered (``routes`` already clamped)."""
    options = dict(q_region=q_region, kv_region=kv_region, scale=scale)
    return common.run_pallas(
        functools.partial(tpu_routed_attention, **options),
        functools.partial(gpu_routed_attention, **options),
        interpret,
        q, k, v, routes,
    )
