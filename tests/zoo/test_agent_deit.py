"""Agent-DeiT and per-block mixers in the ViT: the presets' structure and parameter counts (equal to
LeapLabTHU/Agent-Attention's models), a float64 forward against an independent numpy composition of
the blocks (Agent-DeiT's agent attention with the class token, then softmax attention), block order
across the stacked runs, scan == loop, and argument errors."""


import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from attnzoo import zoo
from attnzoo.zoo import VisionTransformer
from attnzoo.zoo.common import LayerRuns, LayerStack
from tests.layers.numpy_layers import param64
from tests.layers.vision_linear_reference import numpy_agent_attention_tokens, numpy_focused_linear_attention_tokens
from tests.zoo.helpers import build, fast_jit, num_params

# Parameter counts of the official models (agent_deit.py, built with each yaml's AGENT.NUM and image size).
OFFICIAL = {
    "agent_deit_tiny": (6_015_640, 12, 49, (14, 14)),
    "agent_deit_small": (22_647_112, 12, 49, (14, 14)),
    "agent_deit_small_448": (23_070_472, 12, 49, (28, 28)),
    "agent_deit_base": (87_204_904, 4, 81, (14, 14)),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_presets_have_the_official_structure_and_counts(name):
    count, agent_blocks, agents, grid = OFFICIAL[name]
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert num_params(model) == count
    assert model.mixer_names == ("agent_attention_tokens",) * agent_blocks + ("attention",) * (12 - agent_blocks)
    runs = model.blocks.runs if agent_blocks < 12 else [model.blocks]
    assert isinstance(model.blocks, LayerRuns if agent_blocks < 12 else LayerStack)
    assert [run.num_layers for run in runs] == [agent_blocks, 12 - agent_blocks][: len(runs)]
    first = runs[0].layers.mixer  # stacked: parameters [layers, ...]
    assert (first.agent_num, first.resolution, first.num_prefix_tokens) == (agents, grid, 1)
    assert first.ac_bias.get_value().shape == (agent_blocks, model.num_heads, agents, 1)
    assert [type(run.layers.mixer).__name__ for run in runs] == ["AgentAttentionTokens", "Attention"][: len(runs)]


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * param64(norm.scale) + param64(norm.bias)


def _numpy_attention(attn, x):
    heads, dh = attn.num_heads, attn.head_dim
    proj = lambda d: np.einsum("bnd,dhk->bhnk", x, param64(d.kernel)) + param64(d.bias).reshape(1, heads, 1, dh)  # noqa: E731
    q, k, v = proj(attn.q_proj), proj(attn.k_proj), proj(attn.v_proj)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhnk,hkd->bnd", probs @ v, param64(attn.o_proj.kernel)) + param64(attn.o_proj.bias)


MIXERS = {
    "agent_attention_tokens": numpy_agent_attention_tokens,
    "focused_linear_attention_tokens": numpy_focused_linear_attention_tokens,
    "attention": _numpy_attention,
}


def numpy_forward(model, images):
    """Logits of the ViT in float64 numpy, block ``i`` = ``model.blocks.layer(i)`` with its mixer's
    reference (the class token pooled)."""
    images = np.asarray(images, np.float64)
    batch = images.shape[0]
    (gh, gw), (ph, pw), chans = model.grid_size, model.patch_size, model.in_chans
    patches = images.reshape(batch, gh, ph, gw, pw, chans).transpose(0, 1, 3, 2, 4, 5).reshape(batch, gh * gw, -1)
    x = patches @ param64(model.patch_embed.kernel) + param64(model.patch_embed.bias)
    x = np.concatenate([np.broadcast_to(param64(model.cls_token), (batch, 1, model.dim)), x], axis=1)
    x = x + param64(model.pos_embed)
    for index, name in enumerate(model.mixer_names):
        block = model.blocks.layer(index)
        x = x + MIXERS[name](block.mixer, _layer_norm(x, block.norm1))
        h = _layer_norm(x, block.norm2) @ param64(block.mlp.up.kernel) + param64(block.mlp.up.bias)
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = x + h @ param64(block.mlp.down.kernel) + param64(block.mlp.down.bias)
    x = _layer_norm(x, model.norm)
    return x[:, 0] @ param64(model.head.kernel) + param64(model.head.bias)


def test_agent_deit_float64_matches_numpy(x64):
    """Agent-DeiT-B narrowed (3 agent blocks then 2 attention blocks, 9 agents on a 3x5 grid) and a
    ViT mixing FLatten's token mixer with agent attention, each against the numpy composition."""
    forward = fast_jit(lambda m, x: m(x))
    models = {
        "agent_deit_base": lambda: zoo.create_model(
            "agent_deit_base", img_size=(12, 20), patch_size=4, dim=12, depth=5, num_heads=3, num_classes=4,
            param_dtype=jnp.float64, logits_dtype=jnp.float64, rngs=nnx.Rngs(0)),
        "mixed": lambda: VisionTransformer(
            img_size=(12, 16), patch_size=4, dim=12, depth=3, num_heads=2, num_classes=3,
            mixer=("focused_linear_attention_tokens", "agent_attention_tokens", "focused_linear_attention_tokens"),
            mixer_options=(None, {"agent_num": 4}, {"kernel_size": 3}),
            param_dtype=jnp.float64, logits_dtype=jnp.float64, rngs=nnx.Rngs(0)),
    }
    for label, make in models.items():
        for seed in (0, 1):
            model = build(make, seed=seed)
            h, w = model.img_size
            images = np.random.default_rng(seed + 3).normal(size=(2, h, w, 3))
            logits = np.asarray(forward(model, jnp.asarray(images)))
            ref = numpy_forward(model, images)
            assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 1e-10, label
    # The comparison can fail: a small change to one class-token -> agent bias is detected.
    assert label == "mixed" and isinstance(model.blocks, LayerRuns) and [r.num_layers for r in model.blocks.runs] == [1, 1, 1]
    agent = model.blocks.runs[1].layers.mixer
    agent.ca_bias[...] = agent.ca_bias[...].at[0, 0, 0, 0].add(1e-3)
    moved = np.asarray(forward(model, jnp.asarray(images)))
    assert np.linalg.norm(moved - ref) / np.linalg.norm(ref) > 1e-8


def test_runs_keep_block_order_and_scan_equals_loop():
    options = dict(img_size=16, patch_size=4, dim=16, depth=4, num_heads=2, num_classes=5,
                   mixer=("agent_attention_tokens",) * 2 + ("attention",) * 2, mixer_options={"agent_num": 4})
    with pytest.raises(TypeError, match="unexpected keyword argument 'agent_num'"):
        VisionTransformer(**options, rngs=nnx.Rngs(0))  # one dict goes to every block, attention included
    options["mixer_options"] = ({"agent_num": 4},) * 2 + (None,) * 2
    loop = build(lambda: VisionTransformer(**options, scan_layers=False, rngs=nnx.Rngs(0)))
    scan = VisionTransformer(**options, scan_layers=True, rngs=nnx.Rngs(0))
    nnx.update(scan, nnx.state(loop))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    x = loop._embed(images)
    expected = []
    for index in range(4):
        x = loop.blocks.layer(index)(x)
        expected.append(x)
    maps = fast_jit(lambda m, im: m.forward_intermediates(im, output_fmt="NLC"))(loop, images)
    for index in range(4):
        np.testing.assert_allclose(maps[index], expected[index], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(fast_jit(lambda m, im: m(im))(scan, images), fast_jit(lambda m, im: m(im))(loop, images),
                               rtol=2e-5, atol=2e-5)
    assert [type(layer.mixer).__name__ for layer in loop.blocks.unstacked()] == ["AgentAttentionTokens"] * 2 + ["Attention"] * 2
    # Gradients reach both runs.
    grads = nnx.grad(lambda m: jnp.sum(m(images) ** 2))(loop)
    for run in range(2):
        kernel = grads.blocks.runs[run].layers.mlp.up.kernel
        assert float(jnp.abs(kernel[...]).max()) > 0
    # No class token: the agent mixers get num_prefix_tokens=0.
    avg = nnx.eval_shape(lambda: VisionTransformer(**options, class_token=False, global_pool="avg", rngs=nnx.Rngs(0)))
    agent = avg.blocks.runs[0].layers.mixer
    assert agent.num_prefix_tokens == 0 and agent.ac_bias is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mixer=("attention",) * 2), ValueError, r"mixer must have one entry per block \(3\), got 2"),
    (dict(mixer=("attention", "attention", 3)), TypeError, r"mixer\[2\] must be a registered mixer name \(str\), got int"),
    (dict(mixer=("attention", "nope", "attention")), ValueError, "unknown mixer 'nope'"),
    (dict(mixer_options=[{}, "x", {}]), TypeError, r"mixer_options\[1\] must be a dict \(or None\), got str"),
    (dict(mixer_options=[{}]), ValueError, r"mixer_options must have one entry per block \(3\), got 1"),
    (dict(mixer_options=3), TypeError, r"mixer_options must be a dict \(or None\) or a sequence of 3 of them, got int"),
    (dict(mixer="agent_attention_tokens", mixer_options={"agent_num": 8}), ValueError, "agent_num must be a perfect square"),
])
def test_per_block_mixer_errors(kwargs, error, match):
    options = dict(img_size=16, patch_size=4, dim=16, depth=3, num_heads=2, num_classes=5)
    with pytest.raises(error, match=match):
        VisionTransformer(**{**options, **kwargs}, rngs=nnx.Rngs(0))


def test_timm_converter_refuses_agent_blocks():
    model = nnx.eval_shape(lambda: zoo.create_model("agent_deit_tiny", rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="a timm ViT has attention blocks"):
        zoo.load_timm_weights(model, {})

