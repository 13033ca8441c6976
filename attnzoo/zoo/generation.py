"""Decoding for the zoo's language models: prefill a prompt into the caches, then sample token by token.

>>> from attnzoo import zoo
>>> lm = zoo.create_model("kimi_linear_lm_tiny", rngs=nnx.Rngs(0))
>>> out = zoo.generate(lm, prompts, lengths=lens, padding="left", max_new_tokens=64,
...                    temperature=0.8, top_k=40, rng=jax.random.key(0))     # [B, 64] int32
>>> logits, cache = zoo.prefill(lm, prompts, lengths=lens, padding="left", max_len=256)

Any model with ``init_cache(batch, max_len)`` and ``model(tokens, cache=..., valid_lengths=...)``
(:class:`attnzoo.zoo.lm.DecoderLM` and every pattern / hybrid preset, :class:`attnzoo.zoo.zamba.ZambaLM`)
decodes here: attention layers keep KV caches, recurrent layers their states and short-convolution
tails. Prompts of different lengths share a batch, padded on either side: left-padded rows are
moved to the right (each row rolled by its padding) before the prefill, because every cache takes
right-padded rows (``valid_lengths``), so a row's padding never reaches its cache and each row
continues from its own length.

Sampling (:func:`sample_logits`): ``temperature == 0`` is greedy (argmax); otherwise the logits
are divided by ``temperature``, restricted to the ``top_k`` largest and to the smallest set whose
probability reaches ``top_p`` (either or both optional), and a token is drawn from the softmax.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = ["generate", "prefill", "sample_logits", "to_right_padding"]

PADDING_SIDES = ("right", "left")


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """One token per row from ``logits [B, V]`` -> ``[B]`` int32.

    ``temperature == 0``: the argmax (``rng`` unused, may be None). Otherwise a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (ties at the k-th
    value are kept) and to the smallest prefix of tokens sorted by probability whose mass reaches
    ``top_p`` (the most likely token is always kept).
    """
    owner = "sample_logits"
    temperature = check_float(owner, "temperature", temperature, allow_none=False)
    if temperature < 0:
        raise ValueError(f"{owner}: temperature must be >= 0 (0 is greedy), got {temperature}")
    if logits.ndim != 2:
        raise ValueError(f"{owner}: logits must have shape [B,V], got {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if top_k is not None:
        top_k = check_int(owner, "top_k", top_k)
        if top_k > vocab:
            raise ValueError(f"{owner}: top_k must be <= the vocabulary size {vocab}, got {top_k}")
    if top_p is not None:
        top_p = check_float(owner, "top_p", top_p, allow_none=False)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"{owner}: top_p must be in (0, 1], got {top_p}")
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError(f"{owner}: rng (a jax.random key) is needed when temperature > 0")
    logits = logits / temperature
    if top_k is not None and top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the first token always has mass_before 0
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def to_right_padding(tokens: jax.Array, lengths: jax.Array, padding: str) -> jax.Array:
    """``[B, T]`` rows padded on ``padding``'s side -> right-padded rows (real tokens first).

    A left-padded row with ``lengths[b]`` real tokens is rolled left by ``T - lengths[b]``; right
    padding is returned unchanged. Applying the inverse roll (``shift`` negated) restores the layout.
    """
    if padding == "right":
        return tokens
    shifts = tokens.shape[1] - lengths
    return jax.vmap(lambda row, shift: jnp.roll(row, -shift, axis=0))(tokens, shifts)


def _from_right_padding(values: jax.Array, lengths: jax.Array, padding: str) -> jax.Array:
    if padding == "right":
        return values
    shifts = values.shape[1] - lengths
    return jax.vmap(lambda row, shift: jnp.roll(row, shift, axis=0))(values, shifts)


def _check_prompts(owner: str, model: Any, tokens: Any, lengths: Any, padding: str) -> tuple[jax.Array, jax.Array]:
    for method in ("init_cache", "__call__"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"{owner}: model must be a zoo language model with init_cache, got {type(model).__name__}")
    if padding not in PADDING_SIDES:
        raise ValueError(f"{owner}: padding must be one of {PADDING_SIDES}, got {padding!r}")
    if not hasattr(tokens, "shape") or tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{owner}: tokens must be an int array of shape [B,T], got "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)}{tuple(getattr(tokens, 'shape', ()))}"
        )
    batch, length = tokens.shape
    if length < 1:
        raise ValueError(f"{owner}: tokens must hold at least one token per row, got shape {tuple(tokens.shape)}")
    if lengths is None:
        return jnp.asarray(tokens, jnp.int32), jnp.full((batch,), length, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{owner}: lengths must be an int array of shape ({batch},) [B], got {lengths.dtype}{lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        low, high = int(jnp.min(lengths)), int(jnp.max(lengths))
        if low < 1 or high > length:
            raise ValueError(f"{owner}: lengths must lie in [1, {length}] (real tokens per row), got values in [{low}, {high}]")
    return jnp.asarray(tokens, jnp.int32), lengths.astype(jnp.int32)


def _prefill(model, tokens, lengths, padding: str, max_len: int, cache_dtype):
    """Right-padded prefill; returns (logits in the input layout, cache, last real logits [B, V])."""
    batch = tokens.shape[0]
    right = to_right_padding(tokens, lengths, padding)
    cache = model.init_cache(batch, max_len, cache_dtype)
    logits, cache = model(right, cache=cache, valid_lengths=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return _from_right_padding(logits, lengths, padding), cache, last


@functools.partial(nnx.jit, static_argnames=("padding", "max_len", "cache_dtype"))
def _prefill_jit(model, tokens, lengths, *, padding, max_len, cache_dtype):
    logits, cache, _ = _prefill(model, tokens, lengths, padding, max_len, cache_dtype)
    return logits, cache


def prefill(
    model: nnx.Module,
    tokens: jax.Array,
    *,
    lengths: jax.Array | None = None,
    padding: str = "right",
    max_len: int | None = None,
    cache_dtype: Any = None,
):
    """Runs prompts through ``model`` into a fresh cache.

    Args:
      model: a zoo LM (``init_cache`` and ``model(tokens, cache=, valid_lengths=)``).
      tokens: ``[B, T]`` int prompts, padded on ``padding``'s side (``"right"`` or ``"left"``).
      lengths: ``[B]`` ints in ``[1, T]``, real tokens per row (default: every row has ``T``).
      max_len: the cache capacity in tokens (default ``T``; leave room for what you decode next).
      cache_dtype: dtype of the caches (default: the model's compute dtype).

    Returns ``(logits [B, T, V], cache)``: ``logits[b, t]`` predicts the token after ``tokens[b, t]``
    (same layout as ``tokens``; values at padding are unspecified), and the cache holds each row's
    real tokens, ready for ``model(next_tokens[:, None], cache=cache)``.
    """
    tokens, lengths = _check_prompts("prefill", model, tokens, lengths, padding)
    max_len = tokens.shape[1] if max_len is None else check_int("prefill", "max_len", max_len)
    if max_len < tokens.shape[1]:
        raise ValueError(f"prefill: max_len ({max_len}) must be >= the prompt length T = {tokens.shape[1]}")
    return _prefill_jit(model, tokens, lengths, padding=padding, max_len=max_len, cache_dtype=cache_dtype)


@functools.partial(
    nnx.jit,
    static_argnames=("padding", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "cache_dtype"),
)
def _generate_jit(model, tokens, lengths, rng, *, padding, max_new_tokens, temperature, top_k, top_p, eos_id,
                  cache_dtype):
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    max_len = tokens.shape[1] + max_new_tokens - 1
    _, cache, last = _prefill(model, tokens, lengths, padding, max_len, cache_dtype)
    keys = jax.random.split(rng, max_new_tokens)
    first = sample(last, keys[0])
    done = jnp.zeros_like(first, dtype=bool) if eos_id is None else first == eos_id
    # NNX transforms inside lax.scan need the model's arrays at the body's trace level: they ride
    # in the carry (unchanged) and the model is rebuilt in the body.
    graphdef, state = nnx.split(model)

    def step(carry, key):
        state, cache, token, done = carry
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        new = sample(logits[:, 0], key)
        if eos_id is not None:
            new = jnp.where(done, eos_id, new)
            done = done | (new == eos_id)
        return (state, cache, new, done), new

    _, rest = jax.lax.scan(step, (state, cache, first, done), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: nnx.Module,
    prompts: jax.Array,
    *,
    max_new_tokens: int,
    lengths: jax.Array | None = None,
    padding: str = "right",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    cache_dtype: Any = None,
) -> jax.Array:
    """Continues every prompt by ``max_new_tokens`` tokens (one compiled prefill + decode loop).

    Args:
      model: a zoo LM (see the module docstring).
      prompts: ``[B, T]`` int prompts padded on ``padding``'s side; ``lengths [B]`` real tokens
        per row (default ``T``).
      max_new_tokens: tokens generated per row (the caches hold ``T + max_new_tokens - 1``).
      temperature / top_k / top_p: see :func:`sample_logits` (``temperature=0``: greedy).
      rng: a ``jax.random`` key; needed when ``temperature > 0`` (split once per step).
      eos_id: once a row samples it, the row's later tokens are ``eos_id``.
      cache_dtype: dtype of the caches (default: the model's compute dtype).

    Returns ``[B, max_new_tokens]`` int32.
    """
    owner = "generate"
    tokens, lengths = _check_prompts(owner, model, prompts, lengths, padding)
    max_new_tokens = check_int(owner, "max_new_tokens", max_new_tokens)
    vocab = getattr(model, "vocab_size", None)
    if eos_id is not None:
        eos_id = check_int(owner, "eos_id", eos_id, minimum=0)
        if vocab is not None and eos_id >= vocab:
            raise ValueError(f"{owner}: eos_id must be < vocab_size {vocab}, got {eos_id}")
    temperature = float(check_float(owner, "temperature", temperature, allow_none=False))
    if temperature > 0 and rng is None:
        raise ValueError(f"{owner}: rng (a jax.random key) is needed when temperature > 0, got None")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    sample_logits(jnp.zeros((1, vocab or max(top_k or 1, 1)), jnp.float32), rng, temperature=temperature,
                  top_k=top_k, top_p=top_p)  # argument checks with a clear message, before compiling
    return _generate_jit(model, tokens, lengths, rng, padding=padding, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, cache_dtype=cache_dtype)
