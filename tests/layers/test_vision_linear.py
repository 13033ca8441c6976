"""Agent Attention, FLatten's focused linear attention and Efficient Attention against independent
float64 numpy implementations (tests/layers/vision_linear_reference.py): outputs on odd and
rectangular maps over several seeds, gradients of every parameter and the input, the Swin backbone's
resolution hook, FLOP counts against the traced matmuls, and argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers, zoo
from attnzoo.layers.vision_linear import (
    AgentAttention,
    AgentAttentionTokens,
    EfficientAttention,
    FocusedLinearAttention,
    FocusedLinearAttentionTokens,
    adaptive_pool_matrix,
    bilinear_matrix,
)
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from tests.layers.vision_linear_reference import (
    adaptive_avg_pool,
    bilinear_resize,
    numpy_agent_attention,
    numpy_agent_attention_tokens,
    numpy_efficient_attention,
    numpy_focused_linear_attention,
    numpy_focused_linear_attention_tokens,
)
from tests.layers.testing import as_float64, check_finite_differences, make_mixer
from tests.zoo.helpers import build, fast_jit

REFERENCES = {
    "agent_attention": numpy_agent_attention,
    "focused_linear_attention": numpy_focused_linear_attention,
    "efficient_attention": numpy_efficient_attention,
    "agent_attention_tokens": numpy_agent_attention_tokens,
    "focused_linear_attention_tokens": numpy_focused_linear_attention_tokens,
}
SPATIAL = ("agent_attention", "focused_linear_attention", "efficient_attention")


def make(name, seed=0, **options):
    options = {"dim": 12, "num_heads": 3, **options}
    return make_mixer(name, seed, **options)


apply = fast_jit(lambda module, x: module(x))


# (name, height, width, options): odd, rectangular and tiny maps; pooling that shrinks (5x7 -> 2x2,
# overlapping cells) and grows (3x2 -> 4x4) the map; bias tables resized down (7 onto 5 rows, 3 onto
# 2 columns) and up (3 onto 4 x 5 in the gradient case); a non-default focusing power and kernel.
CASES = [
    ("agent_attention", 5, 7, dict(agent_num=4, qkv_bias=False)),
    ("agent_attention", 3, 2, dict(agent_num=16, dim=8, num_heads=2, bias_size=3, kernel_size=5)),
    ("focused_linear_attention", 5, 7, dict()),
    ("focused_linear_attention", 4, 3, dict(focusing_factor=2.5, kernel_size=3, out_bias=False)),
    ("efficient_attention", 3, 8, dict(key_dim=5, value_dim=3, num_heads=2)),
]


def _options(name, height, width, options):
    if name != "efficient_attention":
        options = {"resolution": (height, width), **options}
    return options


@pytest.mark.parametrize("name, height, width, options", CASES)
def test_matches_numpy_reference(name, height, width, options):
    reference = REFERENCES[name]
    for seed in (0, 1):
        m = make(name, seed=seed + height * width, **_options(name, height, width, options))
        x = np.random.default_rng(seed).normal(size=(2, height, width, m.dim))
        assert_close(apply(m, jnp.asarray(x, jnp.float32)), reference(m, x), f"{name} {options} seed {seed}",
                     dtype=jnp.float32)


def test_pooling_and_bias_resizing_helpers():
    rng = np.random.default_rng(0)
    for size, length in ((3, 56), (7, 14), (4, 3), (7, 2), (2, 5)):
        plane = rng.normal(size=(length, length + 1, 2))
        pool_rows, pool_cols = adaptive_pool_matrix(size, length), adaptive_pool_matrix(size, length + 1)
        np.testing.assert_allclose(np.einsum("iy,yxc,jx->ijc", pool_rows, plane, pool_cols), adaptive_avg_pool(plane, size))
        table = rng.normal(size=(2, size, size))
        rows, cols = bilinear_matrix(length, size), bilinear_matrix(length + 1, size)
        np.testing.assert_allclose(np.einsum("yi,aij,xj->ayx", rows, table, cols), bilinear_resize(table, length, length + 1))


def test_pooling_and_resizing_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for size, height, width in ((3, 56, 56), (4, 3, 5), (7, 2, 2), (2, 9, 6)):
        plane = rng.normal(size=(height, width, 3))
        expected = torch.nn.AdaptiveAvgPool2d(size)(torch.from_numpy(plane.transpose(2, 0, 1))).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(adaptive_avg_pool(plane, size), expected, rtol=1e-12, atol=1e-12)
        table = rng.normal(size=(1, 2, 7, 7))
        resized = torch.nn.functional.interpolate(torch.from_numpy(table), size=(height, width), mode="bilinear")
        np.testing.assert_allclose(bilinear_resize(table, height, width), resized.numpy(), rtol=1e-12, atol=1e-12)


GRADIENT_CASES = [
    ("agent_attention", 4, 5, dict(agent_num=4, bias_size=3), 12),
    ("focused_linear_attention", 3, 4, dict(), 8),
    ("efficient_attention", 3, 4, dict(key_dim=3, value_dim=5), 8),
    # the ViT token mixers: a class token (two prefix tokens for FLatten) before the map
    ("agent_attention_tokens", 3, 4, dict(agent_num=4, bias_size=3), 14),
    ("focused_linear_attention_tokens", 3, 3, dict(num_prefix_tokens=2), 8),
]


@pytest.mark.parametrize("name, height, width, options, count", GRADIENT_CASES)
def test_gradients_of_every_parameter_and_the_input_match_finite_differences(name, height, width, options, count):
    """The float64 output against the reference, and directional derivatives of ``sum(y * cotangent)``
    along a random direction of each parameter (and of x), by jax in float64 vs central differences
    of the numpy reference."""
    reference = REFERENCES[name]
    with float64():
        m = as_float64(make(name, seed=3, **_options(name, height, width, options)))
        x = _tokens(m, 4, batch=1) if name.endswith("_tokens") else np.random.default_rng(4).normal(
            size=(1, height, width, m.dim))
        cotangent = np.random.default_rng(5).normal(size=x.shape)

        def loss(model, x):
            y = model(x)
            return jnp.sum(y * cotangent), y

        step = fast_jit(lambda model, x: nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x))
        (_, y), (grads, x_grad) = step(m, jnp.asarray(x))
        assert_close(y, reference(m, x), f"{name} float64", dtype=jnp.float64)
        checked = check_finite_differences(m, x, cotangent, grads, x_grad, reference, np.random.default_rng(6))
        assert len(checked) == count, checked


def test_every_term_matters():
    """Each documented term changes the output: the assertions above can fail."""
    x = np.random.default_rng(0).normal(size=(1, 5, 6, 12))
    agent = make("agent_attention", resolution=(5, 6), agent_num=4)
    base = np.asarray(apply(agent, jnp.asarray(x, jnp.float32)))
    for bias in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "dwc.kernel"):
        changed = nnx.clone(agent)
        target = changed
        for part in bias.split("."):
            target = getattr(target, part)
        target.set_value(target.get_value() * 0.0)
        assert rel_rms(apply(changed, jnp.asarray(x, jnp.float32)), base) > 1e-3, bias
    flatten = make("focused_linear_attention", resolution=(5, 6))
    linear = make("focused_linear_attention", resolution=(5, 6), focusing_factor=1.0)
    assert rel_rms(apply(flatten, jnp.asarray(x, jnp.float32)), apply(linear, jnp.asarray(x, jnp.float32))) > 1e-2
    # Efficient attention is a global mixer: a change at one corner reaches the opposite one.
    eff = make("efficient_attention")
    moved = x.copy()
    moved[0, 0, 0] += 3.0
    delta = np.asarray(apply(eff, jnp.asarray(moved, jnp.float32)) - apply(eff, jnp.asarray(x, jnp.float32)))
    assert np.abs(delta[0, -1, -1]).max() > 1e-4


def test_flops_match_traced_matmuls():
    from tests.zoo.helpers import traced_matmul_flops

    x = jnp.zeros((1, 6, 5, 12))
    eff = make("efficient_attention", key_dim=3, value_dim=5)
    assert eff.flops(6, 5) == traced_matmul_flops(eff, x)
    flatten = make("focused_linear_attention", resolution=(6, 5))
    conv = 2 * 30 * 12 * 25  # the depthwise convolution, counted by flops() but not a dot_general
    assert flatten.flops(6, 5) == traced_matmul_flops(flatten, x) + conv
    agent = make("agent_attention", resolution=(6, 5), agent_num=4)
    pooling = 2 * (2 * 6 * 5 * 12 + 2 * 2 * 5 * 12)  # the pooling matrices, traced but not counted
    bias = 2 * 2 * 3 * 4 * (6 * 7 * 7 + 6 * 5 * 7)  # resizing the two bias tables, likewise
    assert agent.flops(6, 5) == traced_matmul_flops(agent, x) - pooling - bias + 2 * 30 * 12 * 9


def test_bfloat16_and_logical_axes():
    m = make("agent_attention", resolution=(4, 4), agent_num=4, dtype=jnp.bfloat16)
    x = np.random.default_rng(7).normal(size=(2, 4, 4, 12))
    y = apply(m, jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert rel_rms(y, numpy_agent_attention(m, x)) < 3e-2
    f = make("focused_linear_attention", resolution=(4, 4), dtype=jnp.bfloat16)
    assert rel_rms(apply(f, jnp.asarray(x, jnp.float32)), numpy_focused_linear_attention(f, x)) < 3e-2
    specs = {
        ".".join(map(str, path)): variable.get_metadata().get("out_sharding")
        for path, variable in nnx.iter_graph(f)
        if isinstance(variable, nnx.Param)
    }
    assert specs == {
        "qkv.kernel": ("embed", None, "heads", "head_dim"),
        "qkv.bias": (None, "heads", "head_dim"),
        "proj.kernel": ("heads", "head_dim", "embed"),
        "proj.bias": ("embed",),
        "dwc.kernel": (None, None, None, "head_dim"),
        "dwc.bias": ("head_dim",),
        "scale": ("heads", "head_dim"),
        "positional_encoding": (None, "heads", "head_dim"),
    }
    assert {"agent_attention", "focused_linear_attention", "efficient_attention"} <= set(layers.list_mixers())
    assert all(layers.get_mixer_class(n).spatial_ndim == 2 for n in SPATIAL)


def test_swin_backbone_passes_each_stage_resolution():
    model = nnx.eval_shape(lambda: zoo.create_model(
        "agent_swin_tiny", img_size=(64, 96), embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
        rngs=nnx.Rngs(0)))
    assert [stage.blocks[0].mixer.resolution for stage in model.layers[:3]] == [(16, 24), (8, 12), (4, 6)]
    assert [stage.blocks[0].mixer.agent_num for stage in model.layers[:3]] == [9, 16, 49]
    assert model.layers[0].blocks[0].mixer.ah_bias.get_value().shape == (1, 9, 16)
    last = model.layers[3].blocks[0].mixer
    assert type(last).__name__ == "WindowAttention" and last.window_size == (2, 3) and last.shift_size == (0, 0)
    flatten = nnx.eval_shape(lambda: zoo.create_model("flatten_swin_tiny", rngs=nnx.Rngs(0)))
    names = [type(stage.blocks[0].mixer).__name__ for stage in flatten.layers]
    assert names == ["FocusedLinearAttention"] * 2 + ["WindowAttention"] * 2
    assert flatten.layers[2].blocks[1].mixer.shift_size == (3, 3)  # Swin's shifted windows in stage 3
    assert flatten.layers[0].blocks[0].mixer.positional_encoding.get_value().shape == (56 * 56, 3, 32)


def test_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="agent_num must be a perfect square"):
        AgentAttention(12, 3, resolution=4, agent_num=8, rngs=rngs)
    with pytest.raises(ValueError, match=r"window_size must be None or the resolution \(4, 4\), got 2"):
        AgentAttention(12, 3, resolution=4, window_size=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"FocusedLinearAttention: attends over the whole map, so shift_size must be 0"):
        FocusedLinearAttention(12, 3, resolution=4, shift_size=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"resolution must be an int or a \(height, width\) pair"):
        FocusedLinearAttention(12, 3, resolution=(4, 4, 4), rngs=rngs)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'resolution'"):
        AgentAttention(12, 3, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_heads \(5\) must divide dim \(12\)"):
        FocusedLinearAttention(12, 5, resolution=4, rngs=rngs)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        FocusedLinearAttention(12, 3, resolution=4, kernel_size=4, rngs=rngs)
    with pytest.raises(ValueError, match="focusing_factor must be a finite positive float, got -1.0"):
        FocusedLinearAttention(12, 3, resolution=4, focusing_factor=-1, rngs=rngs)
    with pytest.raises(ValueError, match="key_dim must be an int >= 1, got 0"):
        EfficientAttention(12, 3, key_dim=0, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_heads \(5\) must divide dim \(12\) when key_dim or value_dim"):
        EfficientAttention(12, 5, rngs=rngs)
    with pytest.raises(TypeError, match="qkv_bias must be a bool"):
        EfficientAttention(12, 3, qkv_bias=1, rngs=rngs)
    m = build(lambda: AgentAttention(12, 3, resolution=(4, 5), agent_num=4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"AgentAttention: x must be a 4 x 5 map \(the resolution the layer .*, got 5 x 4"):
        m(jnp.zeros((1, 5, 4, 12)))
    with pytest.raises(ValueError, match=r"x must have shape \[B,H,W,C\] with last axis 12, got \(1, 20, 12\)"):
        m(jnp.zeros((1, 20, 12)))
    e = build(lambda: EfficientAttention(12, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="x must have a floating dtype, got int32"):
        e(jnp.zeros((1, 4, 4, 12), jnp.int32))


# ----------------------------------------------------------------------------------------------
# The ViT token mixers: P prefix tokens, then the map row-major
# ----------------------------------------------------------------------------------------------

# (name, height, width, options): one class token (Agent-DeiT), two prefix tokens, none; odd and
# rectangular grids; pooling that shrinks (3x5 -> 2x2) and grows (2x3 -> 3x3) the map.
TOKEN_CASES = [
    ("agent_attention_tokens", 3, 5, dict(agent_num=4)),
    ("agent_attention_tokens", 2, 3, dict(agent_num=9, num_prefix_tokens=2, dim=8, num_heads=2, bias_size=3)),
    ("agent_attention_tokens", 3, 3, dict(agent_num=4, num_prefix_tokens=0, qkv_bias=False)),
    ("focused_linear_attention_tokens", 3, 5, dict()),
    ("focused_linear_attention_tokens", 4, 3, dict(num_prefix_tokens=2, focusing_factor=2.5, kernel_size=3)),
    ("focused_linear_attention_tokens", 3, 3, dict(num_prefix_tokens=0, out_bias=False)),
]


def _tokens(m, seed, batch=2):
    count = m.num_prefix_tokens + m.resolution[0] * m.resolution[1]
    return np.random.default_rng(seed).normal(size=(batch, count, m.dim))


@pytest.mark.parametrize("name, height, width, options", TOKEN_CASES)
def test_token_mixers_match_numpy_reference(name, height, width, options):
    for seed in (0, 1):
        m = make(name, seed=seed + 7 * height + width, resolution=(height, width), **options)
        x = _tokens(m, seed)
        assert_close(apply(m, jnp.asarray(x, jnp.float32)), REFERENCES[name](m, x), f"{name} {options} seed {seed}",
                     dtype=jnp.float32)


def test_token_mixers_without_prefix_equal_the_map_mixers():
    """With no prefix token the token mixers are the 2-D ones on the flattened map (same parameters)."""
    x = np.random.default_rng(3).normal(size=(2, 3, 5, 12))
    for tokens_name, map_name, options in (("agent_attention_tokens", "agent_attention", dict(agent_num=4)),
                                           ("focused_linear_attention_tokens", "focused_linear_attention", {})):
        on_tokens = make(tokens_name, seed=5, resolution=(3, 5), num_prefix_tokens=0, **options)
        on_map = make(map_name, seed=6, resolution=(3, 5), **options)
        nnx.update(on_map, nnx.state(on_tokens, nnx.Param))
        y_tokens = apply(on_tokens, jnp.asarray(x.reshape(2, 15, 12), jnp.float32))
        y_map = apply(on_map, jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(np.asarray(y_tokens), np.asarray(y_map).reshape(2, 15, 12), rtol=1e-5, atol=1e-6)


def test_the_class_token_terms_matter():
    """The prefix biases change every output; the class token gets no convolution term (zeroing the
    depthwise kernel and bias leaves its output alone and moves the map tokens)."""
    agent = make("agent_attention_tokens", resolution=(3, 4), agent_num=4)
    x = jnp.asarray(_tokens(agent, 0), jnp.float32)
    base = np.asarray(apply(agent, x))
    for bias in ("ac_bias", "ca_bias"):
        changed = nnx.clone(agent)
        getattr(changed, bias).set_value(getattr(changed, bias).get_value() * 0.0)
        assert rel_rms(apply(changed, x), base) > 1e-4, bias
    for name, options in (("agent_attention_tokens", dict(agent_num=4)), ("focused_linear_attention_tokens", {})):
        m = make(name, resolution=(3, 4), **options)
        y = np.asarray(apply(m, x))
        no_conv = nnx.clone(m)
        no_conv.dwc.kernel.set_value(no_conv.dwc.kernel.get_value() * 0.0)
        no_conv.dwc.bias.set_value(no_conv.dwc.bias.get_value() * 0.0)
        y_no_conv = np.asarray(apply(no_conv, x))
        np.testing.assert_allclose(y_no_conv[:, 0], y[:, 0], rtol=1e-6, atol=1e-7)
        assert rel_rms(y_no_conv[:, 1:], y[:, 1:]) > 1e-3, name


def test_token_mixer_flops_match_traced_matmuls():
    from tests.zoo.helpers import traced_matmul_flops

    x = jnp.zeros((1, 1 + 6 * 5, 12))
    flatten = make("focused_linear_attention_tokens", resolution=(6, 5))
    conv = 2 * 30 * 12 * 25  # the depthwise convolution on the map, counted by flops() but not a dot_general
    assert flatten.flops(31) == traced_matmul_flops(flatten, x) + conv
    agent = make("agent_attention_tokens", resolution=(6, 5), agent_num=4)
    pooling = 2 * (2 * 6 * 5 * 12 + 2 * 2 * 5 * 12)  # the pooling matrices, traced but not counted
    bias = 2 * 2 * 3 * 4 * (6 * 7 * 7 + 6 * 5 * 7)  # resizing the two bias tables, likewise
    assert agent.flops(31) == traced_matmul_flops(agent, x) - pooling - bias + 2 * 30 * 12 * 9


def test_token_mixer_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0, got -1"):
        AgentAttentionTokens(12, 3, resolution=4, num_prefix_tokens=-1, rngs=rngs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'window_size'"):
        FocusedLinearAttentionTokens(12, 3, resolution=4, window_size=4, rngs=rngs)
    for m in (build(lambda: AgentAttentionTokens(12, 3, resolution=(2, 3), agent_num=4, rngs=nnx.Rngs(0))),
              build(lambda: FocusedLinearAttentionTokens(12, 3, resolution=(2, 3), rngs=nnx.Rngs(0)))):
        name = type(m).__name__
        with pytest.raises(ValueError, match=rf"{name}: x must have 1 prefix tokens then a 2 x 3 map \(7 tokens.*got 6"):
            m(jnp.zeros((1, 6, 12)))
        with pytest.raises(ValueError, match=rf"{name}: x must have shape \[B,N,C\] with last axis 12"):
            m(jnp.zeros((1, 2, 3, 12)))
