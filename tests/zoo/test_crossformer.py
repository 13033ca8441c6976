"""CrossFormer backbone: a narrowed model (padded SDA / LDA groups, the small-map rule, CEL stem and
downsamplers) against the float64 numpy implementation of the official model
(tests/layers/crossformer_reference.py), logits and every stage's features; the paper's parameter
counts; mixer swapping; the official-checkpoint converter. The timm contract and the published
GMACs are checked for every preset by test_vision_models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import assert_close, rel_rms
from attnzoo.zoo.crossformer import load_official_crossformer_weights
from tests.layers.crossformer_reference import numpy_crossformer
from tests.zoo.helpers import build, fast_jit, num_params

# Maps 13x18 -> 6x9 -> 3x4 -> 1x2 (odd sizes floor as the convolutions do): 4x4 groups padded to
# 16x20 (SDA) and, with interval 2, 8x8 regions padded to 16x24 (LDA); 3x4 and 1x2 shrink to SDA.
SMALL = dict(img_size=(52, 72), embed_dim=(32, 32, 48, 48), depths=(2, 2, 1, 1), num_heads=(2, 2, 3, 3), group_size=4,
             intervals=(2, 1, 1, 1), num_classes=5, mixer_options={"dpb_dim": 3})


def small_model(seed=0, **extra):
    return build(lambda: zoo.create_model("crossformer_tiny", rngs=nnx.Rngs(0), **{**SMALL, **extra}), seed=seed, scale=0.3)


def _logits_and_maps(model, x):
    final, maps = model.forward_intermediates(x, intermediates_only=False)
    return model.forward_head(final), maps


forward = fast_jit(_logits_and_maps)


def test_matches_numpy_reference_of_the_official_model():
    seed = 0
    model = small_model(seed)
    model.layers[0].blocks[1].mixer.pos.residual = True  # both DPB branches (the official default is False)
    images = jnp.asarray(np.random.default_rng(10 + seed).normal(size=(2, 52, 72, 3)), jnp.float32)
    logits, maps = forward(model, images)
    ref_logits, ref_maps = numpy_crossformer(model, images)
    assert [m.shape[1:3] for m in maps] == [(13, 18), (6, 9), (3, 4), (1, 2)]
    for index, (out, ref) in enumerate(zip(maps, ref_maps, strict=True)):
        assert_close(out, ref, f"stage {index}", dtype=jnp.float32)
    assert_close(logits, ref_logits, "logits", dtype=jnp.float32)
    # A differently initialised model disagrees: the comparison can fail.
    fresh = small_model(seed + 5)
    fresh.layers[0].blocks[1].mixer.pos.residual = True
    assert rel_rms(forward(fresh, images)[0], ref_logits) > 0.1


# The official models' parameter counts (cheerss/CrossFormer models/crossformer.py at 224 px, 1000
# classes; the paper rounds them to 27.8M, 30.7M, 52.0M and 92.0M).
OFFICIAL_PARAMS = {
    "crossformer_tiny": 27_776_794,
    "crossformer_small": 30_657_394,
    "crossformer_base": 51_971_554,
    "crossformer_large": 91_971_184,
}


def test_parameter_counts_match_the_official_models():
    # Building a preset abstractly takes seconds: tiny here (its stage widths and depths differ from the
    # others'); small, base and large were checked the same way against the official code once.
    name = "crossformer_tiny"
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert num_params(model) == OFFICIAL_PARAMS[name]
    assert [stage.blocks[0].mixer.interval for stage in model.layers] == [8, 4, 2, 1]
    assert [block.mixer.layout(14, 14)[0] for block in model.layers[2].blocks[:2]] == ["sda", "lda"]


def test_stage_mixers_are_swappable_by_name():
    overrides = {**SMALL, "mixer": ("crossformer_lsda", "swin_window", "attention", "crossformer_lsda"),
                 "mixer_options": ({"dpb_dim": 3}, {"window_size": 3}, {}, {"dpb_dim": 3})}
    model = nnx.eval_shape(lambda: zoo.create_model("crossformer_tiny", rngs=nnx.Rngs(0), **overrides))
    kinds = [type(stage.blocks[0].mixer).__name__ for stage in model.layers]
    assert kinds == ["CrossFormerAttention", "WindowAttention", "Attention", "CrossFormerAttention"]
    attention = model.layers[2].blocks[0].mixer  # an image backbone's attention: bidirectional, no RoPE
    assert (attention.causal, attention.use_rope, attention.o_proj.bias is not None) == (False, False, True)
    assert [block.mixer.mode for block in model.layers[0].blocks] == ["sda", "lda"]
    assert model.layers[0].blocks[1].mixer.interval == 2
    logits = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 52, 72, 3), jnp.float32))
    assert logits.shape == (2, 5)
    assert model.forward_flops() > 0
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        zoo.create_model("crossformer_tiny", mixer="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"intervals must be one value or a sequence of 4"):
        zoo.create_model("crossformer_tiny", intervals=(8, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"merge_kernels needs one sequence per downsampler \(3\)"):
        zoo.create_model("crossformer_tiny", merge_kernels=((2, 4), (2, 4)), rngs=nnx.Rngs(0))


def _official_state_dict(model):
    """The model's parameters under the official names and layouts (torch OIHW / [out, in])."""
    state = {}

    def linear(prefix, dense):
        kernel = np.asarray(dense.kernel[...])
        fan_in = int(np.prod(dense.in_features))
        state[f"{prefix}.weight"] = kernel.reshape(fan_in, -1).T
        if dense.bias is not None:
            state[f"{prefix}.bias"] = np.asarray(dense.bias[...]).reshape(-1)

    def norm(prefix, layer_norm):
        state[f"{prefix}.weight"] = np.asarray(layer_norm.scale[...])
        state[f"{prefix}.bias"] = np.asarray(layer_norm.bias[...])

    def cel(prefix, convs, embedding):
        for i, conv in enumerate(embedding.projs):
            state[f"{prefix}.{convs}.{i}.weight"] = np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1)
            state[f"{prefix}.{convs}.{i}.bias"] = np.asarray(conv.bias[...])
        norm(f"{prefix}.norm", embedding.norm)

    cel("patch_embed", "projs", model.patch_embed)
    for s, stage in enumerate(model.layers):
        if stage.downsample is not None:
            cel(f"layers.{s - 1}.downsample", "reductions", stage.downsample)
        for j, block in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{j}"
            norm(f"{name}.norm1", block.norm1)
            norm(f"{name}.norm2", block.norm2)
            linear(f"{name}.attn.qkv", block.mixer.qkv)
            linear(f"{name}.attn.proj", block.mixer.proj)
            linear(f"{name}.attn.pos.pos_proj", block.mixer.pos.pos_proj)
            for n in (1, 2, 3):
                norm(f"{name}.attn.pos.pos{n}.0", getattr(block.mixer.pos, f"norm{n}"))
                linear(f"{name}.attn.pos.pos{n}.2", getattr(block.mixer.pos, f"fc{n}"))
            state[f"{name}.attn.relative_position_index"] = np.zeros((16, 16), np.int64)  # an official buffer
            linear(f"{name}.mlp.fc1", block.mlp.up)
            linear(f"{name}.mlp.fc2", block.mlp.down)
    norm("norm", model.norm)
    linear("head", model.head)
    return state


def test_official_checkpoint_converter():
    """Every parameter is read from its official name (conv OIHW -> HWIO, Linear [out, in] -> kernel,
    stage s's downsampler from the official ``layers.{s-1}.downsample``); buffers are skipped."""
    source = small_model(seed=3)
    state = _official_state_dict(source)
    target = small_model(seed=4)
    unused = load_official_crossformer_weights(target, state)
    assert all(key.endswith("relative_position_index") for key in unused) and unused
    flat = dict(nnx.to_flat_state(nnx.state(target, nnx.Param)))
    for path, value in nnx.to_flat_state(nnx.state(source, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(flat[path][...]), np.asarray(value[...]), err_msg=str(path))
    with pytest.raises(ValueError, match=r"state_dict keys not converted: \['extra.weight'\]"):
        load_official_crossformer_weights(target, {**state, "extra.weight": np.zeros(1)})
    del state["layers.0.downsample.reductions.1.bias"]
    with pytest.raises(KeyError, match="layers.0.downsample.reductions.1.bias"):
        load_official_crossformer_weights(target, state)
