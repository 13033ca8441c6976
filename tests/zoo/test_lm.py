"""DecoderLM: float64 parity with an independent numpy decoder, scan == loop, causality, packing,
tied embeddings, sliding windows, pattern errors and FLOP counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from attnzoo import zoo
from attnzoo.zoo import DecoderLM
from tests.zoo.helpers import build, fast_jit, num_params, traced_matmul_flops


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rotate(x, positions, theta):
    """Rotate-half RoPE of ``x [B,T,H,D]`` at integer ``positions [B,T]``."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(half) / half)
    angle = positions[..., None, None] * inv_freq
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)], -1)


def numpy_lm(model: DecoderLM, tokens, segment_ids=None, positions=None) -> np.ndarray:
    """The decoder in float64 numpy from the parameter arrays: repetition r = slice [r]."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    positions = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else np.asarray(positions)
    segment_ids = np.zeros((batch, length), int) if segment_ids is None else np.asarray(segment_ids)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    x = p(model.embedding)[tokens]
    for r in range(model.num_repeats):
        for block in model.blocks.layers.blocks:
            w = lambda v: p(v)[r]  # noqa: E731
            attn = block.mixer
            h = _rms_norm(x, w(block.mixer_norm.scale))
            q = np.einsum("btd,dhk->bthk", h, w(attn.q_proj.kernel))
            k = np.einsum("btd,dhk->bthk", h, w(attn.k_proj.kernel))
            v = np.einsum("btd,dhk->bthk", h, w(attn.v_proj.kernel))
            q, k = _rotate(q, positions, attn.rope_theta), _rotate(k, positions, attn.rope_theta)
            group = attn.num_heads // attn.num_kv_heads
            k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
            scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(attn.head_dim)
            visible = (j <= i) & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
            if attn.window is not None:
                visible = visible & (j >= i - attn.window[0])
            scores = np.where(visible, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out = np.einsum("bhts,bshk->bthk", probs, v)
            x = x + np.einsum("bthk,hkd->btd", out, w(attn.o_proj.kernel))
            if block.mlp is None:
                continue
            h = _rms_norm(x, w(block.mlp_norm.scale))
            up = h @ w(block.mlp.up.kernel)
            if block.mlp.gate is not None:
                gate = h @ w(block.mlp.gate.kernel)
                hidden = gate / (1.0 + np.exp(-gate)) * up
            else:
                hidden = 0.5 * up * (1.0 + erf(up / np.sqrt(2.0)))
            x = x + hidden @ w(block.mlp.down.kernel)
    x = _rms_norm(x, p(model.norm.scale))
    return x @ (p(model.embedding).T if model.head is None else p(model.head.kernel))


def _tokens(seed, batch, length, vocab):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(batch, length)), jnp.int32)


LM_CASES = {
    # overrides, sequence length: odd sizes, GQA / MQA, windows, tied, gelu, loop, remat
    "swa_attn_gqa": (dict(pattern="swa,attn", depth=4, dim=24, num_heads=4, num_kv_heads=2,
                          sliding_window=3, vocab_size=37), 13),
    "tied_gelu_loop": (dict(pattern="attn", depth=3, dim=20, num_heads=2, tie_embeddings=True, mlp="gelu",
                            mlp_dim=36, rope_theta=500.0, scan_layers=False, vocab_size=29), 9),
    "mqa_head_dim": (dict(pattern="attn,swa,swa", depth=3, dim=18, num_heads=3, num_kv_heads=1, head_dim=10,
                          sliding_window=2, vocab_size=31, remat="dots"), 11),
    "mixer_only": (dict(pattern="swa,attn", depth=4, dim=16, num_heads=2, mlp="none", sliding_window=2,
                        vocab_size=23), 7),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_lm_float64_matches_numpy(case, x64):
    overrides, length = LM_CASES[case]
    forward = fast_jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p))
    for seed in (0, 1):  # same shapes: compiled once
        model = build(lambda: DecoderLM(
            param_dtype=jnp.float64, logits_dtype=jnp.float64, rngs=nnx.Rngs(0), **overrides), seed=seed)
        tokens = _tokens(seed, 2, length, model.vocab_size)
        logits = forward(model, tokens, None, None)
        assert logits.shape == (2, length, model.vocab_size) and logits.dtype == jnp.float64
        ref = numpy_lm(model, tokens)
        assert _rel_err(logits, ref) < 1e-10

        # Packed documents with restarting positions.
        cut = length // 2 + seed
        segment_ids = np.array([[0] * cut + [1] * (length - cut), [3] * length])
        positions = np.array([list(range(cut)) + list(range(length - cut)), list(range(length))])
        packed = forward(model, tokens, jnp.asarray(segment_ids), jnp.asarray(positions))
        assert _rel_err(packed, numpy_lm(model, tokens, segment_ids, positions)) < 1e-10

    # The comparison can fail: a small change in one parameter of the last repetition is detected.
    last = model.blocks.layers.blocks[-1]
    kernel = last.mixer.o_proj.kernel if last.mlp is None else last.mlp.down.kernel
    kernel[...] = kernel[...].at[(-1,) + (0,) * (kernel[...].ndim - 1)].add(1e-4)
    assert _rel_err(forward(model, tokens, None, None), ref) > 1e-8


def _small_lm(seed=0, scale=0.3, **overrides):
    options = dict(vocab_size=64, dim=32, depth=4, num_heads=4, num_kv_heads=2, pattern="swa,attn", sliding_window=3)
    return build(lambda: DecoderLM(**{**options, **overrides}, rngs=nnx.Rngs(0)), seed=seed, scale=scale)


@pytest.mark.parametrize(
    "remat, pattern, depth", [("none", "swa,attn", 4), ("full", "attn", 2), ("dots", "swa,attn", 2)]
)
def test_lm_scan_and_loop_agree(remat, pattern, depth):
    options = dict(remat=remat, pattern=pattern, depth=depth, seed=1, scale=0.2)
    scanned = _small_lm(scan_layers=True, **options)
    looped = _small_lm(scan_layers=False, **options)
    assert jax.tree.structure(nnx.state(scanned, nnx.Param)) == jax.tree.structure(nnx.state(looped, nnx.Param))
    tokens = _tokens(2, 2, 10, 64)

    def loss(model, tokens):
        logits = model(tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1))

    value_and_grad = fast_jit(nnx.value_and_grad(loss))
    loss_scan, grads_scan = value_and_grad(scanned, tokens)
    loss_loop, grads_loop = value_and_grad(looped, tokens)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
    leaves_scan = jax.tree_util.tree_leaves_with_path(nnx.state(grads_scan))
    leaves_loop = jax.tree.leaves(nnx.state(grads_loop))
    assert len(leaves_scan) == len(leaves_loop) > 10
    for (path, a), b in zip(leaves_scan, leaves_loop):
        assert np.any(np.asarray(a) != 0), path
        assert _rel_err(a, b) < 1e-5, path


def test_lm_is_causal():
    model = _small_lm(pattern="attn", depth=2, seed=3)
    tokens = _tokens(4, 1, 12, 64)
    forward = fast_jit(lambda m, t: m(t))
    base = forward(model, tokens)
    for t in (0, 5, 11):
        changed = forward(model, tokens.at[0, t].set((tokens[0, t] + 1) % 64))
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert not np.allclose(changed[:, t], base[:, t])


def test_lm_packed_segments_equal_separate_documents():
    model = _small_lm(seed=5)
    forward = fast_jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p))
    doc_a, doc_b = _tokens(6, 1, 7, 64), _tokens(7, 1, 5, 64)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(5))], jnp.int32)
    out = forward(model, packed, segment_ids, positions)
    alone_a = forward(model, doc_a, None, None)
    alone_b = forward(model, doc_b, None, None)
    np.testing.assert_allclose(out[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], alone_b, rtol=1e-5, atol=1e-5)


def test_lm_tied_embeddings():
    tied = _small_lm(tie_embeddings=True)
    untied = _small_lm()
    assert tied.head is None and untied.head is not None
    assert "head" not in nnx.state(tied, nnx.Param)
    assert num_params(untied) - num_params(tied) == 32 * 64
    logits = tied(_tokens(8, 2, 6, 64))
    assert logits.shape == (2, 6, 64) and bool(jnp.all(jnp.isfinite(logits)))


def test_lm_sliding_window_layers():
    model = _small_lm(pattern="swa,attn", depth=4)
    windows = [block.mixer.window for block in model.blocks.layers.blocks]
    assert windows == [(3, 0), None]
    assert all(block.mixer.causal and block.mixer.use_rope for block in model.blocks.layers.blocks)

    # A swa-only model of L layers with window w: token 0 reaches positions <= L * w only.
    swa = _small_lm(pattern="swa", depth=2, sliding_window=3, seed=9)
    full = _small_lm(pattern="attn", depth=2, seed=9)
    tokens = _tokens(10, 1, 12, 64)
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % 64)
    forward = fast_jit(lambda m, t: m(t))
    swa_diff = np.abs(np.asarray(forward(swa, changed) - forward(swa, tokens))).max(-1)[0]
    full_diff = np.abs(np.asarray(forward(full, changed) - forward(full, tokens))).max(-1)[0]
    assert np.all(swa_diff[:7] > 0) and np.all(swa_diff[7:] == 0)
    assert np.all(full_diff > 0)


def test_lm_mixer_options_by_name_and_token():
    model = _small_lm(
        pattern="swa,attn",
        mixer_options={"attention": {"qk_norm": True, "rope_theta": 100.0}, "swa": {"rope_theta": 7.0}},
    )
    swa, attn = (block.mixer for block in model.blocks.layers.blocks)
    assert swa.q_norm is not None and attn.q_norm is not None
    assert (swa.rope_theta, attn.rope_theta) == (7.0, 100.0)
    with pytest.raises(ValueError, match=r"mixer_options key 'sw' matches no token or mixer of pattern 'swa,attn'"):
        _small_lm(mixer_options={"sw": {}})
    with pytest.raises(TypeError, match=r"mixer_options\['swa'\] must be a dict"):
        _small_lm(mixer_options={"swa": 3})


def test_lm_labelled_tokens_take_their_own_options():
    model = _small_lm(
        pattern="attn:a,attn,swa:b,swa",
        depth=4,
        mixer_options={"attention": {"rope_theta": 5.0}, "attn:a": {"qk_norm": True}, "swa": {"rope_theta": 7.0},
                       "swa:b": {"rope_theta": 9.0}},
    )
    mixers = [block.mixer for block in model.blocks.layers.blocks]
    assert [m.q_norm is not None for m in mixers] == [True, False, False, False]
    assert [m.rope_theta for m in mixers] == [5.0, 5.0, 9.0, 7.0]
    assert mixers[2].window == mixers[3].window == (model.sliding_window, 0) and mixers[0].window is None


def test_lm_meta_tokens():
    model = _small_lm(pattern="attn", depth=2, seed=7, num_meta_tokens=3)
    assert model.meta_tokens[...].shape == (3, model.dim)
    tokens = _tokens(8, 2, 9, 64)
    forward = fast_jit(lambda m, t: m(t))
    base = forward(model, tokens)
    assert base.shape == (2, 9, 64)
    # still causal over the real tokens, and the meta tokens are seen by every position
    changed = forward(model, tokens.at[0, 5].set((tokens[0, 5] + 1) % 64))
    np.testing.assert_array_equal(changed[:, :5], base[:, :5])
    grads = nnx.grad(lambda m: jnp.mean(m(tokens)[:, 0] ** 2))(model)
    assert np.all(np.asarray(grads.meta_tokens[...]) != 0)
    explicit = fast_jit(lambda m, t, p: m(t, positions=p))(model, tokens, jnp.arange(9)[None].repeat(2, 0))
    np.testing.assert_allclose(explicit, base, rtol=1e-6, atol=1e-6)
    assert model.forward_flops(9) == _small_lm(pattern="attn", depth=2).forward_flops(12) - 2 * 3 * model.dim * 64
    with pytest.raises(ValueError, match="num_meta_tokens=3 cannot be combined with packed segment_ids"):
        model(tokens, segment_ids=jnp.zeros((2, 9), jnp.int32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pattern="swa,mambo"), ValueError,
         r"unknown token 'mambo' in pattern 'swa,mambo'; available: attention, attn, .*swa"),
        (dict(pattern="swa,swin_window"), ValueError,
         r"token 'swin_window' in pattern 'swa,swin_window' names a vision mixer .*needs a sequence mixer: attention, attn, "),
        (dict(pattern="agent_attention_tokens"), ValueError,
         r"token 'agent_attention_tokens' in pattern 'agent_attention_tokens' names a vision mixer \(input \[B, H, W, C\] "
         r"or a patch grid's tokens\); a language model layer needs a sequence mixer: attention, attn, base_conv"),
        (dict(pattern="swa,attn:"), ValueError, "has an empty token or label"),
        (dict(pattern="swa,,attn", depth=3), ValueError, "pattern 'swa,,attn' has an empty token"),
        (dict(pattern="swa,swa,attn", depth=4), ValueError,
         r"depth \(4\) must be a multiple of the pattern length \(3 for pattern 'swa,swa,attn'\)"),
        (dict(mlp="relu"), ValueError, "mlp must be 'swiglu', 'gelu' or 'none', got 'relu'"),
        (dict(mlp="none", mlp_dim=64), ValueError, r"mlp_dim must be None when mlp='none' \(no MLP\), got 64"),
        (dict(remat="dot"), ValueError, "remat must be one of"),
        (dict(num_kv_heads=3), ValueError, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
        (dict(pattern=["attn"]), TypeError, "pattern must be a comma-separated string"),
    ],
)
def test_lm_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _small_lm(**kwargs)


def test_lm_rejects_bad_tokens():
    model = _small_lm(depth=2)
    with pytest.raises(ValueError, match=r"tokens must be an int array of shape \[B,T\], got float32\(2, 3\)"):
        model(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"got int32\(5,\)"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 64\), got values in \[0, 64\]"):
        model(jnp.asarray([[0, 64]]))


def test_lm_forward_flops_equals_traced_matmuls():
    # Bidirectional reference attention computes every score, so the traced matmuls must equal
    # the analytic count exactly; causal and windowed layers then subtract the masked pairs.
    length, dim, heads, kv_heads, head_dim = 10, 32, 4, 2, 8
    bidirectional = {"attention": {"causal": False, "impl": "reference"}}
    full = _small_lm(pattern="attn", mixer_options=bidirectional, tie_embeddings=True)
    looped = _small_lm(pattern="attn", mixer_options=bidirectional, scan_layers=False)
    tokens = _tokens(11, 3, length, 64)
    assert traced_matmul_flops(full, tokens) == 3 * full.forward_flops(length)
    assert traced_matmul_flops(looped, tokens) == 3 * looped.forward_flops(length) == 3 * full.forward_flops(length)

    assert full.mlp_dim == 128  # 8 * 32 / 3 = 85.3, rounded up to a multiple of 64
    mlp = 2 * length * dim * 128 * 3
    projections = 2 * length * dim * head_dim * (2 * heads + 2 * kv_heads)
    head = 2 * length * dim * 64
    per_pair = 4 * heads * head_dim
    assert full.forward_flops(length) == 4 * (projections + mlp + length * length * per_pair) + head

    causal = _small_lm(pattern="attn")
    assert causal.forward_flops(length) == 4 * (projections + mlp + length * (length + 1) // 2 * per_pair) + head
    window = 3  # swa layers: query i sees min(i, 3) + 1 keys
    swa_pairs = sum(min(i, window) + 1 for i in range(length))
    mixed = _small_lm(pattern="swa,attn", sliding_window=window)
    assert mixed.forward_flops(length) == (
        4 * (projections + mlp) + 2 * (swa_pairs + length * (length + 1) // 2) * per_pair + head
    )
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        mixed.forward_flops(0)

    # Mixer-only layers (mlp="none"): no MLP parameters, no MLP FLOPs, traced == analytic.
    mixer_only = _small_lm(pattern="attn", mixer_options=bidirectional, mlp="none")
    assert mixer_only.mlp_dim == 0 and all(b.mlp is None and b.mlp_norm is None for b in mixer_only.blocks.layers.blocks)
    assert num_params(full) + 32 * 64 - num_params(mixer_only) == 4 * (3 * dim * 128 + dim)
    assert mixer_only.forward_flops(length) == full.forward_flops(length) - 4 * mlp
    assert traced_matmul_flops(mixer_only, tokens) == 3 * mixer_only.forward_flops(length)


def test_lm_presets_override():
    model = nnx.eval_shape(
        lambda: zoo.create_model("lm_tiny", pattern="swa,swa,swa,attn", depth=8, vocab_size=1000, rngs=nnx.Rngs(0))
    )
    assert (model.dim, model.depth, model.num_heads, model.vocab_size, model.num_repeats) == (128, 8, 4, 1000, 2)
    assert [token for token, _ in model.pattern] == ["swa", "swa", "swa", "attn"]
    assert model.blocks.layers.blocks[0].mixer.q_proj.kernel.shape == (2, 128, 4, 32)
