"""Zamba: a state-space backbone with weight-shared transformer blocks applied periodically.

>>> lm = zoo.create_model("zamba_lm_tiny", rngs=nnx.Rngs(0))
>>> logits = lm(tokens)                                   # [B, T] int -> [B, T, V] float32
>>> cache = lm.init_cache(batch=B, max_len=1024)          # decoding, as DecoderLM (zoo.generate)
>>> logits, cache = lm(prompts, cache=cache, valid_lengths=lens)

Glorioso et al. 2024, "Zamba: A Compact 7B SSM Hybrid Model" (arXiv:2405.16712) and Zamba2
(arXiv:2411.15242), as Hugging Face transformers' ``Zamba2ForCausalLM`` (parity tested,
tests/zoo/test_hf_parity.py). With ``e`` the token embeddings and ``x`` the residual stream, layer
``l`` is a pre-norm state-space layer (no MLP)::

    x = x + mixer_l(RMSNorm_l(x + t_l))          t_l = 0, or at every shared_every-th layer:
    t_l = W_l S_j(x, e)                           S_j one of num_shared_blocks weight-shared blocks
    S(x, e): h = RMSNorm([x, e]) (width 2D);  a = o_proj(attention(h))   (head_dim 2D / H, scale (Dh/2)^-1/2)
             out = down(gelu(gate(n)) * up(n)),   n = RMSNorm(a)           (no residual inside S)

The shared blocks are used in turn (block ``j = k mod num_shared_blocks`` at the ``k``-th shared
layer); every use has its own projection ``W_l`` and, as in Zamba2, low-rank adapters added to the
shared block's gate/up projection (and, with ``attention_adapters``, to its q, k, v projections).

Layout: the model is ``depth / (shared_every * num_shared_blocks)`` repetitions of a super-block
of ``shared_every * num_shared_blocks`` layers, stacked and applied with ``nnx.scan`` (the shared
blocks are broadcast into the scan); the shared layer of each group of ``shared_every`` layers is
at ``shared_offset`` (Zamba2-1.2B: every 6th layer, the last of each group).

Parameters (logical axes): ``embedding [V, D]``; ``shared[j].*`` (attention over ``2D``,
``o_proj``, ``gate_up_proj [D, 2, F]``, ``down_proj``); ``blocks.layers.*`` stacked per super-block
(layers, ...): ``layers[i].norm``, ``layers[i].mixer.*``, ``shared_proj[s].kernel [D, D]``,
``adapters[s].*``; ``norm.scale``; ``head.kernel`` unless embeddings are tied (the default, as Zamba2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import Attention, Dense, RMSNorm, create_mixer
from attnzoo.layers.common import DType, compute_dtype, gelu, partitioned
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import LayerStack, build_from_preset, mixer_flops
from attnzoo.zoo.lm import LMCache, advance_lengths, check_lm_cache, check_tokens
from attnzoo.zoo.registry import register_model

__all__ = ["ZambaLM", "ZambaSharedBlock"]


class ZambaAdapters(nnx.Module):
    """One shared-layer call's low-rank adapters (Zamba2): ``x -> up(down(x))`` added to a projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int, rank: int, *, attention: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        wide = 2 * dim
        if attention:
            self.q_down, self.k_down, self.v_down = (Dense(wide, rank, logical_axes=("embed", None), **dense) for _ in range(3))
            self.q_up, self.k_up, self.v_up = (
                Dense(rank, (num_heads, head_dim), logical_axes=(None, "heads", "head_dim"), **dense) for _ in range(3)
            )
        else:
            self.q_down = self.k_down = self.v_down = self.q_up = self.k_up = self.v_up = None
        self.gate_up_down = Dense(dim, rank, logical_axes=("embed", None), **dense)
        self.gate_up_up = Dense(rank, (2, mlp_dim), logical_axes=(None, None, "mlp"), **dense)

    def qkv(self, h):
        if self.q_down is None:
            return None
        return tuple(up(down(h)) for down, up in ((self.q_down, self.q_up), (self.k_down, self.k_up), (self.v_down, self.v_up)))


class ZambaSharedBlock(nnx.Module):
    """The weight-shared transformer block ``S(x, e)`` (see the module docstring): ``[B,T,D]`` twice -> ``[B,T,D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, use_rope: bool, rope_theta: float, norm_eps: float,
                 impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        wide = 2 * dim
        if wide % num_heads:
            raise ValueError(f"ZambaLM: num_heads ({num_heads}) must divide 2 * dim ({wide})")
        self.head_dim = wide // num_heads
        norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(wide, **norm)
        self.attention = Attention(
            wide, num_heads, head_dim=self.head_dim, scale=(self.head_dim / 2) ** -0.5, output_projection=False,
            use_rope=use_rope, rope_theta=rope_theta, impl=impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.o_proj = Dense((num_heads, self.head_dim), dim, logical_axes=("heads", "head_dim", "embed"), **dense)
        self.mlp_norm = RMSNorm(dim, **norm)
        self.gate_up_proj = Dense(dim, (2, mlp_dim), logical_axes=("embed", None, "mlp"), **dense)
        self.down_proj = Dense(mlp_dim, dim, logical_axes=("mlp", "embed"), **dense)
        self.num_heads = num_heads

    def __call__(self, x, embeddings, adapters: ZambaAdapters, *, segment_ids=None, positions=None, cache=None,
                 valid_lengths=None):
        """``x, embeddings [B,T,D]`` -> ``[B,T,D]``; with this use's attention ``cache`` (a
        ``KVCache``), ``(out, new_cache)``."""
        h = self.input_norm(jnp.concatenate([x, embeddings.astype(x.dtype)], axis=-1))
        if cache is None:
            a = self.attention(h, segment_ids=segment_ids, positions=positions, qkv_deltas=adapters.qkv(h))
        else:
            a, cache = self.attention(h, cache=cache, valid_lengths=valid_lengths, qkv_deltas=adapters.qkv(h))
        out = self._feed_forward(a, adapters)
        return out if cache is None else (out, cache)

    def _feed_forward(self, a, adapters: ZambaAdapters):
        a = self.o_proj(a.reshape(a.shape[:2] + (self.num_heads, self.head_dim)))
        n = self.mlp_norm(a)
        gate_up = self.gate_up_proj(n) + adapters.gate_up_up(adapters.gate_up_down(n))
        return self.down_proj(gelu(gate_up[..., 0, :]) * gate_up[..., 1, :])


class ZambaLayer(nnx.Module):
    """``x + mixer(RMSNorm(x + t))`` (``t`` the shared block's projected output, or nothing)."""

    def __init__(self, dim: int, num_heads: int, mixer: str, mixer_options: dict[str, Any], norm_eps: float,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mixer = create_mixer(mixer, dim=dim, num_heads=num_heads, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs, **mixer_options)

    def __call__(self, x, t=None, *, segment_ids=None, cache=None, valid_lengths=None):
        """``x [B,T,D]`` -> ``[B,T,D]``; with the mixer's ``cache``, ``(y, new_cache)``."""
        inner = x if t is None else x + t.astype(x.dtype)
        if cache is None:
            return x + self.mixer(self.norm(inner), segment_ids=segment_ids).astype(x.dtype)
        mixed, cache = self.mixer(self.norm(inner), cache=cache, valid_lengths=valid_lengths)
        return x + mixed.astype(x.dtype), cache


class ZambaSuperBlock(nnx.Module):
    """``shared_every * num_shared`` layers; the ``shared_offset``-th of each group of ``shared_every``
    adds shared block ``s`` (its group index) through its own projection and adapters."""

    def __init__(self, *, dim, num_heads, mixer, mixer_options, shared_every, shared_offset, num_shared, mlp_dim,
                 adapter_rank, attention_adapters, head_dim, norm_eps, dtype, param_dtype, rngs: nnx.Rngs):
        self.shared_every, self.shared_offset, self.num_shared = shared_every, shared_offset, num_shared
        self.layers = nnx.List([
            ZambaLayer(dim, num_heads, mixer, mixer_options, norm_eps, dtype, param_dtype, rngs)
            for _ in range(shared_every * num_shared)
        ])
        self.shared_proj = nnx.List([
            Dense(dim, dim, logical_axes=("embed", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(num_shared)
        ])
        self.adapters = nnx.List([
            ZambaAdapters(dim, num_heads, head_dim, mlp_dim, adapter_rank, attention=attention_adapters, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
            for _ in range(num_shared)
        ])

    def __call__(self, x, embeddings, shared_blocks, *, segment_ids=None, positions=None, cache=None,
                 valid_lengths=None):
        """``x [B,T,D]`` -> ``[B,T,D]``. ``cache``: ``(mixer caches, one per layer; shared-attention
        KV caches, one per use)``; with it, returns ``(y, new_cache)``."""
        mixer_caches, shared_caches = ([None] * len(self.layers), [None] * self.num_shared) if cache is None else (
            list(cache[0]), list(cache[1]))
        cached = dict(valid_lengths=valid_lengths) if cache is not None else dict(segment_ids=segment_ids)
        for group in range(self.num_shared):
            for position in range(self.shared_every):
                index = group * self.shared_every + position
                t = None
                if position == self.shared_offset:
                    shared = shared_blocks[group]
                    if cache is None:
                        s = shared(x, embeddings, self.adapters[group], segment_ids=segment_ids, positions=positions)
                    else:
                        s, shared_caches[group] = shared(x, embeddings, self.adapters[group], cache=shared_caches[group],
                                                         valid_lengths=valid_lengths)
                    t = self.shared_proj[group](s)
                if cache is None:
                    x = self.layers[index](x, t, **cached)
                else:
                    x, mixer_caches[index] = self.layers[index](x, t, cache=mixer_caches[index], **cached)
        return x if cache is None else (x, (tuple(mixer_caches), tuple(shared_caches)))


class ZambaLM(nnx.Module):
    """Zamba2-style language model (see the module docstring).

    Args:
      vocab_size / dim / depth: ``V``, ``D``, layers (a multiple of ``shared_every * num_shared_blocks``).
      num_heads: heads of the shared attention (head_dim ``2D / H``) and of the mixers.
      mixer: the state-space layers' registered mixer ("mamba2", Zamba2; "mamba", Zamba1) and
        ``mixer_options`` its options (Zamba2: ``dt_limit=(time_step_min, inf)``).
      shared_every: a shared-block layer every this many layers (6). shared_offset: its position
        in the group (default ``shared_every - 1``). num_shared_blocks: shared blocks used in turn (2).
      mlp_dim: the shared block's MLP width (default ``4 D``). adapter_rank: the per-call adapters'
        rank (128). attention_adapters: also adapt q, k, v (Zamba2's ``use_shared_attention_adapter``).
      use_rope / rope_theta: RoPE in the shared attention (Zamba2's ``use_mem_rope``).
      tie_embeddings: logits from ``embedding.T`` (True, as Zamba2). norm_eps: RMSNorm epsilon (1e-5).
      remat / scan_layers: as :class:`attnzoo.zoo.lm.DecoderLM`. dtype / param_dtype / logits_dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        mixer: str = "mamba2",
        mixer_options: dict[str, Any] | None = None,
        shared_every: int = 6,
        shared_offset: int | None = None,
        num_shared_blocks: int = 2,
        mlp_dim: int | None = None,
        adapter_rank: int = 128,
        attention_adapters: bool = False,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        remat: str = "none",
        scan_layers: bool = True,
        impl: str = "auto",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logits_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "ZambaLM"
        self.vocab_size = check_int(owner, "vocab_size", vocab_size)
        self.dim = check_int(owner, "dim", dim)
        self.depth = check_int(owner, "depth", depth)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.shared_every = check_int(owner, "shared_every", shared_every)
        shared_offset = self.shared_every - 1 if shared_offset is None else shared_offset
        self.shared_offset = check_int(owner, "shared_offset", shared_offset, minimum=0)
        if self.shared_offset >= self.shared_every:
            raise ValueError(f"{owner}: shared_offset must be in [0, shared_every={self.shared_every}), got {shared_offset}")
        self.num_shared_blocks = check_int(owner, "num_shared_blocks", num_shared_blocks)
        group = self.shared_every * self.num_shared_blocks
        if self.depth % group:
            raise ValueError(
                f"{owner}: depth ({self.depth}) must be a multiple of shared_every * num_shared_blocks ({group})"
            )
        self.mlp_dim = 4 * self.dim if mlp_dim is None else check_int(owner, "mlp_dim", mlp_dim)
        adapter_rank = check_int(owner, "adapter_rank", adapter_rank)
        mixer_options = {} if mixer_options is None else dict(mixer_options)
        for name, value in (("attention_adapters", attention_adapters), ("use_rope", use_rope),
                            ("tie_embeddings", tie_embeddings), ("scan_layers", scan_layers)):
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        self.tie_embeddings = tie_embeddings
        self.dtype, self.param_dtype = dtype, param_dtype
        self.logits_dtype = jnp.dtype(logits_dtype)

        embed_std = self.dim**-0.5 if tie_embeddings else 1.0
        self.embedding = nnx.Param(
            partitioned(nnx.initializers.normal(embed_std), ("vocab", "embed"))(
                rngs.params(), (self.vocab_size, self.dim), param_dtype
            )
        )
        shared = dict(use_rope=use_rope, rope_theta=rope_theta, norm_eps=norm_eps, impl=impl, dtype=dtype,
                      param_dtype=param_dtype)
        self.shared = nnx.List([
            ZambaSharedBlock(self.dim, self.num_heads, self.mlp_dim, rngs=rngs, **shared)
            for _ in range(self.num_shared_blocks)
        ])
        head_dim = 2 * self.dim // self.num_heads
        block_args = dict(
            dim=self.dim, num_heads=self.num_heads, mixer=mixer, mixer_options=mixer_options,
            shared_every=self.shared_every, shared_offset=self.shared_offset, num_shared=self.num_shared_blocks,
            mlp_dim=self.mlp_dim, adapter_rank=adapter_rank, attention_adapters=attention_adapters, head_dim=head_dim,
            norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
        )
        self.num_repeats = self.depth // group
        self.blocks = LayerStack(lambda r: ZambaSuperBlock(rngs=r, **block_args), self.num_repeats, remat=remat,
                                 scan_layers=scan_layers, rngs=rngs)
        self.norm = RMSNorm(self.dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.head = None if tie_embeddings else Dense(
            self.dim, self.vocab_size, logical_axes=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> LMCache:
        """An empty :class:`attnzoo.zoo.lm.LMCache` for ``batch`` rows of up to ``max_len`` tokens:
        per super-block, the mixers' caches and one shared-attention ``KVCache`` per use."""
        owner = "ZambaLM.init_cache"
        batch = check_int(owner, "batch", batch)
        max_len = check_int(owner, "max_len", max_len)

        def make(super_block: ZambaSuperBlock):
            mixers = tuple(layer.mixer.init_cache(batch, max_len, dtype) for layer in super_block.layers)
            shared = tuple(block.attention.init_cache(batch, max_len, dtype) for block in self.shared)
            return mixers, shared

        return LMCache(layers=self.blocks.init_cache(make), lengths=jnp.zeros((batch,), jnp.int32), max_len=max_len)

    def __call__(self, tokens: jax.Array, *, segment_ids=None, positions=None, cache: LMCache | None = None,
                 valid_lengths=None):
        """``tokens [B, T]`` ints -> logits ``[B, T, vocab_size]`` (``logits_dtype``); packed documents
        with ``segment_ids`` / ``positions``, and decoding with ``cache`` / ``valid_lengths``
        (returning ``(logits, new_cache)``), as :class:`attnzoo.zoo.lm.DecoderLM`."""
        owner = "ZambaLM"
        check_tokens(owner, tokens, self.vocab_size)
        dtype = compute_dtype(self.dtype, self.param_dtype)
        embeddings = jnp.take(self.embedding[...], tokens, axis=0, mode="fill", fill_value=jnp.nan).astype(dtype)
        if cache is not None:
            check_lm_cache(owner, cache, tokens)
            if segment_ids is not None or positions is not None:
                raise ValueError(f"{owner}: segment_ids / positions cannot be combined with a cache")
            x, layers = self.blocks(embeddings, cache=cache.layers, embeddings=embeddings, shared_blocks=self.shared,
                                    valid_lengths=valid_lengths)
            lengths = advance_lengths(cache.lengths, tokens.shape[1], valid_lengths)
            return self._logits(x), LMCache(layers=layers, lengths=lengths, max_len=cache.max_len)
        if valid_lengths is not None:
            raise ValueError(f"{owner}: valid_lengths needs a cache (use segment_ids for packing)")
        x = self.blocks(embeddings, embeddings=embeddings, shared_blocks=self.shared, segment_ids=segment_ids,
                        positions=positions)
        return self._logits(x)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        accumulate = jnp.promote_types(compute_dtype(self.dtype, x, self.param_dtype), jnp.float32)
        if self.head is None:
            logits = jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(x.dtype), preferred_element_type=accumulate)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.head.kernel[...].astype(x.dtype), preferred_element_type=accumulate)
        return logits.astype(self.logits_dtype)

    def forward_flops(self, seq_len: int) -> int:
        """Analytic forward matmul FLOPs of one sequence: the mixers, the shared blocks at each use
        (attention over ``2D``, o_proj, MLP, adapters, projection) and the head."""
        seq_len = check_int("ZambaLM.forward_flops", "seq_len", seq_len)
        superblock = self.blocks.layers
        mixers = sum(mixer_flops(layer.mixer, seq_len, "ZambaLM") for layer in superblock.layers)
        shared = 0
        for index, block in enumerate(self.shared):
            attention = block.attention.flops(seq_len)
            o_proj = 2 * seq_len * 2 * self.dim * self.dim
            mlp = 2 * seq_len * self.dim * self.mlp_dim * 3
            adapters = superblock.adapters[index]
            rank = adapters.gate_up_down.out_features[0]
            adapter = 2 * seq_len * rank * (self.dim + 2 * self.mlp_dim)
            if adapters.q_down is not None:
                adapter += 3 * 2 * seq_len * rank * 4 * self.dim
            shared += attention + o_proj + mlp + adapter + 2 * seq_len * self.dim * self.dim
        return int(self.num_repeats * (mixers + shared) + 2 * seq_len * self.dim * self.vocab_size)


def _zamba_preset(name: str, dim: int, depth: int, num_heads: int):
    preset = dict(vocab_size=256, dim=dim, depth=depth, num_heads=num_heads, mixer="mamba2", shared_every=6,
                  num_shared_blocks=2, adapter_rank=dim // 4,
                  mixer_options=dict(state_dim=64, dt_limit=(1e-3, float("inf"))))

    def factory(*, rngs: nnx.Rngs, **overrides) -> ZambaLM:
        return build_from_preset(ZambaLM, name, preset, overrides, rngs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"Zamba2-style LM (Glorioso et al. 2024, arXiv:2411.15242): D {dim}, {depth} Mamba-2 layers, two shared "
        f"attention+MLP blocks used in turn every 6th layer with per-use adapters, {num_heads} heads, byte vocabulary."
    )
    return register_model(name)(factory)


zamba_lm_tiny = _zamba_preset("zamba_lm_tiny", 128, 12, 4)
zamba_lm_small = _zamba_preset("zamba_lm_small", 384, 24, 6)
