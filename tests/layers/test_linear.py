"""Linear-attention mixers against independent float64 numpy loops of the published formulas;
decoding (prefill, chunk, steps, right padding), gradients, DecoderLM patterns, FLOPs, errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers, zoo
from attnzoo.layers import linear
from attnzoo.layers.common import RecurrentCache
from attnzoo.pallas_kernels.testing import assert_close, float64
from tests.layers.numpy_layers import dense, param64, rms_norm, short_conv, sigmoid, silu
from tests.layers.recurrent_testing import (
    assert_gradients_reach_every_parameter,
    assert_padding_step_keeps_row,
    assert_rejects_bad_calls,
    decode_in_pieces,
    recurrence,
)
from tests.zoo.helpers import logical_axes, randomize, traced_matmul_flops

MIXERS = ("linear_attention", "based", "base_conv", "retnet", "lightning", "gla")


# ---------------------------------------------------------------------------------------------
# Parameters and plain numpy pieces
# ---------------------------------------------------------------------------------------------


def _build(mixer, seed=0, **kwargs):
    """The registered mixer with random parameters, built abstractly (no initializer runs)."""
    module = nnx.eval_shape(lambda: layers.create_mixer(mixer, rngs=nnx.Rngs(seed), **kwargs))
    return randomize(module, seed)


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _segments(segment_ids, batch, length):
    return np.zeros((batch, length), int) if segment_ids is None else np.asarray(segment_ids)


def _conv_heads(conv, x, segment_ids):
    """The short conv over the flattened head axes of ``x [B, T, H, K]``."""
    return short_conv(conv, x.reshape(*x.shape[:2], -1), segment_ids).reshape(x.shape)


def _rope(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = positions[:, :, None, None] * freqs
    first, second = x[..., :half], x[..., half:]
    return np.concatenate(
        [first * np.cos(angles) - second * np.sin(angles), second * np.cos(angles) + first * np.sin(angles)], -1
    )


# ---------------------------------------------------------------------------------------------
# The published formulas, one function per mixer, from the module's own parameter values
# ---------------------------------------------------------------------------------------------


def _feature_map(fm, x):
    if fm.kind == "elementwise_product":
        return dense(fm.proj, x) * dense(fm.proj2, x)
    if fm.kind == "hedgehog":
        y = 2 * dense(fm.proj, x)
        both = np.concatenate([y, -y], -1)
        e = np.exp(both - both.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if fm.kind == "t2r":
        return np.maximum(dense(fm.proj, x), 0)
    if fm.kind == "elu":
        return np.where(x > 0, x + 1, np.exp(x))
    if fm.kind == "relu":
        return np.maximum(x, 0)
    return x


def numpy_linear_attention(m, x, segment_ids=None, positions=None):
    q = _feature_map(m.feature_map_q, dense(m.q_proj, x))
    k = _feature_map(m.feature_map_k or m.feature_map_q, dense(m.k_proj, x))
    v = dense(m.v_proj, x)
    if m.norm_q:
        q = q / (q.sum(-1, keepdims=True) + 1e-4)
    if m.norm_k:
        k = k / (k.sum(-1, keepdims=True) + 1e-4)
    o = recurrence(q, k, v, scale=q.shape[-1] ** -0.5, segment_ids=segment_ids, normalize=m.normalize)
    if m.norm is not None:
        o = rms_norm(o, None if m.norm.scale is None else param64(m.norm.scale), m.norm.epsilon)
    return dense(m.o_proj, o)


def _taylor_expanded(x):
    """Based's TaylorExp: ``[1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]`` (all ordered pairs)."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return np.concatenate([np.ones(x.shape[:-1] + (1,)), x / d**0.25, outer / (np.sqrt(2) * np.sqrt(d))], -1)


def numpy_based(m, x, segment_ids=None, positions=None):
    q = _taylor_expanded(dense(m.q_proj, x))
    k = _taylor_expanded(dense(m.k_proj, x))
    v = dense(m.v_proj, x)
    batch, length = x.shape[:2]
    seg = _segments(segment_ids, batch, length)
    out = np.zeros(v.shape)
    for b in range(batch):
        for t in range(length):
            visible = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
            weights = np.einsum("hf,shf->sh", q[b, t], k[b, visible])  # [S, H]
            out[b, t] = np.einsum("sh,shv->hv", weights, v[b, visible]) / (weights.sum(0)[:, None] + 1e-10)
    return dense(m.o_proj, out)


def numpy_base_conv(m, x, segment_ids=None, positions=None):
    u = short_conv(m.conv, dense(m.in_proj, x), segment_ids)
    return dense(m.out_proj, u * dense(m.gate_proj, x))


def _qkv(m, x, segment_ids):
    q, k, v = dense(m.q_proj, x), dense(m.k_proj, x), dense(m.v_proj, x)
    if m.use_short_conv:
        q, k, v = (_conv_heads(c, a, segment_ids) for c, a in ((m.q_conv, q), (m.k_conv, k), (m.v_conv, v)))
    if m.feature_map in ("swish", "silu"):
        q, k = silu(q), silu(k)
    elif m.feature_map == "relu":
        q, k = np.maximum(q, 0), np.maximum(k, 0)
    return q, k, v


def _gated_output(m, x, o):
    if m.g_proj is not None:
        norm = m.g_norm.norm
        o = rms_norm(o, param64(norm.scale), norm.epsilon) * silu(dense(m.g_proj, x))
    else:
        o = rms_norm(o, param64(m.g_norm.scale), m.g_norm.epsilon)
    return dense(m.o_proj, o)


def numpy_retnet(m, x, segment_ids=None, positions=None):
    batch, length = x.shape[:2]
    q, k, v = _qkv(m, x, segment_ids)
    positions = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else np.asarray(positions)
    q, k = _rope(q, positions, m.rope_theta), _rope(k, positions, m.rope_theta)
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(m.num_heads))
    decay = np.broadcast_to(gamma, (batch, length, m.num_heads))
    o = recurrence(q, k, v, scale=q.shape[-1] ** -0.5, decay=decay, segment_ids=segment_ids)
    return _gated_output(m, x, o)


def _alibi(n):
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    lower = 2 ** int(math.floor(math.log2(n)))
    return _alibi(lower) + _alibi(2 * lower)[0::2][: n - lower]


def numpy_lightning(m, x, segment_ids=None, positions=None):
    batch, length = x.shape[:2]
    q, k, v = silu(dense(m.q_proj, x)), silu(dense(m.k_proj, x)), silu(dense(m.v_proj, x))
    ratio = m.layer_idx / (m.num_layers - 1) if m.num_layers > 1 else 0.0
    slopes = np.asarray(_alibi(m.num_heads)) * (1 - ratio + 1e-5)
    decay = np.broadcast_to(np.exp(-slopes), (batch, length, m.num_heads))
    o = recurrence(q, k, v, scale=1.0, decay=decay, segment_ids=segment_ids)
    o = o.reshape(batch, length, -1)
    if isinstance(m.norm, layers.RMSNorm):
        o = rms_norm(o, param64(m.norm.scale), m.norm.epsilon)
    else:
        o = _layer_norm(o, param64(m.norm.scale), param64(m.norm.bias), m.norm.epsilon)
    gate = dense(m.gate_proj, x) if m.gate_proj is not None else dense(m.gate_up, dense(m.gate_down, x))
    o = o * sigmoid(gate.reshape(o.shape))
    return dense(m.o_proj, o.reshape(batch, length, m.num_heads, m.head_dim))


def numpy_gla(m, x, segment_ids=None, positions=None):
    q, k, v = _qkv(m, x, segment_ids)
    logits = dense(m.gk_up, dense(m.gk_down, x))
    gk = -np.logaddexp(0.0, -logits) / m.gate_logit_normalizer
    if m.clamp_min is not None:
        gk = np.maximum(gk, m.clamp_min)
    o = recurrence(q, k, v, scale=q.shape[-1] ** -0.5, decay=np.exp(gk), segment_ids=segment_ids)
    return _gated_output(m, x, o)


NUMPY = {
    "linear_attention": numpy_linear_attention,
    "based": numpy_based,
    "base_conv": numpy_base_conv,
    "retnet": numpy_retnet,
    "lightning": numpy_lightning,
    "gla": numpy_gla,
}


@nnx.jit
def _forward(module, x, segment_ids=None, positions=None):
    return module(x, segment_ids=segment_ids, positions=positions)


def _segment_ids(batch, length, seed):
    """Two or three packed documents per row (none for very short rows)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False)) if length > 2 else []
        for cut in cuts:
            ids[b, cut:] += 1
    return ids


def _restarting_positions(segment_ids):
    """Position of every token within its segment, ``[B, T]``."""
    positions = np.zeros(segment_ids.shape, np.int32)
    for b, row in enumerate(segment_ids):
        for t in range(1, len(row)):
            positions[b, t] = 0 if row[t] != row[t - 1] else positions[b, t - 1] + 1
    return positions


# name: (mixer, dim, heads, options, T, seed, packed documents)
CASES = {
    "linear_attention-default": ("linear_attention", 15, 3, {}, 7, 0, True),
    "linear_attention-elu-normalize-normq": (
        "linear_attention", 15, 3, dict(feature_map="elu", normalize=True, norm_q=True, expand_v=2.0), 37, 1, True),
    "linear_attention-hedgehog-tied": (
        "linear_attention", 15, 3, dict(feature_map="hedgehog", tie_feature_map_qk=True, normalize=True,
                                        output_norm="identity"), 1, 2, False),
    "based-f3": ("based", 15, 3, dict(feature_dim=3), 37, 3, True),
    "based-f16-head_dim": ("based", 16, 2, dict(head_dim=5), 1, 4, False),
    "base_conv-expand2": ("base_conv", 15, 3, dict(expand_proj=2), 37, 5, True),
    "base_conv-k4-nobias": ("base_conv", 8, 2, dict(expand_proj=3, kernel_size=4, use_bias=False), 1, 6, False),
    "retnet-default": ("retnet", 12, 3, {}, 37, 7, True),
    "retnet-conv-swish": ("retnet", 18, 3, dict(use_short_conv=True, conv_bias=True, feature_map="swish",
                                                 rope_theta=500.0), 7, 8, True),
    "retnet-no-gate": ("retnet", 12, 2, dict(use_output_gate=False, expand_v=1.0), 1, 9, False),
    "lightning-layer1of3": ("lightning", 15, 3, dict(layer_idx=1, num_layers=3), 37, 10, True),
    "lightning-tnl": ("lightning", 16, 4, dict(norm="layernorm", norm_eps=1e-5, gate_low_rank_dim=3, head_dim=3,
                                                layer_idx=3, num_layers=4), 7, 11, False),
    "lightning-default": ("lightning", 15, 5, {}, 1, 12, False),
    "gla-default": ("gla", 18, 3, {}, 37, 13, True),
    "gla-conv-relu-clamp": ("gla", 18, 3, dict(use_short_conv=True, conv_bias=True, feature_map="relu",
                                               clamp_min=-0.05, gate_low_rank_dim=5), 7, 14, True),
    "gla-no-gate": ("gla", 12, 2, dict(use_output_gate=False, expand_k=1.0), 1, 15, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_forward_matches_numpy_loop(case):
    mixer, dim, heads, options, length, seed, packed = CASES[case]
    with float64():
        module = _build(mixer, seed, dim=dim, num_heads=heads, param_dtype=jnp.float64, impl="xla", chunk_size=16,
                        **options)
        x = np.random.default_rng(100 + seed).normal(size=(2, length, dim))
        segment_ids = _segment_ids(2, length, seed) if packed else None
        positions = None
        if mixer == "retnet" and packed:  # packed documents restart their positions (as the LM passes them)
            positions = _restarting_positions(segment_ids)
        out = _forward(module, jnp.asarray(x), None if segment_ids is None else jnp.asarray(segment_ids),
                       None if positions is None else jnp.asarray(positions))
        assert out.shape == (2, length, dim) and out.dtype == jnp.float64
        ref = NUMPY[mixer](module, x, segment_ids, positions)
        assert_close(out, ref, case, dtype=jnp.float64)


@pytest.mark.parametrize("kind", linear.FeatureMap.KINDS)
def test_feature_maps_match_numpy(kind):
    fm = randomize(nnx.eval_shape(lambda: linear.FeatureMap(kind, 5, rngs=nnx.Rngs(0))), 1)
    x = np.random.default_rng(2).normal(size=(3, 2, 5)).astype(np.float32)
    out = fm(jnp.asarray(x))
    assert out.shape == (3, 2, fm.features)
    np.testing.assert_allclose(out, _feature_map(fm, x.astype(np.float64)), rtol=2e-5, atol=2e-6)


def test_taylor_map_inner_products_and_slopes():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(4, 16)), rng.normal(size=(4, 16))
    with float64():
        phi_q, phi_k = linear.taylor_feature_map(jnp.asarray(q)), linear.taylor_feature_map(jnp.asarray(k))
    assert phi_q.shape == (4, 1 + 16 + 136)
    dots = (q * k).sum(-1) / 4.0  # q.k / sqrt(16)
    np.testing.assert_allclose((np.asarray(phi_q) * np.asarray(phi_k)).sum(-1), 1 + dots + dots**2 / 2, rtol=1e-12)
    np.testing.assert_allclose(linear.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_allclose(linear.alibi_slopes(3), [2**-4, 2**-8, 2**-2])
    np.testing.assert_allclose(linear.lightning_slopes(4, 1, 3), np.array(_alibi(4)) * (0.5 + 1e-5))
    np.testing.assert_allclose(np.exp(linear.retention_log_decays(3)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128])


# ---------------------------------------------------------------------------------------------
# Decoding: prefill of right-padded rows, a multi-token chunk, one-token steps
# ---------------------------------------------------------------------------------------------

DECODE_CASES = {
    "linear_attention": dict(feature_map="elu", normalize=True),
    "based": dict(feature_dim=3),
    "base_conv": dict(expand_proj=2),
    "retnet": dict(use_short_conv=True, conv_bias=True),
    "lightning": dict(layer_idx=0, num_layers=2),
    "gla": dict(use_short_conv=True, conv_bias=True),
}


@pytest.mark.parametrize("mixer", MIXERS)
def test_decoding_matches_full_forward(mixer):
    """Prefill of right-padded rows (junk padding), each row's next 2 tokens as one chunk, then 3
    one-token steps, against the numpy layer; then a padding step leaves its row's cache alone."""
    dim, heads, seed = 12, 2, MIXERS.index(mixer)
    with float64():
        module = _build(mixer, seed, dim=dim, num_heads=heads, param_dtype=jnp.float64, **DECODE_CASES[mixer])
        x = np.random.default_rng(seed).normal(size=(3, 10, dim))
        lengths = np.array([5, 2, 4], np.int32)  # row 0 is not padded
        prefill, continuation, cache = decode_in_pieces(module, x, lengths, [2, 1, 1, 1], seed=seed)
        ref = NUMPY[mixer](module, x)
        for b, n in enumerate(lengths):
            assert_close(prefill[b, :n], ref[b, :n], f"{mixer} prefill row {b}", dtype=jnp.float64)
            assert_close(continuation[b], ref[b, n : n + 5], f"{mixer} decoding row {b}", dtype=jnp.float64)
        assert isinstance(cache, RecurrentCache) and cache.state.dtype == jnp.float64
        assert_padding_step_keeps_row(module, cache, x[:, :1])


def test_cache_dtypes_and_shapes():
    module = _build("gla", dim=16, num_heads=2, use_short_conv=True)
    cache = module.init_cache(3, 100, dtype=jnp.bfloat16)
    assert cache.state.shape == (3, 2, 4, 8) and cache.state.dtype == jnp.float32
    assert [c.shape for c in cache.conv] == [(3, 3, 8), (3, 3, 8), (3, 3, 16)]
    assert all(c.dtype == jnp.bfloat16 for c in cache.conv)
    based = _build("based", dim=16, num_heads=2)
    assert based.init_cache(1, 8).state.shape == (1, 2, 153, 9)  # Taylor features, values + normaliser
    assert _build("base_conv", dim=16, num_heads=2).init_cache(2, 8).state.shape == (2, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Gradients, dtypes, logical axes
# ---------------------------------------------------------------------------------------------

GRAD_CASES = {
    "linear_attention": dict(),
    "based": dict(feature_dim=4),
    "base_conv": dict(),
    "retnet": dict(use_short_conv=True, conv_bias=True),
    "lightning": dict(norm="layernorm", gate_low_rank_dim=4, num_layers=2),
    "gla": dict(use_short_conv=True, conv_bias=True),
}


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_parameter_gets_a_gradient(mixer):
    module = _build(mixer, 1, dim=16, num_heads=2, **GRAD_CASES[mixer])
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 16)), jnp.float32)
    assert_gradients_reach_every_parameter(module, x)


def test_bfloat16_compute():
    module = _build("gla", dim=16, num_heads=2, dtype=jnp.bfloat16)
    x = np.random.default_rng(4).normal(size=(1, 6, 16)).astype(np.float32)
    out = _forward(module, jnp.asarray(x))
    assert out.dtype == jnp.bfloat16 and module.q_proj.kernel[...].dtype == jnp.float32
    assert_close(out, numpy_gla(module, x.astype(np.float64)), "gla bfloat16", dtype=jnp.bfloat16)


KNOWN_AXES = {"embed", "heads", "head_dim", "mlp", "norm", "conv_kernel", None}


@pytest.mark.parametrize("mixer", MIXERS)
def test_parameters_carry_logical_axes(mixer):
    options = GRAD_CASES[mixer]
    module = nnx.eval_shape(lambda: layers.create_mixer(mixer, dim=16, num_heads=2, rngs=nnx.Rngs(0), **options))
    axes_by_path = logical_axes(module)
    assert axes_by_path
    for path, (axes, ndim) in axes_by_path.items():
        assert axes is not None and len(axes) == ndim, (path, axes)
        assert set(axes) <= KNOWN_AXES and any(a is not None for a in axes), (path, axes)


# ---------------------------------------------------------------------------------------------
# FLOPs: the documented formula equals the matmuls the module traces to
# ---------------------------------------------------------------------------------------------


def test_chunked_op_flops_formula():
    # chunks of 16, 16 and 5 tokens; per chunk of c: 2 c^2 (K + V) + 4 c K V, times H
    per_chunk = lambda c: 2 * c * c * (4 + 6) + 4 * c * 4 * 6  # noqa: E731
    assert linear.chunked_op_flops(37, 3, 4, 6, 16) == 3 * (2 * per_chunk(16) + per_chunk(5))
    assert linear.chunked_op_flops(16, 1, 4, 6, 64) == per_chunk(16)


# With T a multiple of the chunk size no implementation pads, so the documented count must equal
# the matmuls the module traces to (the xla engine's four matmuls per chunk, projections, maps).
@pytest.mark.parametrize("length", [16, 48])
@pytest.mark.parametrize("mixer", [m for m in MIXERS if m != "gla"] + ["linear_attention-hedgehog"])
def test_flops_equal_traced_matmuls(mixer, length):
    name, options = mixer.split("-")[0], {}
    if mixer.endswith("hedgehog"):
        options = dict(feature_map="hedgehog", normalize=True)
    module = _build(name, dim=16, num_heads=2, chunk_size=16, impl="xla", **options)
    assert traced_matmul_flops(module, jnp.zeros((1, length, 16))) == module.flops(length)


def test_gla_flops_formula():
    module = _build("gla", dim=16, num_heads=2, chunk_size=16, impl="xla")
    length, d, h, k, v, rank = 40, 16, 2, 4, 8, 16
    op = h * sum(2 * c * c * (k + v) + 4 * c * k * v for c in (16, 16, 8))
    assert module.flops(length) == 2 * length * d * h * (2 * k + 3 * v) + 2 * length * rank * (d + h * k) + op
    # The engine builds per-channel-decay scores from rescaled blocks; its count stays close.
    traced = traced_matmul_flops(module, jnp.zeros((1, 48, 16)))
    assert 0.5 * module.flops(48) < traced < 1.5 * module.flops(48)


# ---------------------------------------------------------------------------------------------
# In the zoo's DecoderLM
# ---------------------------------------------------------------------------------------------


def test_mixers_in_decoder_lm():
    # A Based LM's pattern (BaseConv, Based, sliding-window attention) followed by the other mixers.
    pattern = "base_conv,based,swa,linear_attention,retnet,lightning,gla"
    options = {"based": {"feature_dim": 4}, "lightning": {"num_layers": 2}}
    model = randomize(nnx.eval_shape(lambda: zoo.create_model(
        "lm_nano", pattern=pattern, depth=7, dim=16, vocab_size=32, sliding_window=4, mixer_options=options,
        rngs=nnx.Rngs(0))), 0)
    blocks = model.blocks.layers.blocks
    assert [type(b.mixer).__name__ for b in blocks] == [
        "BaseConv", "Based", "Attention", "LinearAttention", "MultiScaleRetention", "LightningAttention",
        "GatedLinearAttention"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 9)), jnp.int32)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, 9, 32) and np.all(np.isfinite(logits))
    mixer_flops = sum(block.mixer.flops(9) for block in blocks)
    mlp = 2 * 9 * 16 * model.mlp_dim * 3
    assert model.forward_flops(9) == mixer_flops + len(blocks) * mlp + 2 * 9 * 16 * 32


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

BAD_CONSTRUCTORS = [
    ("linear_attention", dict(dim=16, num_heads=3), ValueError, "expand_k.*multiple of num_heads"),
    ("linear_attention", dict(dim=16, num_heads=2, feature_map="dpfp"), ValueError, "feature_map must be one of"),
    ("linear_attention", dict(dim=16, num_heads=2, normalize=1), TypeError, "normalize must be a bool"),
    ("linear_attention", dict(dim=16, num_heads=2, output_norm="layernorm"), ValueError, "output_norm"),
    ("based", dict(dim=15, num_heads=2), ValueError, "num_heads \\(2\\) must divide dim \\(15\\)"),
    ("based", dict(dim=16, num_heads=2, feature_dim=0), ValueError, "feature_dim must be an int >= 1"),
    ("base_conv", dict(dim=15, num_heads=1, expand_proj=1), ValueError, "expand_proj \\* dim must be even"),
    ("retnet", dict(dim=12, num_heads=4), ValueError, "even key head dim"),
    ("retnet", dict(dim=16, num_heads=2, feature_map="tanh"), ValueError, "feature_map must be one of"),
    ("retnet", dict(dim=16, num_heads=2, impl="pallas_gpu"), ValueError, "impl must be one of"),
    ("lightning", dict(dim=16, num_heads=2, layer_idx=4, num_layers=4), ValueError, "layer_idx must be in"),
    ("lightning", dict(dim=16, num_heads=2, norm="batchnorm"), ValueError, "norm must be one of"),
    ("lightning", dict(dim=16, num_heads=2, gate_low_rank_dim=0), ValueError, "gate_low_rank_dim must be an int"),
    ("gla", dict(dim=16, num_heads=2, clamp_min=0.5), ValueError, "clamp_min must be <= 0"),
    ("gla", dict(dim=16, num_heads=2, chunk_size=48), ValueError, "chunk_size must be a power of two"),
    ("gla", dict(dim=16, num_heads=2, use_short_conv="yes"), TypeError, "use_short_conv must be a bool"),
    ("gla", dict(dim=16, num_heads=2, gate_logit_normalizer=0), ValueError, "gate_logit_normalizer must be a finite pos"),
]


@pytest.mark.parametrize("mixer, kwargs, error, match", BAD_CONSTRUCTORS)
def test_rejects_bad_constructor_arguments(mixer, kwargs, error, match):
    with pytest.raises(error, match=match):
        layers.create_mixer(mixer, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("mixer", MIXERS)
def test_rejects_bad_call_arguments(mixer):
    assert_rejects_bad_calls(_build(mixer, dim=16, num_heads=2, **GRAD_CASES[mixer]))
