"""Parity with timm's Twins: random timm weights (every parameter perturbed, norms included),
converted by zoo.load_timm_weights, give the same logits and stage features as timm, for PCPVT and
SVT layouts: LSA windows that pad the map (and exceed it), GSA sub-sampling that drops rows and
columns, non-square images, a stage with ``ws == 1`` (all GSA) and a non-default patch size.

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
# The small models agree to <= 6e-7 (logits and stages); 2e-6 also catches a LayerNorm epsilon of 1e-5
# in place of the blocks' 1e-6, which moves the PCPVT case's logits by 5e-6.
SMALL_TOLERANCE = 2e-6

forward = fast_jit(lambda model, images: model(images))


def _logits_and_stages(model, images):
    final, stages = model.forward_intermediates(images, norm=True, output_fmt="NCHW", intermediates_only=False)
    return model.forward_head(final), stages


logits_and_stages = fast_jit(_logits_and_stages)


def images_for(size, seed, batch=2):
    height, width = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


CASES = [
    # PCPVT, non-square: maps 16x24, 8x12, 4x6, 2x3; sub-sampling 3 drops rows and columns of 16x24 and 8x12
    ("twins_pcpvt_small", dict(img_size=(64, 96), embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4),
                               depths=(1, 2, 1, 1), mlp_ratios=(8, 8, 4, 4), sr_ratios=(3, 3, 2, 1), num_classes=7)),
    # SVT, three stages, patch 2: maps 20, 10, 5; LSA windows 6 (padding 20 to 24) and 7 (larger than the
    # 5x5 map), stage 1 all GSA (ws 1); sub-sampling 4, 3 (dropping a row and a column), 1
    ("twins_svt_small", dict(img_size=40, patch_size=2, embed_dims=(8, 16, 24), num_heads=(1, 2, 3), depths=(3, 2, 2),
                             mlp_ratios=(2, 3, 4), wss=(6, 1, 7), sr_ratios=(4, 3, 1), num_classes=5)),
]


@pytest.mark.parametrize("name, timm_kwargs", CASES)
def test_small_twins_matches_timm(name, timm_kwargs):
    from timm.models.twins import Twins as TimmTwins

    source = perturbed(TimmTwins(**timm_kwargs), seed=1)
    model = build(lambda: zoo.create_model(name, rngs=nnx.Rngs(0), **timm_kwargs))
    assert zoo.load_timm_weights(model, numpy_state(source)) == []
    images = images_for(timm_kwargs["img_size"], seed=2)
    theirs = torch_forward(source, images)
    logits, mine = logits_and_stages(model, images)
    assert rel_rms(logits, theirs) < SMALL_TOLERANCE
    # The converted weights matter: a fresh model disagrees.
    fresh = build(lambda: zoo.create_model(name, rngs=nnx.Rngs(0), **timm_kwargs))
    assert rel_rms(logits_and_stages(fresh, images)[0], theirs) > 0.1

    with torch.no_grad():
        expected = source.forward_intermediates(torch.from_numpy(images.transpose(0, 3, 1, 2)), norm=True,
                                                intermediates_only=True)
    assert len(mine) == len(expected) == len(model.feature_info)
    for ours, reference, info in zip(mine, expected, model.feature_info, strict=True):
        assert ours.shape == tuple(reference.shape) and ours.shape[1] == info["num_chs"]
        assert rel_rms(ours, reference.numpy()) < SMALL_TOLERANCE


@pytest.mark.slow
def test_twins_svt_small_matches_timm():
    """The full Twins-SVT-S at 224 px, one image, against timm's float64 logits. Weights of std 0.1
    keep the 16-block network well conditioned (timm's own float32 logits are ~1e-6 from its
    float64 ones; at std 0.2 they are ~2e-5 away, the tolerance itself)."""
    name = "twins_svt_small"
    source = perturbed(timm.create_model(name, pretrained=False), seed=3, scale=0.1)
    state = numpy_state(source)
    images = images_for(224, seed=4, batch=1)
    with torch.no_grad():
        theirs64 = source.double()(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
    model = build(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert zoo.load_timm_weights(model, state) == []
    assert rel_rms(forward(model, images), theirs64) < TOLERANCE


def test_converter_errors_name_the_key():
    from timm.models.twins import Twins as TimmTwins

    kwargs = dict(img_size=32, embed_dims=(8, 16), num_heads=(1, 2), depths=(2, 1), mlp_ratios=(2, 2), wss=(3, 3),
                  sr_ratios=(2, 1), num_classes=3)
    state = numpy_state(TimmTwins(**kwargs))
    model = build(lambda: zoo.create_model("twins_svt_small", rngs=nnx.Rngs(0), **kwargs))
    missing = {k: v for k, v in state.items() if k != "blocks.0.1.attn.sr.weight"}
    with pytest.raises(KeyError, match="blocks.0.1.attn.sr.weight"):
        zoo.load_timm_weights(model, missing)
    wrong = dict(state, **{"pos_block.1.proj.0.weight": np.zeros((16, 1, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="pos_block.1.proj.0.weight"):
        zoo.load_timm_weights(model, wrong)
    extra = dict(state, **{"blocks.1.5.mlp.fc1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="blocks.1.5.mlp.fc1.weight"):
        zoo.load_timm_weights(model, extra)
    swapped = build(lambda: zoo.create_model("twins_svt_small", rngs=nnx.Rngs(0), mixer="swin_window",
                                             mixer_options={"window_size": 2}, **kwargs))
    with pytest.raises(TypeError, match="only twins_locally_grouped and twins_global_subsampled mixers"):
        zoo.load_timm_weights(swapped, state)
