"""Norms, Dense, MLP, RoPE and the short convolution against independent numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _randomize(module, seed=0):
    """Replaces every parameter with random normal values (so ones/zeros inits test nothing away)."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            variable[...] = jnp.asarray(rng.normal(size=variable[...].shape), variable[...].dtype)
    return module


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


def test_rmsnorm_matches_numpy():
    norm = _randomize(layers.RMSNorm(24, epsilon=1e-5, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(1).normal(size=(3, 5, 24)).astype(np.float32) * 3
    scale = np.asarray(norm.scale[...], np.float64)
    xd = x.astype(np.float64)
    ref = xd / np.sqrt(np.mean(xd**2, axis=-1, keepdims=True) + 1e-5) * scale
    out = norm(jnp.asarray(x))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-6


def test_layernorm_matches_numpy():
    norm = _randomize(layers.LayerNorm(24, epsilon=1e-5, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(2).normal(size=(4, 24)).astype(np.float32) + 5.0
    xd = x.astype(np.float64)
    mean = xd.mean(-1, keepdims=True)
    var = ((xd - mean) ** 2).mean(-1, keepdims=True)
    ref = (xd - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
    assert _rel_err(norm(jnp.asarray(x)), ref) < 1e-6


def test_norm_dtypes_and_float32_statistics():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64)) * 100, jnp.bfloat16)
    norm = layers.RMSNorm(64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = norm(x)
    assert out.dtype == jnp.bfloat16 and norm.scale[...].dtype == jnp.bfloat16
    xd = np.asarray(x, np.float64)
    ref = xd / np.sqrt(np.mean(xd**2, -1, keepdims=True) + 1e-6)
    assert _rel_err(out, ref) < 1e-2
    # float32 parameters with bfloat16 input and no dtype: promoted to float32.
    assert layers.LayerNorm(64, rngs=nnx.Rngs(0))(x).dtype == jnp.float32


def test_norm_rejects_wrong_features():
    with pytest.raises(ValueError, match="num_features"):
        layers.RMSNorm(0)
    with pytest.raises(ValueError, match="last axis 8"):
        layers.RMSNorm(8)(jnp.ones((2, 7)))


# ---------------------------------------------------------------------------------------------
# Dense and MLP
# ---------------------------------------------------------------------------------------------


def test_dense_multi_axis_matches_numpy():
    dense = _randomize(
        layers.Dense(6, (2, 3), logical_axes=("embed", "heads", "head_dim"), use_bias=True, rngs=nnx.Rngs(0))
    )
    x = np.random.default_rng(4).normal(size=(2, 5, 6)).astype(np.float32)
    ref = np.einsum("btd,dhk->bthk", x, np.asarray(dense.kernel[...])) + np.asarray(dense.bias[...])
    out = dense(jnp.asarray(x))
    assert out.shape == (2, 5, 2, 3)
    assert _rel_err(out, ref) < 1e-6
    assert nnx.get_partition_spec(nnx.state(dense))["kernel"].get_value() == jax.P("embed", "heads", "head_dim")


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlp_matches_numpy_and_has_gradients(kind):
    mlp = layers.MLP(16, 40, kind=kind, use_bias=kind == "gelu", rngs=nnx.Rngs(0))
    _randomize(mlp)
    x = np.random.default_rng(5).normal(size=(2, 3, 16)).astype(np.float32)
    up = x @ np.asarray(mlp.up.kernel[...])
    if kind == "swiglu":
        gate = x @ np.asarray(mlp.gate.kernel[...])
        hidden = gate / (1 + np.exp(-gate)) * up
        ref = hidden @ np.asarray(mlp.down.kernel[...])
    else:
        from math import erf

        up = up + np.asarray(mlp.up.bias[...])
        hidden = 0.5 * up * (1 + np.vectorize(erf)(up / np.sqrt(2)))
        ref = hidden @ np.asarray(mlp.down.kernel[...]) + np.asarray(mlp.down.bias[...])
    out = mlp(jnp.asarray(x))
    assert out.shape == (2, 3, 16)
    assert _rel_err(out, ref) < 1e-5

    def loss(model):
        return jnp.sum(model(jnp.asarray(x)) ** 2)

    grads = nnx.grad(loss)(mlp)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), path


def test_mlp_default_hidden_and_bad_kind():
    assert layers.MLP(96, kind="swiglu", rngs=nnx.Rngs(0)).hidden_dim == 256
    assert layers.MLP(96, kind="gelu", rngs=nnx.Rngs(0)).hidden_dim == 384
    with pytest.raises(ValueError, match="kind"):
        layers.MLP(8, kind="relu", rngs=nnx.Rngs(0))


def test_mlp_bfloat16_compute():
    mlp = layers.MLP(16, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 16), jnp.float32)
    out = mlp(x)
    assert out.dtype == jnp.bfloat16 and mlp.up.kernel[...].dtype == jnp.float32
    ref = layers.MLP(16, 32, rngs=nnx.Rngs(0))(x)
    assert _rel_err(out, ref) < 2e-2


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


def _numpy_rope(x, positions, theta, rotary_dim=None):
    """Rotate-half RoPE written pair by pair: feature i pairs with i + rotary_dim / 2."""
    x = np.asarray(x, np.float64)
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    out = x.copy()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                angle = positions[b, t] / theta ** (2 * i / rotary_dim)
                c, s = np.cos(angle), np.sin(angle)
                a, bb = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i] = a * c - bb * s
                out[b, t, :, i + half] = bb * c + a * s
    return out


@pytest.mark.parametrize("theta,rotary_dim", [(10000.0, None), (500.0, 4)])
def test_rope_matches_numpy(theta, rotary_dim):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    positions = np.stack([np.arange(7), np.array([0, 1, 2, 0, 1, 2, 3])])  # row 1: packed, restarts
    out = layers.apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=theta, rotary_dim=rotary_dim)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert _rel_err(out, _numpy_rope(x, positions, theta, rotary_dim)) < 1e-6
    module = layers.RotaryEmbedding(8, theta=theta, rotary_dim=rotary_dim)
    np.testing.assert_array_equal(module(jnp.asarray(x), jnp.asarray(positions)), out)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = layers.apply_rope(q, jnp.array([[pq]]))
        rk = layers.apply_rope(k, jnp.array([[pk]]))
        return float(jnp.sum(rq * rk))

    for delta in (0, 3, 17):
        scores = [score(p + delta, p) for p in (0, 5, 100, 1234)]
        np.testing.assert_allclose(scores, scores[0], rtol=2e-4, atol=2e-4)
    assert abs(score(3, 0) - score(0, 3)) > 1e-4  # not symmetric: direction matters


def test_rope_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rotary_dim"):
        layers.apply_rope(jnp.ones((1, 2, 1, 6)), jnp.arange(2), rotary_dim=3)
    with pytest.raises(ValueError, match="positions"):
        layers.apply_rope(jnp.ones((1, 2, 1, 6)), jnp.arange(3))


# ---------------------------------------------------------------------------------------------
# Short convolution
# ---------------------------------------------------------------------------------------------


def _numpy_short_conv(x, weight, bias, segment_ids, silu):
    """Loop implementation: y[t] = sum_k w[k] x[t-(K-1)+k] over taps inside t's segment."""
    batch, length, channels = x.shape
    kernel = weight.shape[0]
    y = np.zeros((batch, length, channels))
    for b in range(batch):
        for t in range(length):
            for k in range(kernel):
                src = t - (kernel - 1) + k
                if src < 0:
                    continue
                if segment_ids is not None and np.any(segment_ids[b, src : t + 1] != segment_ids[b, t]):
                    continue
                y[b, t] += weight[k] * x[b, src]
    if bias is not None:
        y = y + bias
    return y / (1 + np.exp(-y)) if silu else y


@pytest.mark.parametrize("kernel_size,activation,use_bias", [(4, "silu", False), (3, None, True), (1, "silu", True)])
def test_short_conv_matches_numpy_loop(kernel_size, activation, use_bias):
    conv = layers.ShortConvolution(6, kernel_size, activation=activation, use_bias=use_bias, rngs=nnx.Rngs(0))
    _randomize(conv)
    x = np.random.default_rng(8).normal(size=(2, 9, 6)).astype(np.float32)
    weight = np.asarray(conv.weight[...], np.float64)
    bias = None if conv.bias is None else np.asarray(conv.bias[...], np.float64)
    ref = _numpy_short_conv(x.astype(np.float64), weight, bias, None, activation == "silu")
    assert _rel_err(conv(jnp.asarray(x)), ref) < 1e-6


def test_short_conv_segment_reset():
    conv = _randomize(layers.ShortConvolution(5, 4, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 10, 5)).astype(np.float32)
    segment_ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [3, 3, 3, 3, 3, 3, 7, 7, 7, 7]])
    weight = np.asarray(conv.weight[...], np.float64)
    ref = _numpy_short_conv(x.astype(np.float64), weight, None, segment_ids, True)
    out = conv(jnp.asarray(x), segment_ids=jnp.asarray(segment_ids))
    assert _rel_err(out, ref) < 1e-6
    # Each document equals the convolution of that document alone.
    alone = conv(jnp.asarray(x[:1, 5:]))
    np.testing.assert_allclose(out[:1, 5:], alone, rtol=1e-6, atol=1e-6)


def test_short_conv_step_matches_full_forward():
    conv = _randomize(layers.ShortConvolution(4, 4, use_bias=True, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(10).normal(size=(3, 8, 4)), jnp.float32)
    full = conv(x)
    state = conv.init_state(3)
    assert state.shape == (3, 3, 4)
    step = jax.jit(conv.step)
    outputs = []
    for t in range(8):
        y_t, state = step(x[:, t], state)
        outputs.append(y_t)
    np.testing.assert_allclose(np.stack(outputs, 1), full, rtol=1e-5, atol=1e-6)
    # Prefill 5 tokens with return_state, then step the rest.
    y_pre, state = conv(x[:, :5], return_state=True)
    rest = []
    for t in range(5, 8):
        y_t, state = conv.step(x[:, t], state)
        rest.append(y_t)
    np.testing.assert_allclose(np.concatenate([y_pre, np.stack(rest, 1)], 1), full, rtol=1e-5, atol=1e-6)
    # Chunked forward from a state equals the full forward.
    y_a, state_a = conv(x[:, :3], return_state=True)
    y_b = conv(x[:, 3:], state=state_a)
    np.testing.assert_allclose(np.concatenate([y_a, y_b], 1), full, rtol=1e-5, atol=1e-6)


def test_short_conv_state_after_per_row_lengths():
    conv = _randomize(layers.ShortConvolution(3, 4, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 6, 3)), jnp.float32)
    lengths = jnp.array([6, 2])
    _, state = conv(x, return_state=True, lengths=lengths)
    np.testing.assert_array_equal(state[0], x[0, 3:])
    np.testing.assert_array_equal(state[1], np.concatenate([np.zeros((1, 3)), x[1, :2]]))
    # Decoding row 1 from its state equals the full forward over its first 3 tokens.
    y_t, _ = conv.step(x[:, 2], state)
    np.testing.assert_allclose(y_t[1], conv(x[1:, :3])[0, 2], rtol=1e-6, atol=1e-6)


def test_short_conv_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        layers.ShortConvolution(4, 0, rngs=nnx.Rngs(0))
    conv = layers.ShortConvolution(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="state"):
        conv(jnp.ones((2, 3, 4)), state=jnp.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="segment_ids"):
        conv(jnp.ones((2, 3, 4)), segment_ids=jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 3e-7), (jnp.bfloat16, 8e-3)])
def test_gelu_matches_the_exact_formula_and_its_derivative(dtype, tolerance):
    """layers.common.gelu against x Phi(x) in float64 (math.erf), values and gradient, tails included."""
    import math

    from attnzoo.layers.common import gelu

    x = np.concatenate([np.linspace(-12.0, 12.0, 4001), np.random.default_rng(0).normal(size=999) * 3])
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)  # representable in dtype
    phi = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    expected = x * phi
    expected_grad = phi + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    got = np.asarray(gelu(jnp.asarray(x, dtype)).astype(jnp.float32), np.float64)
    grad = np.asarray(jax.vmap(jax.grad(lambda v: gelu(v)))(jnp.asarray(x, jnp.float32)), np.float64)
    assert gelu(jnp.asarray(x, dtype)).dtype == dtype
    # erf's cancellation in 1 + erf(x) for x < -3 leaves an absolute error below 1e-6 where the
    # value itself is below 4e-3 (as torch's erf formula has); elsewhere a few units in the last place.
    core = x >= -3.0
    assert np.max(np.abs(got - expected)[core] / np.maximum(np.abs(expected[core]), 1.0)) < tolerance
    assert np.max(np.abs(got - expected)[~core]) < max(tolerance, 1e-6)
    assert np.max(np.abs(grad - expected_grad) / np.maximum(np.abs(expected_grad), 1.0)) < 1e-6
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x, jnp.float32), approximate=True)),
                               np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=True)))


def test_gelu_is_exact_in_float64():
    import math

    from attnzoo.layers.common import gelu
    from attnzoo.pallas_kernels.testing import float64

    x = np.random.default_rng(1).normal(size=257) * 2
    expected = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    with float64():
        got = gelu(jnp.asarray(x, jnp.float64))
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-14, atol=1e-15)


def test_matmul_has_jnp_dots_derivatives_in_every_mode():
    """layers.common.matmul against jnp.dot in float64: value, VJP, JVP and a second derivative."""
    from attnzoo.layers.common import matmul
    from attnzoo.pallas_kernels.testing import float64

    rng = np.random.default_rng(5)
    with float64():
        x, w = jnp.asarray(rng.normal(size=(7, 5))), jnp.asarray(rng.normal(size=(5, 3)))
        dx, dw, dy = (jnp.asarray(rng.normal(size=s)) for s in ((7, 5), (5, 3), (7, 3)))
        ours = lambda x, w: matmul(x, w, jnp.float64)  # noqa: E731
        ref = lambda x, w: jnp.dot(x, w)  # noqa: E731
        np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-14)
        for got, want in zip(jax.vjp(ours, x, w)[1](dy), jax.vjp(ref, x, w)[1](dy)):
            np.testing.assert_allclose(got, want, rtol=1e-13)
        np.testing.assert_allclose(jax.jvp(ours, (x, w), (dx, dw))[1], jax.jvp(ref, (x, w), (dx, dw))[1], rtol=1e-13)
        second = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x, w)) ** 2))  # noqa: E731
        np.testing.assert_allclose(jax.jvp(second(ours), (x,), (dx,))[1], jax.jvp(second(ref), (x,), (dx,))[1], rtol=1e-12)
        np.testing.assert_allclose(jax.grad(lambda x: ours(x, w).sum())(x), jax.grad(lambda x: ref(x, w).sum())(x), rtol=1e-14)


def test_matmul_backward_reads_a_transposed_weight():
    """The reason matmul exists: no dot in its backward contracts the weight's minor axis."""
    from attnzoo.layers.common import matmul

    x, w, dy = jnp.ones((16, 8)), jnp.ones((8, 4)), jnp.ones((16, 4))

    def backward_text(f):
        return jax.jit(lambda x, w: jax.vjp(f, x, w)[1](dy)).lower(x, w).compile().as_text()

    plain = backward_text(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    ours = backward_text(lambda x, w: matmul(x, w, jnp.float32))
    assert "rhs_contracting_dims={1}" in plain  # the check can fail
    assert "rhs_contracting_dims={1}" not in ours
