"""Pieces shared by the TPU and GPU flash-attention kernels: the static config, tile scores,
the backward pass's row statistics and the custom-VJP wrapper."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels.attention.masks import Mask
from attnzoo.pallas_kernels.common import pad_axis

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static description of one attention call, shared by the TPU and GPU kernels."""

    mask: Mask
    q_len: int
    kv_len: int
    scale: float
    softcap: float | None
    block_q: int
    block_kv: int
    use_segments: bool


def tile_scores(q, k, q_start, k_start, q_seg, kv_seg, cfg: KernelConfig, masked: bool):
    """Float32 soft-capped scores ``[bq, bk]`` of one tile and its visibility (None if unmasked).

    The scores are returned unmasked (finite), so derivative factors computed from them stay finite.
    """
    s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    if not masked:
        return s, None
    shape = s.shape
    q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    visible = jnp.broadcast_to(cfg.mask(q_idx, k_idx), shape) & (k_idx < cfg.kv_len)
    if cfg.use_segments:
        visible = visible & (q_seg == kv_seg)
    return s, visible


def backward_rows(out, lse, d_out, d_lse, block_q: int):
    """Per-row statistics of the backward pass, ``[B, Hq, T']`` float32 padded to ``block_q``.

    ``delta = rowsum(dO * O) - dlse`` (the lse cotangent enters here) and the lse with -inf (rows
    that see no key, whose tiles are all masked) replaced by 0.
    """
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    delta = pad_axis(delta - d_lse, 2, block_q)
    lse_rows = pad_axis(jnp.where(jnp.isfinite(lse), lse, 0.0), 2, block_q)
    return delta, lse_rows


def flash_vjp(forward: Callable, backward: Callable):
    """``f(q, k, v, q_seg, kv_seg, cfg, interpret) -> (out, lse)`` with a custom VJP.

    ``forward(q, k, v, q_seg, kv_seg, cfg, interpret)`` returns ``(out, lse)``;
    ``backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg, interpret)`` returns
    ``(dq, dk, dv)``. Segment ids get no cotangent.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def flash(q, k, v, q_seg, kv_seg, cfg, interpret):
        return forward(q, k, v, q_seg, kv_seg, cfg, interpret)

    def flash_fwd(q, k, v, q_seg, kv_seg, cfg, interpret):
        out, lse = forward(q, k, v, q_seg, kv_seg, cfg, interpret)
        return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)

    def flash_bwd(cfg, interpret, residuals, cotangents):
        q, k, v, q_seg, kv_seg, out, lse = residuals
        d_out, d_lse = cotangents
        grads = backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg, interpret)
        return (*grads, None, None)

    flash.defvjp(flash_fwd, flash_bwd)
    return flash


def config_for(q, k, *, mask, use_segments, scale, softcap, block_q, block_kv) -> KernelConfig:
    return KernelConfig(
        mask=mask, q_len=q.shape[1], kv_len=k.shape[1], scale=float(scale), softcap=softcap,
        block_q=block_q, block_kv=block_kv, use_segments=use_segments,
    )
