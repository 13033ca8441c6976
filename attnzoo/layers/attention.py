"""Softmax attention mixer: GQA/MQA, RoPE, QK-norm, sliding window (with sink tokens), softcap, KV-cache decoding.

>>> m = Attention(dim=256, num_heads=8, num_kv_heads=2, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,T,256] -> [B,T,256], causal
>>> cache = m.init_cache(batch=B, max_len=1024)
>>> y, cache = m(prompt, cache=cache)          # prefill (T > 1)
>>> y, cache = m(token, cache=cache)           # one decoding step (T == 1)

Parameters (logical axis names in parentheses):
  ``q_proj.kernel [D, Hq, Dh]`` (embed, heads, head_dim), ``k_proj``/``v_proj.kernel [D, Hkv, Dh]``
  (embed, kv_heads, head_dim), ``o_proj.kernel [Hq, Dh, D]`` (heads, head_dim, embed); optional
  biases; with ``qk_norm`` the scales ``q_norm.scale``/``k_norm.scale [Dh]`` (norm).

Cache: :class:`KVCache` ``(k [B,S,Hkv,Dh], v [B,S,Hkv,Dh], lengths [B] int32)``, a pytree.
``lengths[b]`` is the number of tokens row ``b`` holds, which is also the position of its next token,
so rows may be at different positions. Keys are stored after RoPE and QK-norm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import pallas_kernels as pk
from attnzoo.layers.common import (
    DType,
    Dense,
    MeshAxes,
    RMSNorm,
    apply_rope,
    check_input,
    head_shards,
    shard_map_batch_heads,
)
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels.common import check_float, check_int, check_window

__all__ = ["Attention", "KVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Key/value cache of one attention layer.

    Attributes:
      k: ``[B, S, Hkv, Dh]`` keys (after RoPE and QK-norm). v: ``[B, S, Hkv, Dh]`` values.
      lengths: ``[B]`` int32, tokens held per row (= position of the row's next token).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


def _write_rows(cache: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes ``update [B,T,...]`` into ``cache [B,S,...]`` at a per-row time offset ``starts [B]``."""
    return jax.vmap(lambda row, new, start: jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0))(
        cache, update.astype(cache.dtype), starts
    )


@register_mixer("attention")
class Attention(nnx.Module):
    """Multi-head softmax attention (MHA / GQA / MQA) over ``pk.attention``.

    Args:
      dim: model width ``D``.
      num_heads: query heads ``Hq``.
      num_kv_heads: key/value heads ``Hkv`` (divides ``num_heads``); default ``num_heads``.
      head_dim: features per head; default ``dim // num_heads`` (then ``num_heads`` must divide ``dim``).
      v_head_dim: value features per head ``Dv`` (default ``head_dim``), e.g. Hymba's wider values.
      output_projection: apply ``o_proj`` (True); without it the layer returns the heads' outputs
        flattened, ``[B, T, Hq * Dv]`` (for blocks that fuse their own output projection).
      causal: causal masking (required for decoding with a cache).
      window: ``(left, right)`` sliding window (token ``i`` sees ``i-left .. i+right``; a side may be
        None = unbounded) or None. With ``causal`` only ``left`` matters.
      num_sink_tokens: ``S >= 0`` attention sinks: with a window, keys at absolute positions
        ``j < S`` (the first S tokens of the sequence, e.g. Hymba's meta tokens) stay visible to
        every query besides the window (causally: query ``i`` sees ``j <= i`` with ``j`` in the
        window or ``j < S``). Without a window every earlier key is visible anyway and it changes
        nothing. Not combined with ``segment_ids`` (raises). Hymba's mask (``modeling_hymba.py``
        of nvidia/Hymba-1.5B-Base, ``HymbaFlexAttention``: ``causal & ((q - kv <= window) |
        (kv < num_memory_tokens))``) is ``window=(w, 0), num_sink_tokens=M``.
      use_rope / rope_theta / rotary_dim: rotary embedding of q and k (rotate-half convention) on
        the first ``rotary_dim`` features of each head (default all); or ``partial_rotary_factor``,
        the rotated fraction of the head (MiniMax: 0.5).
      qk_norm: RMSNorm over ``head_dim`` of each query and key head (before RoPE); ``qk_norm_eps``.
      softcap: logit soft-capping ``c * tanh(s / c)``, or None. scale: logit scale, default ``Dh**-0.5``.
      qkv_bias / out_bias: biases on the input / output projections.
      impl: "auto" | "xla" | "pallas" | "reference", passed to the op. block_sizes: the op's.
      mesh_axes: mesh axes that shard batch and heads when a Pallas call is wrapped in
        ``jax.shard_map`` under an active mesh (see :class:`attnzoo.layers.common.MeshAxes`).
      dtype: compute dtype (default: promotion of input and params); softmax statistics are float32.
      param_dtype: parameter dtype. kernel_init: initializer of the projection kernels.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        output_projection: bool = True,
        causal: bool = True,
        window: tuple[int | None, int | None] | None = None,
        num_sink_tokens: int = 0,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        rotary_dim: int | None = None,
        partial_rotary_factor: float | None = None,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        softcap: float | None = None,
        scale: float | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        impl: str = "auto",
        block_sizes=None,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "Attention"
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.num_kv_heads = check_int(owner, "num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) when head_dim is not given"
                )
            head_dim = self.dim // self.num_heads
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else check_int(owner, "v_head_dim", v_head_dim)
        if not isinstance(output_projection, bool):
            raise TypeError(f"{owner}: output_projection must be a bool, got {type(output_projection).__name__}")
        if not isinstance(causal, bool):
            raise TypeError(f"{owner}: causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self.window = check_window(owner, window)
        self.num_sink_tokens = check_int(owner, "num_sink_tokens", num_sink_tokens, minimum=0)
        self.use_rope = bool(use_rope)
        self.rope_theta = check_float(owner, "rope_theta", rope_theta, positive=True, allow_none=False)
        if partial_rotary_factor is not None:
            if rotary_dim is not None:
                raise ValueError(f"{owner}: give rotary_dim or partial_rotary_factor, not both")
            factor = check_float(owner, "partial_rotary_factor", partial_rotary_factor, positive=True, allow_none=False)
            rotary_dim = int(self.head_dim * factor)
        rotary_dim = self.head_dim if rotary_dim is None else check_int(owner, "rotary_dim", rotary_dim)
        if use_rope and (rotary_dim % 2 or rotary_dim > self.head_dim):
            raise ValueError(f"{owner}: rotary_dim must be even and <= head_dim ({self.head_dim}), got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.softcap = check_float(owner, "softcap", softcap, positive=True)
        self.scale = check_float(owner, "scale", scale, positive=True)
        if impl not in pk_common.IMPLS:
            raise ValueError(f"{owner}: impl must be one of {pk_common.IMPLS}, got {impl!r}")
        self.impl = impl
        self.block_sizes = block_sizes
        if not isinstance(mesh_axes, MeshAxes):
            raise TypeError(f"{owner}: mesh_axes must be a MeshAxes, got {type(mesh_axes).__name__}")
        self.mesh_axes = mesh_axes
        self.dtype = dtype
        self.param_dtype = param_dtype

        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        heads, kv_heads, dh, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        self.q_proj = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), use_bias=qkv_bias, **dense)
        self.k_proj = Dense(dim, (kv_heads, dh), logical_axes=("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, **dense)
        self.v_proj = Dense(dim, (kv_heads, dv), logical_axes=("embed", "kv_heads", "head_dim"), use_bias=qkv_bias, **dense)
        self.o_proj = (
            Dense((heads, dv), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=out_bias, **dense)
            if output_projection
            else None
        )
        if qk_norm:
            norm = dict(epsilon=qk_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.q_norm = RMSNorm(dh, **norm)
            self.k_norm = RMSNorm(dh, **norm)
        else:
            self.q_norm = None
            self.k_norm = None

    @property
    def _sinks(self) -> int:
        """The sink tokens that change the mask: ``num_sink_tokens`` with a window, else 0."""
        return self.num_sink_tokens if self.window is not None else 0

    # ------------------------------------------------------------------------------------------
    # Cache
    # ------------------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens.

        ``dtype`` defaults to the compute dtype (or ``param_dtype`` when that is None).
        """
        if not self.causal:
            raise ValueError("Attention: a KV cache needs causal=True")
        batch = check_int("Attention.init_cache", "batch", batch)
        max_len = check_int("Attention.init_cache", "max_len", max_len)
        dtype = jnp.dtype(dtype or self.dtype or self.param_dtype)
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        v_shape = shape[:-1] + (self.v_head_dim,)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(v_shape, dtype), jnp.zeros((batch,), jnp.int32))

    # ------------------------------------------------------------------------------------------
    # Cost model
    # ------------------------------------------------------------------------------------------

    def visible_pairs(self, seq_len: int, kv_len: int | None = None) -> int:
        """Number of (query, key) pairs the mask lets through for one sequence and one head.

        Queries ``i < seq_len`` sit at position ``c = i + kv_len - seq_len`` among ``kv_len`` keys
        (bottom-right alignment, as ``pk.attention`` aligns them). Query ``i`` sees keys ``j`` with
        ``0 <= j < kv_len``, ``j <= c`` if causal, and ``c - left <= j <= c + right`` for a window
        side that is not None; with ``num_sink_tokens = N`` and a window, also the keys ``j < N``
        (and ``j <= c`` if causal). E.g. causal self-attention: ``T (T + 1) / 2``. Segment ids are
        not modelled (they only remove pairs).
        """
        owner = "Attention.visible_pairs"
        seq_len = check_int(owner, "seq_len", seq_len)
        kv_len = seq_len if kv_len is None else check_int(owner, "kv_len", kv_len)
        centre = np.arange(seq_len, dtype=np.int64) + (kv_len - seq_len)
        lo = np.zeros(seq_len, np.int64)
        hi = np.full(seq_len, kv_len - 1, np.int64)
        if self.causal:
            hi = np.minimum(hi, centre)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                lo = np.maximum(lo, centre - left)
            if right is not None:
                hi = np.minimum(hi, centre + right)
        pairs = np.maximum(hi - lo + 1, 0)
        sinks = self._sinks
        if sinks:
            # Sinks [0, sink_hi] minus the part already inside the window [lo, hi].
            sink_hi = np.full(seq_len, min(sinks, kv_len) - 1, np.int64)
            if self.causal:
                sink_hi = np.minimum(sink_hi, centre)
            overlap = np.maximum(np.minimum(hi, sink_hi) - np.maximum(lo, 0) + 1, 0)
            pairs = pairs + np.maximum(sink_hi + 1, 0) - overlap
        return int(pairs.sum())

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward FLOPs of this layer for one sequence, counting matmuls only (2 per multiply-add).

        With ``T = seq_len`` input tokens, ``S = kv_len`` keys (default ``T``; ``S > T`` models a
        chunk attending to a cache of ``S`` tokens, bottom-right aligned), ``D = dim``,
        ``Hq``/``Hkv`` heads of ``Dh`` features and ``P`` = :meth:`visible_pairs` ``(T, S)``::

            q projection:      2 * T * D * Hq * Dh
            o projection:      2 * T * D * Hq * Dv      (without output_projection: 0)
            k, v projections:  2 * T * D * Hkv * (Dh + Dv)   (keys of the T new tokens)
            scores q k^T:      2 * P * Hq * Dh
            weights @ v:       2 * P * Hq * Dv

        Masked pairs are not counted (a causal layer costs about half a bidirectional one). Norms,
        RoPE, softmax and biases are not counted.

        Returns an int. Raises ``ValueError`` for a non-positive ``seq_len`` / ``kv_len``.
        """
        seq_len = check_int("Attention.flops", "seq_len", seq_len)
        pairs = self.visible_pairs(seq_len, kv_len)
        d, dh, dv, hq, hkv = self.dim, self.head_dim, self.v_head_dim, self.num_heads, self.num_kv_heads
        output = hq * dv if self.o_proj is not None else 0
        projections = 2 * seq_len * d * (hq * dh + output + hkv * (dh + dv))
        return int(projections + 2 * pairs * hq * (dh + dv))

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        valid_lengths: jax.Array | None = None,
        qkv_deltas: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ):
        """Attention over a sequence, or a prefill / decoding step against a cache.

        Args:
          x: ``[B, T, D]``.
          segment_ids: ``[B, T]`` ints, packed documents (tokens attend within their segment).
            Not combined with ``cache``, nor with ``num_sink_tokens`` and a window.
          positions: ``[B, T]`` (or ``[T]``) RoPE positions; default ``arange(T)``, or with a cache
            ``cache.lengths[b] + arange(T)``. Packed documents pass positions restarting at 0.
          cache: a :class:`KVCache` from :meth:`init_cache`. x is written at each row's position;
            T > 1 is a prefill (chunk), T == 1 one decoding step.
          valid_lengths: with a cache, ``[B]`` number of real (non-padding) tokens of x per row
            (right padding; default T): each row's length advances by its own count, so prompts
            of different lengths are prefilled together. Outputs at padding positions are
            unspecified.
          qkv_deltas: ``(dq [B,T,Hq,Dh], dk [B,T,Hkv,Dh], dv [B,T,Hkv,Dv])`` added to the q, k, v
            projections (per-call low-rank adapters of a weight-shared block, as Zamba2's), or None.

        Returns ``y [B, T, D]`` in the compute dtype; with a cache ``(y, new_cache)``. If a row
        would overflow the cache (``lengths[b] + T > max_len``) its outputs are NaN (and a
        ``ValueError`` is raised when the lengths are concrete).

        A prefill attends over the whole cache (each row rolled so its newest token is last, with
        key segment ids hiding unwritten slots), so it costs ``O(T * max_len)``. The decoding step
        uses ``pk.attention_decode``, which is forward-only for the xla and pallas impls; with
        sink tokens (and a window) it takes the prefill path instead (T == 1).
        """
        check_input("Attention", x, ndim=3, last=self.dim, layout="[B,T,D]")
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if qkv_deltas is not None:
            for name, projection, delta in zip("qkv", (q, k, v), qkv_deltas):
                if delta.shape != projection.shape:
                    raise ValueError(f"Attention: qkv_deltas {name} must have shape {projection.shape}, got {delta.shape}")
            q, k, v = (p + d.astype(p.dtype) for p, d in zip((q, k, v), qkv_deltas))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is None:
            if valid_lengths is not None:
                raise ValueError("Attention: valid_lengths needs a cache (use segment_ids for packing)")
            if positions is None:
                positions = jnp.arange(length, dtype=jnp.int32)[None, :]
            q, k = self._rope(q, positions), self._rope(k, positions)
            if segment_ids is not None:
                if self._sinks:
                    raise ValueError(
                        f"Attention: num_sink_tokens ({self.num_sink_tokens}) with a window cannot be combined "
                        "with segment_ids (the sinks are the first tokens of the row, not of each segment)"
                    )
                segment_ids = jnp.asarray(segment_ids)
                if segment_ids.shape != (batch, length) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                    raise ValueError(
                        f"Attention: segment_ids must be an int array of shape {(batch, length)} [B,T], "
                        f"got {segment_ids.dtype}{tuple(segment_ids.shape)}"
                    )
                segments = (segment_ids, segment_ids)
            else:
                segments = None
            if self._sinks:
                # causal & (window | key < S); the op intersects `causal` with `mask`.
                left, right = self.window
                sink_mask = pk.LocalMask(left, right, 0) | pk.KeyRangeMask(0, self._sinks)
                out = self._attend(q, k, v, segments, window=None, mask=sink_mask)
            else:
                out = self._attend(q, k, v, segments)
            return self._output(out.astype(q.dtype))
        if segment_ids is not None:
            raise ValueError("Attention: segment_ids cannot be combined with a cache; decode one sequence per row")
        out, cache = self._attend_cached(q, k, v, cache, positions, valid_lengths)
        return self._output(out.astype(q.dtype)), cache

    def _output(self, out: jax.Array) -> jax.Array:
        """``o_proj`` of the heads' outputs ``[B,T,Hq,Dv]``, or the heads flattened without it."""
        if self.o_proj is None:
            return out.reshape(out.shape[:2] + (-1,))
        return self.o_proj(out)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        if not self.use_rope:
            return x
        return apply_rope(x, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)

    def _uses_pallas(self) -> bool:
        return pk_common.resolve_impl(self.impl, "Attention") == "pallas"

    def _kv_for_head_sharding(self, k: jax.Array, v: jax.Array):
        """Repeats k/v heads so each head shard holds whole groups when ``Hkv`` does not divide by
        the head mesh axis but ``Hq`` does (e.g. MQA under tensor parallelism)."""
        shards = head_shards(self.mesh_axes)
        if shards == 1 or self.num_kv_heads % shards == 0 or self.num_heads % shards:
            return k, v
        repeats = int(np.lcm(self.num_kv_heads, shards)) // self.num_kv_heads
        return jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)

    def _attend(self, q, k, v, segments, **overrides):
        """``pk.attention`` (shard-mapped over batch and heads for Pallas under a mesh).

        ``overrides`` replace the op's ``causal`` / ``window`` or add a ``mask``.
        """
        options = dict(causal=self.causal, window=self.window, scale=self.scale, softcap=self.softcap, impl=self.impl)
        options.update(overrides)
        if self.block_sizes is not None:
            options["block_sizes"] = self.block_sizes

        if segments is None:
            def attend(q, k, v):
                return pk.attention(q, k, v, **options)
            args, layouts = (q, k, v), ("BTHD", "BSHD", "BSHD")
        else:
            def attend(q, k, v, q_ids, kv_ids):
                return pk.attention(q, k, v, segment_ids=(q_ids, kv_ids), **options)
            args, layouts = (q, k, v, *segments), ("BTHD", "BSHD", "BSHD", "BT", "BS")
        if not self._uses_pallas():
            return attend(*args)
        k, v = self._kv_for_head_sharding(k, v)
        args = (q, k, v) + tuple(args[3:])
        return shard_map_batch_heads(attend, args, layouts, "BTHD", self.mesh_axes, owner="Attention")

    def _decode(self, q, k_cache, v_cache, lengths):
        """``pk.attention_decode`` for q ``[B,Hq,Dh]`` (shard-mapped for Pallas under a mesh)."""
        options = dict(window=self.window, scale=self.scale, softcap=self.softcap, impl=self.impl)

        def decode(q, k_cache, v_cache, lengths):
            return pk.attention_decode(q, k_cache, v_cache, lengths, **options)

        if not self._uses_pallas():
            return decode(q, k_cache, v_cache, lengths)
        k_cache, v_cache = self._kv_for_head_sharding(k_cache, v_cache)
        return shard_map_batch_heads(
            decode, (q, k_cache, v_cache, lengths), ("BHD", "BSHD", "BSHD", "B"), "BHD", self.mesh_axes,
            owner="Attention",
        )

    def _attend_cached(self, q, k, v, cache: KVCache, positions, valid_lengths):
        """Writes k/v at each row's position, attends over the cache; returns (out, new cache)."""
        if not self.causal:
            raise ValueError("Attention: a KV cache needs causal=True")
        if not isinstance(cache, KVCache):
            raise TypeError(f"Attention: cache must be a KVCache from init_cache, got {type(cache).__name__}")
        batch, length = q.shape[:2]
        max_len = cache.max_len
        want = (batch, max_len, self.num_kv_heads, self.head_dim)
        want_v = want[:-1] + (self.v_head_dim,)
        if cache.k.shape != want or cache.v.shape != want_v or cache.lengths.shape != (batch,):
            raise ValueError(
                f"Attention: cache must hold k {want}, v {want_v} [B,S,Hkv,Dh|Dv] and lengths ({batch},), got "
                f"k {cache.k.shape}, v {cache.v.shape}, lengths {cache.lengths.shape}"
            )
        starts = cache.lengths.astype(jnp.int32)
        if not isinstance(starts, jax.core.Tracer) and int(jnp.max(starts)) + length > max_len:
            raise ValueError(
                f"Attention: cache overflow: a row holds {int(jnp.max(starts))} tokens, writing {length} "
                f"more exceeds max_len={max_len}"
            )
        if valid_lengths is None:
            advance = jnp.full((batch,), length, jnp.int32)
        else:
            advance = jnp.asarray(valid_lengths)
            if advance.shape != (batch,) or not jnp.issubdtype(advance.dtype, jnp.integer):
                raise ValueError(f"Attention: valid_lengths must be an int array of shape ({batch},), got {advance.dtype}{advance.shape}")
            advance = jnp.clip(advance.astype(jnp.int32), 0, length)
        if positions is None:
            positions = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        q, k = self._rope(q, positions), self._rope(k, positions)

        k_all = _write_rows(cache.k, k, starts)
        v_all = _write_rows(cache.v, v, starts)
        ends = starts + length
        if self._sinks:
            out = self._attend_cached_sinks(q, k, v, k_all, v_all, starts)
        elif length == 1:
            out = self._decode(q[:, 0], k_all.astype(q.dtype), v_all.astype(q.dtype), ends)[:, None]
        else:
            # Roll each row so its newest token sits at S-1: then the op's bottom-right-aligned
            # causal/window mask (offset S-T) is exactly each row's mask, and kv segment ids
            # exclude the slots no token has been written to.
            shifts = max_len - ends
            roll = jax.vmap(lambda row, shift: jnp.roll(row, shift, axis=0))
            k_view, v_view = roll(k_all, shifts).astype(q.dtype), roll(v_all, shifts).astype(q.dtype)
            kv_ids = (jnp.arange(max_len, dtype=jnp.int32)[None, :] >= shifts[:, None]).astype(jnp.int32)
            q_ids = jnp.ones((batch, length), jnp.int32)
            out = self._attend(q, k_view, v_view, (q_ids, kv_ids))
        overflow = ends > max_len
        out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
        return out, KVCache(k_all, v_all, starts + advance)

    def _attend_cached_sinks(self, q, k, v, k_all, v_all, starts):
        """Cached attention with sink tokens: ``q [B,T,Hq,Dh]`` (at positions ``starts + t``), the
        chunk's ``k``/``v [B,T,Hkv,Dh|Dv]`` and the cache after the write ``k_all``/``v_all [B,S,...]``.

        The key view is three regions, with ``N = min(num_sink_tokens, S)`` and ``H = min(N, T)``:
          A ``[0, N)``: cache slots ``0..N-1``, unrolled; slot ``s`` valid iff ``s < starts`` (written
            before this chunk, so before every query);
          B ``[N, N+H)``: the chunk's first ``H`` tokens; token ``c`` valid iff ``starts + c < N`` (a
            sink written by this chunk), visible causally (``c <= t``);
          C ``[N+H, N+H+S)``: the cache rolled so each row's newest token is last (as without sinks);
            slot ``o`` valid iff written and ``o >= N`` (the sinks live in A or B), under the causal
            window.
        Every sink slot is valid in exactly one of A and B, so each (query, key) pair counts once.
        Returns ``[B, T, Hq, Dv]``.
        """
        batch, length = q.shape[:2]
        max_len = k_all.shape[1]
        sinks = min(self._sinks, max_len)
        head = min(sinks, length)
        total = sinks + head + max_len
        ends = starts + length
        shifts = max_len - ends
        roll = jax.vmap(lambda row, shift: jnp.roll(row, shift, axis=0))

        def view(new, cached):  # B holds the chunk's values as stored in the cache
            regions = (cached[:, :sinks], new[:, :head].astype(cached.dtype), roll(cached, shifts))
            return jnp.concatenate([region.astype(q.dtype) for region in regions], axis=1)

        k_view, v_view = view(k, k_all), view(v, v_all)
        slot = jnp.arange(max_len, dtype=jnp.int32)[None, :]
        chunk = jnp.arange(head, dtype=jnp.int32)[None, :]
        kv_ids = jnp.concatenate(
            [jnp.arange(sinks, dtype=jnp.int32)[None, :] < starts[:, None],
             starts[:, None] + chunk < sinks,
             slot >= shifts[:, None] + sinks], axis=1).astype(jnp.int32)
        q_ids = jnp.ones((batch, length), jnp.int32)
        left, right = self.window
        offset = total - length
        mask = (pk.KeyRangeMask(0, sinks + head) & pk.CausalMask(sinks)) | (
            pk.KeyRangeMask(sinks + head, total) & pk.CausalMask(offset) & pk.LocalMask(left, right, offset)
        )
        return self._attend(q, k_view, v_view, (q_ids, kv_ids), causal=False, window=None, mask=mask)
