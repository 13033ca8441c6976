"""The hierarchical (Swin / NAT / DiNAT) backbone: forward against an independent float64 numpy
forward (patch and conv stems, patch merging and conv downsampling, layer scale, padded shifted
windows), timm's window rule, stochastic depth, the feature contract, mixer swaps, preset
parameter counts and argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.layers.window import WindowAttention
from attnzoo.pallas_kernels.testing import assert_close, float64, rel_rms
from attnzoo.zoo.swin import ConvDownsample, ConvTokenizer, SwinBlock, SwinTransformer
from tests.layers.numpy_layers import dense, param64
from tests.layers.window_reference import numpy_window_attention
from tests.zoo.helpers import build, fast_jit, num_params, traced_matmul_flops

NAME = "swin_tiny_patch4_window7_224"

# ---------------------------------------------------------------------------------------------
# An independent float64 numpy forward
# ---------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def layer_norm(norm, x):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def conv2d(conv, x, stride, padding):
    """Direct convolution (NHWC input, HWIO kernel), a loop over the kernel taps."""
    kernel = param64(conv.kernel)
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            taps = x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            y += taps @ kernel[i, j]
    return y if conv.bias is None else y + param64(conv.bias)


def numpy_block(block, x):
    def residual(x, branch, gamma):
        return x + (branch if gamma is None else branch * param64(gamma))

    x = residual(x, numpy_window_attention(block.mixer, layer_norm(block.norm1, x)), block.gamma1)
    hidden = dense(block.mlp.up, layer_norm(block.norm2, x))
    hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
    return residual(x, dense(block.mlp.down, hidden), block.gamma2)


def numpy_swin(model, images):
    """The backbone written from Swin's / NAT's published structure, window-attention mixers."""
    x = np.asarray(images, np.float64)
    if isinstance(model.patch_embed, ConvTokenizer):
        stem = model.patch_embed
        x = layer_norm(stem.norm, conv2d(stem.conv2, conv2d(stem.conv1, x, 2, 1), 2, 1))
    else:
        p = model.patch_size[0]
        batch, height, width, channels = x.shape
        patches = np.zeros((batch, height // p, width // p, p * p * channels))
        for i in range(p):
            for j in range(p):
                patches[..., (i * p + j) * channels : (i * p + j + 1) * channels] = x[:, i::p, j::p]
        x = layer_norm(model.patch_embed.norm, dense(model.patch_embed.proj, patches))
    for stage in model.layers:
        down = stage.downsample
        if isinstance(down, ConvDownsample):
            x = layer_norm(down.norm, conv2d(down.reduction, x, 2, 1))
        elif down is not None:
            x = np.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
            merged = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = dense(down.reduction, layer_norm(down.norm, merged))
        for block in stage.blocks:
            x = numpy_block(block, x)
    pooled = layer_norm(model.norm, x).mean(axis=(1, 2))
    return dense(model.head, pooled)


def make(seed=0, **overrides):
    return build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(seed), **overrides), seed=seed, scale=0.3)


def random_images(seed, size, batch=2, channels=3):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *size, channels)), jnp.float32)


forward = fast_jit(lambda model, images: model(images))


def _contract(model, images):
    final, maps = model.forward_intermediates(images, intermediates_only=False)
    return dict(
        final=final, maps=maps, features=model.forward_features(images), logits=model(images),
        head=model.forward_head(final), pre_logits=model.forward_head(final, pre_logits=True),
        picked=model.forward_intermediates(images, indices=[-1, 0], norm=True, output_fmt="NCHW"),
        normed_last=model.norm(maps[-1]), last_two=model.forward_intermediates(images, indices=2),
    )


contract = fast_jit(_contract)

# ---------------------------------------------------------------------------------------------

SMALL = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), num_classes=5)
CASES = [
    # Swin: patch 2 on 20x28 -> 10x14 with windows 4 (padded to 12x16, shifted), then 5x7
    dict(SMALL, img_size=(20, 28), patch_size=2, window_size=4),
    # NAT's structure (conv stem and downsampling, layer scale) with window mixers; odd sizes -> ceil
    dict(SMALL, img_size=(30, 18), stem="conv", downsample="conv", layer_scale_init=0.5, window_size=(3, 2),
         mlp_ratio=3.0),
]


@pytest.mark.parametrize("overrides", CASES)
def test_matches_numpy_forward(overrides):
    model = make(seed=1, **overrides)
    images = random_images(2, overrides["img_size"])
    reference = numpy_swin(model, images)
    assert_close(forward(model, images), reference, "logits", dtype=jnp.float32)
    with float64():
        model64 = make(seed=1, **overrides, param_dtype=jnp.float64, logits_dtype=jnp.float64)
        reference = numpy_swin(model64, images)  # its parameters are the float64 draws, not rounded to float32
        assert_close(forward(model64, jnp.asarray(images, jnp.float64)), reference, "logits", dtype=jnp.float64)


def test_window_rule_follows_timm():
    """A stage whose map is not larger than the window shrinks the window to the map and does not
    shift (per axis); always_partition keeps both."""
    model = nnx.eval_shape(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), img_size=(56, 32), embed_dim=8,
                                                    depths=(2, 2, 2), num_heads=(1, 1, 1), window_size=7))
    assert model.resolutions == ((14, 8), (7, 4), (4, 2))
    windows = [[(b.mixer.window_size, b.mixer.shift_size) for b in stage.blocks] for stage in model.layers]
    assert windows == [
        [((7, 7), (0, 0)), ((7, 7), (3, 3))],
        [((7, 4), (0, 0)), ((7, 4), (0, 0))],
        [((4, 2), (0, 0)), ((4, 2), (0, 0))],
    ]
    kept = nnx.eval_shape(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), img_size=(56, 32), embed_dim=8, depths=(2, 2),
                                                   num_heads=(1, 1), window_size=7, always_partition=True))
    assert [(b.mixer.window_size, b.mixer.shift_size) for b in kept.layers[1].blocks] == [((7, 7), (0, 0)), ((7, 7), (3, 3))]


def _drop_path_outcomes(block, x):
    """The block's output in two training-mode calls, and the four outputs of keeping or dropping
    each residual branch (kept branches scaled by 1 / (1 - 0.5))."""
    mixed = block.mixer(block.norm1(x))
    outcomes = []
    for h in (x, x + 2.0 * mixed):
        outcomes += [h, h + 2.0 * block.mlp(block.norm2(h))]
    return block(x), block(x), jnp.stack(outcomes), x + mixed + block.mlp(block.norm2(x + mixed))


def test_drop_path_drops_whole_residual_branches_in_training_only():
    block = SwinBlock(8, 2, mixer="swin_window", mixer_options=dict(window_size=2), mlp_ratio=2.0, norm_eps=1e-5,
                      layer_scale_init=None, drop_path=0.5, dtype=None, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = random_images(3, (4, 4), batch=32, channels=8)
    block.eval()
    y, again, _, plain = fast_jit(_drop_path_outcomes)(block, x)
    np.testing.assert_array_equal(y, again)
    np.testing.assert_allclose(y, plain, rtol=1e-6, atol=1e-6)
    block.train()
    y, again, outcomes, _ = fast_jit(_drop_path_outcomes)(block, x)
    which = np.stack([np.abs(np.asarray(y - o)).max(axis=(1, 2, 3)) < 1e-5 for o in outcomes])  # [4, B]
    assert np.all(which.sum(0) == 1)
    assert np.all(which.sum(1) > 0)  # every combination happens in 32 samples
    assert not np.array_equal(y, again)  # fresh randomness per call


def test_features_intermediates_and_classifier():
    model = make(seed=2, img_size=36, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 2), window_size=3, num_classes=4)
    images = random_images(4, (36, 36))
    info = model.feature_info
    assert [(i["num_chs"], i["reduction"], i["module"]) for i in info] == [(8, 4, "layers.0"), (16, 8, "layers.1"),
                                                                           (32, 16, "layers.2")]
    out = contract(model, images)
    final, maps = out["final"], out["maps"]
    assert [m.shape for m in maps] == [(2, 9, 9, 8), (2, 5, 5, 16), (2, 3, 3, 32)]
    np.testing.assert_allclose(final, out["features"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["head"], out["logits"], rtol=1e-6, atol=1e-6)
    assert out["pre_logits"].shape == (2, model.num_features)
    np.testing.assert_allclose(out["picked"][0], jnp.transpose(out["normed_last"], (0, 3, 1, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["picked"][1], jnp.transpose(maps[0], (0, 3, 1, 2)), rtol=1e-6, atol=1e-6)
    assert [m.shape for m in out["last_two"]] == [m.shape for m in maps[1:]]

    backbone = make(seed=2, img_size=36, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 2), window_size=3,
                    features_only=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    backbone_flat = nnx.to_flat_state(nnx.state(backbone, nnx.Param))
    assert {path for path, _ in backbone_flat} == set(flat) - {("norm", "scale"), ("norm", "bias"), ("head", "kernel"),
                                                              ("head", "bias")}
    nnx.update(backbone, nnx.from_flat_state([(path, flat[path]) for path, _ in backbone_flat]))
    for a, b in zip(forward(backbone, images), maps):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    model.reset_classifier(7, global_pool="max", rngs=nnx.Rngs(1))
    assert model.head.kernel.shape == (32, 7) and model.num_classes == 7
    np.testing.assert_allclose(model.forward_head(final, pre_logits=True), final.max(axis=(1, 2)), rtol=1e-6)
    model.reset_classifier(0)
    assert model.forward_head(final).shape == (2, model.num_features) and model.num_classes == 0
    with pytest.raises(ValueError, match="a features_only model has no classifier"):
        backbone.reset_classifier(3)


def test_neighborhood_attention_swaps_in_and_matches_a_full_window():
    """Swin-T's structure with neighbourhood attention: where the neighbourhood covers the whole map
    (and there is no position bias), it is exactly one window covering the map."""
    small = dict(img_size=20, embed_dim=8, depths=(1, 2), num_heads=(1, 2), num_classes=3)
    na = make(seed=3, mixer="neighborhood_attention", mixer_options=[{"kernel_size": 5, "rel_pos_bias": False},
                                                                      {"kernel_size": 3, "rel_pos_bias": False}], **small)
    windowed = make(seed=4, window_size=5, mixer_options={"rel_pos_bias": False}, **small)
    assert type(na.layers[1].blocks[0].mixer).__name__ == "NeighborhoodAttention2D"
    assert [b.mixer.window_size for s in windowed.layers for b in s.blocks] == [(5, 5), (3, 3), (3, 3)]
    nnx.update(windowed, nnx.state(na, nnx.Param))
    images = random_images(5, (20, 20))
    assert rel_rms(forward(na, images), forward(windowed, images)) < 2e-6

    # DiNAT's per-block dilations, and a different mixer per stage (a 1-D one on flattened tokens).
    dinat = nnx.eval_shape(lambda: zoo.create_model("dinat_tiny", rngs=nnx.Rngs(0)))
    dilations = [[b.mixer.dilation[0] for b in stage.blocks] for stage in dinat.layers]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert num_params(dinat) == 27_901_582  # the official model's count
    mixed = make(seed=5, mixer=["neighborhood_attention", "attention"], mixer_options=[{"kernel_size": 3}, {}],
                 **small)
    grads = fast_jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(mixed, images)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_forward_flops_counts_every_matmul():
    for overrides in (CASES[0], dict(CASES[0], window_size=[(3, 5), 2], num_classes=0)):
        model = make(**overrides)
        images = random_images(0, overrides["img_size"], batch=1)
        assert model.forward_flops() == traced_matmul_flops(model, images)
    # Dense k x k convolutions run as one matmul per kernel tap (layers.conv.shifted_conv2d), so the
    # traced dots count the conv stem and downsampling too.
    conv = make(**CASES[1])
    assert conv.forward_flops() == traced_matmul_flops(conv, random_images(0, (30, 18), batch=1))
    with pytest.raises(ValueError, match=r"example_shape must be \(H, W, C\) = \(20, 28, 3\)"):
        model.forward_flops((28, 20, 3))


def test_preset_parameter_counts():
    counts = {
        "swin_tiny_patch4_window7_224": 28_288_354,  # timm's counts
        "swin_base_patch4_window7_224": 87_768_224,
        "nat_mini": 19_984_174,  # the official NAT / DiNAT models' counts
        "nat_tiny": 27_901_582,
    }
    for name, count in counts.items():
        assert num_params(nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))) == count, name


def test_errors_name_the_argument():
    def create(**overrides):
        return nnx.eval_shape(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), **overrides))

    with pytest.raises(ValueError, match=r"img_size \(30, 30\) must be divisible by patch_size \(4, 4\)"):
        create(img_size=30)
    with pytest.raises(ValueError, match="unknown mixer 'swin'"):
        create(mixer="swin")
    with pytest.raises(ValueError, match=r"num_heads must be one value or a sequence of 4"):
        create(num_heads=(3, 6))
    with pytest.raises(ValueError, match=r"block_options must be a sequence of dicts"):
        create(block_options=[[{}], [{}]])
    with pytest.raises(ValueError, match=r"stem must be one of \('patch', 'conv'\), got 'convolution'"):
        create(stem="convolution")
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        create(drop_path_rate=1.5)
    with pytest.raises(ValueError, match="remat must be one of"):
        create(remat="some")
    with pytest.raises(TypeError, match="unknown argument\\(s\\) 'depth'"):
        create(depth=3)
    model = make(img_size=32, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4)
    with pytest.raises(ValueError, match=r"images must have shape \[B,H,W,C\] = \[B, 32, 32, 3\] \(NHWC\), got \(1, 3, 32, 32\)"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"indices must be ints in \[-2, 2\)"):
        model.forward_intermediates(jnp.zeros((1, 32, 32, 3)), indices=[2])
    with pytest.raises(ValueError, match="output_fmt must be one of"):
        model.forward_intermediates(jnp.zeros((1, 32, 32, 3)), output_fmt="NLC")
    with pytest.raises(ValueError, match=r"features must have shape \[B, h, w, 16\]"):
        model.forward_head(jnp.zeros((1, 4, 4, 8)))
    assert isinstance(model, SwinTransformer) and isinstance(model.layers[0].blocks[0].mixer, WindowAttention)
