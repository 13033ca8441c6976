"""State-space mixers (Mamba-2, Mamba) against a float64 numpy token loop of the published layer, decoding
with a cache (prefill, steps, right padding), gradients, the LM, FLOPs and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers import RecurrentCache
from attnzoo.layers.ssm import Mamba, Mamba2
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from attnzoo.zoo import DecoderLM
from tests.layers.numpy_layers import dense, numpy_mamba, numpy_ssd, param64, short_conv, silu
from tests.layers.recurrent_testing import (
    apply_mixer,
    assert_gradients_reach_every_parameter,
    assert_padding_step_keeps_row,
    assert_rejects_bad_calls,
    decode_in_pieces,
    split_case,
)
from tests.zoo.helpers import fast_jit, logical_axes

CLASSES = {"mamba2": Mamba2, "mamba": Mamba}


# ---------------------------------------------------------------------------------------------
# An independent float64 numpy implementation of the published layer (token by token)
# ---------------------------------------------------------------------------------------------


def grouped_gated_rms_norm(y, gate, scale, eps, groups):
    """mamba_ssm's RMSNormGated(norm_before_gate=False): ``rms_G(y * silu(gate)) * scale``."""
    y = y * silu(gate)
    shape = y.shape
    grouped = y.reshape(shape[:-1] + (groups, -1))
    grouped = grouped / np.sqrt(np.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    return grouped.reshape(shape) * scale


def numpy_mamba2(m, x, segment_ids=None):
    """mamba_ssm's Mamba2 forward from m's parameters (in-projection split per output)."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    h, p = m.num_heads, m.head_dim
    z = dense(m.z_proj, x).reshape(batch, length, h * p)
    xs = short_conv(m.x_conv1d, dense(m.x_proj, x).reshape(batch, length, -1), segment_ids)
    B = short_conv(m.B_conv1d, dense(m.B_proj, x).reshape(batch, length, -1), segment_ids)
    C = short_conv(m.C_conv1d, dense(m.C_proj, x).reshape(batch, length, -1), segment_ids)
    dt = dense(m.dt_proj, x)
    A = -np.exp(param64(m.A_log))
    shape_bc = (batch, length, m.num_groups, m.state_dim)
    y, _ = numpy_ssd(xs.reshape(batch, length, h, p), dt, A, B.reshape(shape_bc), C.reshape(shape_bc),
                     D=param64(m.D), dt_bias=param64(m.dt_bias), dt_softplus=True, dt_limit=m.dt_limit,
                     segment_ids=segment_ids)
    y = grouped_gated_rms_norm(y.reshape(batch, length, h * p), z, param64(m.norm.norm.scale), m.norm.norm.epsilon,
                               m.num_groups)
    return dense(m.out_proj, y.reshape(batch, length, h, p))


NUMPY_LAYERS = {"mamba2": numpy_mamba2, "mamba": numpy_mamba}


def _randomize(module, seed=0, scale=0.3):
    """Random values in every parameter (kernels, biases, conv weights ~ N(0, scale^2), norm scales
    and D around one, A_log / dt_bias from the published ranges). Also makes an ``nnx.eval_shape``
    module concrete without compiling its initializers."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            current = variable.get_value()
            if path[-1] == "A_log":
                value = np.log(rng.uniform(1.0, 16.0, current.shape))
            elif path[-1] == "dt_bias":
                dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), current.shape))
                value = dt + np.log(-np.expm1(-dt))
            else:
                value = rng.normal(size=current.shape) * scale + (1.0 if path[-1] in ("scale", "D") else 0.0)
            variable.set_value(jnp.asarray(value, current.dtype))
    return module


def _abstract(name, dim=12, num_heads=2, **options):
    return nnx.eval_shape(lambda: CLASSES[name](dim, num_heads, rngs=nnx.Rngs(0), **options))


def _build(name, seed=0, param_dtype=jnp.float64, dim=12, num_heads=2, chunk_size=16, **options):
    module = _abstract(name, dim, num_heads, param_dtype=param_dtype, chunk_size=chunk_size, **options)
    return _randomize(module, seed)


CONFIGS = {
    "mamba2": dict(name="mamba2", state_dim=8),
    "mamba2_groups_dhdim_limit": dict(
        name="mamba2", num_heads=4, state_dim=5, num_groups=2, D_per_channel=True, dt_limit=(0.002, 0.05),
        conv_size=3, use_bias=True,
    ),
    "mamba2_expand1_headdim": dict(name="mamba2", num_heads=3, expand=1, head_dim=4, state_dim=16, conv_bias=False),
    "mamba": dict(name="mamba", state_dim=5),
    "mamba_rank_bias_conv3": dict(name="mamba", expand=1.5, state_dim=16, dt_rank=3, use_bias=True, conv_size=3),
}



@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_float64_forward_matches_numpy_token_loop(config):
    name, options = split_case(CONFIGS[config])
    # T = 1, 7 and 37 (three chunks of 16); two seeds.
    for seed, length in ((0, 1), (1, 7), (2, 37)):
        with float64():
            module = _build(name, seed, **options)
            x = np.random.default_rng(seed + 100).normal(size=(2, length, module.dim))
            out = apply_mixer(module, jnp.asarray(x))
            assert out.dtype == jnp.float64
            assert_close(out, NUMPY_LAYERS[name](module, x), f"{config} T={length}", dtype=jnp.float64)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_float64_packed_segments_match_numpy_and_run_alone(name):
    with float64():
        module = _build(name, 3, **split_case(CONFIGS[{"mamba2": "mamba2_groups_dhdim_limit", "mamba": "mamba_rank_bias_conv3"}[name]])[1])
        x = np.random.default_rng(4).normal(size=(2, 30, module.dim))
        ids = np.zeros((2, 30), np.int32)
        ids[0, 11:] = 1
        ids[0, 16:] = 2
        ids[1, 25:] = 7
        out = apply_mixer(module, jnp.asarray(x), jnp.asarray(ids))
        assert_close(out, NUMPY_LAYERS[name](module, x, ids), "packed", dtype=jnp.float64)
        alone = apply_mixer(module, jnp.asarray(x[:1, 11:16]))
        assert_close(out[:1, 11:16], alone, "segment alone", dtype=jnp.float64)


def test_float32_and_bfloat16_compute():
    with float64():
        module64 = _build("mamba2", 5)
        x = np.random.default_rng(6).normal(size=(2, 40, module64.dim))
        ref = np.asarray(apply_mixer(module64, jnp.asarray(x)))
    module32 = _build("mamba2", 5, param_dtype=jnp.float32)
    out32 = apply_mixer(module32, jnp.asarray(x, jnp.float32))
    assert out32.dtype == jnp.float32
    assert_close(out32, ref, "float32", dtype=jnp.float32)
    module_bf16 = _build("mamba2", 5, param_dtype=jnp.float32)
    module_bf16.dtype = jnp.bfloat16
    for sub in (module_bf16.norm.norm,):
        sub.dtype = jnp.bfloat16
    out16 = apply_mixer(module_bf16, jnp.asarray(x, jnp.bfloat16))
    assert rel_rms(out16, ref) < 5e-2


def test_published_initialisation():
    module = Mamba2(64, 4, state_dim=16, rngs=nnx.Rngs(0))
    a = np.exp(np.asarray(module.A_log[...]))
    assert np.all((a >= 1.0) & (a <= 16.0))
    dt = np.log1p(np.exp(np.asarray(module.dt_bias[...])))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001))
    np.testing.assert_array_equal(module.D[...], np.ones(4))
    assert module.head_dim == 32 and module.d_inner == 128
    assert module.x_conv1d.bias is not None and module.z_proj.bias is None


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_prefill_then_steps_equal_full_forward(config):
    name, options = split_case(CONFIGS[config])
    with float64():
        module = _build(name, 7, **options)
        x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 37, module.dim)))
        full = apply_mixer(module, x)
        cache = module.init_cache(2, 64)
        assert isinstance(cache, RecurrentCache) and cache.state.dtype == jnp.float64
        assert len(cache.conv) == len(module._conv_modules())
        first, rest, cache = decode_in_pieces(module, x, [1, 1], [33, 1, 1, 1])
        assert_close(jnp.concatenate([first, rest], 1), full, f"{config} decoded", dtype=jnp.float64)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_right_padded_prefill_then_steps(name):
    with float64():
        module = _build(name, 9)
        tokens = np.random.default_rng(10).normal(size=(2, 37, module.dim))
        prompt_lengths = [33, 20]
        y_prompt, steps, cache = decode_in_pieces(module, tokens, prompt_lengths, [1, 1, 1, 1], seed=10)
        full = apply_mixer(module, jnp.asarray(tokens))
        for row, n in enumerate(prompt_lengths):
            assert_close(y_prompt[row, :n], full[row, :n], f"row {row} prompt", dtype=jnp.float64)
            assert_close(steps[row], full[row, n : n + 4], f"row {row} steps", dtype=jnp.float64)
        assert_padding_step_keeps_row(module, cache, tokens[:, :1])


def test_cache_state_layout():
    module = _abstract("mamba2", 16, 4, state_dim=6)
    cache = module.init_cache(3, 10)
    assert cache.state.shape == (3, 4, 6, 8) and cache.state.dtype == jnp.float32
    assert [c.shape for c in cache.conv] == [(3, 3, 32), (3, 3, 6), (3, 3, 6)]
    cache = _abstract("mamba", 16, 4, state_dim=6).init_cache(3, 10)
    assert cache.state.shape == (3, 32, 6) and [c.shape for c in cache.conv] == [(3, 3, 32)]


# ---------------------------------------------------------------------------------------------
# Gradients, LM, FLOPs, logical axes, errors
# ---------------------------------------------------------------------------------------------


GRAD_CONFIGS = {"mamba2": dict(num_heads=4, num_groups=2, use_bias=True), "mamba": dict(use_bias=True, dt_rank=2)}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_gradients_reach_every_parameter(name):
    module = _build(name, 11, param_dtype=jnp.float32, **GRAD_CONFIGS[name])
    x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 7, 12)), jnp.float32)
    assert_gradients_reach_every_parameter(module, x)


def test_parameter_logical_axes():
    known = {"embed", "heads", "head_dim", "norm", "conv_kernel", None}
    module = _abstract("mamba2", 16, 4, D_per_channel=True)
    for path, (axes, ndim) in logical_axes(module).items():
        assert axes is not None and len(axes) == ndim and set(axes) <= known, (path, axes)
    specs = {
        jax.tree_util.keystr(path).removesuffix(".value"): tuple(spec)
        for path, spec in jax.tree_util.tree_leaves_with_path(
            nnx.get_partition_spec(nnx.state(module, nnx.Param)), is_leaf=lambda s: isinstance(s, jax.P)
        )
    }
    assert specs["['x_proj']['kernel']"] == ("embed", "heads", "head_dim")
    assert specs["['out_proj']['kernel']"] == ("heads", "head_dim", "embed")
    assert specs["['D']"] == ("heads", "head_dim") and specs["['A_log']"] == ("heads",)
    assert specs["['x_conv1d']['weight']"] == ("conv_kernel", "heads")
    assert specs["['norm']['norm']['scale']"] == ("norm",)
    known |= {"mlp"}
    for path, (axes, ndim) in logical_axes(_abstract("mamba", 16, 4, use_bias=True)).items():
        assert axes is not None and len(axes) == ndim and set(axes) <= known, (path, axes)


def test_flops():
    module = _abstract("mamba2", 16, 4, state_dim=6, num_groups=2)
    h, p, n = 4, 8, 6
    kernels = sum(
        int(np.prod(variable.get_value().shape))
        for path, variable in nnx.iter_graph(module)
        if isinstance(variable, nnx.Param) and path[-1] == "kernel"
    )
    for length in (1, 5, 64, 100):
        op = sum(h * (2 * c * c * (n + p) + 4 * c * n * p)
                 for c in [64] * (length // 64) + ([length % 64] if length % 64 else []))
        assert module.flops(length) == 2 * length * kernels + op
    assert module.flops(7, kv_len=100) == module.flops(7)
    mamba = _abstract("mamba", 16, 1, state_dim=6, dt_rank=3)
    kernels = sum(int(np.prod(v.get_value().shape)) for p, v in nnx.iter_graph(mamba)
                  if isinstance(v, nnx.Param) and p[-1] == "kernel")
    assert mamba.flops(10) == 2 * 10 * kernels + 6 * 10 * 32 * 6


def test_mamba_published_initialisation():
    module = Mamba(32, 1, state_dim=8, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.exp(np.asarray(module.A_log[...])), np.tile(np.arange(1, 9), (64, 1)), rtol=1e-6)
    np.testing.assert_array_equal(module.D[...], np.ones(64))
    dt = np.log1p(np.exp(np.asarray(module.dt_bias[...])))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001))
    assert module.dt_rank == 2 and np.all(np.abs(np.asarray(module.dt_proj.kernel[...])) <= 2**-0.5)


def test_runs_in_the_decoder_lm():
    model = _randomize(nnx.eval_shape(lambda: DecoderLM(
        vocab_size=32, dim=16, depth=3, num_heads=2, pattern="mamba2,mamba,attn", mlp_dim=32,
        mixer_options={"mamba2": dict(chunk_size=16, state_dim=8), "mamba": dict(chunk_size=16)}, rngs=nnx.Rngs(0),
    )))
    tokens = jnp.asarray(np.random.default_rng(13).integers(0, 32, size=(2, 10)), jnp.int32)
    segment_ids = jnp.asarray([[0] * 4 + [1] * 6, [0] * 10])
    logits = fast_jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segment_ids)
    assert logits.shape == (2, 10, 32) and np.all(np.isfinite(logits))
    blocks = model.blocks.layers.blocks
    assert isinstance(blocks[0].mixer, Mamba2) and isinstance(blocks[1].mixer, Mamba)
    assert model.forward_flops(10) == sum(b.mixer.flops(10) for b in blocks) + 3 * 2 * 3 * 10 * 16 * 32 + 2 * 10 * 16 * 32


def test_registry():
    assert set(CLASSES) <= set(layers.list_mixers())
    for name, cls in CLASSES.items():
        module = nnx.eval_shape(lambda: layers.create_mixer(name, dim=16, num_heads=2, rngs=nnx.Rngs(0)))
        assert isinstance(module, cls)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_heads=5), ValueError, r"num_heads \(5\) must divide d_inner"),
        (dict(head_dim=5), ValueError, r"num_heads \* head_dim \(2 \* 5\) must equal d_inner"),
        (dict(num_groups=3), ValueError, r"num_groups \(3\) must divide num_heads"),
        (dict(expand=0.3), ValueError, "dim \\* expand"),
        (dict(state_dim=0), ValueError, "state_dim must be an int >= 1"),
        (dict(dt_min=0.2), ValueError, r"dt_min \(0.2\) must not exceed dt_max"),
        (dict(dt_limit=3.0), ValueError, "dt_limit must be a"),
        (dict(a_init_range=(5, 1)), ValueError, "a_init_range"),
        (dict(D_per_channel=1), TypeError, "D_per_channel must be a bool"),
        (dict(chunk_size=24), ValueError, "chunk_size must be a power of two"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=f"Mamba2: {match}"):
        Mamba2(12, kwargs.pop("num_heads", 2), rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_rejects_bad_inputs_and_caches(name):
    assert_rejects_bad_calls(_build(name, 0, param_dtype=jnp.float32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(expand=0.01), ValueError, "dim \\* expand"),
        (dict(dt_rank="big"), ValueError, "dt_rank must be an int >= 1"),
        (dict(dt_scale=0.0), ValueError, "dt_scale must be a finite positive float"),
        (dict(conv_bias="yes"), TypeError, "conv_bias must be a bool"),
    ],
)
def test_mamba_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=f"Mamba: {match}"):
        Mamba(12, 1, rngs=nnx.Rngs(0), **kwargs)
