"""Softmax attention: one signature, reference / xla / pallas implementations, composable masks.

>>> o = attention(q, k, v, causal=True, window=(256, 0), impl="auto")

Shapes: q ``[B,T,Hq,D]``, k ``[B,S,Hkv,D]``, v ``[B,S,Hkv,Dv]`` with ``Hq % Hkv == 0``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.attention import reference as _reference
from attnzoo.pallas_kernels.attention import xla as _xla
from attnzoo.pallas_kernels.attention.masks import (
    AndMask,
    BlockMetadata,
    CausalMask,
    ChunkedCausalMask,
    FullMask,
    FunctionMask,
    LocalMask,
    Mask,
    NotMask,
    OrMask,
    KeyRangeMask,
    PrefixLMMask,
    as_mask,
    block_metadata,
    build_mask,
)
from attnzoo.pallas_kernels.attention.routed import routed_attention
from attnzoo.pallas_kernels.attention.xla import XlaBlockSizes

__all__ = [
    "attention",
    "attention_decode",
    "routed_attention",
    "BlockSizes",
    "XlaBlockSizes",
    "DecodeBlockSizes",
    "Mask",
    "FullMask",
    "CausalMask",
    "LocalMask",
    "ChunkedCausalMask",
    "KeyRangeMask",
    "PrefixLMMask",
    "FunctionMask",
    "AndMask",
    "OrMask",
    "NotMask",
    "BlockMetadata",
    "block_metadata",
]

_OP = "attention"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Pallas kernels (forward, dq and dk/dv passes share them).

    On TPU ``block_kv`` must be a multiple of 128 and ``block_q`` of 8; on GPU both are rounded to
    powers of two. Blocks are shrunk for short sequences.
    """

    block_q: int = 128
    block_kv: int = 128


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Key/value tile length of the decode kernels and the blockwise decode path."""

    block_kv: int = 512


def _check_qkv(q, k, v, op):
    common.check_array(op, "q", q, ndim=4, floating=True, expected="[B,T,Hq,D]")
    common.check_array(op, "k", k, ndim=4, floating=True, expected="[B,S,Hkv,D]")
    common.check_array(op, "v", v, ndim=4, floating=True, expected="[B,S,Hkv,Dv]")
    batch, _, q_heads, head_dim = q.shape
    common.check_array(op, "k", k, shape=(batch, None, None, head_dim), expected="[B,S,Hkv,D] with q's B and D")
    kv_len, kv_heads = k.shape[1], k.shape[2]
    common.check_array(op, "v", v, shape=(batch, kv_len, kv_heads, None), expected="[B,S,Hkv,Dv] with k's B, S and Hkv")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"{op}: the number of query heads ({q_heads}) must be a multiple of the number of "
            f"key/value heads ({kv_heads}) (GQA/MQA)"
        )
    if q.shape[1] == 0 or kv_len == 0 or head_dim == 0 or v.shape[-1] == 0:
        raise ValueError(f"{op}: empty sequence or head dimension: q {q.shape}, k {k.shape}, v {v.shape}")


def _check_segments(segment_ids, batch, q_len, kv_len, op):
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{op}: segment_ids must be [B,T] or a (q_ids, kv_ids) pair, got {len(segment_ids)} items")
        q_ids, kv_ids = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"{op}: a single segment_ids array needs T == S (self-attention); got T={q_len}, "
                f"S={kv_len}: pass (q_ids [B,T], kv_ids [B,S])"
            )
        q_ids = kv_ids = segment_ids
    common.check_array(op, "segment_ids (queries)", q_ids, integer=True, shape=(batch, q_len), expected="[B,T]")
    common.check_array(op, "segment_ids (keys)", kv_ids, integer=True, shape=(batch, kv_len), expected="[B,S]")
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def _check_block_sizes(block_sizes, cls, op):
    if block_sizes is None:
        return cls()
    if not isinstance(block_sizes, cls):
        raise TypeError(f"{op}: block_sizes must be a {cls.__name__} for this impl, got {type(block_sizes).__name__}")
    for field in dataclasses.fields(block_sizes):
        common.check_int(op, f"block_sizes.{field.name}", getattr(block_sizes, field.name))
    return block_sizes


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    segment_ids=None,
    mask=None,
    scale: float | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    block_sizes=None,
    interpret=None,
):
    """Softmax attention with GQA/MQA, block-sparse masks and packed segments.

    Args:
      q: ``[B, T, Hq, D]`` queries. k: ``[B, S, Hkv, D]``. v: ``[B, S, Hkv, Dv]``. One float dtype.
      causal: key ``j`` visible to query ``i`` iff ``j <= i + S - T`` (last query aligned to last key).
      window: ``(left, right)``: ``i' - left <= j <= i' + right`` with ``i' = i + S - T``; None on a
        side means unbounded. Combined with ``causal`` by intersection.
      segment_ids: ``[B, T]`` int (self-attention), or ``(q_ids [B,T], kv_ids [B,S])``: a query sees
        only keys of its own segment (packed documents).
      mask: an attnzoo ``Mask`` (compose with ``&``, ``|``, ``~``) or a function
        ``mask_mod(q_idx, kv_idx) -> bool`` of absolute positions, written with array operators.
        It is evaluated per tile: invisible tiles are skipped, fully visible ones skip the element
        mask.
      scale: logit scale, default ``D ** -0.5``. softcap: if set, logits ``c * tanh(s / c)``.
      impl: "auto" | "reference" | "xla" | "pallas". return_lse: also return log-sum-exp.
      block_sizes: ``BlockSizes`` (pallas) or ``XlaBlockSizes`` (xla).
      interpret: Pallas interpret mode, see ``attnzoo.pallas_kernels.common``.

    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype; with ``return_lse`` also ``lse [B, Hq, T]`` float32.
      A query that sees no key gets output 0 and lse ``-inf`` (never NaN).
    """
    _check_qkv(q, k, v, _OP)
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    window = common.check_window(_OP, window)
    segments = _check_segments(segment_ids, batch, q_len, kv_len, _OP)
    if mask is not None:
        mask = as_mask(mask, f"{_OP}: mask")
    scale = common.check_float(_OP, "scale", scale)
    scale = head_dim**-0.5 if scale is None else scale
    softcap = common.check_float(_OP, "softcap", softcap, positive=True)
    if not isinstance(return_lse, bool):
        raise TypeError(f"{_OP}: return_lse must be a bool, got {type(return_lse).__name__}")
    interpret = common.check_interpret(interpret, _OP)
    impl = common.resolve_impl(impl, _OP)
    full_mask = build_mask(causal=causal, window=window, mask=mask, q_len=q_len, kv_len=kv_len)
    if impl == "xla":
        block_sizes = _check_block_sizes(block_sizes, XlaBlockSizes, _OP)
    elif impl == "pallas":
        block_sizes = _check_block_sizes(block_sizes, BlockSizes, _OP)
    run = functools.partial(
        _attention_jit, impl=impl, mask=full_mask, scale=scale, softcap=softcap,
        block_sizes=block_sizes if impl != "reference" else None, interpret=interpret,
    )
    explicit = common.explicit_mesh_axes()
    if explicit:
        # Under Explicit mesh axes every reshape would need an out_sharding; the op is batch- and
        # head-parallel, so it runs with the axes treated as Auto and returns q's sharding.
        spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 4
        out_spec = jax.sharding.PartitionSpec(spec[0], spec[1], spec[2], None)
        lse_spec = jax.sharding.PartitionSpec(spec[0], spec[2], spec[1])
        run = jax.sharding.auto_axes(run, axes=explicit, out_sharding=(out_spec, lse_spec))
    out, lse = run(q, k, v, segments)
    return (out, lse) if return_lse else out


@functools.partial(
    jax.jit, static_argnames=("impl", "mask", "scale", "softcap", "block_sizes", "interpret")
)
def _attention_jit(q, k, v, segments, *, impl, mask, scale, softcap, block_sizes, interpret):
    """Validated arguments -> implementation, jitted so eager calls reuse one compiled program."""
    if impl == "reference":
        return _reference.attention(q, k, v, mask=mask, segment_ids=segments, scale=scale, softcap=softcap)
    if impl == "xla":
        return _xla.attention(
            q, k, v, mask=mask, segment_ids=segments, scale=scale, softcap=softcap, block_sizes=block_sizes
        )
    from attnzoo.pallas_kernels.attention import pallas as _pallas

    return _pallas.attention(
        q, k, v, mask=mask, segment_ids=segments, scale=scale, softcap=softcap,
        block_sizes=block_sizes, interpret=interpret,
    )


def attention_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    block_sizes: DecodeBlockSizes | None = None,
    interpret=None,
):
    """One decoding step against a KV cache.

    Args:
      q: ``[B, Hq, D]``, the newest token's queries (its key and value already written to the
        cache at position ``lengths[b] - 1``).
      k_cache: ``[B, S, Hkv, D]``; v_cache: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      lengths: ``[B]`` int, valid cache entries per row (0 gives output 0).
      window: ``(left, right)`` as in :func:`attention`; only ``left`` matters here (keys
        ``lengths-1-left .. lengths-1``).
      scale, softcap, impl, interpret: as in :func:`attention`. block_sizes: ``DecodeBlockSizes``.

    Returns ``[B, Hq, Dv]`` in q's dtype. ``xla`` and ``pallas`` are forward-only (inference).
    """
    op = "attention_decode"
    common.check_array(op, "q", q, ndim=3, floating=True, expected="[B,Hq,D]")
    common.check_array(op, "k_cache", k_cache, ndim=4, floating=True, expected="[B,S,Hkv,D]")
    common.check_array(op, "v_cache", v_cache, ndim=4, floating=True, expected="[B,S,Hkv,Dv]")
    batch, q_heads, head_dim = q.shape
    common.check_array(op, "k_cache", k_cache, shape=(batch, None, None, head_dim), expected="[B,S,Hkv,D] with q's B and D")
    kv_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    common.check_array(op, "v_cache", v_cache, shape=(batch, kv_len, kv_heads, None), expected="[B,S,Hkv,Dv] with k_cache's B, S and Hkv")
    common.check_array(op, "lengths", lengths, integer=True, shape=(batch,), expected="[B]")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError(f"{op}: q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"{op}: the number of query heads ({q_heads}) must be a multiple of the number of key/value heads ({kv_heads})")
    window = common.check_window(op, window)
    window_left = None if window is None else window[0]
    scale = common.check_float(op, "scale", scale)
    scale = head_dim**-0.5 if scale is None else scale
    softcap = common.check_float(op, "softcap", softcap, positive=True)
    interpret = common.check_interpret(interpret, op)
    impl = common.resolve_impl(impl, op)
    sizes = _check_block_sizes(block_sizes, DecodeBlockSizes, op)
    run = functools.partial(
        _decode_jit, impl=impl, window_left=window_left, scale=scale, softcap=softcap,
        block_kv=sizes.block_kv, interpret=interpret,
    )
    explicit = common.explicit_mesh_axes()
    if explicit:
        spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 3
        run = jax.sharding.auto_axes(
            run, axes=explicit, out_sharding=jax.sharding.PartitionSpec(spec[0], spec[1], None)
        )
    return run(q, k_cache, v_cache, lengths)


@functools.partial(
    jax.jit, static_argnames=("impl", "window_left", "scale", "softcap", "block_kv", "interpret")
)
def _decode_jit(q, k_cache, v_cache, lengths, *, impl, window_left, scale, softcap, block_kv, interpret):
    options = dict(window_left=window_left, scale=scale, softcap=softcap)
    if impl == "reference":
        return _reference.attention_decode(q, k_cache, v_cache, lengths, **options)
    from attnzoo.pallas_kernels.attention import decode as _decode

    if impl == "xla":
        return _decode.decode_xla(q, k_cache, v_cache, lengths, block_kv=block_kv, **options)
    from attnzoo.pallas_kernels.attention import gpu as _gpu

    return common.run_pallas(
        functools.partial(_decode.decode_tpu, block_kv=block_kv, **options),
        functools.partial(_gpu.flash_decode, block_kv=block_kv, **options),
        interpret,
        q, k_cache, v_cache, lengths,
    )
