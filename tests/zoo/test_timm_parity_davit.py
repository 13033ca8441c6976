"""Parity with timm's DaVit: random timm weights (every parameter perturbed, norms included), converted
by zoo.load_timm_weights, give the same logits, pre-logits and stage features as timm, including
odd image sizes (the stem and downsample padding), maps smaller than and not divisible by the
window, channel-first dual blocks, GELU position encodings, an odd downsample kernel and max pooling;
and the full DaViT-T (slow).

Run with torch + timm installed (``make test-timm-parity``)."""

import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import rel_rms
from tests.zoo.helpers import build, fast_jit

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from tests.zoo.torch_testing import numpy_state, perturbed, torch_forward  # noqa: E402

pytestmark = pytest.mark.parity

TOLERANCE = 2e-5
NAME = "davit_tiny"

# timm's DaVit argument -> ours
_RENAMES = {"attn_types": "mixers"}
_KINDS = {"spatial": "davit_window", "channel": "davit_channel"}


def ours(timm_kwargs: dict) -> dict:
    kwargs = {_RENAMES.get(k, k): v for k, v in timm_kwargs.items() if k != "img_size"}
    if "mixers" in kwargs:
        kwargs["mixers"] = tuple(_KINDS[kind] for kind in kwargs["mixers"])
    return dict(kwargs, img_size=timm_kwargs["img_size"])


def _outputs(model, images):
    final, stages = model.forward_intermediates(images, output_fmt="NCHW", intermediates_only=False)
    return model.forward_head(final), model.forward_head(final, pre_logits=True), stages


outputs = fast_jit(_outputs)


def images_for(size, seed, batch=2):
    height, width = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


CASES = [
    # 64 px, window 4: maps 16, 8, 4, 2 (the last padded to the window); two dual blocks in stage 1;
    # Florence-2's 3x3 downsample (padding 1), max pooling, MLP ratio 2
    dict(img_size=64, embed_dims=(16, 32, 32, 48), depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 3), window_size=4,
         num_classes=10, down_kernel_size=3, global_pool="max", mlp_ratio=2.0),
    # odd, non-square image (stem pad to 4, odd maps padded to even by the 2x2 downsample), windows
    # (3, 5) padded on every stage, channel attention first, GELU position encodings, no qkv bias
    dict(img_size=(45, 39), embed_dims=(12, 24, 24), depths=(1, 1, 2), num_heads=(3, 2, 4), window_size=(3, 5),
         num_classes=5, attn_types=("channel", "spatial"), cpe_act=True, qkv_bias=False),
]


@pytest.mark.parametrize("timm_kwargs", CASES)
def test_small_davit_matches_timm(timm_kwargs):
    from timm.models.davit import DaVit as TimmDaVit

    source = perturbed(TimmDaVit(**{k: v for k, v in timm_kwargs.items() if k != "img_size"}), seed=1)
    model = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), **ours(timm_kwargs)))
    assert zoo.load_timm_weights(model, numpy_state(source)) == []
    images = images_for(timm_kwargs["img_size"], seed=2)
    theirs = torch_forward(source, images)
    logits, pre_logits, mine = outputs(model, images)
    assert rel_rms(logits, theirs) < TOLERANCE
    # The converted weights matter: a fresh model disagrees.
    fresh = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), **ours(timm_kwargs)))
    assert rel_rms(outputs(fresh, images)[0], theirs) > 0.1

    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        expected = source.forward_intermediates(nchw, intermediates_only=True)
        expected_pre_logits = source.forward_head(source.forward_features(nchw), pre_logits=True).numpy()
    assert rel_rms(pre_logits, expected_pre_logits) < TOLERANCE
    assert len(mine) == len(expected) == len(model.feature_info)
    for feature, reference, info in zip(mine, expected, model.feature_info, strict=True):
        assert feature.shape == tuple(reference.shape) and feature.shape[1] == info["num_chs"]
        assert rel_rms(feature, reference.numpy()) < TOLERANCE


@pytest.mark.slow
def test_davit_tiny_matches_timm():
    """The full DaViT-T at 224 px, one image, float32 on both sides. Weights of std 0.05 keep the deep
    network well conditioned (timm's own float32 logits are ~1e-6 from its float64 ones; at std 0.2
    that grows to ~2e-4 and float32 parity would say little)."""
    source = perturbed(timm.create_model(NAME, pretrained=False), seed=3, scale=0.05)
    model = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0)))
    assert zoo.load_timm_weights(model, numpy_state(source)) == []
    images = images_for(224, seed=4, batch=1)
    theirs = torch_forward(source, images)
    assert rel_rms(outputs(model, images)[0], theirs) < TOLERANCE


def test_converter_errors_name_the_key_and_the_mismatch():
    from timm.models.davit import DaVit as TimmDaVit

    kwargs = dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3)
    state = numpy_state(TimmDaVit(**kwargs))
    model = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), img_size=32, **kwargs))
    missing = {k: v for k, v in state.items() if k != "stages.1.blocks.0.1.cpe2.proj.weight"}
    with pytest.raises(KeyError, match=r"stages\.1\.blocks\.0\.1\.cpe2\.proj\.weight"):
        zoo.load_timm_weights(model, missing)
    wrong = dict(state, **{"stages.1.downsample.conv.weight": np.zeros((16, 8, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"stages\.1\.downsample\.conv\.weight"):
        zoo.load_timm_weights(model, wrong)
    extra = dict(state, **{"stages.1.blocks.1.0.mlp.fc1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.1\.0\.mlp\.fc1\.weight"):
        zoo.load_timm_weights(model, extra)
    swapped = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), img_size=32, mixers=("swin_window",
                                                                                          "davit_channel"), **kwargs))
    with pytest.raises(TypeError, match=r"only davit_window \('spatial'\) and davit_channel \('channel'\) mixers"):
        zoo.load_timm_weights(swapped, state)
    biased = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), img_size=32,
                                            mixer_options={"davit_window": {"rel_pos_bias": True}}, **kwargs))
    with pytest.raises(TypeError, match=r"stages\[0\]\.blocks\[0\]\.mixer has a relative position bias"):
        zoo.load_timm_weights(biased, state)
