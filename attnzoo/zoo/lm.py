"""Decoder-only language model whose layers follow a pattern of token mixers.

>>> from attnzoo import zoo
>>> lm = zoo.create_model("lm_tiny", rngs=nnx.Rngs(0))                      # 4 causal attention layers
>>> lm = zoo.create_model("lm_tiny", pattern="swa,swa,swa,attn", depth=8, vocab_size=512, rngs=nnx.Rngs(0))
>>> logits = lm(tokens)                                                      # [B,T] int -> [B,T,V] float32
>>> logits = lm(tokens, segment_ids=ids, positions=pos)                      # packed documents
>>> cache = lm.init_cache(batch=B, max_len=1024)                            # decoding (zoo.generate)
>>> logits, cache = lm(prompts, cache=cache, valid_lengths=lens)            # prefill right-padded rows
>>> logits, cache = lm(next_tokens[:, None], cache=cache)                   # one step

The pattern is a comma-separated list of tokens, one per layer of a *super-block*; the model is
``depth / len(pattern)`` repetitions of the super-block, stacked and applied with ``nnx.scan``
(:class:`attnzoo.zoo.common.LayerStack`). Tokens:

* ``attn``: the ``"attention"`` mixer, causal, RoPE (``rope_theta``), ``num_kv_heads``, ``head_dim``;
* ``swa``: the same with a sliding window ``(sliding_window, 0)`` (token ``i`` sees ``i-w .. i``);
* any registered mixer name (``attnzoo.layers.list_mixers()``), built with ``dim``, ``num_heads``,
  ``dtype``, ``param_dtype`` and its ``mixer_options`` (``"attention"`` also gets the attn defaults);
* ``name:label`` (e.g. ``hymba:global``): the mixer ``name`` with the options of ``mixer_options``
  key ``"name:label"`` applied after those of ``name``, so positions of a super-block can differ.

With ``num_meta_tokens = M`` (Hymba), ``M`` learned vectors are prepended to every sequence (as
positions ``0 .. M-1``; the tokens follow at ``M ..``) and their outputs dropped from the logits.

Each layer is pre-norm: ``x + mixer(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``; a final RMSNorm and
the output head follow.

Parameters (logical axes): ``embedding [V, D]`` (vocab, embed); ``blocks.layers.blocks[j].*`` for
pattern position ``j``, stacked ``[depth / len(pattern), ...]`` (layers, ...); ``norm.scale [D]``
(norm); ``head.kernel [D, V]`` (embed, vocab) unless embeddings are tied (then the logits use
``embedding`` transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import MLP, Dense, RMSNorm, create_mixer, get_mixer_class, list_mixers
from attnzoo.layers.common import DType, compute_dtype, partitioned
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import LayerStack, build_from_preset, mixer_flops, mlp_flops
from attnzoo.zoo.registry import register_model

__all__ = ["DecoderLM", "DecoderBlock", "SuperBlock", "LMCache", "PATTERN_ALIASES", "parse_pattern"]

# pattern token -> registered mixer name
PATTERN_ALIASES = {"attn": "attention", "swa": "attention"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LMCache:
    """Decoding cache of a language model.

    Attributes:
      layers: the layers' caches, a pytree whose leaves have a leading ``[num_repeats]`` axis
        (for :class:`DecoderLM`, a tuple with one mixer cache per pattern position: a
        ``KVCache`` for attention, a ``RecurrentCache`` for recurrent mixers, ...).
      lengths: ``[B]`` int32, tokens seen per row (not counting meta tokens).
      max_len: tokens each row can hold (static; a row that would exceed it is an error).
    """

    layers: Any
    lengths: jax.Array
    max_len: int = dataclasses.field(metadata=dict(static=True), default=0)


def check_lm_cache(owner: str, cache: Any, tokens: jax.Array) -> None:
    """Raises ``TypeError`` / ``ValueError`` unless ``cache`` is an :class:`LMCache` with room for
    ``tokens [B, T]`` (the row lengths are checked when they are concrete; under ``jit`` a row
    that overflows gets NaN logits from its attention layers)."""
    if not isinstance(cache, LMCache):
        raise TypeError(f"{owner}: cache must be an LMCache from init_cache, got {type(cache).__name__}")
    batch, length = tokens.shape
    if tuple(cache.lengths.shape) != (batch,):
        raise ValueError(
            f"{owner}: cache holds {tuple(cache.lengths.shape)} rows (lengths), but tokens have {batch} rows"
        )
    held = None if isinstance(cache.lengths, jax.core.Tracer) else int(jnp.max(cache.lengths))
    if length > cache.max_len or (held is not None and held + length > cache.max_len):
        raise ValueError(
            f"{owner}: cache overflow: rows hold up to {held if held is not None else '?'} tokens, writing "
            f"{length} more exceeds the cache's max_len={cache.max_len}"
        )


def advance_lengths(lengths: jax.Array, length: int, valid_lengths: jax.Array | None) -> jax.Array:
    """``lengths + T``, or ``+ valid_lengths`` (clipped to ``[0, T]``) for right-padded rows."""
    if valid_lengths is None:
        return lengths + length
    return lengths + jnp.clip(jnp.asarray(valid_lengths, jnp.int32), 0, length)


def _is_2d_mixer(name: str) -> bool:
    """Whether the registered mixer ``name`` is a vision mixer: on 2-D maps ``[B, H, W, C]``
    (``spatial_ndim == 2``) or on the tokens of a fixed patch grid (``grid_tokens``, e.g. the ViT's
    ``agent_attention_tokens``), neither of which is a causal sequence mixer."""
    cls = get_mixer_class(name)
    return getattr(cls, "spatial_ndim", 1) == 2 or getattr(cls, "grid_tokens", False)


def parse_pattern(pattern: str) -> tuple[tuple[str, str], ...]:
    """``"swa, swa, attn"`` -> ``(("swa", "attention"), ("swa", "attention"), ("attn", "attention"))``.

    Each token is an alias (``attn``, ``swa``) or a registered mixer name; anything else raises
    ``ValueError`` naming the token, the pattern and the available names.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"DecoderLM: pattern must be a comma-separated string, got {type(pattern).__name__}")
    tokens = [token.strip() for token in pattern.split(",")]
    sequence_mixers = [name for name in list_mixers() if not _is_2d_mixer(name)]
    available = sorted(set(PATTERN_ALIASES) | set(sequence_mixers))
    parsed = []
    for token in tokens:
        if not token or token.endswith(":") or token.startswith(":"):
            raise ValueError(f"DecoderLM: pattern {pattern!r} has an empty token or label; expected e.g. 'swa,swa,attn'")
        base = token.split(":", 1)[0]
        mixer = PATTERN_ALIASES.get(base, base)
        if mixer in list_mixers() and _is_2d_mixer(mixer):
            raise ValueError(
                f"DecoderLM: token {token!r} in pattern {pattern!r} names a vision mixer (input [B, H, W, C] or "
                f"a patch grid's tokens); a "
                f"language model layer needs a sequence mixer: {', '.join(available)}"
            )
        if mixer not in sequence_mixers:
            raise ValueError(
                f"DecoderLM: unknown token {token!r} in pattern {pattern!r}; available: {', '.join(available)}"
            )
        parsed.append((token, mixer))
    return tuple(parsed)


class DecoderBlock(nnx.Module):
    """Pre-norm decoder layer: ``x + mixer(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``; with
    ``mlp="none"`` only the first (a mixer-only layer: Mamba's LM blocks, Zoology's MQAR models),
    and ``mlp_norm`` / ``mlp`` are ``None``.

    ``x [B, T, D] -> [B, T, D]``; ``segment_ids`` / ``positions`` ``[B, T]`` go to the mixer.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mixer: str,
        mixer_options: dict[str, Any],
        mlp_dim: int,
        mlp: str,
        norm_eps: float,
        dtype: DType | None,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mixer_norm = RMSNorm(dim, **norm)
        self.mixer = create_mixer(
            mixer, dim=dim, num_heads=num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **mixer_options
        )
        if mlp == "none":
            self.mlp_norm = self.mlp = None
        else:
            self.mlp_norm = RMSNorm(dim, **norm)
            self.mlp = MLP(dim, mlp_dim, kind=mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _add_mlp(self, x: jax.Array) -> jax.Array:
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

    def __call__(self, x: jax.Array, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """x ``[B, T, D]`` -> ``[B, T, D]``; with the mixer's ``cache``, ``(y, new_cache)``."""
        if cache is None:
            x = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions).astype(x.dtype)
            return self._add_mlp(x)
        mixed, cache = self.mixer(self.mixer_norm(x), positions=positions, cache=cache, valid_lengths=valid_lengths)
        return self._add_mlp(x + mixed.astype(x.dtype)), cache


class SuperBlock(nnx.Module):
    """One :class:`DecoderBlock` per pattern token, applied in order (``blocks``, an ``nnx.List``)."""

    def __init__(self, specs: list[tuple[str, dict[str, Any]]], *, rngs: nnx.Rngs, **block_args: Any):
        self.blocks = nnx.List(
            [DecoderBlock(mixer=mixer, mixer_options=options, rngs=rngs, **block_args) for mixer, options in specs]
        )

    def __call__(self, x: jax.Array, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """x ``[B, T, D]`` -> ``[B, T, D]``; with ``cache`` (a tuple, one mixer cache per block),
        ``(y, new_cache)``."""
        if cache is None:
            for block in self.blocks:
                x = block(x, segment_ids=segment_ids, positions=positions)
            return x
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block(x, positions=positions, cache=block_cache, valid_lengths=valid_lengths)
            new_cache.append(block_cache)
        return x, tuple(new_cache)


def check_tokens(owner: str, tokens: Any, vocab_size: int) -> None:
    """Raises unless ``tokens`` is an int array ``[B, T]`` (values in ``[0, vocab_size)`` when concrete)."""
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise TypeError(f"{owner}: tokens must be an int array [B,T], got {type(tokens).__name__}")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{owner}: tokens must be an int array of shape [B,T], got {tokens.dtype}{tuple(tokens.shape)}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        low, high = int(jnp.min(tokens)), int(jnp.max(tokens))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{owner}: tokens must lie in [0, {vocab_size}), got values in [{low}, {high}]")


def default_mlp_dim(dim: int, mlp: str) -> int:
    """``4 * dim`` for gelu; for swiglu ``8 * dim / 3`` (truncated) rounded up to a multiple of 64,
    which keeps the parameter count of a ``4 * dim`` GELU MLP (three matrices instead of two)."""
    if mlp == "none":
        return 0
    if mlp == "gelu":
        return 4 * dim
    return -(-int(8 * dim / 3) // 64) * 64


class DecoderLM(nnx.Module):
    """Decoder-only LM over a pattern of token mixers, scanned over repeated super-blocks.

    Args:
      vocab_size: ``V``. dim: width ``D``. depth: number of layers (a multiple of the pattern length).
      num_heads: mixer heads. num_kv_heads / head_dim: for attention layers (GQA; default
        ``num_heads`` and ``D / num_heads``).
      pattern: comma-separated mixer tokens of one super-block (see the module docstring).
      mlp_dim: MLP hidden width; default :func:`default_mlp_dim` (swiglu: ``8D/3`` rounded up to a
        multiple of 64; gelu: ``4D``). mlp: "swiglu", "gelu" or "none" (mixer-only layers, as
        Mamba's LMs and Zoology's MQAR models; ``mlp_dim`` must then be left unset).
      sliding_window: window of ``swa`` layers (keys ``i - w .. i``).
      mixer_options: ``{mixer name or pattern token: {option: value}}``; a mixer name applies to
        every token resolving to it, a token's options are applied after (e.g.
        ``{"attention": {"qk_norm": True}, "swa": {"rope_theta": 1e4}}``).
      tie_embeddings: use ``embedding.T`` as the output head (no ``head`` parameter).
      rope_theta: RoPE base of attention layers. norm_eps: RMSNorm epsilon.
      num_meta_tokens: learned vectors prepended to every sequence (Hymba's meta tokens; 0 = none).
        Not combined with packed ``segment_ids``. A mixer option ``num_sink_tokens="meta"``
        becomes this count (sliding-window attention that keeps the meta tokens in view).
      remat: per-super-block remat policy name. scan_layers: ``nnx.scan`` (True) or a loop (False)
        over the same stacked parameters.
      dtype: compute dtype (default: promotion). param_dtype: parameter dtype.
      logits_dtype: dtype of the logits (default float32; the head accumulates in at least float32).
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Initialisation: the embedding is normal with stddev 1 (untied) or ``D**-0.5`` (tied, so that
    the initial logits have unit scale); projections are Lecun normal.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        pattern: str = "attn",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        mlp: str = "swiglu",
        sliding_window: int = 128,
        mixer_options: dict[str, dict[str, Any]] | None = None,
        tie_embeddings: bool = False,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        remat: str = "none",
        scan_layers: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logits_dtype: DType = jnp.float32,
        num_meta_tokens: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        owner = "DecoderLM"
        self.num_meta_tokens = check_int(owner, "num_meta_tokens", num_meta_tokens, minimum=0)
        self.vocab_size = check_int(owner, "vocab_size", vocab_size)
        self.dim = check_int(owner, "dim", dim)
        self.depth = check_int(owner, "depth", depth)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.pattern = tuple(parse_pattern(pattern))
        if self.depth % len(self.pattern):
            raise ValueError(
                f"{owner}: depth ({self.depth}) must be a multiple of the pattern length "
                f"({len(self.pattern)} for pattern {pattern!r})"
            )
        self.num_repeats = self.depth // len(self.pattern)
        if mlp not in ("swiglu", "gelu", "none"):
            raise ValueError(f"{owner}: mlp must be 'swiglu', 'gelu' or 'none', got {mlp!r}")
        if mlp == "none" and mlp_dim is not None:
            raise ValueError(f"{owner}: mlp_dim must be None when mlp='none' (no MLP), got {mlp_dim!r}")
        self.mlp_dim = default_mlp_dim(self.dim, mlp) if mlp_dim is None else check_int(owner, "mlp_dim", mlp_dim)
        self.sliding_window = check_int(owner, "sliding_window", sliding_window)
        if not isinstance(tie_embeddings, bool):
            raise TypeError(f"{owner}: tie_embeddings must be a bool, got {type(tie_embeddings).__name__}")
        self.tie_embeddings = tie_embeddings
        rope_theta = check_float(owner, "rope_theta", rope_theta, positive=True, allow_none=False)
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.logits_dtype = jnp.dtype(logits_dtype)
        if not jnp.issubdtype(self.logits_dtype, jnp.floating):
            raise TypeError(f"{owner}: logits_dtype must be a floating dtype, got {self.logits_dtype}")

        attention_defaults = dict(
            causal=True, use_rope=True, rope_theta=rope_theta, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        specs = self._mixer_specs(pattern, mixer_options, attention_defaults)

        embed_std = self.dim**-0.5 if tie_embeddings else 1.0
        self.embedding = nnx.Param(
            partitioned(nnx.initializers.normal(embed_std), ("vocab", "embed"))(
                rngs.params(), (self.vocab_size, self.dim), param_dtype
            )
        )
        block_args = dict(
            dim=self.dim, num_heads=self.num_heads, mlp_dim=self.mlp_dim, mlp=mlp, norm_eps=norm_eps,
            dtype=dtype, param_dtype=param_dtype,
        )

        def make_super_block(block_rngs: nnx.Rngs) -> SuperBlock:
            return SuperBlock(specs, rngs=block_rngs, **block_args)

        self.meta_tokens = (
            nnx.Param(partitioned(nnx.initializers.normal(embed_std), (None, "embed"))(
                rngs.params(), (self.num_meta_tokens, self.dim), param_dtype))
            if self.num_meta_tokens
            else None
        )
        self.blocks = LayerStack(make_super_block, self.num_repeats, remat=remat, scan_layers=scan_layers, rngs=rngs)
        self.norm = RMSNorm(self.dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.head = (
            None
            if tie_embeddings
            else Dense(self.dim, self.vocab_size, logical_axes=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def _mixer_specs(self, pattern: str, mixer_options, attention_defaults) -> list[tuple[str, dict[str, Any]]]:
        """``(mixer name, options)`` per pattern token: defaults, then mixer-name, then token options."""
        owner = "DecoderLM"
        mixer_options = {} if mixer_options is None else mixer_options
        if not isinstance(mixer_options, dict):
            raise TypeError(f"{owner}: mixer_options must be a dict {{mixer or token: options}}, got {type(mixer_options).__name__}")
        known = ({token for token, _ in self.pattern} | {mixer for _, mixer in self.pattern}
                 | {token.split(":", 1)[0] for token, _ in self.pattern})
        for key, options in mixer_options.items():
            if key not in known:
                raise ValueError(
                    f"{owner}: mixer_options key {key!r} matches no token or mixer of pattern {pattern!r}; "
                    f"expected one of {sorted(known)}"
                )
            if not isinstance(options, dict):
                raise TypeError(f"{owner}: mixer_options[{key!r}] must be a dict of options, got {type(options).__name__}")
        specs = []
        for token, mixer in self.pattern:
            base = token.split(":", 1)[0]
            options: dict[str, Any] = dict(attention_defaults) if mixer == "attention" else {}
            if base == "swa":
                options["window"] = (self.sliding_window, 0)
            options.update(mixer_options.get(mixer, {}))
            if base != mixer:
                options.update(mixer_options.get(base, {}))
            if token != base:
                options.update(mixer_options.get(token, {}))
            if options.get("num_sink_tokens") == "meta":
                options["num_sink_tokens"] = self.num_meta_tokens
            specs.append((mixer, options))
        return specs

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> LMCache:
        """An empty decoding cache for ``batch`` rows of up to ``max_len`` tokens each.

        ``dtype``: the caches' dtype (default: the compute dtype, else ``param_dtype``); recurrent
        states are float32. With ``num_meta_tokens = M`` the attention caches hold ``max_len + M``
        slots and the meta tokens are already in the cache (one forward pass over them), so the
        first call with this cache starts at token position ``M`` as the full forward does.
        """
        owner = "DecoderLM.init_cache"
        batch = check_int(owner, "batch", batch)
        max_len = check_int(owner, "max_len", max_len)
        slots = max_len + self.num_meta_tokens

        def make(super_block: SuperBlock):
            return tuple(block.mixer.init_cache(batch, slots, dtype) for block in super_block.blocks)

        layers = self.blocks.init_cache(make)
        if self.num_meta_tokens:
            dtype = compute_dtype(self.dtype, self.param_dtype)
            prefix = jnp.broadcast_to(self.meta_tokens[...].astype(dtype), (batch, self.num_meta_tokens, self.dim))
            _, layers = self.blocks(prefix, cache=layers, positions=None, valid_lengths=None)
        return LMCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32), max_len=max_len)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: LMCache | None = None,
        valid_lengths: jax.Array | None = None,
    ):
        """Next-token logits.

        Args:
          tokens: ``[B, T]`` ints in ``[0, vocab_size)`` (out of range raises when concrete, gives
            NaN logits under ``jit``).
          segment_ids: ``[B, T]`` ints: packed documents; tokens attend only within their segment.
            Not combined with a cache.
          positions: ``[B, T]`` ints, RoPE positions (packed documents restart them at 0);
            default ``arange(T)``; with a cache, each row continues from its cache length.
          cache: an :class:`LMCache` from :meth:`init_cache`: ``T > 1`` is a prefill (chunk),
            ``T == 1`` one decoding step, each row continuing after its own ``cache.lengths``.
          valid_lengths: with a cache, ``[B]`` ints, real tokens per row of right-padded ``tokens``
            (default ``T``); logits at padding positions are unspecified and padding never
            reaches the cache.

        Returns logits ``[B, T, vocab_size]`` in ``logits_dtype``; with a cache ``(logits, new_cache)``.
        """
        owner = "DecoderLM"
        check_tokens(owner, tokens, self.vocab_size)
        dtype = compute_dtype(self.dtype, self.param_dtype)
        x = jnp.take(self.embedding[...], tokens, axis=0, mode="fill", fill_value=jnp.nan).astype(dtype)
        meta = self.num_meta_tokens
        if cache is not None:
            check_lm_cache(owner, cache, tokens)
            if segment_ids is not None:
                raise ValueError(f"{owner}: segment_ids cannot be combined with a cache; decode one sequence per row")
            if positions is not None:
                raise ValueError(f"{owner}: positions cannot be combined with a cache (they follow cache.lengths)")
            x, layers = self.blocks(x, cache=cache.layers, positions=None, valid_lengths=valid_lengths)
            lengths = advance_lengths(cache.lengths, tokens.shape[1], valid_lengths)
            new_cache = LMCache(layers=layers, lengths=lengths, max_len=cache.max_len)
            return self._logits(x), new_cache
        if valid_lengths is not None:
            raise ValueError(f"{owner}: valid_lengths needs a cache (use segment_ids for packing)")
        if meta:
            if segment_ids is not None:
                raise ValueError(f"{owner}: num_meta_tokens={meta} cannot be combined with packed segment_ids")
            batch, length = tokens.shape
            prefix = jnp.broadcast_to(self.meta_tokens[...].astype(dtype), (batch, meta, self.dim))
            x = jnp.concatenate([prefix, x], axis=1)
            if positions is None:
                positions = jnp.arange(meta + length, dtype=jnp.int32)[None, :]
            else:
                positions = jnp.concatenate(
                    [jnp.broadcast_to(jnp.arange(meta, dtype=jnp.int32), (batch, meta)),
                     jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, length)) + meta], axis=1)
        x = self.blocks(x, segment_ids=segment_ids, positions=positions)
        if meta:
            x = x[:, meta:]
        return self._logits(x)

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: ``[B, T, D]`` -> ``[B, T, V]`` in ``logits_dtype``."""
        x = self.norm(x)
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        if self.head is None:
            kernel, equation = self.embedding[...], "btd,vd->btv"
        else:
            kernel, equation = self.head.kernel[...], "btd,dv->btv"
        logits = jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype), preferred_element_type=accumulate)
        return logits.astype(self.logits_dtype)

    def forward_flops(self, seq_len: int) -> int:
        """Analytic forward FLOPs for one sequence of ``seq_len`` tokens (matmuls only, 2 per
        multiply-add)::

            per layer:  mixer.flops(T)            (attention: q/k/v/o projections plus
                                                   4 * P * Hq * Dh for scores and values, with
                                                   P the visible (query, key) pairs: T(T+1)/2
                                                   causal, about T * (w + 1) for a window w)
                        + 2 * T * D * F * 3       (swiglu gate, up, down; 2 matrices for gelu;
                                                   nothing for mlp="none")
            head:       2 * T * D * V             (tied or not)

        The embedding lookup, norms, RoPE, softmax and activations are not counted. Raises
        ``TypeError`` if a mixer has no ``flops`` method.
        """
        seq_len = check_int("DecoderLM.forward_flops", "seq_len", seq_len)
        per_repeat = 0
        mixed = seq_len + self.num_meta_tokens  # the meta tokens pass through every layer
        for block in self.blocks.layers.blocks:
            per_repeat += mixer_flops(block.mixer, mixed, "DecoderLM")
            if block.mlp is not None:
                per_repeat += mlp_flops(block.mlp, mixed)
        return int(self.num_repeats * per_repeat + 2 * seq_len * self.dim * self.vocab_size)


# ----------------------------------------------------------------------------------------------
# Presets (byte-level vocabulary by default; every argument can be overridden)
# ----------------------------------------------------------------------------------------------

_LM_BASE = dict(vocab_size=256, pattern="attn")


def _lm_preset(name: str, dim: int, depth: int, num_heads: int):
    def factory(*, rngs: nnx.Rngs, **overrides) -> DecoderLM:
        return build_from_preset(DecoderLM, name, dict(_LM_BASE, dim=dim, depth=depth, num_heads=num_heads), overrides, rngs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Decoder LM preset: D {dim}, {depth} layers, {num_heads} heads, byte vocabulary, pattern 'attn'."
    return register_model(name)(factory)


lm_nano = _lm_preset("lm_nano", 64, 2, 2)
lm_tiny = _lm_preset("lm_tiny", 128, 4, 4)
lm_small = _lm_preset("lm_small", 384, 6, 6)
lm_base = _lm_preset("lm_base", 768, 12, 12)
