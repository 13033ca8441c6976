"""BiFormer backbone: a narrowed model (odd image size, routing regions padded by auto_pad, attention
with LePE in the last stage) against the float64 numpy implementation of the official forward
(tests/layers/biformer_reference.py), logits and every stage's features; the official parameter
counts; feature_info; mixer swapping; the official-checkpoint converter. The timm contract and the
published GMACs are checked for every preset by test_vision_models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import assert_close, rel_rms
from attnzoo.zoo.biformer import load_official_biformer_weights
from tests.layers.biformer_reference import numpy_biformer
from tests.layers.conv_reference import randomize_batch_stats
from tests.zoo.helpers import fast_jit, num_params, randomize

# 45 x 38 images: maps 12 x 10, 6 x 5, 3 x 3, 2 x 2; 3 x 3 regions (the first two maps padded to
# 12 x 12 and 6 x 6), top-k 2 and 4; attention with LePE (8 heads) on the last map.
SMALL = dict(img_size=(45, 38), embed_dim=(16, 24, 32, 32), depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 8), n_win=3,
             topk=(2, 4, 9, None), auto_pad=True, num_classes=5)


def small_model(seed=0, **extra):
    model = nnx.eval_shape(lambda: zoo.create_model("biformer_tiny", rngs=nnx.Rngs(0), **{**SMALL, **extra}))
    model = randomize_batch_stats(randomize(model, seed=seed, scale=0.3), seed + 1)
    model.eval()
    return model


def _logits_and_maps(model, x):
    final, maps = model.forward_intermediates(x, intermediates_only=False)
    return model.forward_head(final), maps


forward = fast_jit(_logits_and_maps)


def test_matches_numpy_reference_of_the_official_model():
    model = small_model(seed=0)
    images = np.random.default_rng(10).normal(size=(2, 45, 38, 3))
    logits, maps = forward(model, jnp.asarray(images, jnp.float32))
    ref_logits, ref_maps = numpy_biformer(model, images)
    assert [m.shape[1:3] for m in maps] == [(12, 10), (6, 5), (3, 3), (2, 2)]
    for index, (out, ref) in enumerate(zip(maps, ref_maps, strict=True)):
        assert_close(out, ref, f"stage {index}", dtype=jnp.float32)
    assert_close(logits, ref_logits, "logits", dtype=jnp.float32)
    # A differently initialised model disagrees: the comparison can fail.
    assert rel_rms(forward(small_model(seed=5), jnp.asarray(images, jnp.float32))[0], ref_logits) > 0.1


# rayleizhu/BiFormer models/biformer.py built in torch at 224 px with 1000 classes (paper: 13.1M,
# 25.5M, 56.8M). Building a preset abstractly takes seconds: tiny here; small and base are checked
# by tests/zoo/test_models.py::test_parameter_count (its OFFICIAL_PARAMS holds all three).
OFFICIAL_PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}


def test_parameter_counts_match_the_official_models():
    name = "biformer_tiny"
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert num_params(model) == OFFICIAL_PARAMS[name]
    assert [type(stage.blocks[0].mixer).__name__ for stage in model.stages] == ["BiLevelRoutingAttention"] * 3 + [
        "AttentionLePE"]
    assert [stage.blocks[0].mixer.topk for stage in model.stages[:3]] == [1, 4, 16]
    assert [stage.blocks[0].mixer.num_heads for stage in model.stages] == list(model.num_heads)
    assert model.stages[3].blocks[0].mixer.num_heads == 8
    assert model.resolutions == ((56, 56), (28, 28), (14, 14), (7, 7))
    assert model.feature_info == [dict(num_chs=c, reduction=r, module=f"stages.{i}")
                                  for i, (c, r) in enumerate(zip(model.dims, (4, 8, 16, 32), strict=True))]


def test_features_only_and_stage_mixers_are_swappable_by_name():
    backbone = nnx.eval_shape(lambda: zoo.create_model("biformer_tiny", rngs=nnx.Rngs(0), features_only=True, **SMALL))
    assert backbone.head is None and backbone.norm is not None  # kept for forward_intermediates(norm=True)
    graphdef, state = nnx.split(backbone)
    maps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 45, 38, 3), jnp.float32))
    assert [m.shape for m in maps] == [(2, 12, 10, 16), (2, 6, 5, 24), (2, 3, 3, 32), (2, 2, 2, 32)]

    overrides = {**SMALL, "mixer": ("biformer_routing", "swin_window", "attention", "attention_lepe"),
                 "mixer_options": ({}, {"window_size": 3}, {}, {"side_dwconv": 3})}
    model = nnx.eval_shape(lambda: zoo.create_model("biformer_tiny", rngs=nnx.Rngs(0), **overrides))
    kinds = [type(stage.blocks[0].mixer).__name__ for stage in model.stages]
    assert kinds == ["BiLevelRoutingAttention", "WindowAttention", "Attention", "AttentionLePE"]
    assert model.stages[3].blocks[0].mixer.lepe.kernel_size == (3, 3)
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 45, 38, 3), jnp.float32))
    assert logits.shape == (2, 5)
    assert model.forward_flops() > 0
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        zoo.create_model("biformer_tiny", mixer="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"topk must be one value or a sequence of 4"):
        zoo.create_model("biformer_tiny", topk=(1, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"embed_dim\[0\] must be even"):
        zoo.create_model("biformer_tiny", embed_dim=(15, 32, 32, 32), rngs=nnx.Rngs(0))


def _official_state_dict(model):
    """The model's parameters and running statistics under the official names and layouts (torch
    OIHW convolutions, ``[out, in]`` linears, the fused BRA ``qkv.qkv`` rows q | k | v)."""
    state = {}

    def linear(prefix, dense):
        kernel = np.asarray(dense.kernel[...])
        state[f"{prefix}.weight"] = kernel.reshape(int(np.prod(dense.in_features)), -1).T
        if dense.bias is not None:
            state[f"{prefix}.bias"] = np.asarray(dense.bias[...]).reshape(-1)

    def conv(prefix, layer):
        state[f"{prefix}.weight"] = np.asarray(layer.kernel[...]).transpose(3, 2, 0, 1)
        state[f"{prefix}.bias"] = np.asarray(layer.bias[...])

    def batch_norm(prefix, norm):
        for name, variable in (("weight", norm.scale), ("bias", norm.bias), ("running_mean", norm.mean),
                               ("running_var", norm.var)):
            state[f"{prefix}.{name}"] = np.asarray(variable[...])
        state[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)  # an official buffer

    def layer_norm(prefix, norm):
        state[f"{prefix}.weight"] = np.asarray(norm.scale[...])
        state[f"{prefix}.bias"] = np.asarray(norm.bias[...])

    stem = model.stages[0].downsample
    conv("downsample_layers.0.0", stem.conv1)
    batch_norm("downsample_layers.0.1", stem.norm1)
    conv("downsample_layers.0.3", stem.conv2)
    batch_norm("downsample_layers.0.4", stem.norm2)
    for s, stage in enumerate(model.stages):
        if s:
            conv(f"downsample_layers.{s}.0", stage.downsample.conv)
            batch_norm(f"downsample_layers.{s}.1", stage.downsample.norm)
        for j, block in enumerate(stage.blocks):
            name, attn = f"stages.{s}.{j}", block.mixer
            conv(f"{name}.pos_embed", block.pos_embed)
            layer_norm(f"{name}.norm1", block.norm1)
            layer_norm(f"{name}.norm2", block.norm2)
            if hasattr(attn, "n_win"):
                qk = np.asarray(attn.qk.kernel[...]).reshape(attn.dim, -1)
                v = np.asarray(attn.v.kernel[...]).reshape(attn.dim, -1)
                state[f"{name}.attn.qkv.qkv.weight"] = np.concatenate([qk, v], axis=1).T
                state[f"{name}.attn.qkv.qkv.bias"] = np.concatenate(
                    [np.asarray(attn.qk.bias[...]).reshape(-1), np.asarray(attn.v.bias[...]).reshape(-1)])
                linear(f"{name}.attn.wo", attn.proj)
            else:
                linear(f"{name}.attn.qkv", attn.qkv)
                linear(f"{name}.attn.proj", attn.proj)
            conv(f"{name}.attn.lepe", attn.lepe)
            linear(f"{name}.mlp.0", block.mlp.up)
            linear(f"{name}.mlp.3", block.mlp.down)
    batch_norm("norm", model.norm)
    linear("head", model.head)
    return state


def test_official_checkpoint_converter():
    """Every parameter and running statistic is read from its official name; BatchNorm's
    ``num_batches_tracked`` buffers are skipped, anything else left over is an error."""
    source = small_model(seed=3)
    state = _official_state_dict(source)
    target = small_model(seed=4)
    unused = load_official_biformer_weights(target, state)
    assert unused and all(key.endswith("num_batches_tracked") for key in unused)
    flat = dict(nnx.to_flat_state(nnx.state(target, nnx.Any(nnx.Param, nnx.BatchStat))))
    source_flat = nnx.to_flat_state(nnx.state(source, nnx.Any(nnx.Param, nnx.BatchStat)))
    assert len(source_flat) == len(flat)
    for path, value in source_flat:
        np.testing.assert_array_equal(np.asarray(flat[path][...]), np.asarray(value[...]), err_msg=str(path))
    with pytest.raises(ValueError, match=r"state_dict keys not converted: \['extra.weight'\]"):
        load_official_biformer_weights(target, {**state, "extra.weight": np.zeros(1)})
    del state["stages.1.0.attn.qkv.qkv.bias"]
    with pytest.raises(KeyError, match="stages.1.0.attn.qkv.qkv.bias"):
        load_official_biformer_weights(target, state)
