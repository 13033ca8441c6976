"""Hymba's hybrid-head mixer against float64 numpy references of its two branches and their fusion;
decoding with its two caches, gradients, the LM, FLOPs and argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.hybrid import HybridCache, HymbaHead
from attnzoo.pallas_kernels.testing import assert_close, float64
from attnzoo.zoo import DecoderLM
from tests.layers.numpy_layers import dense, numpy_attention_layer, numpy_mamba, param64, rms_norm
from tests.layers.recurrent_testing import assert_gradients_reach_every_parameter, cached_call
from tests.layers.test_ssm import _randomize
from tests.zoo.helpers import fast_jit, logical_axes


def numpy_hymba(m, x, segment_ids=None):
    """Hymba's block: ``out_proj((RMSNorm_1(attention) + RMSNorm_2(mamba)) / 2)`` in float64."""
    a = numpy_attention_layer(m.attention, x, segment_ids=segment_ids)
    s = numpy_mamba(m.mamba, x, segment_ids)
    fused = (rms_norm(a, param64(m.attention_norm.scale), m.attention_norm.epsilon)
             + rms_norm(s, param64(m.mamba_norm.scale), m.mamba_norm.epsilon)) / 2
    return dense(m.out_proj, fused)


def _build(seed=0, param_dtype=jnp.float64, dim=16, num_heads=4, **options):
    module = nnx.eval_shape(lambda: HymbaHead(dim, num_heads, param_dtype=param_dtype, chunk_size=16,
                                              rngs=nnx.Rngs(0), **options))
    return _randomize(module, seed)


_forward = fast_jit(lambda module, x, segment_ids: module(x, segment_ids=segment_ids))

CONFIGS = {
    "gqa": dict(num_kv_heads=2, state_dim=6),
    "window_mha": dict(window=5, state_dim=4, dt_rank=3, expand=1.5),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_float64_forward_matches_numpy(config):
    for seed, length in ((0, 1), (1, 9), (2, 37)):
        with float64():
            module = _build(seed, **CONFIGS[config])
            x = np.random.default_rng(seed + 50).normal(size=(2, length, module.dim))
            out = _forward(module, jnp.asarray(x), None)
            assert_close(out, numpy_hymba(module, x), f"{config} T={length}", dtype=jnp.float64)


def test_float64_packed_segments_match_numpy():
    with float64():
        module = _build(3, **CONFIGS["gqa"])
        x = np.random.default_rng(4).normal(size=(2, 20, module.dim))
        ids = np.zeros((2, 20), np.int32)
        ids[0, 7:] = 1
        ids[1, 13:] = 4
        out = _forward(module, jnp.asarray(x), jnp.asarray(ids))
        assert_close(out, numpy_hymba(module, x, ids), "packed", dtype=jnp.float64)


def test_the_fusion_is_checked():
    """Summing the branches instead of averaging them is caught by the numpy comparison."""
    with float64():
        module = _build(5, **CONFIGS["gqa"])
        x = np.random.default_rng(6).normal(size=(1, 8, module.dim))
        out = _forward(module, jnp.asarray(x), None)
        with pytest.raises(AssertionError, match="relative RMS"):
            assert_close(out, 2 * numpy_hymba(module, x), "sum", dtype=jnp.float64)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_prefill_then_steps_and_right_padding(config):
    with float64():
        module = _build(7, **CONFIGS[config])
        x = np.random.default_rng(8).normal(size=(2, 24, module.dim))
        full = np.asarray(_forward(module, jnp.asarray(x), None))
        cache = module.init_cache(2, 32)
        assert isinstance(cache, HybridCache)
        lengths = np.array([17, 11])
        prompt = np.where(np.arange(17)[None, :, None] < lengths[:, None, None], x[:, :17], 1e3)
        y, cache = cached_call(module, jnp.asarray(prompt), cache, jnp.asarray(lengths, jnp.int32))
        np.testing.assert_array_equal(cache.lengths, lengths)
        for row, n in enumerate(lengths):
            assert_close(y[row, :n], full[row, :n], f"row {row} prompt", dtype=jnp.float64)
        for step in range(5):
            token = np.stack([x[row, n + step] for row, n in enumerate(lengths)])[:, None]
            y, cache = cached_call(module, jnp.asarray(token), cache, None)
            for row, n in enumerate(lengths):
                assert_close(y[row, 0], full[row, n + step], f"row {row} step {step}", dtype=jnp.float64)


def test_gradients_reach_every_parameter():
    module = _build(11, param_dtype=jnp.float32, **CONFIGS["gqa"])
    x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 7, 16)), jnp.float32)
    assert_gradients_reach_every_parameter(module, x)


def test_parameter_logical_axes_and_flops():
    module = nnx.eval_shape(lambda: HymbaHead(16, 4, num_kv_heads=2, state_dim=6, rngs=nnx.Rngs(0)))
    known = {"embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "conv_kernel", None}
    for path, (axes, ndim) in logical_axes(module).items():
        assert axes is not None and len(axes) == ndim and set(axes) <= known, (path, axes)
    assert module.flops(10) == module.attention.flops(10) + module.mamba.flops(10) + 2 * 10 * 32 * 16
    assert module.attention.o_proj is None and module.mamba.out_proj is None
    assert module.attention.v_head_dim == 8  # d_inner / H


def test_runs_in_the_decoder_lm_and_registry():
    assert "hymba" in layers.list_mixers()
    model = _randomize(nnx.eval_shape(lambda: DecoderLM(
        vocab_size=32, dim=16, depth=2, num_heads=4, pattern="hymba,attn", mlp_dim=32,
        mixer_options={"hymba": dict(num_kv_heads=2, state_dim=4, chunk_size=16)}, rngs=nnx.Rngs(0),
    )))
    tokens = jnp.asarray(np.random.default_rng(13).integers(0, 32, size=(2, 10)), jnp.int32)
    logits = fast_jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, 10, 32) and np.all(np.isfinite(logits))
    assert isinstance(model.blocks.layers.blocks[0].mixer, HymbaHead)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=3), r"num_heads \(3\) must divide dim \(16\)"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(expand=0.01), "dim \\* expand"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"HymbaHead: {match}"):
        HymbaHead(16, kwargs.pop("num_heads", 4), rngs=nnx.Rngs(0), **kwargs)


def test_rejects_bad_calls():
    module = _build(0, param_dtype=jnp.float32)
    with pytest.raises(ValueError, match="HymbaHead: x must have shape"):
        module(jnp.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match="HymbaHead: valid_lengths needs a cache"):
        module(jnp.zeros((1, 3, 16)), valid_lengths=jnp.array([2]))
    with pytest.raises(TypeError, match="HymbaHead: cache must be a HybridCache"):
        module(jnp.zeros((1, 3, 16)), cache=module.init_cache(1, 8).attention)
