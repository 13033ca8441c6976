"""MEGA (moving-average equipped gated attention) against an independent float64 numpy token loop of
the official fairseq layer; packing, decoding with a cache (prefill, steps, right padding),
gradients, the LM, logical axes, FLOPs and argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers, zoo
from attnzoo.layers.attention import KVCache
from attnzoo.layers.mega import Mega, MegaCache
from attnzoo.pallas_kernels.testing import assert_close, float64
from tests.layers.numpy_layers import dense, param64, sigmoid, silu
from tests.layers.recurrent_testing import assert_gradients_reach_every_parameter, cached_call, decode_in_pieces
from tests.zoo.helpers import fast_jit, logical_axes

# ---------------------------------------------------------------------------------------------
# An independent float64 numpy implementation of the official layer, token by token
# ---------------------------------------------------------------------------------------------


def official_rotary_bias(alpha, beta, length):
    """fairseq ``RotaryRelativePositionalBias(Z, ...)(length)``: ``rotary(alpha) @ rotary(beta).T``
    with positions ``0 .. length-1`` (``[length, length]``)."""
    half = alpha.shape[0] // 2
    freqs = np.exp(np.arange(half) * -(math.log(10000) / half))
    angles = np.arange(length)[:, None] * freqs[None, :]
    sin, cos = np.sin(angles), np.cos(angles)

    def rotary(vector):
        x1, x2 = vector[:half], vector[half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)

    return rotary(alpha) @ rotary(beta).T


def numpy_mega(m, x, segment_ids=None):
    """``MovingAverageGatedAttention`` (unidirectional, softmax, rotary bias, no norm/dropout) in
    float64, one token at a time: the EMA as its recurrence, attention as a loop over queries.
    With ``m.chunk_size``, a query sees the earlier keys of its own chunk, chunks counted from the
    document start, and the bias uses positions within the chunk (as the official chunked code)."""
    x = np.asarray(x, np.float64)
    batch, length, dim = x.shape
    n = m.ema_dim
    p, damping = sigmoid(param64(m.ema_delta)), sigmoid(param64(m.ema_alpha))
    q, pb = 1.0 - p * damping, p * param64(m.ema_beta)
    eta = param64(m.ema_gamma) * math.sqrt(1.0 / n)
    if segment_ids is None:
        segment_ids = np.zeros((batch, length), np.int64)
    segment_ids = np.asarray(segment_ids)
    ema = np.zeros_like(x)
    for b in range(batch):
        h = np.zeros((dim, n))
        for t in range(length):
            if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                h = np.zeros_like(h)
            h = pb * x[b, t][:, None] + q * h
            ema[b, t] = (eta * h).sum(-1)
    mx = silu(ema + param64(m.omega) * x)
    v = silu(dense(m.v_proj, x))
    u = sigmoid(dense(m.u_proj, mx))
    z = silu(dense(m.z_proj, mx))
    r = silu(dense(m.r_proj, mx))
    hx = dense(m.hx_proj, mx)
    gamma, beta = param64(m.qk_gamma), param64(m.qk_beta)
    queries, keys = z * gamma[0] + beta[0], z * gamma[1] + beta[1]
    chunk = m.chunk_size or length
    bias = official_rotary_bias(param64(m.bias_alpha), param64(m.bias_beta), max(chunk, length))
    attended = np.zeros(v.shape)
    for b in range(batch):
        start = 0
        for i in range(length):
            if i > 0 and segment_ids[b, i] != segment_ids[b, i - 1]:
                start = i
            first = start + ((i - start) // chunk) * chunk  # first token of i's chunk
            js = np.arange(first, i + 1)
            scores = queries[b, i] @ keys[b, js].T * m.z_dim**-0.5 + bias[i - first, js - first]
            weights = np.exp(scores - scores.max())
            attended[b, i] = (weights / weights.sum()) @ v[b, js]
    h = silu(hx + dense(m.h_proj, attended * r))
    return x + u * (h - x)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _randomize(module, seed=0, scale=0.3):
    """Random values in every parameter; the EMA's delta / alpha logits spread widely so decays
    from near 0 to near 1 are exercised. Makes an ``nnx.eval_shape`` module concrete."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            current = variable.get_value()
            spread = 2.0 if path[-1] in ("ema_delta", "ema_alpha") else 1.0 if path[-1] == "ema_gamma" else scale
            value = rng.normal(size=current.shape) * spread
            variable.set_value(jnp.asarray(value, current.dtype))
    return module


def _build(seed=0, param_dtype=jnp.float64, dim=12, **options):
    module = nnx.eval_shape(lambda: Mega(dim, 1, param_dtype=param_dtype, rngs=nnx.Rngs(0), **options))
    return _randomize(module, seed)


CONFIGS = {
    "full": dict(z_dim=6, hidden_dim=10, ema_dim=3, ema_chunk_size=8),
    "chunked": dict(z_dim=4, hidden_dim=8, ema_dim=4, chunk_size=5, ema_chunk_size=4),
}

_forward = fast_jit(lambda module, x, segment_ids: module(x, segment_ids=segment_ids))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_float64_forward_matches_numpy_token_loop(config):
    for seed in (0, 1):
        for length in (1, 7, 37):
            with float64():
                module = _build(seed, **CONFIGS[config])
                x = np.random.default_rng(100 * seed + length).normal(size=(2, length, module.dim))
                out = _forward(module, jnp.asarray(x), None)
                assert_close(out, numpy_mega(module, x), f"{config} seed={seed} T={length}", dtype=jnp.float64)


def test_float32_forward_is_close():
    module = _build(3, param_dtype=jnp.float32, **CONFIGS["full"])
    x = np.random.default_rng(4).normal(size=(2, 37, module.dim))
    out = _forward(module, jnp.asarray(x, jnp.float32), None)
    assert out.dtype == jnp.float32
    ref = numpy_mega(module, x)
    assert np.sqrt(np.mean((np.asarray(out) - ref) ** 2) / np.mean(ref**2)) < 1e-5


def test_the_reference_is_sensitive():
    """The numpy comparison catches a wrong residual and an EMA without its omega skip."""
    with float64():
        module = _build(5, **CONFIGS["full"])
        x = np.random.default_rng(6).normal(size=(1, 9, module.dim))
        out = np.asarray(_forward(module, jnp.asarray(x), None))
        ref = numpy_mega(module, x)
        with pytest.raises(AssertionError, match="relative RMS"):
            assert_close(out, ref - x, "no residual", dtype=jnp.float64)
        module.omega.set_value(module.omega[...] * 0)
        with pytest.raises(AssertionError, match="relative RMS"):
            assert_close(out, numpy_mega(module, x), "omega", dtype=jnp.float64)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_packed_segments_equal_separate_runs(config):
    with float64():
        module = _build(7, **CONFIGS[config])
        x = np.random.default_rng(8).normal(size=(2, 23, module.dim))
        ids = np.zeros((2, 23), np.int32)
        ids[0, 6:] = 1
        ids[0, 17:] = 2
        ids[1, 13:] = 5
        packed = np.asarray(_forward(module, jnp.asarray(x), jnp.asarray(ids)))
        for b in range(2):
            for segment in np.unique(ids[b]):
                where = np.flatnonzero(ids[b] == segment)
                alone = _forward(module, jnp.asarray(x[b : b + 1, where]), None)
                assert_close(packed[b, where], alone[0], f"row {b} segment {segment}", dtype=jnp.float64)
        assert_close(packed, numpy_mega(module, x, ids), "packed vs numpy", dtype=jnp.float64)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(config):
    """Right-padded prompts (junk in the padding) with valid_lengths, then one-token steps and a
    3-token chunk, equal the full forward; chunk boundaries are crossed while decoding."""
    with float64():
        module = _build(9, **CONFIGS[config])
        x = np.random.default_rng(10).normal(size=(3, 20, module.dim))
        full = np.asarray(_forward(module, jnp.asarray(x), None))
        lengths = np.array([9, 4, 7])
        prefill, rest, cache = decode_in_pieces(module, x, lengths, (1, 1, 3, 1, 1))
        assert isinstance(cache, MegaCache) and isinstance(cache.attention, KVCache)
        assert cache.ema.dtype == jnp.float64 and cache.ema.shape == (3, module.dim, module.ema_dim)
        for row, n in enumerate(lengths):
            assert_close(prefill[row, :n], full[row, :n], f"row {row} prefill", dtype=jnp.float64)
            assert_close(rest[row], full[row, n : n + 7], f"row {row} decode", dtype=jnp.float64)


def test_float32_cache_state_and_padding_step_keeps_row():
    module = _build(11, param_dtype=jnp.float32, **CONFIGS["chunked"])
    x = np.random.default_rng(12).normal(size=(2, 6, module.dim)).astype(np.float32)
    cache = module.init_cache(2, 8)
    assert cache.ema.dtype == jnp.float32
    _, cache = cached_call(module, jnp.asarray(x[:, :5]), cache, None)
    _, after = cached_call(module, jnp.asarray(x[:, 5:]), cache, jnp.array([1, 0], jnp.int32))
    np.testing.assert_array_equal(after.lengths, [6, 5])
    np.testing.assert_array_equal(after.ema[1], cache.ema[1])
    assert not np.allclose(after.ema[0], cache.ema[0])


def test_gradients_reach_every_parameter():
    module = _build(13, param_dtype=jnp.float32, **CONFIGS["chunked"])
    x = jnp.asarray(np.random.default_rng(14).normal(size=(2, 11, module.dim)), jnp.float32)
    assert_gradients_reach_every_parameter(module, x)


def test_float64_gradients_match_finite_differences_of_numpy():
    """d sum(w * y) / d x and / d (EMA and bias parameters) against central differences of the
    numpy reference."""
    with float64():
        module = _build(15, **CONFIGS["chunked"])
        rng = np.random.default_rng(16)
        x = rng.normal(size=(1, 9, module.dim))
        w = rng.normal(size=x.shape)
        graphdef, state = nnx.split(module)

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x) * w)

        grad_state, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(x))
        eps = 1e-6
        for index in [(0, 0, 0), (0, 4, 3), (0, 8, 11)]:
            bump = np.zeros_like(x)
            bump[index] = eps
            numeric = (np.sum(numpy_mega(module, x + bump) * w) - np.sum(numpy_mega(module, x - bump) * w)) / (2 * eps)
            np.testing.assert_allclose(grad_x[index], numeric, rtol=1e-6, atol=1e-8)
        for name, index in [("ema_delta", (2, 1)), ("ema_alpha", (5, 0)), ("ema_beta", (0, 3)),
                            ("ema_gamma", (7, 2)), ("omega", (3,)), ("bias_alpha", (1,)), ("bias_beta", (2,))]:
            variable = getattr(module, name)
            original = np.asarray(variable[...])
            values = []
            for sign in (1, -1):
                bumped = original.copy()
                bumped[index] += sign * eps
                variable.set_value(jnp.asarray(bumped))
                values.append(np.sum(numpy_mega(module, x) * w))
            variable.set_value(jnp.asarray(original))
            numeric = (values[0] - values[1]) / (2 * eps)
            analytic = np.asarray(grad_state[name][...])[index]
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_runs_in_the_lm_pattern_with_gradients():
    assert "mega" in layers.list_mixers()
    model = zoo.create_model("lm_tiny", pattern="mega,attn", vocab_size=64, dim=32, depth=2, num_heads=2,
                             rngs=nnx.Rngs(0))
    assert isinstance(model.blocks.layers.blocks[0].mixer, Mega)
    tokens = jnp.asarray(np.random.default_rng(17).integers(0, 64, size=(2, 12)), jnp.int32)

    def loss(model, tokens):
        logits = model(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    value, grads = fast_jit(lambda m, t: nnx.value_and_grad(loss)(m, t))(model, tokens)
    assert np.isfinite(value)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    mega = [(p, g) for p, g in leaves if "ema_delta" in jax.tree_util.keystr(p) or "qk_gamma" in jax.tree_util.keystr(p)]
    assert len(mega) == 2
    for path, leaf in leaves:
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    assert all(np.any(g != 0) for _, g in mega)


def test_logical_axes_flops_and_defaults():
    module = nnx.eval_shape(lambda: Mega(32, 4, rngs=nnx.Rngs(0)))
    assert (module.z_dim, module.hidden_dim, module.ema_dim, module.num_heads) == (8, 64, 16, 4)
    known = {"embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}
    axes = logical_axes(module)
    assert len(axes) == 21  # 6 kernels + 6 biases + 9 vectors / matrices
    for path, (names, ndim) in axes.items():
        assert names is not None and len(names) == ndim and set(names) <= known, (path, names)
    d, z, e, n = 32, 8, 64, 16
    kernels = sum(int(np.prod(v.get_value().shape)) for p, v in nnx.iter_graph(module)
                  if isinstance(v, nnx.Param) and p[-1] == "kernel")
    assert kernels == d * (2 * e + 2 * d + z) + e * d
    for length in (1, 10, 100):
        pairs = length * (length + 1) // 2
        assert module.flops(length) == 2 * length * kernels + 2 * pairs * (2 * z + e) + 4 * length * d * n > 0
    assert module.flops(1, kv_len=50) == 2 * kernels + 2 * 50 * (2 * z + e) + 4 * d * n
    chunked = nnx.eval_shape(lambda: Mega(32, 1, chunk_size=16, rngs=nnx.Rngs(0)))
    assert chunked.visible_pairs(40) == 2 * (16 * 17 // 2) + 8 * 9 // 2
    assert chunked.flops(40) < module.flops(40) and chunked.flops(16) == module.flops(16)


def test_published_initialisation():
    module = Mega(8, 1, ema_dim=4, rngs=nnx.Rngs(0))
    beta = np.asarray(module.ema_beta[...])
    np.testing.assert_allclose(np.sign(beta), np.tile([1, -1, 1, -1], (8, 1)))
    np.testing.assert_array_equal(module.qk_beta[...], 0)
    assert np.all(np.abs(np.asarray(module.qk_gamma[...])) < 0.2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_heads=0), ValueError, "Mega: num_heads must be an int >= 1, got 0"),
        (dict(z_dim=5), ValueError, "Mega: z_dim must be even"),
        (dict(chunk_size=0), ValueError, "Mega: chunk_size must be an int >= 1"),
        (dict(ema_dim=0), ValueError, "Mega: ema_dim must be an int >= 1"),
        (dict(rel_pos_bias="simple"), ValueError, r"Mega: rel_pos_bias must be one of \('rotary',\)"),
        (dict(gated_residual=1), TypeError, "Mega: gated_residual must be a bool"),
        (dict(impl="cuda"), ValueError, "Mega: impl must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Mega(16, kwargs.pop("num_heads", 1), rngs=nnx.Rngs(0), **kwargs)


def test_rejects_bad_calls():
    module = _build(0, param_dtype=jnp.float32, **CONFIGS["full"])
    x = jnp.zeros((2, 3, 12))
    with pytest.raises(ValueError, match=r"Mega: x must have shape \[B,T,D\] with last axis 12, got \(2, 3, 8\)"):
        module(jnp.zeros((2, 3, 8)))
    with pytest.raises(TypeError, match="Mega: x must have a floating dtype, got int32"):
        module(jnp.zeros((2, 3, 12), jnp.int32))
    with pytest.raises(ValueError, match=r"Mega: segment_ids must be an int array of shape \(2, 3\)"):
        module(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="Mega: valid_lengths needs a cache"):
        module(x, valid_lengths=jnp.array([1, 2]))
    cache = module.init_cache(2, 8)
    with pytest.raises(ValueError, match="Mega: segment_ids cannot be combined with a cache"):
        module(x, cache=cache, segment_ids=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"Mega: valid_lengths must be an int array of shape \(2,\)"):
        module(x, cache=cache, valid_lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="Mega: cache must be a MegaCache"):
        module(x, cache=cache.attention)
    with pytest.raises(ValueError, match="Mega: cache.attention must hold k"):
        module(x, cache=module.init_cache(3, 8))
    with pytest.raises(ValueError, match=r"Mega: cache.ema must have shape \(2, 12, 3\)"):
        module(x, cache=MegaCache(cache.ema[:, :, :2], cache.attention))
    with pytest.raises(ValueError, match="Mega: cache overflow"):
        module(jnp.zeros((2, 9, 12)), cache=cache)
    with pytest.raises(ValueError, match="Mega.init_cache: batch must be an int >= 1"):
        module.init_cache(0, 8)
    with pytest.raises(ValueError, match="Mega.flops: seq_len must be an int >= 1, got 0"):
        module.flops(0)
    with pytest.raises(ValueError, match="kv_len must be an int >= 1"):
        module.flops(3, kv_len=0)
