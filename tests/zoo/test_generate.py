"""Decoding with caches (attnzoo.zoo.generation, DecoderLM / ZambaLM ``init_cache``).

The reference for every cached path is the model's own full forward, which uses no cache: a prefill
of padded prompts followed by one-token steps must give, at every real position, the logits of one
full forward over that row's real tokens alone. Padding holds random tokens, so a leak of padding
into a cache changes the logits and fails the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.zoo.generation import to_right_padding
from attnzoo.zoo.hybrid_lm import HYBRID_PRESETS

NARROW = dict(dim=32, num_heads=2, vocab_size=64)
# case -> (registered model, overrides): every LM preset, narrowed; plain patterns for mixers no preset uses.
CASES = {
    "lm_nano": ("lm_nano", dict(pattern="swa,attn", sliding_window=3)),
    **{f"{name}_tiny": (f"{name}_tiny", {}) for name in sorted(HYBRID_PRESETS)},
    "zamba_lm_tiny": ("zamba_lm_tiny", dict(depth=12, attention_adapters=True)),
    "mega_attn": ("lm_nano", dict(pattern="mega,attn", mixer_options={"mega": {"chunk_size": 4}})),
    "based": ("lm_nano", dict(pattern="base_conv,based,swa", depth=3, sliding_window=4)),
    "mixer_only": ("lm_nano", dict(pattern="base_conv,gated_deltanet,attn", depth=3, mlp="none")),
}
PRESETS = list(CASES)


def make_lm(case, seed=0, **overrides):
    name, extra = CASES[case]
    return zoo.create_model(name, rngs=nnx.Rngs(seed), **{**NARROW, **extra, **overrides})


@nnx.jit
def full_forward(model, tokens):
    return model(tokens)


def padded_batch(rng, lengths, width, vocab, padding):
    """Rows of ``lengths`` real tokens in a ``[B, width]`` batch padded (with random junk) on ``padding``'s side."""
    real = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
    junk = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
    batch = junk.copy()
    for row, length in enumerate(lengths):
        if padding == "right":
            batch[row, :length] = real[row, :length]
        else:
            batch[row, width - length:] = real[row, :length]
    return real, batch


def assert_prefill_then_decode_matches(lm, lengths, width, steps, padding, seed):
    rng = np.random.default_rng(seed)
    vocab = lm.vocab_size
    real, batch = padded_batch(rng, lengths, width, vocab, padding)
    continuation = rng.integers(0, vocab, size=(len(lengths), steps)).astype(np.int32)
    # Reference: each row's prompt and continuation, alone, through the cache-free forward. One
    # batched call: the model is causal, so the junk after a row's tokens cannot reach them.
    sequences = rng.integers(0, vocab, size=(len(lengths), width + steps)).astype(np.int32)
    for row, length in enumerate(lengths):
        sequences[row, :length] = real[row, :length]
        sequences[row, length:length + steps] = continuation[row]
    expected = np.asarray(full_forward(lm, jnp.asarray(sequences)))
    scale = np.abs(expected).max()

    logits, cache = zoo.prefill(lm, jnp.asarray(batch), lengths=jnp.asarray(lengths), padding=padding,
                                max_len=width + steps)
    logits = np.asarray(logits)
    for row, length in enumerate(lengths):
        got = logits[row, :length] if padding == "right" else logits[row, width - length:]
        np.testing.assert_allclose(got, expected[row, :length], atol=2e-5 * scale, rtol=0,
                                   err_msg=f"prefill row {row}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    step = nnx.jit(lambda model, token, cache: model(token, cache=cache))
    for index in range(steps):
        step_logits, cache = step(lm, jnp.asarray(continuation[:, index:index + 1]), cache)
        for row, length in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(step_logits)[row, 0], expected[row, length + index],
                                       atol=2e-5 * scale, rtol=0, err_msg=f"decode step {index} row {row}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_equals_full_forward_left_padded(name):
    """Every LM preset: left-padded prompts of lengths 7, 2 and 5 (junk padding), then 3 steps."""
    assert_prefill_then_decode_matches(make_lm(name), [7, 2, 5], width=7, steps=3, padding="left", seed=1)


@pytest.mark.parametrize("name", ["lm_nano", "hymba_lm_tiny", "zamba_lm_tiny"])
def test_prefill_then_decode_equals_full_forward_right_padded(name):
    assert_prefill_then_decode_matches(make_lm(name, seed=3), [3, 6], width=6, steps=2, padding="right", seed=2)


def test_the_comparison_fails_when_padding_leaks():
    """The check above can fail: the same prompts prefilled as if every row were full length
    (padding treated as real tokens) no longer match the rows' own forwards."""
    lm = make_lm("lm_nano")
    rng = np.random.default_rng(0)
    real, batch = padded_batch(rng, [5, 2], 5, lm.vocab_size, "left")
    logits, _ = zoo.prefill(lm, jnp.asarray(batch))  # lengths omitted: padding counted as tokens
    expected = np.asarray(lm(jnp.asarray(real[1:2, :2])))[0]
    assert np.abs(np.asarray(logits)[1, 3:] - expected).max() > 1e-2


def test_to_right_padding_moves_real_tokens_first():
    tokens = jnp.array([[0, 0, 1, 2], [3, 4, 5, 6], [0, 7, 8, 9]])
    lengths = jnp.array([2, 4, 3])
    right = np.asarray(to_right_padding(tokens, lengths, "left"))
    np.testing.assert_array_equal(right[0, :2], [1, 2])
    np.testing.assert_array_equal(right[1], [3, 4, 5, 6])
    np.testing.assert_array_equal(right[2, :3], [7, 8, 9])
    assert to_right_padding(tokens, lengths, "right") is tokens


@pytest.mark.parametrize("name", ["lm_nano", "gdn_swa_lm_tiny"])
def test_greedy_generate_equals_argmax_of_full_forwards(name):
    """generate(temperature=0) picks, at every step, the argmax of a full forward over the row so far."""
    lm = make_lm(name, seed=5)
    rng = np.random.default_rng(4)
    lengths = [4, 1, 3]
    real, batch = padded_batch(rng, lengths, 4, lm.vocab_size, "left")
    out = np.asarray(zoo.generate(lm, jnp.asarray(batch), lengths=jnp.asarray(lengths), padding="left",
                                  max_new_tokens=5))
    assert out.shape == (3, 5) and out.dtype == np.int32
    for row, length in enumerate(lengths):
        sequence = list(real[row, :length])
        for _ in range(5):
            sequence.append(int(np.argmax(np.asarray(lm(jnp.asarray([sequence])))[0, -1])))
        assert list(out[row]) == sequence[length:], row


def test_sampled_generation_is_reproducible_and_stops_at_eos():
    lm = make_lm("lm_nano", seed=6)
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 3)), jnp.int32)
    kwargs = dict(max_new_tokens=12, temperature=2.0, rng=jax.random.key(1))
    first = np.asarray(zoo.generate(lm, prompts, **kwargs))
    np.testing.assert_array_equal(first, np.asarray(zoo.generate(lm, prompts, **kwargs)))
    other = np.asarray(zoo.generate(lm, prompts, **{**kwargs, "rng": jax.random.key(2)}))
    assert (first != other).any()
    eos = int(first[0, 2])  # a token that row 0 samples at step 2
    stopped = np.asarray(zoo.generate(lm, prompts, eos_id=eos, **kwargs))
    for row in stopped:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert (row[hits[0]:] == eos).all()
    assert (stopped[0, 2:] == eos).all() and (stopped[0, :2] == first[0, :2]).all()


@pytest.mark.parametrize("top_k, top_p", [(None, None), (3, None), (None, 0.7), (4, 0.8)])
def test_sample_logits_draws_from_the_truncated_softmax(top_k, top_p):
    """Frequencies over 40k draws match softmax(logits / T) restricted as documented (chi-square)."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0], np.float64)
    temperature = 1.3
    probs = np.exp(logits / temperature)
    probs /= probs.sum()
    keep = np.ones(8, bool)
    if top_k is not None:
        keep &= logits >= np.sort(logits)[-top_k]
    if top_p is not None:
        order = np.argsort(-np.where(keep, probs, 0))
        kept_probs = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
        before = np.cumsum(kept_probs[order]) - kept_probs[order]
        mask = np.zeros(8, bool)
        mask[order[before < top_p]] = True
        keep &= mask
    expected = np.where(keep, probs, 0)
    expected /= expected.sum()
    draws = 40_000
    tokens = zoo.sample_logits(jnp.asarray(np.tile(logits, (draws, 1)), jnp.float32), jax.random.key(7),
                               temperature=temperature, top_k=top_k, top_p=top_p)
    counts = np.bincount(np.asarray(tokens), minlength=8)
    assert counts[~keep].sum() == 0
    chi2 = (((counts - draws * expected)[keep] ** 2) / (draws * expected[keep])).sum()
    assert chi2 < 30.0, (counts, draws * expected)  # ~1e-5 tail for <= 7 degrees of freedom


def test_sample_logits_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 11)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(zoo.sample_logits(logits, None)), np.argmax(np.asarray(logits), -1))


def test_generation_errors_name_the_argument():
    lm = make_lm("lm_nano")
    prompts = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="padding"):
        zoo.generate(lm, prompts, max_new_tokens=2, padding="middle")
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 3\]"):
        zoo.generate(lm, prompts, max_new_tokens=2, lengths=jnp.array([0, 3]))
    with pytest.raises(ValueError, match="lengths must be an int array"):
        zoo.generate(lm, prompts, max_new_tokens=2, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="rng"):
        zoo.generate(lm, prompts, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="top_k"):
        zoo.generate(lm, prompts, max_new_tokens=2, temperature=1.0, top_k=65, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        zoo.generate(lm, prompts, max_new_tokens=2, temperature=1.0, top_p=1.5, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        zoo.generate(lm, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_id"):
        zoo.generate(lm, prompts, max_new_tokens=2, eos_id=64)
    with pytest.raises(ValueError, match="tokens must be an int array"):
        zoo.generate(lm, jnp.zeros((2, 3)), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_len"):
        zoo.prefill(lm, prompts, max_len=2)
    vit = zoo.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="init_cache"):
        zoo.generate(vit, prompts, max_new_tokens=2)


def test_lm_cache_errors():
    lm = make_lm("lm_nano")
    cache = lm.init_cache(2, 8)
    tokens = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(TypeError, match="LMCache"):
        lm(tokens, cache=cache.layers)
    with pytest.raises(ValueError, match="rows"):
        lm(jnp.zeros((3, 3), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="segment_ids"):
        lm(tokens, cache=cache, segment_ids=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        lm(tokens, cache=cache, positions=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="valid_lengths needs a cache"):
        lm(tokens, valid_lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="overflow"):
        lm(jnp.zeros((2, 9), jnp.int32), cache=cache)
    _, cache = lm(jnp.zeros((2, 6), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="rows hold up to 6 tokens, writing 3 more exceeds the cache's max_len=8"):
        lm(tokens, cache=cache)


def test_cache_works_with_layers_applied_in_a_loop():
    """scan_layers=False slices the stacked cache per layer and stacks it back: same logits as scan."""
    scanned, looped = make_lm("lm_nano", scan_layers=True), make_lm("lm_nano", scan_layers=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 5)), jnp.int32)
    a, cache_a = scanned(tokens, cache=scanned.init_cache(2, 6))
    b, cache_b = looped(tokens, cache=looped.init_cache(2, 6))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for x, y in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
