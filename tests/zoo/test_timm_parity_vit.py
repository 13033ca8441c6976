"""Parity with timm's VisionTransformer: random timm weights, converted by zoo.load_timm_weights,
give the same logits and intermediates at float32 tolerance.

Run with torch + timm installed (``make test-timm-parity``)."""

import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import rel_rms
from tests.zoo.torch_testing import numpy_state, perturbed, torch_forward

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.parity

TOLERANCE = 2e-5


CASES = [
    # (timm model name or kwargs, attnzoo name, attnzoo overrides)
    (dict(img_size=48, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10),
     "vit_tiny_patch16_224", dict(img_size=48, patch_size=8, dim=48, depth=2, num_heads=3, num_classes=10)),
    (dict(img_size=40, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7, global_pool="avg", class_token=False),
     "vit_tiny_patch16_224", dict(img_size=40, patch_size=8, dim=32, depth=3, num_heads=2, num_classes=7,
                                  global_pool="avg", class_token=False)),
]


@pytest.mark.parametrize("timm_kwargs, name, overrides", CASES)
def test_small_vit_matches_timm(timm_kwargs, name, overrides):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    source = perturbed(TimmViT(**timm_kwargs), seed=1)
    model = zoo.create_model(name, rngs=nnx.Rngs(0), **overrides)
    assert zoo.load_timm_weights(model, numpy_state(source)) == []
    images = np.random.default_rng(2).normal(size=(2, timm_kwargs["img_size"], timm_kwargs["img_size"], 3)).astype(np.float32)
    ours = np.asarray(model(images))
    assert rel_rms(ours, torch_forward(source, images)) < TOLERANCE
    # The converted weights matter: a fresh model disagrees.
    fresh = zoo.create_model(name, rngs=nnx.Rngs(0), **overrides)
    assert rel_rms(np.asarray(fresh(images)), torch_forward(source, images)) > 0.1

    with torch.no_grad():
        theirs = source.forward_intermediates(torch.from_numpy(images.transpose(0, 3, 1, 2)), indices=[0, 1],
                                              output_fmt="NLC", intermediates_only=True)
    mine = model.forward_intermediates(images, indices=[0, 1], output_fmt="NLC")
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):  # timm drops the class token from intermediates
        assert rel_rms(np.asarray(a)[:, model.num_prefix_tokens :], b.numpy()) < TOLERANCE


@pytest.mark.slow
def test_vit_tiny_patch16_224_matches_timm():
    source = perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False), seed=3)
    model = zoo.create_model("vit_tiny_patch16_224", rngs=nnx.Rngs(0))
    assert zoo.load_timm_weights(model, numpy_state(source)) == []
    images = np.random.default_rng(4).normal(size=(1, 224, 224, 3)).astype(np.float32)
    assert rel_rms(np.asarray(model(images)), torch_forward(source, images)) < TOLERANCE


def test_converter_errors_name_the_key():
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    state = numpy_state(TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5))
    model = zoo.create_model("vit_tiny_patch16_224", rngs=nnx.Rngs(0), img_size=32, patch_size=8, dim=32, depth=1,
                             num_heads=2, num_classes=5)
    missing = {k: v for k, v in state.items() if k != "blocks.0.attn.proj.weight"}
    with pytest.raises(KeyError, match="blocks.0.attn.proj.weight"):
        zoo.load_timm_weights(model, missing)
    wrong = dict(state, **{"head.weight": np.zeros((6, 32), np.float32)})
    with pytest.raises(ValueError, match="head.weight"):
        zoo.load_timm_weights(model, wrong)
    extra = dict(state, **{"blocks.9.mlp.fc1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="blocks.9.mlp.fc1.weight"):
        zoo.load_timm_weights(model, extra)
    assert zoo.load_timm_weights(model, extra, strict=False) == ["blocks.9.mlp.fc1.weight"]
