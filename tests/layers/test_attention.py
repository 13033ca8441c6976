"""The attention mixer against an independent numpy implementation, decoding, Linen, registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

from attnzoo import layers
from attnzoo.layers import Attention, KVCache
from tests.layers.numpy_layers import numpy_attention_layer


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _randomize(module, seed=0, scale=0.3):
    """Random parameters everywhere (biases and norm scales included) so every path is exercised."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            shape = variable[...].shape
            value = rng.normal(size=shape) * scale
            if path[-1] == "scale":  # norm scales around one
                value = value + 1.0
            variable[...] = jnp.asarray(value, variable[...].dtype)
    return module


@nnx.jit
def _apply(module, x, segment_ids=None, positions=None):
    """The module's forward under jit (eager dispatch of the blockwise op is slow on CPU)."""
    return module(x, segment_ids=segment_ids, positions=positions)


CONFIGS = {
    "mha": dict(num_heads=4),
    "gqa_window_qknorm": dict(num_heads=4, num_kv_heads=2, window=(3, 0), qk_norm=True, qkv_bias=True, out_bias=True),
    "mqa_softcap": dict(num_heads=4, num_kv_heads=1, softcap=2.0, rope_theta=500.0),
    "bidirectional_window": dict(num_heads=2, causal=False, window=(2, 3), use_rope=False),
    "head_dim_and_scale": dict(num_heads=3, head_dim=10, scale=0.2),
    "wide_values_no_output_projection": dict(num_heads=4, num_kv_heads=2, v_head_dim=10, output_projection=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attention_matches_numpy(name):
    module = _randomize(Attention(24, rngs=nnx.Rngs(0), impl="xla", **CONFIGS[name]))
    x = np.random.default_rng(1).normal(size=(2, 11, 24)).astype(np.float32)
    out = _apply(module, jnp.asarray(x))
    width = 24 if module.o_proj is not None else module.num_heads * module.v_head_dim
    assert out.shape == (2, 11, width) and out.dtype == jnp.float32
    assert _rel_err(out, numpy_attention_layer(module, x)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_attention_segments_and_positions_match_numpy(impl):
    module = _randomize(Attention(16, 4, num_kv_heads=2, qk_norm=True, impl=impl, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(2).normal(size=(2, 9, 16)).astype(np.float32)
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 5, 5]])
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    out = _apply(module, jnp.asarray(x), jnp.asarray(segment_ids), jnp.asarray(positions))
    ref = numpy_attention_layer(module, x, segment_ids=segment_ids, positions=positions)
    assert _rel_err(out, ref) < 1e-5
    # A packed document equals the same document run alone.
    alone = _apply(module, jnp.asarray(x[:1, 4:]))
    np.testing.assert_allclose(out[:1, 4:], alone, rtol=1e-5, atol=1e-5)


def test_attention_gradients_reach_every_parameter():
    module = _randomize(
        Attention(16, 4, num_kv_heads=2, qk_norm=True, qkv_bias=True, out_bias=True, window=(4, 0), rngs=nnx.Rngs(0))
    )
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 16)), jnp.float32)

    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    grads, x_grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(module, x)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 10  # q/k/v/o kernels and biases, two norm scales
    for path, leaf in leaves:
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), jax.tree_util.keystr(path)
    assert np.all(np.isfinite(x_grad)) and np.any(x_grad != 0)


def test_attention_bfloat16_compute():
    module = _randomize(Attention(16, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 6, 16)), jnp.float32)
    out = _apply(module, x)
    assert out.dtype == jnp.bfloat16 and module.q_proj.kernel[...].dtype == jnp.float32
    assert _rel_err(out, numpy_attention_layer(module, x)) < 3e-2


def test_attention_parameter_logical_axes():
    module = Attention(16, 4, num_kv_heads=2, qk_norm=True, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    flat = {jax.tree_util.keystr(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda s: isinstance(s, jax.P))}
    expected = {
        "q_proj": ("embed", "heads", "head_dim"),
        "k_proj": ("embed", "kv_heads", "head_dim"),
        "v_proj": ("embed", "kv_heads", "head_dim"),
        "o_proj": ("heads", "head_dim", "embed"),
        "q_norm": ("norm",),
    }
    for key, axes in expected.items():
        matches = [spec for path, spec in flat.items() if key in path]
        assert matches and tuple(matches[0]) == axes, (key, flat)


# ---------------------------------------------------------------------------------------------
# FLOP count
# ---------------------------------------------------------------------------------------------


def _dense_visible(causal, window, q_len, kv_len):
    """Brute-force ``[T, S]`` mask: query i sits at kv position i + S - T (bottom-right aligned)."""
    visible = np.zeros((q_len, kv_len), bool)
    for i in range(q_len):
        centre = i + kv_len - q_len
        for j in range(kv_len):
            ok = not (causal and j > centre)
            if window is not None:
                left, right = window
                ok &= left is None or j >= centre - left
                ok &= right is None or j <= centre + right
            visible[i, j] = ok
    return visible


def _dot_flops(jaxpr):
    """2 x multiply-adds of every dot_general in ``jaxpr`` and its sub-jaxprs (no loops here)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))
        assert eqn.primitive.name not in ("scan", "while"), "loops: extend the counter"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _dot_flops(sub)
    return total


def _traced_dot_flops(module, x):
    graphdef, state = nnx.split(module)
    return _dot_flops(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, (3, 0), (2, 1), (None, 2), (0, 0), (20, 20)])
def test_attention_flops_counts_visible_pairs(causal, window):
    from attnzoo.pallas_kernels.attention.masks import build_mask

    module = Attention(24, 4, num_kv_heads=2, head_dim=5, causal=causal, window=window, use_rope=False, rngs=nnx.Rngs(0))
    for q_len, kv_len in [(1, 1), (7, 7), (4, 11), (9, 9), (5, 3), (1, 6)]:
        visible = _dense_visible(causal, window, q_len, kv_len)
        # The op aligns queries the same way.
        op_mask = build_mask(causal=causal, window=window, mask=None, q_len=q_len, kv_len=kv_len)
        q_idx, kv_idx = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
        np.testing.assert_array_equal(np.broadcast_to(np.asarray(op_mask(q_idx, kv_idx)), visible.shape), visible)
        assert module.visible_pairs(q_len, kv_len) == int(visible.sum())
        projections = 2 * q_len * 24 * 5 * (2 * 4 + 2 * 2)
        assert module.flops(q_len, kv_len) == projections + 4 * int(visible.sum()) * 4 * 5
        if kv_len == q_len:
            assert module.flops(q_len) == module.flops(q_len, q_len)


def test_attention_flops_equal_traced_matmuls():
    # Bidirectional reference attention materialises every score: the traced matmul count is
    # exactly the analytic one. A causal layer counts T (T + 1) / 2 of the T^2 pairs.
    x = jnp.ones((3, 10, 24), jnp.float32)
    full = Attention(24, 4, num_kv_heads=2, causal=False, impl="reference", rngs=nnx.Rngs(0))
    assert _traced_dot_flops(full, x) == 3 * full.flops(10)
    causal = Attention(24, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    assert full.flops(10) - causal.flops(10) == 4 * (100 - 55) * 4 * 6
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        causal.flops(0)
    with pytest.raises(ValueError, match="kv_len must be an int >= 1"):
        causal.flops(3, kv_len=-1)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@nnx.jit
def _cached_call(module, x, cache, valid_lengths=None):
    return module(x, cache=cache, valid_lengths=valid_lengths)


@pytest.mark.parametrize(
    "options",
    [dict(num_kv_heads=2, qk_norm=True, window=(3, 0), softcap=3.0), dict(num_kv_heads=1),
     dict(num_kv_heads=2, v_head_dim=6, output_projection=False)],
    ids=["gqa_window_softcap", "mqa", "wide_values_no_output_projection"],
)
def test_prefill_then_decode_equals_full_forward(options):
    module = _randomize(Attention(16, 4, impl="xla", rngs=nnx.Rngs(0), **options))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 10, 16)), jnp.float32)
    full = _apply(module, x)
    cache = module.init_cache(2, 12)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 12, options["num_kv_heads"], 4)
    assert cache.v.shape == (2, 12, options["num_kv_heads"], options.get("v_head_dim", 4))
    # Prefill 4 tokens, a second chunk of 3 (T > 1 at a non-zero position), then 3 single steps.
    outputs = []
    y, cache = _cached_call(module, x[:, :4], cache)
    outputs.append(y)
    y, cache = _cached_call(module, x[:, 4:7], cache)
    outputs.append(y)
    for t in range(7, 10):
        y, cache = _cached_call(module, x[:, t : t + 1], cache)
        outputs.append(y)
    np.testing.assert_array_equal(cache.lengths, [10, 10])
    np.testing.assert_allclose(np.concatenate(outputs, 1), full, rtol=2e-5, atol=2e-5)


def test_prefill_with_per_row_lengths_then_decode():
    module = _randomize(Attention(16, 4, num_kv_heads=2, qk_norm=True, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    prompt_lengths = np.array([5, 2])
    # Right-padded prompts: row 1's padding is junk that must not influence anything.
    prompt = np.array(tokens[:, :5])
    prompt[1, 2:] = rng.normal(size=(3, 16)) * 100
    cache = module.init_cache(2, 16)
    y_prompt, cache = _cached_call(module, jnp.asarray(prompt), cache, jnp.asarray(prompt_lengths))
    np.testing.assert_array_equal(cache.lengths, prompt_lengths)
    decoded = [[], []]
    for step in range(4):
        x_t = jnp.stack([tokens[0, 5 + step], tokens[1, 2 + step]])[:, None]
        y_t, cache = _cached_call(module, x_t, cache)
        decoded[0].append(y_t[0, 0])
        decoded[1].append(y_t[1, 0])
    np.testing.assert_array_equal(cache.lengths, prompt_lengths + 4)
    full = _apply(module, tokens)
    np.testing.assert_allclose(y_prompt[0], full[0, :5], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y_prompt[1, :2], full[1, :2], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.stack(decoded[0]), full[0, 5:9], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.stack(decoded[1]), full[1, 2:6], rtol=2e-5, atol=2e-5)


def test_cache_overflow_and_misuse():
    module = Attention(16, 4, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 16))
    cache = module.init_cache(1, 4)
    with pytest.raises(ValueError, match="max_len"):
        module(x, cache=_cached_call(module, x, cache)[1])
    _, cache = _cached_call(module, x, cache)
    y, _ = _cached_call(module, x, cache)  # under jit the overflow cannot raise: NaN, never silent
    assert np.all(np.isnan(y))
    with pytest.raises(ValueError, match="segment_ids"):
        module(x, cache=module.init_cache(1, 4), segment_ids=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="causal"):
        Attention(16, 4, causal=False, rngs=nnx.Rngs(0)).init_cache(1, 4)


# ---------------------------------------------------------------------------------------------
# Arguments, registry, Linen
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(dim=30, num_heads=4), "num_heads"),
        (dict(dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(dim=32, num_heads=0), "num_heads"),
        (dict(dim=32, num_heads=4, window=(2,)), "window"),
        (dict(dim=32, num_heads=4, window=(-1, 0)), "window"),
        (dict(dim=32, num_heads=4, impl="cuda"), "impl"),
        (dict(dim=32, num_heads=4, softcap=-1.0), "softcap"),
        (dict(dim=32, num_heads=4, head_dim=7), "rotary_dim"),
    ],
)
def test_attention_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Attention(rngs=nnx.Rngs(0), **kwargs)


def test_attention_rejects_bad_inputs():
    module = Attention(16, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B,T,D\]"):
        module(jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match="segment_ids"):
        module(jnp.ones((2, 5, 16)), segment_ids=jnp.zeros((2, 4), jnp.int32))


def test_registry():
    assert "attention" in layers.list_mixers()
    assert layers.list_mixers("attention") == ["attention"]
    assert layers.list_mixers("att*") == ["attention", "attention_lepe"]  # fnmatch patterns
    assert layers.list_mixers("no_such_*") == []
    assert layers.list_mixers() == sorted(layers.list_mixers())
    module = layers.create_mixer("attention", dim=16, num_heads=4, rngs=nnx.Rngs(0), num_kv_heads=2)
    assert isinstance(module, Attention) and module.num_kv_heads == 2
    with pytest.raises(ValueError, match=r"unknown mixer 'atention'.*attention"):
        layers.create_mixer("atention", dim=16, num_heads=4, rngs=nnx.Rngs(0))


def test_register_mixer_rejects_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        layers.register_mixer("attention")(type("Other", (nnx.Module,), {}))


def test_usable_from_linen_through_to_linen():
    options = dict(dim=16, num_heads=4, num_kv_heads=2, qk_norm=True)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + bridge.ToLinen(Attention, kwargs=options, name="mixer")(x)

    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, 16)), jnp.float32)
    variables = jax.jit(Block().init)(jax.random.key(0), x)
    apply = jax.jit(Block().apply)
    y = apply(variables, x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    np.testing.assert_array_equal(apply(variables, x), y)
    # The same parameters in the NNX module give the same output.
    params = nn.unbox(variables["params"]["mixer"])
    module = Attention(rngs=nnx.Rngs(1), **options)
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            value = params
            for key in path:
                value = value[key]
            variable[...] = value
    np.testing.assert_allclose(y, x + _apply(module, x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pallas kernels (interpret mode on CPU)
# ---------------------------------------------------------------------------------------------


def test_attention_pallas_matches_numpy_gradients_and_decoding():
    options = dict(num_kv_heads=2, qk_norm=True, window=(4, 0), softcap=4.0)
    module = _randomize(Attention(16, 4, impl="pallas", rngs=nnx.Rngs(0), **options))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 9, 16)), jnp.float32)
    segment_ids = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 1, 1], [2] * 9], jnp.int32)
    out = _apply(module, x, segment_ids)
    assert _rel_err(out, numpy_attention_layer(module, x, segment_ids=np.asarray(segment_ids))) < 1e-5

    xla_module = _randomize(Attention(16, 4, impl="xla", rngs=nnx.Rngs(0), **options))
    loss_grad = nnx.jit(nnx.grad(lambda m, x: jnp.mean(m(x) ** 2)))
    grads, xla_grads = nnx.state(loss_grad(module, x)), nnx.state(loss_grad(xla_module, x))
    for (path, leaf), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(xla_grads)):
        assert _rel_err(leaf, ref) < 1e-4, jax.tree_util.keystr(path)

    full = _apply(module, x)
    cache = module.init_cache(2, 9)
    y_prefill, cache = _cached_call(module, x[:, :6], cache)
    steps = []
    for t in range(6, 9):
        y_t, cache = _cached_call(module, x[:, t : t + 1], cache)
        steps.append(y_t)
    np.testing.assert_allclose(np.concatenate([y_prefill, *steps], 1), full, rtol=2e-5, atol=2e-5)
