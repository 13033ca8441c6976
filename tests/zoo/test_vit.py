"""VisionTransformer: float64 parity with an independent numpy ViT, scan == loop, features, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from attnzoo import zoo
from attnzoo.zoo import VisionTransformer
from tests.zoo.helpers import build, fast_jit, traced_matmul_flops


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def numpy_vit(model: VisionTransformer, images) -> np.ndarray:
    """timm's ViT forward in float64 numpy, reading the parameter arrays (layer i = slice [i])."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    images = np.asarray(images, np.float64)
    batch, height, width, chans = images.shape
    ph, pw = model.patch_size
    eps = 1e-6

    def layer_norm(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * scale + bias

    # Patch embedding as the strided convolution it is: one patch at a time.
    kernel = p(model.patch_embed.kernel).reshape(ph, pw, chans, -1)
    tokens = []
    for top in range(0, height, ph):
        for left in range(0, width, pw):
            patch = images[:, top : top + ph, left : left + pw, :]
            tokens.append(np.einsum("bhwc,hwcd->bd", patch, kernel) + p(model.patch_embed.bias))
    x = np.stack(tokens, axis=1)
    if model.class_token:
        x = np.concatenate([np.broadcast_to(p(model.cls_token), (batch, 1, x.shape[-1])), x], axis=1)
    x = x + p(model.pos_embed)

    blocks = model.blocks.layers
    attn = blocks.mixer
    heads, head_dim = attn.num_heads, attn.head_dim
    for i in range(model.depth):
        w = lambda v: p(v)[i]  # noqa: E731
        h = layer_norm(x, w(blocks.norm1.scale), w(blocks.norm1.bias))
        q = np.einsum("bnd,dhk->bhnk", h, w(attn.q_proj.kernel)) + w(attn.q_proj.bias).reshape(1, heads, 1, head_dim)
        k = np.einsum("bnd,dhk->bhnk", h, w(attn.k_proj.kernel)) + w(attn.k_proj.bias).reshape(1, heads, 1, head_dim)
        v = np.einsum("bnd,dhk->bhnk", h, w(attn.v_proj.kernel)) + w(attn.v_proj.bias).reshape(1, heads, 1, head_dim)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhnk,hkd->bnd", probs @ v, w(attn.o_proj.kernel)) + w(attn.o_proj.bias)
        x = x + out
        h = layer_norm(x, w(blocks.norm2.scale), w(blocks.norm2.bias))
        h = h @ w(blocks.mlp.up.kernel) + w(blocks.mlp.up.bias)
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = x + h @ w(blocks.mlp.down.kernel) + w(blocks.mlp.down.bias)
    if model.global_pool == "token":
        if model.norm is not None:
            x = layer_norm(x, p(model.norm.scale), p(model.norm.bias))
        pooled = x[:, 0]
    else:
        pooled = x[:, model.num_prefix_tokens :].mean(1)
        pooled = layer_norm(pooled, p(model.fc_norm.scale), p(model.fc_norm.bias))
    return pooled @ p(model.head.kernel) + p(model.head.bias)


VIT_CASES = {
    # overrides: odd sizes, non-square images and patches, both pools, no class token, loop
    "square_token": dict(img_size=32, patch_size=8, in_chans=3, dim=24, depth=3, num_heads=3, num_classes=7),
    "odd_avg_no_cls_loop": dict(img_size=(21, 14), patch_size=(7, 7), in_chans=2, dim=20, depth=2, num_heads=4,
                                num_classes=5, class_token=False, global_pool="avg", mlp_ratio=1.5, scan_layers=False),
    "rect_patch_avg": dict(img_size=(12, 20), patch_size=(4, 5), in_chans=1, dim=18, depth=2, num_heads=2,
                           num_classes=3, global_pool="avg", remat="full"),
}


@pytest.mark.parametrize("case", sorted(VIT_CASES))
def test_vit_float64_matches_numpy(case, x64):
    overrides = VIT_CASES[case]
    forward = fast_jit(lambda m, x: m(x))
    for seed in (0, 1):  # same shapes: compiled once
        model = build(lambda: VisionTransformer(
            param_dtype=jnp.float64, logits_dtype=jnp.float64, rngs=nnx.Rngs(0), **overrides), seed=seed)
        h, w = model.img_size
        images = np.random.default_rng(seed + 10).normal(size=(2, h, w, model.in_chans))
        logits = forward(model, jnp.asarray(images))
        assert logits.shape == (2, model.num_classes) and logits.dtype == jnp.float64
        ref = numpy_vit(model, images)
        assert _rel_err(logits, ref) < 1e-10

    # The comparison can fail: a small change in one parameter of the last block is detected.
    kernel = model.blocks.layers.mlp.down.kernel
    kernel[...] = kernel[...].at[-1, 0, 0].add(1e-4)
    assert _rel_err(forward(model, jnp.asarray(images)), ref) > 1e-8


def _small_vit(seed=3, **overrides):
    options = dict(img_size=16, patch_size=4, in_chans=3, dim=32, depth=3, num_heads=4, num_classes=5)
    return build(lambda: VisionTransformer(**{**options, **overrides}, rngs=nnx.Rngs(0)), seed=seed)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_vit_scan_and_loop_agree(remat):
    scanned = _small_vit(remat=remat, scan_layers=True, depth=2)
    looped = _small_vit(remat=remat, scan_layers=False, depth=2)
    assert jax.tree.structure(nnx.state(scanned, nnx.Param)) == jax.tree.structure(nnx.state(looped, nnx.Param))
    images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 16, 3)), jnp.float32)

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    value_and_grad = fast_jit(nnx.value_and_grad(loss))
    loss_scan, grads_scan = value_and_grad(scanned, images)
    loss_loop, grads_loop = value_and_grad(looped, images)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
    leaves_scan = jax.tree_util.tree_leaves_with_path(nnx.state(grads_scan))
    leaves_loop = jax.tree.leaves(nnx.state(grads_loop))
    assert len(leaves_scan) == len(leaves_loop) > 10
    for (path, a), b in zip(leaves_scan, leaves_loop):
        if "k_proj" in str(path) and "bias" in str(path):
            # Softmax ignores a shift shared by all keys: this gradient is zero up to rounding.
            assert np.max(np.abs(a)) < 1e-5 and np.max(np.abs(b)) < 1e-5
            continue
        assert np.any(np.asarray(a) != 0), path
        assert _rel_err(a, b) < 1e-5, path


def test_layer_stack_loop_unstacks_once():
    """The loop path takes every layer from one split per stacked parameter: the layers equal
    ``layer(i)``, and the gradient of the stack is one concatenation per parameter, with no
    per-layer pad of a gradient back to ``[N, ...]`` (N full-size buffers summed)."""
    from attnzoo.layers.common import Dense
    from attnzoo.zoo.common import LayerStack

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.dense = Dense(6, 6, logical_axes=("embed", "mlp"), use_bias=True, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.dense(x))

    stack = LayerStack(Layer, 4, scan_layers=False, rngs=nnx.Rngs(2))
    layers = stack.unstacked()
    assert len(layers) == 4
    for index, layer in enumerate(layers):
        for got, want in zip(jax.tree.leaves(nnx.state(layer)), jax.tree.leaves(nnx.state(stack.layer(index)))):
            np.testing.assert_array_equal(got, want)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
    graphdef, params = nnx.split(stack, nnx.Param)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    primitives = [eqn.primitive.name for eqn in jaxpr.eqns]
    assert primitives.count("concatenate") == 2, primitives  # kernel and bias
    assert "pad" not in primitives and "dynamic_update_slice" not in primitives, primitives
    # The same gradient as differentiating each layer on its own.
    grads = jax.grad(loss)(params)

    def by_layer(params):
        stack = nnx.merge(graphdef, params)
        y = x
        for index in range(4):
            y = stack.layer(index)(y)
        return jnp.sum(y ** 2)

    want = jax.grad(by_layer)(params)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        assert np.any(np.asarray(expected) != 0)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_vit_features_intermediates_and_feature_info():
    model = _small_vit()
    images = jnp.asarray(np.random.default_rng(7).normal(size=(2, 16, 16, 3)), jnp.float32)

    @fast_jit
    def run(model, images):
        out = dict(logits=model(images), feats=model.forward_features(images))
        out["head"] = model.forward_head(out["feats"])
        out["pre_logits"] = model.forward_head(out["feats"], pre_logits=True)
        # Per-block outputs from applying the blocks one at a time.
        x = model._embed(images)
        for i in range(model.depth):
            x = out[f"block{i}"] = model.blocks.layer(i)(x)
        out["final"], out["inter"] = model.forward_intermediates(images, indices=[0, -1], intermediates_only=False)
        out["normed"] = model.forward_intermediates(images, indices=1, norm=True)
        out["grids"] = model.forward_intermediates(images, output_fmt="NHWC")
        return out

    out = run(model, images)
    assert out["feats"].shape == (2, 17, 32) and out["pre_logits"].shape == (2, 32)
    assert _rel_err(out["head"], out["logits"]) < 1e-6
    assert _rel_err(out["final"], out["feats"]) < 1e-6
    assert _rel_err(out["inter"][0], out["block0"]) < 1e-5 and _rel_err(out["inter"][1], out["block2"]) < 1e-5
    assert _rel_err(out["normed"][0], out["feats"]) < 1e-5
    grids = out["grids"]
    assert len(grids) == 3 and all(g.shape == (2, 4, 4, 32) for g in grids)
    assert _rel_err(grids[1].reshape(2, 16, 32), out["block1"][:, 1:]) < 1e-5
    assert model.feature_info == [dict(num_chs=32, reduction=4, module=f"blocks.{i}") for i in range(3)]
    with pytest.raises(ValueError, match=r"indices must be ints in \[-3, 3\)"):
        model.forward_intermediates(images, indices=[3])
    with pytest.raises(ValueError, match="output_fmt must be 'NLC' or 'NHWC'"):
        model.forward_intermediates(images, output_fmt="NCHW")


def test_vit_headless_and_bfloat16():
    forward = fast_jit(lambda m, x: m(x))
    images = jnp.ones((2, 16, 16, 3), jnp.float32)
    pooled = forward(_small_vit(num_classes=0, global_pool="avg", dtype=jnp.bfloat16), images)
    assert pooled.shape == (2, 32) and pooled.dtype == jnp.bfloat16
    logits = forward(_small_vit(dtype=jnp.bfloat16), images)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_vit_forward_flops_equals_traced_matmuls():
    # The reference attention materialises every score, which is exactly what a bidirectional
    # ViT computes, so the traced matmul count must equal the analytic count.
    model = _small_vit(img_size=(12, 16), patch_size=4, mixer_options=dict(impl="reference"))
    images = jnp.ones((3, 12, 16, 3), jnp.float32)
    traced = traced_matmul_flops(model, images)
    assert traced == 3 * model.forward_flops()
    assert model.forward_flops((12, 16, 3)) == model.forward_flops()
    n, d, f = 13, 32, 128
    per_block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * f
    assert model.forward_flops() == 2 * 12 * (16 * 3) * d + 3 * per_block + 2 * d * 5
    with pytest.raises(ValueError, match="example_shape must be"):
        model.forward_flops((16, 16, 3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(img_size=30, patch_size=8), ValueError, r"img_size \(30, 30\) must be divisible by patch_size \(8, 8\)"),
        (dict(global_pool="token", class_token=False), ValueError, "global_pool='token' needs class_token"),
        (dict(global_pool="max"), ValueError, "global_pool must be 'token' or 'avg', got 'max'"),
        (dict(mixer="no_such_mixer"), ValueError, "unknown mixer 'no_such_mixer'"),
        (dict(remat="sometimes"), ValueError, r"remat must be one of \['dots', 'dots_no_batch', 'full', 'none', 'save_nothing'\]"),
        (dict(dim=30, num_heads=4), ValueError, r"num_heads \(4\) must divide dim \(30\)"),
    ],
)
def test_vit_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _small_vit(**kwargs)


def test_vit_rejects_bad_images():
    model = _small_vit()
    with pytest.raises(ValueError, match=r"images must have shape \[B,H,W,C\] = \[B, 16, 16, 3\].*got \(2, 3, 16, 16\)"):
        model(jnp.ones((2, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"got \(16, 16, 3\)"):
        model(jnp.ones((16, 16, 3)))
    with pytest.raises(TypeError, match="floating dtype, got uint8"):
        model(jnp.ones((1, 16, 16, 3), jnp.uint8))
    with pytest.raises(TypeError, match="images must be an array"):
        model([[1.0]])


def test_vit_preset_overrides():
    model = nnx.eval_shape(
        lambda: zoo.create_model("vit_small_patch16_224", img_size=32, depth=1, num_classes=3, rngs=nnx.Rngs(0))
    )
    assert (model.dim, model.depth, model.num_heads, model.num_classes, model.img_size) == (384, 1, 6, 3, (32, 32))
    with pytest.raises(TypeError, match=r"vit_small_patch16_224: unknown argument\(s\) 'width'.*accepts img_size"):
        zoo.create_model("vit_small_patch16_224", width=3, rngs=nnx.Rngs(0))
