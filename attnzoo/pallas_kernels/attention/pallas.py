"""Pallas attention: picks the TPU (Mosaic) or GPU (Triton) kernel for the platform being lowered."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.attention import gpu, tpu


def attention(q, k, v, *, mask, segment_ids, scale, softcap, block_sizes, interpret):
    """Flash attention; ``(out [B,T,Hq,Dv], lse [B,Hq,T] float32)`` as the reference."""
    use_segments = segment_ids is not None
    if use_segments:
        q_seg, kv_seg = segment_ids
    else:
        q_seg = jnp.zeros(q.shape[:2], jnp.int32)
        kv_seg = jnp.zeros(k.shape[:2], jnp.int32)
    options = dict(
        mask=mask, use_segments=use_segments, scale=scale, softcap=softcap, block_sizes=block_sizes
    )
    return common.run_pallas(
        functools.partial(tpu.flash_attention, **options),
        functools.partial(gpu.flash_attention, **options),
        interpret,
        q, k, v, q_seg, kv_seg,
    )
