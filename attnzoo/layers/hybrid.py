"""Hybrid token mixers: attention and state-space heads in one layer.

>>> m = HymbaHead(dim=256, num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,T,256] -> [B,T,256], causal
>>> cache = m.init_cache(batch=B, max_len=1024)
>>> y, cache = m(prompt, cache=cache, valid_lengths=lens)   # prefill, right-padded rows
>>> y, cache = m(token, cache=cache)           # one decoding step

Hymba (Dong et al. 2024, "Hymba: A Hybrid-head Architecture for Small Language Models",
arXiv:2411.13676; the released ``modeling_hymba.py`` of nvidia/Hymba-1.5B) runs attention heads
and a Mamba (S6) branch in parallel on the same input and averages their normalised outputs::

    q, k, v, x, z = in_proj(u)                 q, k [Dh = D / H]; v [Dv = d_inner / H]; x, z [d_inner]
    a = attention(q, k, v)                     causal GQA with RoPE, optional sliding window
                                               (meta tokens kept in view as sinks); no o_proj
    s = mamba(x, z)                            S6 with RMSNorms on dt, B, C; gated by silu(z)
    y = out_proj((RMSNorm_1(a) + RMSNorm_2(s)) / 2)

The fused ``in_proj`` is stored per output (the attention's ``q/k/v_proj``, the Mamba branch's
``x_in_proj`` / ``z_proj``), which is the same linear map. The meta tokens (learned tokens
prepended to every sequence) belong to the model: :class:`attnzoo.zoo.lm.DecoderLM` prepends them
with ``num_meta_tokens``; a sliding-window layer keeps them in view with ``num_sink_tokens`` equal
to that count (Hymba's SWA mask is ``causal & ((q - kv <= window) | (kv < num_memory_tokens))``,
``HymbaFlexAttention`` in ``modeling_hymba.py``). Hymba shares KV caches across pairs of layers (``reuse_kv``); here every
layer has its own (a memory saving, not a change of the function class).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.attention import Attention, KVCache
from attnzoo.layers.common import (
    Dense,
    DType,
    MeshAxes,
    RecurrentCache,
    RMSNorm,
    check_input,
    compute_dtype,
)
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.ssm import Mamba, _expanded_width
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = ["HymbaHead", "HybridCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HybridCache:
    """Decoding cache of a layer with an attention and a recurrent branch.

    Attributes:
      attention: the attention branch's :class:`KVCache`.
      recurrent: the state-space branch's :class:`RecurrentCache`.
    """

    attention: KVCache
    recurrent: RecurrentCache

    @property
    def lengths(self) -> jax.Array:
        return self.attention.lengths


@register_mixer("hymba")
class HymbaHead(nnx.Module):
    """Hymba's hybrid-head mixer: parallel attention heads and a Mamba branch (see the module docstring).

    Args:
      dim: model width ``D``. num_heads: attention heads ``H`` (``Dh = D / H``).
      num_kv_heads: key/value heads (GQA; default ``H``).
      expand: ``d_inner = expand * D`` (2): the Mamba branch's width and the attention's value
        width ``H * Dv`` (``Dv = d_inner / H``).
      state_dim: the S6 state ``N`` (16). dt_rank: "auto" (``ceil(D / 16)``) or an int.
      conv_size: the Mamba branch's short convolution (4).
      window: sliding window of the attention (token ``i`` sees ``i - window .. i``) or None.
      num_sink_tokens: with a window, the first ``num_sink_tokens`` tokens of the sequence (the
        model's meta tokens) stay visible to every later token (0; see :class:`Attention`).
      rope_theta: RoPE base. norm_eps: of the branch norms and the dt/B/C norms (1e-6).
      impl / chunk_size / mesh_axes / dtype / param_dtype / kernel_init / rngs: as the branches'.

    Parameters: ``attention.{q,k,v}_proj.kernel`` (see :class:`Attention`; ``v`` is ``[D, Hkv, Dv]``);
    the Mamba branch's ``mamba.*`` (see :class:`Mamba`, with inner layernorms and no ``out_proj``);
    ``attention_norm.scale``, ``mamba_norm.scale [d_inner]`` (norm); ``out_proj.kernel [d_inner, D]``
    (mlp, embed).

    Cache: :class:`HybridCache` ``(attention: KVCache, recurrent: RecurrentCache)``.

    FLOPs: the attention branch's (without o_proj) + the Mamba branch's (without out_proj) +
    ``2 T d_inner D``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        expand: float = 2,
        state_dim: int = 16,
        dt_rank: int | str = "auto",
        conv_size: int = 4,
        window: int | None = None,
        num_sink_tokens: int = 0,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "HymbaHead"
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.d_inner = _expanded_width(owner, self.dim, expand)
        if self.dim % self.num_heads or self.d_inner % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) and d_inner ({self.d_inner})"
            )
        self.window = check_int(owner, "window", window, allow_none=True)
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        self.dtype = dtype
        self.param_dtype = param_dtype
        common = dict(impl=impl, mesh_axes=mesh_axes, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                      rngs=rngs)
        self.attention = Attention(
            self.dim, self.num_heads, num_kv_heads=num_kv_heads, v_head_dim=self.d_inner // self.num_heads,
            output_projection=False, causal=True, window=None if self.window is None else (self.window, 0),
            num_sink_tokens=num_sink_tokens, use_rope=True, rope_theta=rope_theta, **common,
        )
        self.mamba = Mamba(
            self.dim, 1, expand=expand, state_dim=state_dim, dt_rank=dt_rank, conv_size=conv_size,
            inner_layernorms=True, output_projection=False, norm_eps=norm_eps, chunk_size=chunk_size, **common,
        )
        norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attention_norm = RMSNorm(self.d_inner, **norm)
        self.mamba_norm = RMSNorm(self.d_inner, **norm)
        self.out_proj = Dense(self.d_inner, self.dim, logical_axes=("mlp", "embed"), dtype=dtype,
                              param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> HybridCache:
        """An empty :class:`HybridCache` (KV cache of ``max_len`` tokens and the recurrent state)."""
        return HybridCache(self.attention.init_cache(batch, max_len, dtype), self.mamba.init_cache(batch, max_len, dtype))

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence (see the class docstring)."""
        seq_len = check_int("HymbaHead.flops", "seq_len", seq_len)
        return int(self.attention.flops(seq_len, kv_len) + self.mamba.flops(seq_len, kv_len)
                   + 2 * seq_len * self.d_inner * self.dim)

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: HybridCache | None = None,
        valid_lengths: jax.Array | None = None,
    ):
        """Both branches on ``x [B, T, D]``; arguments as :class:`Attention` and :class:`Mamba`.

        Returns ``y [B, T, D]`` in the compute dtype; with a cache ``(y, new_cache)``.
        """
        check_input("HymbaHead", x, ndim=3, last=self.dim, layout="[B,T,D]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        if cache is None:
            if valid_lengths is not None:
                raise ValueError("HymbaHead: valid_lengths needs a cache (use segment_ids for packing)")
            a = self.attention(x, segment_ids=segment_ids, positions=positions)
            s = self.mamba(x, segment_ids=segment_ids)
            new_cache = None
        else:
            if not isinstance(cache, HybridCache):
                raise TypeError(f"HymbaHead: cache must be a HybridCache from init_cache, got {type(cache).__name__}")
            a, attention_cache = self.attention(x, positions=positions, cache=cache.attention,
                                                valid_lengths=valid_lengths, segment_ids=segment_ids)
            s, recurrent_cache = self.mamba(x, cache=cache.recurrent, valid_lengths=valid_lengths,
                                            segment_ids=segment_ids)
            new_cache = HybridCache(attention_cache, recurrent_cache)
        stat_dtype = jnp.promote_types(dtype, jnp.float32)
        fused = (self.attention_norm(a).astype(stat_dtype) + self.mamba_norm(s).astype(stat_dtype)) / 2
        y = self.out_proj(fused.astype(dtype))
        return y if new_cache is None else (y, new_cache)
