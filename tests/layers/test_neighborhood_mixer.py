"""NAT / DiNAT neighbourhood attention mixer against an independent float64 numpy implementation of
NATTEN's (<= 0.15) ``NeighborhoodAttention2D`` module, written from its C++ window and bias-index
formulas in absolute coordinates (``get_window_start`` / ``get_pb_start``), query by query; torch
checkpoint layout, padding of small maps, gradients of every parameter, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.layers.neighborhood import NeighborhoodAttention2D
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.zoo.helpers import build, fast_jit

# ---------------------------------------------------------------------------------------------
# Independent float64 reference (odd kernels, stride 1, not causal: the NAT / DiNAT module)
# ---------------------------------------------------------------------------------------------


def legacy_window_start(index, length, kernel, dilation):
    """First key of query ``index``; keys are ``start + t * dilation``, t < kernel."""
    half = kernel // 2
    if dilation == 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        rem = index % dilation
        whole = (length // dilation) * dilation
        extra = length - whole
        if rem < extra:
            return length - extra + rem - 2 * half * dilation
        return whole + rem - kernel * dilation
    return index - half * dilation


def legacy_bias_start(index, length, kernel, dilation):
    """Bias-table row of the first key of query ``index``."""
    half = kernel // 2
    if dilation == 1:
        return half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    if index - half * dilation < 0:
        return kernel - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def numpy_nat_module(weights, x, *, num_heads, kernel, dilation, scale):
    """NATTEN's module on torch-layout weights: pad to kernel * dilation, qkv, NA + rpb, crop, proj."""
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape
    head_dim = channels // num_heads
    hp, wp = max(height, kernel * dilation), max(width, kernel * dilation)
    padded = np.zeros((batch, hp, wp, channels))
    padded[:, :height, :width] = x
    qkv = padded @ weights["qkv.weight"].T + weights["qkv.bias"]
    qkv = qkv.reshape(batch, hp, wp, 3, num_heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    rpb = weights.get("rpb")
    out = np.zeros((batch, hp, wp, num_heads, head_dim))
    for i in range(hp):
        ni = legacy_window_start(i, hp, kernel, dilation)
        pi = legacy_bias_start(i, hp, kernel, dilation)
        for j in range(wp):
            nj = legacy_window_start(j, wp, kernel, dilation)
            pj = legacy_bias_start(j, wp, kernel, dilation)
            rows = ni + dilation * np.arange(kernel)
            cols = nj + dilation * np.arange(kernel)
            keys = k[:, rows][:, :, cols]  # [B, k, k, Hd, Dh]
            values = v[:, rows][:, :, cols]
            logits = np.einsum("bhd,bxyhd->bhxy", q[:, i, j], keys) * scale
            if rpb is not None:
                logits = logits + rpb[:, pi : pi + kernel, pj : pj + kernel][None]
            logits = logits.reshape(batch, num_heads, -1)
            weights_ = np.exp(logits - logits.max(-1, keepdims=True))
            weights_ /= weights_.sum(-1, keepdims=True)
            out[:, i, j] = np.einsum("bhn,bnhd->bhd", weights_, values.reshape(batch, -1, num_heads, head_dim))
    out = out[:, :height, :width].reshape(batch, height, width, channels)
    return out @ weights["proj.weight"].T + weights["proj.bias"]


def torch_layout_weights(seed, dim, num_heads, kernel, rel_pos_bias=True):
    rng = np.random.default_rng(seed)
    weights = {
        "qkv.weight": rng.normal(size=(3 * dim, dim)) * dim**-0.5,
        "qkv.bias": rng.normal(size=(3 * dim,)) * 0.3,
        "proj.weight": rng.normal(size=(dim, dim)) * dim**-0.5,
        "proj.bias": rng.normal(size=(dim,)) * 0.3,
    }
    if rel_pos_bias:
        weights["rpb"] = rng.normal(size=(num_heads, 2 * kernel - 1, 2 * kernel - 1))
    return weights


def load(m: NeighborhoodAttention2D, weights, dtype):
    """The documented checkpoint mapping (reshapes only)."""
    c, hd, dh = m.dim, m.num_heads, m.head_dim
    m.qkv.kernel.set_value(jnp.asarray(weights["qkv.weight"].T.reshape(c, 3, hd, dh), dtype))
    m.qkv.bias.set_value(jnp.asarray(weights["qkv.bias"].reshape(3, hd, dh), dtype))
    m.proj.kernel.set_value(jnp.asarray(weights["proj.weight"].T.reshape(hd, dh, c), dtype))
    m.proj.bias.set_value(jnp.asarray(weights["proj.bias"], dtype))
    if "rpb" in weights:
        m.rpb.set_value(jnp.asarray(weights["rpb"], dtype))
    return m


def make(seed=0, param_dtype=jnp.float32, **options):
    options = {"dim": 12, "num_heads": 3, **options}
    return build(
        lambda: layers.create_mixer("neighborhood_attention", rngs=nnx.Rngs(seed), param_dtype=param_dtype, **options),
        seed=seed, scale=0.5,
    )


apply = fast_jit(lambda module, x: module(x))

# (height, width, options): NAT, DiNAT (both axes dilated, odd sizes not multiples of the
# dilation), a map smaller than kernel * dilation (padded), no bias through the Pallas path.
CASES = [
    (9, 11, dict(kernel_size=3)),
    (11, 13, dict(kernel_size=3, dilation=3)),
    (5, 7, dict(kernel_size=3, dilation=2)),  # height padded to 6
    (4, 3, dict(kernel_size=5)),  # both axes padded
    (7, 6, dict(kernel_size=3, dilation=2, rel_pos_bias=False, impl="pallas")),
]


@pytest.mark.parametrize("height, width, options", CASES)
def test_matches_numpy_natten_module(height, width, options):
    kernel, dilation = options["kernel_size"], options.get("dilation", 1)
    weights = torch_layout_weights(height * width, 12, 3, kernel, options.get("rel_pos_bias", True))
    reference_options = dict(num_heads=3, kernel=kernel, dilation=dilation, scale=4**-0.5)
    x = np.random.default_rng(0).normal(size=(2, height, width, 12))
    m = load(make(**options), weights, jnp.float32)
    y = apply(m, jnp.asarray(x, jnp.float32))
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert_close(y, numpy_nat_module(weights, x, **reference_options), f"{options}", dtype=jnp.float32)
    if options.get("impl") == "pallas":
        return
    with float64():
        m64 = load(make(param_dtype=jnp.float64, **options), weights, jnp.float64)
        y64 = apply(m64, jnp.asarray(x))
        assert_close(y64, numpy_nat_module(weights, x, **reference_options), f"{options} float64", dtype=jnp.float64)


def test_reference_detects_wrong_bias_or_dilation():
    """The comparison can fail: a mis-indexed bias or a different dilation changes the result."""
    weights = torch_layout_weights(1, 12, 3, 3)
    x = np.random.default_rng(1).normal(size=(1, 9, 11, 12))
    y = apply(load(make(kernel_size=3, dilation=2), weights, jnp.float32), jnp.asarray(x, jnp.float32))
    options = dict(num_heads=3, kernel=3, scale=0.5)
    assert rel_rms(y, numpy_nat_module(weights, x, dilation=1, **options)) > 0.05
    flipped = dict(weights, rpb=weights["rpb"][:, ::-1, ::-1])
    assert rel_rms(y, numpy_nat_module(flipped, x, dilation=2, **options)) > 0.05


def test_gradients_reach_every_parameter_and_match_the_reference_impl():
    m = make(seed=2, kernel_size=3, dilation=2)
    m_ref = make(seed=2, kernel_size=3, dilation=2, impl="reference")
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 7, 8, 12))

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    grad_fn = fast_jit(lambda model, x: nnx.grad(loss, argnums=(0, 1))(model, x))
    grads, x_grad = grad_fn(m, x)
    ref_grads, ref_x_grad = grad_fn(m_ref, x)
    assert_close(x_grad, ref_x_grad, "dx", dtype=jnp.float32)
    names = set()
    for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
        ref = nnx.to_flat_state(nnx.state(ref_grads, nnx.Param))
        value = np.asarray(g.get_value())
        assert np.all(np.isfinite(value)) and np.any(value != 0), path
        assert_close(value, dict(ref)[path].get_value(), str(path), dtype=jnp.float32)
        names.add("/".join(map(str, path)))
    assert names == {"qkv/kernel", "qkv/bias", "proj/kernel", "proj/bias", "rpb"}


def test_registry_parameters_and_logical_axes():
    m = layers.create_mixer("neighborhood_attention", dim=16, num_heads=2, kernel_size=(3, 5), rngs=nnx.Rngs(0))
    assert isinstance(m, NeighborhoodAttention2D) and m.spatial_ndim == 2
    assert m.qkv.kernel.shape == (16, 3, 2, 8) and m.proj.kernel.shape == (2, 8, 16)
    assert m.rpb.shape == (2, 5, 9)
    assert 0.01 < float(jnp.std(m.rpb[...])) < 0.03
    assert m.qkv.kernel.get_metadata()["out_sharding"] == ("embed", None, "heads", "head_dim")
    assert m.proj.kernel.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
    assert m.rpb.get_metadata()["out_sharding"] == ("heads", None, None)
    no_bias = make(dim=16, num_heads=2, rel_pos_bias=False, qkv_bias=False)
    assert no_bias.rpb is None and no_bias.qkv.bias is None
    assert no_bias.padded_size(3, 20) == (7, 20)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(dim=10, num_heads=3), ValueError, "num_heads"),
        (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(dilation=(1, 0)), ValueError, r"dilation\[1\]"),
        (dict(kernel_size=3, stride=4), ValueError, "stride"),
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(impl="cuda"), ValueError, "impl"),
        (dict(impl="pallas"), ValueError, "rel_pos_bias=False"),
        (dict(qk_scale=-1.0), ValueError, "qk_scale"),
    ],
)
def test_constructor_errors(options, error, match):
    options = {"dim": 12, "num_heads": 3, **options}
    with pytest.raises(error, match=match):
        NeighborhoodAttention2D(rngs=nnx.Rngs(0), **options)


def test_call_errors():
    m = make(kernel_size=3)
    with pytest.raises(ValueError, match=r"\[B,H,W,C\]"):
        m(jnp.zeros((1, 5, 12)))
    with pytest.raises(ValueError, match=r"\[B,H,W,C\]"):
        m(jnp.zeros((1, 5, 5, 8)))
    with pytest.raises(TypeError, match="floating"):
        m(jnp.zeros((1, 5, 5, 12), jnp.int32))
