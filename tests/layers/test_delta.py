"""Delta-rule mixers (DeltaNet, Gated DeltaNet, KDA) against a float64 numpy token loop of the
published layers, decoding with a cache (prefill, steps, right padding), gradients, the LM, FLOPs
and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers import RecurrentCache
from attnzoo.layers import delta
from attnzoo.layers.delta import DeltaNet, GatedDeltaNet, KimiDeltaAttention
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from attnzoo.zoo import DecoderLM
from tests.layers.numpy_layers import dense, param64, rms_norm, short_conv, sigmoid, silu, softplus
from tests.layers.recurrent_testing import (
    apply_mixer,
    assert_gradients_reach_every_parameter,
    assert_padding_step_keeps_row,
    assert_rejects_bad_calls,
    decode_in_pieces,
    recurrence,
    split_case,
)
from tests.zoo.helpers import fast_jit, logical_axes

CLASSES = {"deltanet": DeltaNet, "gated_deltanet": GatedDeltaNet, "kda": KimiDeltaAttention}


# ---------------------------------------------------------------------------------------------
# An independent float64 numpy implementation of the published layers (token by token)
# ---------------------------------------------------------------------------------------------


def _l2(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def numpy_layer(m, x, segment_ids=None):
    """The layer of fla (delta_net.py / gated_deltanet.py / kda.py) from m's parameters."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    h, hv, dk = m.num_heads, m.num_v_heads, m.head_k_dim
    q, k, v = dense(m.q_proj, x), dense(m.k_proj, x), dense(m.v_proj, x)
    if m.use_short_conv:
        q = short_conv(m.q_conv1d, q.reshape(batch, length, -1), segment_ids).reshape(q.shape)
        k = short_conv(m.k_conv1d, k.reshape(batch, length, -1), segment_ids).reshape(k.shape)
        v = short_conv(m.v_conv1d, v.reshape(batch, length, -1), segment_ids).reshape(v.shape)
    else:
        if m.qk_conv_activation == "silu":
            q, k = silu(q), silu(k)
        v = silu(v)
    if isinstance(m, DeltaNet):
        act = {"silu": lambda a: a, "relu": lambda a: np.maximum(a, 0), "identity": lambda a: a,
               "elu": lambda a: np.where(a > 0, a + 1.0, np.exp(a))}[m.qk_activation]
        q, k = act(q), act(k)
        if m.qk_norm == "sum":
            q, k = q / q.sum(-1, keepdims=True), k / k.sum(-1, keepdims=True)
        else:
            q, k = _l2(q), _l2(k)
        beta = sigmoid(dense(m.b_proj, x)) if m.use_beta else np.ones((batch, length, h))
        gate = None
    elif isinstance(m, GatedDeltaNet):
        q, k = _l2(q), _l2(k)
        beta = sigmoid(dense(m.b_proj, x))
        gate = -np.exp(param64(m.A_log)) * softplus(dense(m.a_proj, x) + param64(m.dt_bias))  # [B,T,Hv]
    else:
        q, k = _l2(q), _l2(k)
        beta = sigmoid(dense(m.b_proj, x))
        f = dense(m.f_b_proj, dense(m.f_a_proj, x)) + param64(m.dt_bias)  # [B,T,Hv,K]
        rate = np.exp(param64(m.A_log))[:, None]
        gate = -rate * softplus(f) if m.lower_bound is None else m.lower_bound * sigmoid(rate * f)
    if m.allow_neg_eigval:
        beta = 2.0 * beta

    groups = hv // h  # value head i reads query/key head i // groups
    q, k = np.repeat(q, groups, axis=2), np.repeat(k, groups, axis=2)
    decay = None if gate is None else np.exp(gate)
    out = recurrence(q, k, v, scale=dk**-0.5, decay=decay, beta=beta, segment_ids=segment_ids)

    if isinstance(m, KimiDeltaAttention):
        norm = m.o_norm.norm
        o = rms_norm(out, param64(norm.scale), norm.epsilon) * sigmoid(dense(m.g_b_proj, dense(m.g_a_proj, x)))
    elif m.use_gate:
        norm = m.o_norm.norm
        o = rms_norm(out, param64(norm.scale), norm.epsilon) * silu(dense(m.g_proj, x))
    else:
        o = rms_norm(out, param64(m.o_norm.scale), m.o_norm.epsilon)
    return dense(m.o_proj, o)


def _randomize(module, seed=0, scale=0.3):
    """Random values in every parameter: kernels, biases, conv weights ~ N(0, scale^2), norm scales
    around one, and A_log / dt_bias drawn from the published ranges (exp(A_log) ~ U[1, 16],
    softplus(dt_bias) log-uniform in [0.001, 0.1]). Also makes an ``nnx.eval_shape`` module
    concrete without compiling its initializers."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            current = variable.get_value()  # an array, or a ShapeDtypeStruct after nnx.eval_shape
            if path[-1] == "A_log":
                value = np.log(rng.uniform(1.0, 16.0, current.shape))
            elif path[-1] == "dt_bias":
                dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), current.shape))
                value = dt + np.log(-np.expm1(-dt))
            else:
                value = rng.normal(size=current.shape) * scale + (1.0 if path[-1] == "scale" else 0.0)
            variable.set_value(jnp.asarray(value, current.dtype))
    return module


def _abstract(name, dim=12, num_heads=2, **options):
    return nnx.eval_shape(lambda: CLASSES[name](dim, num_heads, rngs=nnx.Rngs(0), **options))


def _build(name, seed=0, param_dtype=jnp.float64, dim=12, num_heads=2, chunk_size=16, **options):
    """A module with random parameters (built abstractly: no initializer is compiled)."""
    module = _abstract(name, dim, num_heads, param_dtype=param_dtype, chunk_size=chunk_size, **options)
    return _randomize(module, seed)


CONFIGS = {
    "deltanet": dict(name="deltanet"),
    "deltanet_gate_elu_sum_negeig": dict(
        name="deltanet", use_gate=True, qk_activation="elu", qk_norm="sum", allow_neg_eigval=True, conv_bias=True,
    ),
    "deltanet_noconv_relu_nobeta": dict(
        name="deltanet", use_short_conv=False, qk_activation="relu", use_beta=False, expand_v=2.0, num_heads=3,
    ),
    "gated_deltanet": dict(name="gated_deltanet"),
    "gated_deltanet_gva_nogate": dict(
        name="gated_deltanet", num_v_heads=4, head_dim=5, expand_v=1.0, use_gate=False, allow_neg_eigval=True,
        conv_bias=True, conv_size=3,
    ),
    "kda": dict(name="kda"),
    "kda_gva_lower_bound_noconv": dict(
        name="kda", num_v_heads=4, expand_v=2.0, lower_bound=-5.0, safe_gate=True, output_gate_bias=False,
        allow_neg_eigval=True, use_short_conv=False,
    ),
}



@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_float64_forward_matches_numpy_token_loop(config):
    name, options = split_case(CONFIGS[config])
    # Every mixer meets T = 1, 7 and 37 (37 = three chunks of 16); two seeds per configuration.
    short = 7 if sorted(CONFIGS).index(config) % 2 else 1
    with float64():
        for seed, length in [(0, short), (1, 37)]:
            module = _build(name, seed, **options)
            x = np.random.default_rng(seed + 10).normal(size=(2, length, module.dim))
            out = apply_mixer(module, jnp.asarray(x))
            assert out.shape == x.shape and out.dtype == jnp.float64
            assert_close(out, numpy_layer(module, x), f"{config} T={length}", dtype=jnp.float64)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_float64_packed_segments_match_numpy_and_run_alone(name):
    with float64():
        module = _build(name, 3)
        x = np.random.default_rng(4).normal(size=(2, 44, module.dim))
        segment_ids = np.array([[1] * 7 + [2] * 37, [5] * 3 + [6] * 4 + [7] * 37])
        out = apply_mixer(module, jnp.asarray(x), jnp.asarray(segment_ids))
        assert_close(out, numpy_layer(module, x, segment_ids), f"{name} packed", dtype=jnp.float64)
        alone = apply_mixer(module, jnp.asarray(x[:, 7:]))  # the last documents run alone
        assert_close(out[:, 7:], alone, f"{name} documents alone", dtype=jnp.float64)


def test_float32_and_bfloat16_compute():
    x = np.random.default_rng(5).normal(size=(2, 7, 12))
    for name in CLASSES:
        with float64():
            reference = numpy_layer(_build(name, 6), x)
        module16 = _build(name, 6, param_dtype=jnp.float32, dtype=jnp.bfloat16)
        out = apply_mixer(module16, jnp.asarray(x, jnp.float32))
        assert out.dtype == jnp.bfloat16 and module16.q_proj.kernel[...].dtype == jnp.float32
        assert rel_rms(out, reference) < 5e-2, name
    module32 = _build("kda", 6, param_dtype=jnp.float32)
    out = apply_mixer(module32, jnp.asarray(x, jnp.float32))
    assert out.dtype == jnp.float32 and rel_rms(out, reference) < 1e-5


def test_published_initialisation():
    # Real initialisation (cheap kernels and no convolutions keep it fast): the decay parameters.
    cheap = dict(kernel_init=nnx.initializers.zeros, use_short_conv=False, rngs=nnx.Rngs(0))
    module = GatedDeltaNet(16, 4, num_v_heads=64, **cheap)
    a = np.exp(np.asarray(module.A_log[...]))
    dt = np.logaddexp(0.0, np.asarray(module.dt_bias[...]))  # softplus(dt_bias) = dt
    assert module.A_log[...].shape == (64,) and np.all((a > 0) & (a <= 16)) and a.min() < 4 and a.max() > 12
    assert np.all((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))) and dt.min() < 3e-3 and dt.max() > 3e-2
    assert module.head_v_dim == 2 * module.head_k_dim == 8  # fla's expand_v = 2
    kda = KimiDeltaAttention(16, 4, num_v_heads=64, **cheap)
    a = np.exp(np.asarray(kda.A_log[...]))
    dt = np.logaddexp(0.0, np.asarray(kda.dt_bias[...]))
    assert np.all((a >= 1) & (a <= 16)) and kda.dt_bias[...].shape == (64, 4)
    assert np.all((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4)))
    assert kda.head_v_dim == kda.head_k_dim
    safe = KimiDeltaAttention(16, 4, lower_bound=-5.0, safe_gate=True, **cheap)
    np.testing.assert_array_equal(safe.A_log[...], 0.0)
    # Structure (abstract): fla's defaults.
    kda = _abstract("kda", 16, 4)
    assert kda.g_b_proj.bias is not None and kda.f_a_proj.kernel.get_value().shape == (16, 4)
    net = _abstract("deltanet", 16, 4)
    assert net.b_proj is not None and net.g_proj is None and isinstance(net.o_norm, layers.RMSNorm)
    assert net.q_conv1d.kernel_size == 4 and net.q_conv1d.bias is None and net.head_k_dim == 4


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", ["deltanet_gate_elu_sum_negeig", "gated_deltanet_gva_nogate", "kda_gva_lower_bound_noconv"]
)
def test_prefill_then_steps_equal_full_forward(config):
    name, options = split_case(CONFIGS[config])
    with float64():
        module = _build(name, 7, **options)
        x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 37, module.dim)))
        full = apply_mixer(module, x)
        cache = module.init_cache(2, 64)
        assert isinstance(cache, RecurrentCache) and cache.state.dtype == jnp.float64
        assert cache.state.shape == (2, module.num_v_heads, module.head_k_dim, module.head_v_dim)
        assert len(cache.conv) == (3 if module.use_short_conv else 0)
        # One token, a 33-token chunk from that (non-zero) cache, then three one-token steps.
        first, rest, cache = decode_in_pieces(module, x, [1, 1], [33, 1, 1, 1])
        assert_close(jnp.concatenate([first, rest], 1), full, f"{config} decoded", dtype=jnp.float64)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_right_padded_prefill_then_steps(name):
    with float64():
        module = _build(name, 9, conv_bias=True)
        tokens = np.random.default_rng(10).normal(size=(2, 37, module.dim))
        prompt_lengths = [33, 20]  # row 1 is padded with junk that must not leak
        y_prompt, steps, cache = decode_in_pieces(module, tokens, prompt_lengths, [1, 1, 1, 1], seed=10)
        full = apply_mixer(module, jnp.asarray(tokens))
        for row, n in enumerate(prompt_lengths):
            assert_close(y_prompt[row, :n], full[row, :n], f"row {row} prompt", dtype=jnp.float64)
            assert_close(steps[row], full[row, n : n + 4], f"row {row} steps", dtype=jnp.float64)
        assert_padding_step_keeps_row(module, cache, tokens[:, :1])


# ---------------------------------------------------------------------------------------------
# Gradients, LM, FLOPs, logical axes
# ---------------------------------------------------------------------------------------------


GRAD_CONFIGS = {
    "deltanet": dict(use_gate=True, conv_bias=True),
    "gated_deltanet": dict(conv_bias=True, num_v_heads=4),
    "kda": dict(conv_bias=True, num_v_heads=4),
}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_gradients_reach_every_parameter(name):
    module = _build(name, 11, param_dtype=jnp.float32, **GRAD_CONFIGS[name])
    x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 7, 12)), jnp.float32)
    assert_gradients_reach_every_parameter(module, x)


def test_parameter_logical_axes():
    known = {"embed", "heads", "head_dim", "norm", "conv_kernel", None}
    for name in CLASSES:
        for path, (axes, ndim) in logical_axes(_abstract(name, 16, 4, **GRAD_CONFIGS[name])).items():
            assert axes is not None and len(axes) == ndim and set(axes) <= known, (name, path, axes)
    specs = {
        jax.tree_util.keystr(path): tuple(spec)
        for path, spec in jax.tree_util.tree_leaves_with_path(
            nnx.get_partition_spec(nnx.state(_abstract("kda", 16, 4), nnx.Param)),
            is_leaf=lambda s: isinstance(s, jax.P),
        )
    }
    specs = {path.removesuffix(".value"): spec for path, spec in specs.items()}
    assert specs["['q_proj']['kernel']"] == ("embed", "heads", "head_dim")
    assert specs["['o_proj']['kernel']"] == ("heads", "head_dim", "embed")
    assert specs["['dt_bias']"] == ("heads", "head_dim") and specs["['A_log']"] == ("heads",)
    assert specs["['q_conv1d']['weight']"] == ("conv_kernel", "heads")
    assert specs["['f_b_proj']['kernel']"] == (None, "heads", "head_dim")
    assert specs["['o_norm']['norm']['scale']"] == ("norm",)


def _projection_kernel_size(module) -> int:
    return sum(
        int(np.prod(variable.get_value().shape))
        for path, variable in nnx.iter_graph(module)
        if isinstance(variable, nnx.Param) and path[-1] == "kernel"
    )


def test_flops():
    for name in CLASSES:
        module = _abstract(name, 16, 2, **GRAD_CONFIGS[name])
        heads, dk, dv = module.num_v_heads, module.head_k_dim, module.head_v_dim
        for length in (1, 5, 64, 100):
            op = 0
            for c in [64] * (length // 64) + ([length % 64] if length % 64 else []):
                op += heads * (6 * c * c * dk + 4 * c * c * dv + 6 * c * dk * dv + (c**3 - c) // 3)
            # Every projection is a [T, fan_in] @ [fan_in, fan_out] matmul: 2 T x kernel size.
            assert module.flops(length) == 2 * length * _projection_kernel_size(module) + op, (name, length)
        assert module.flops(7, kv_len=100) == module.flops(7)
    # A worked example: T = 100 at chunk 64 is chunks of 64 and 36 (one head, K = V = 2).
    assert delta.delta_rule_chunk_flops(100, 1, 2, 2, 64) == sum(
        6 * c * c * 2 + 4 * c * c * 2 + 24 * c + (c**3 - c) // 3 for c in (64, 36)
    )


def test_runs_in_the_decoder_lm():
    pattern = "attn,deltanet,gated_deltanet,kda"
    model = _randomize(nnx.eval_shape(lambda: DecoderLM(
        vocab_size=32, dim=16, depth=4, num_heads=2, pattern=pattern, mlp_dim=32,
        mixer_options={name: dict(chunk_size=16) for name in CLASSES}, rngs=nnx.Rngs(0),
    )))
    blocks = model.blocks.layers.blocks
    assert [type(block.mixer) for block in blocks[1:]] == list(CLASSES.values())
    tokens = jnp.asarray(np.random.default_rng(13).integers(0, 32, size=(2, 10)), jnp.int32)
    segment_ids = jnp.asarray([[0] * 4 + [1] * 6, [0] * 10])
    logits = fast_jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segment_ids)
    assert logits.shape == (2, 10, 32) and np.all(np.isfinite(logits))
    mixers = sum(block.mixer.flops(10) for block in blocks)
    mlps = 4 * 2 * 10 * 16 * blocks[0].mlp.hidden_dim * 3
    assert model.forward_flops(10) == mixers + mlps + 2 * 10 * 16 * 32


def test_registry():
    assert {"deltanet", "gated_deltanet", "kda"} <= set(layers.list_mixers())
    for name, cls in CLASSES.items():
        module = nnx.eval_shape(lambda: layers.create_mixer(name, dim=16, num_heads=2, rngs=nnx.Rngs(0)))
        assert isinstance(module, cls)


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,error,match",
    [
        ("deltanet", dict(dim=30, num_heads=4), ValueError, "num_heads"),
        ("deltanet", dict(dim=16, num_heads=4, expand_k=0.3), ValueError, "expand_k"),
        ("deltanet", dict(dim=16, num_heads=4, qk_activation="gelu"), ValueError, "qk_activation"),
        ("deltanet", dict(dim=16, num_heads=4, qk_norm="rms"), ValueError, "qk_norm"),
        ("deltanet", dict(dim=16, num_heads=4, use_gate=1), TypeError, "use_gate"),
        ("gated_deltanet", dict(dim=16, num_heads=3), ValueError, "head_dim"),
        ("gated_deltanet", dict(dim=16, num_heads=4, num_v_heads=6), ValueError, "num_v_heads"),
        ("gated_deltanet", dict(dim=16, num_heads=4, expand_v=1.3), ValueError, "expand_v"),
        ("gated_deltanet", dict(dim=16, num_heads=4, impl="cuda"), ValueError, "impl"),
        ("gated_deltanet", dict(dim=16, num_heads=4, chunk_size=48), ValueError, "chunk_size"),
        ("gated_deltanet", dict(dim=16, num_heads=0), ValueError, "num_heads"),
        ("kda", dict(dim=16, num_heads=4, lower_bound=1.0), ValueError, "lower_bound"),
        ("kda", dict(dim=16, num_heads=4, safe_gate=True), ValueError, "safe_gate"),
        ("kda", dict(dim=16, num_heads=4, norm_eps=-1.0), ValueError, "norm_eps"),
        ("kda", dict(dim=16, num_heads=4, conv_size=0), ValueError, "conv_size"),
    ],
)
def test_rejects_bad_arguments(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        CLASSES[name](rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_rejects_bad_inputs_and_caches(name):
    assert_rejects_bad_calls(_build(name, param_dtype=jnp.float32, dim=16))


def test_mesh_axes_must_be_mesh_axes():
    from attnzoo.layers import MeshAxes

    with pytest.raises(TypeError, match="GatedDeltaNet: mesh_axes must be a MeshAxes, got str"):
        GatedDeltaNet(dim=16, num_heads=2, mesh_axes="tensor", rngs=nnx.Rngs(0))
    module = KimiDeltaAttention(dim=16, num_heads=2, mesh_axes=MeshAxes(batch=("data",), heads=None), rngs=nnx.Rngs(0))
    assert module.mesh_axes.heads is None and module.mesh_axes.batch == ("data",)
