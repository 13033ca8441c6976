"""Attention sinks (``Attention(num_sink_tokens=S)``) against an independent float64 numpy attention.

With a window, query ``i`` sees key ``j`` iff ``j <= i and (i - left <= j or j < S)``: the first S
tokens stay in view beyond the window (Hymba's meta tokens; ``HymbaFlexAttention`` in the released
``modeling_hymba.py`` of nvidia/Hymba-1.5B-Base builds ``causal & ((q - kv <= w) | (kv < M))``).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.layers import Attention
from tests.layers.numpy_layers import numpy_rope


def _params64(module):
    """The projection kernels of a bias-free ``Attention`` as float64 arrays."""
    return {name: np.asarray(getattr(module, name).kernel[...], np.float64)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")}


def _visible(length, left, sinks):
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    return (j <= i) & ((j >= i - left) | (j < sinks))


def numpy_sink_attention(params, x, *, num_heads, num_kv_heads, left, sinks, rope_theta=10000.0):
    """Causal GQA attention with RoPE in float64 under the explicit mask ``causal & (window | key < S)``.

    ``x [B,T,D]`` -> ``[B,T,D]``; ``params``: ``q_proj [D,Hq,Dh]``, ``k_proj``/``v_proj [D,Hkv,Dh]``,
    ``o_proj [Hq,Dh,D]``.
    """
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    q = np.einsum("btd,dhk->bthk", x, params["q_proj"])
    k = np.einsum("btd,dhk->bthk", x, params["k_proj"])
    v = np.einsum("btd,dhk->bthk", x, params["v_proj"])
    positions = np.broadcast_to(np.arange(length), (batch, length))
    q, k = numpy_rope(q, positions, rope_theta), numpy_rope(k, positions, rope_theta)
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthk,bshk->bhts", q, k) * q.shape[-1] ** -0.5
    visible = _visible(length, left, sinks)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    probs = weights / weights.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshk->bthk", probs, v)
    return np.einsum("bthk,hkd->btd", out, params["o_proj"])


def _make(dim=16, num_heads=4, num_kv_heads=2, left=2, sinks=3, seed=0, impl="xla"):
    return Attention(dim, num_heads, num_kv_heads=num_kv_heads, window=(left, 0), num_sink_tokens=sinks,
                     impl=impl, rngs=nnx.Rngs(seed))


def _reference(module, x):
    return numpy_sink_attention(_params64(module), x, num_heads=module.num_heads, num_kv_heads=module.num_kv_heads,
                                left=module.window[0], sinks=module.num_sink_tokens, rope_theta=module.rope_theta)


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


@nnx.jit
def _forward(module, x):
    return module(x)


# (seed, T, S, left, Hq, Hkv, impl): T < S, T == 1, odd T, S beyond T, MHA / GQA / MQA.
FORWARD_CASES = [
    (0, 13, 3, 2, 4, 2, "xla"),
    (1, 2, 4, 1, 2, 2, "xla"),
    (2, 1, 2, 1, 4, 1, "xla"),
    (3, 17, 1, 4, 4, 4, "xla"),
    (4, 9, 5, 0, 2, 1, "reference"),
]


@pytest.mark.parametrize("seed,length,sinks,left,heads,kv_heads,impl", FORWARD_CASES)
def test_forward_matches_numpy(seed, length, sinks, left, heads, kv_heads, impl):
    module = _make(num_heads=heads, num_kv_heads=kv_heads, left=left, sinks=sinks, seed=seed, impl=impl)
    x = np.random.default_rng(seed).normal(size=(2, length, 16)).astype(np.float32)
    out = _forward(module, jnp.asarray(x))
    assert out.shape == (2, length, 16)
    assert _rel_err(out, _reference(module, x)) < 1e-5


def test_sinks_change_the_output_beyond_the_window():
    """The comparison above can fail: without sinks the reference and the layer differ from the
    sink outputs exactly at the queries whose window has left a sink behind."""
    module = _make(left=2, sinks=3)
    x = np.random.default_rng(5).normal(size=(2, 12, 16)).astype(np.float32)
    params = _params64(module)
    common = dict(num_heads=4, num_kv_heads=2, left=2)
    with_sinks = numpy_sink_attention(params, x, sinks=3, **common)
    without = numpy_sink_attention(params, x, sinks=0, **common)
    differs = np.abs(with_sinks - without).max(axis=(0, 2)) > 1e-6
    np.testing.assert_array_equal(differs, np.arange(12) > 2)  # query i sees j < 3 beyond i - 2 once i >= 3
    plain = Attention(16, 4, num_kv_heads=2, window=(2, 0), impl="xla", rngs=nnx.Rngs(0))
    assert _rel_err(_forward(plain, jnp.asarray(x)), with_sinks) > 1e-2


def test_gradients_match_numpy_directional_derivatives():
    """d/dx and d/d(k_proj, v_proj) of ``<y, g>`` against central differences of the float64 reference."""
    module = _make(left=2, sinks=3, seed=6)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 9, 16)).astype(np.float32)
    cotangent = rng.normal(size=(2, 9, 16))

    def loss(module, x):
        return jnp.sum(module(x) * jnp.asarray(cotangent, jnp.float32))

    grad_params, grad_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(module, jnp.asarray(x))
    params = _params64(module)

    def reference(params, x):
        return float(np.sum(numpy_sink_attention(params, x, num_heads=4, num_kv_heads=2, left=2, sinks=3) * cotangent))

    eps = 1e-5
    for trial in range(3):
        direction = rng.normal(size=x.shape)
        numeric = (reference(params, x + eps * direction) - reference(params, x - eps * direction)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grad_x, np.float64) * direction))
        assert abs(analytic - numeric) < 1e-4 * max(abs(numeric), 1.0), (trial, analytic, numeric)
    for name in ("k_proj", "v_proj"):
        direction = rng.normal(size=params[name].shape)
        plus = dict(params, **{name: params[name] + eps * direction})
        minus = dict(params, **{name: params[name] - eps * direction})
        numeric = (reference(plus, x) - reference(minus, x)) / (2 * eps)
        analytic = float(np.sum(np.asarray(getattr(grad_params, name).kernel[...], np.float64) * direction))
        assert abs(analytic - numeric) < 1e-4 * max(abs(numeric), 1.0), (name, analytic, numeric)


@nnx.jit
def _cached(module, x, cache, valid_lengths):
    return module(x, cache=cache, valid_lengths=valid_lengths)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_cached_prefill_chunks_then_decode_equal_the_full_forward(impl):
    """Right-padded rows (junk in the padding) prefilled in two chunks of different real lengths per
    row, so some rows write their sinks across both chunks, then one-token steps: every real position
    matches each row's own full forward."""
    sinks, left, max_len = 5, 2, 24
    module = _make(left=left, sinks=sinks, seed=7, impl=impl)
    rng = np.random.default_rng(7)
    firsts, seconds, width1, width2, steps = [2, 7, 0, 4], [5, 1, 6, 0], 7, 6, 4
    batch = len(firsts)
    totals = [a + b + steps for a, b in zip(firsts, seconds)]
    sequences = rng.normal(size=(batch, max(totals), 16)).astype(np.float32)
    chunk1 = rng.normal(size=(batch, width1, 16)).astype(np.float32)  # junk after the real tokens
    chunk2 = rng.normal(size=(batch, width2, 16)).astype(np.float32)
    for row, (a, b) in enumerate(zip(firsts, seconds)):
        chunk1[row, :a] = sequences[row, :a]
        chunk2[row, :b] = sequences[row, a:a + b]
    expected = _reference(module, sequences)  # causal: trailing extra tokens cannot reach a row's positions

    cache = module.init_cache(batch, max_len)
    y1, cache = _cached(module, jnp.asarray(chunk1), cache, jnp.asarray(firsts, jnp.int32))
    y2, cache = _cached(module, jnp.asarray(chunk2), cache, jnp.asarray(seconds, jnp.int32))
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.add(firsts, seconds))
    scale = np.abs(expected).max()
    for row, (a, b) in enumerate(zip(firsts, seconds)):
        np.testing.assert_allclose(np.asarray(y1)[row, :a], expected[row, :a], atol=1e-5 * scale,
                                   err_msg=f"chunk 1 row {row}")
        np.testing.assert_allclose(np.asarray(y2)[row, :b], expected[row, a:a + b], atol=1e-5 * scale,
                                   err_msg=f"chunk 2 row {row}")
    ones = jnp.ones((batch,), jnp.int32)
    for step in range(steps):
        tokens = np.stack([sequences[row, a + b + step] for row, (a, b) in enumerate(zip(firsts, seconds))])[:, None]
        y, cache = _cached(module, jnp.asarray(tokens), cache, ones)
        for row, (a, b) in enumerate(zip(firsts, seconds)):
            np.testing.assert_allclose(np.asarray(y)[row, 0], expected[row, a + b + step], atol=1e-5 * scale,
                                       err_msg=f"step {step} row {row}")


def test_decoding_from_an_empty_cache_equals_the_full_forward():
    """Token by token from position 0 (the sinks written one per step), past the window."""
    module = _make(left=1, sinks=2, seed=8)
    x = np.random.default_rng(8).normal(size=(2, 8, 16)).astype(np.float32)
    expected = _reference(module, x)
    cache = module.init_cache(2, 8)
    step = nnx.jit(lambda module, token, cache: module(token, cache=cache))
    for t in range(8):
        y, cache = step(module, jnp.asarray(x[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(y)[:, 0], expected[:, t], atol=1e-5 * np.abs(expected).max(),
                                   err_msg=f"step {t}")


def test_visible_pairs_and_flops_count_the_sinks():
    for left, sinks, length, kv_len in [(2, 3, 11, None), (1, 5, 4, None), (3, 2, 3, 9), (0, 4, 6, 6)]:
        module = Attention(16, 2, window=(left, 0), num_sink_tokens=sinks, rngs=nnx.Rngs(0))
        kv = length if kv_len is None else kv_len
        centre = np.arange(length)[:, None] + kv - length
        j = np.arange(kv)[None, :]
        brute = int(((j <= centre) & ((j >= centre - left) | (j < sinks))).sum())
        assert module.visible_pairs(length, kv_len) == brute, (left, sinks, length, kv_len)
    with_sinks = Attention(16, 2, window=(2, 0), num_sink_tokens=3, rngs=nnx.Rngs(0))
    plain = Attention(16, 2, window=(2, 0), rngs=nnx.Rngs(0))
    extra = with_sinks.visible_pairs(11) - plain.visible_pairs(11)
    assert extra == 1 + 2 + 3 * 6
    assert with_sinks.flops(11) - plain.flops(11) == 2 * extra * 2 * (8 + 8)


def test_without_a_window_sinks_change_nothing():
    x = jnp.asarray(np.random.default_rng(9).normal(size=(1, 7, 16)), jnp.float32)
    with_sinks = Attention(16, 2, num_sink_tokens=3, impl="xla", rngs=nnx.Rngs(0))
    plain = Attention(16, 2, impl="xla", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(_forward(with_sinks, x)), np.asarray(_forward(plain, x)))
    assert with_sinks.visible_pairs(7) == plain.visible_pairs(7)
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    with_sinks(x, segment_ids=segments)  # no window: accepted


def test_argument_validation():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_sink_tokens"):
            Attention(16, 2, window=(2, 0), num_sink_tokens=bad, rngs=nnx.Rngs(0))
    module = _make()
    x = jnp.zeros((1, 6, 16))
    with pytest.raises(ValueError, match="num_sink_tokens .* segment_ids"):
        module(x, segment_ids=jnp.zeros((1, 6), jnp.int32))
