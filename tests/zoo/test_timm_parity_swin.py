"""Parity with timm's SwinTransformer: random timm weights (every parameter perturbed, norms included),
converted by zoo.load_timm_weights, give the same logits and stage features as timm, including
non-square images and windows, padded maps with shifted windows, per-stage windows, timm's
window-shrinking rule and always_partition.

Run with torch + timm installed (``make test-timm-parity``)."""

import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import float64, rel_rms
from tests.zoo.helpers import build, fast_jit

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from tests.zoo.torch_testing import numpy_state, perturbed, torch_forward  # noqa: E402

pytestmark = pytest.mark.parity

TOLERANCE = 2e-5
NAME = "swin_tiny_patch4_window7_224"

forward = fast_jit(lambda model, images: model(images))


def _logits_and_stages(model, images):
    final, stages = model.forward_intermediates(images, norm=True, output_fmt="NCHW", intermediates_only=False)
    return model.forward_head(final), stages


logits_and_stages = fast_jit(_logits_and_stages)


def images_for(size, seed, batch=2):
    height, width = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


CASES = [
    # 56 px, window 7: stage resolutions 14, 7, 4, 2 -> windows 7, 7, 4, 2, shifts only in stage 0
    dict(img_size=56, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, num_classes=10),
    # non-square image and window: maps 15x11 and 8x6 are padded to the window and shifted
    dict(img_size=(60, 44), embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=(4, 3), num_classes=5),
    # one window per stage, patch 2, max pooling, no qkv bias
    dict(img_size=36, patch_size=2, embed_dim=8, depths=(2, 1, 2), num_heads=(1, 2, 2), window_size=((4, 3), 3, 5),
         num_classes=4, global_pool="max", qkv_bias=False),
    # always_partition: stage 1 (5x5) keeps the 7x7 window and its shift, padded
    dict(img_size=40, embed_dim=8, depths=(2, 2), num_heads=(1, 1), window_size=7, num_classes=3, always_partition=True),
]


@pytest.mark.parametrize("timm_kwargs", CASES)
def test_small_swin_matches_timm(timm_kwargs):
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    source = perturbed(TimmSwin(**timm_kwargs), seed=1)
    model = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), **timm_kwargs))
    assert zoo.load_timm_weights(model, numpy_state(source)) == []
    images = images_for(timm_kwargs["img_size"], seed=2)
    theirs = torch_forward(source, images)
    logits, mine = logits_and_stages(model, images)
    assert rel_rms(logits, theirs) < TOLERANCE
    # The converted weights matter: a fresh model disagrees.
    fresh = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), **timm_kwargs))
    assert rel_rms(logits_and_stages(fresh, images)[0], theirs) > 0.1

    with torch.no_grad():
        expected = source.forward_intermediates(torch.from_numpy(images.transpose(0, 3, 1, 2)), norm=True,
                                                intermediates_only=True)
    assert len(mine) == len(expected) == len(model.feature_info)
    for ours, reference, info in zip(mine, expected, model.feature_info):
        assert ours.shape == tuple(reference.shape) and ours.shape[1] == info["num_chs"]
        assert rel_rms(ours, reference.numpy()) < TOLERANCE


@pytest.mark.slow
def test_swin_tiny_patch4_window7_224_matches_timm():
    """The full Swin-T. Random weights of std 0.2 in 768-wide layers make this deep network badly
    conditioned (timm's own float32 logits are ~2.4e-5 from its float64 ones), so exactness is
    checked in float64 on both sides, and float32 against timm's float64 logits: no further from
    them than twice timm's own float32 error."""
    source = perturbed(timm.create_model(NAME, pretrained=False), seed=3)
    state = numpy_state(source)
    images = images_for(224, seed=4, batch=1)
    with torch.no_grad():
        source64 = source.double()
        theirs64 = source64(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
        theirs32 = source64.float()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    timm_float32_error = rel_rms(theirs32, theirs64)

    model = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0)))
    assert zoo.load_timm_weights(model, state) == []
    assert rel_rms(forward(model, images), theirs64) < max(TOLERANCE, 2 * timm_float32_error)
    with float64():
        import jax.numpy as jnp

        model64 = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), param_dtype=jnp.float64,
                                            logits_dtype=jnp.float64))
        assert zoo.load_timm_weights(model64, state) == []
        assert rel_rms(forward(model64, images.astype(np.float64)), theirs64) < 1e-10


def test_converter_errors_name_the_key():
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    kwargs = dict(img_size=32, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4, num_classes=3)
    state = numpy_state(TimmSwin(**kwargs))
    model = build(lambda: zoo.create_model(NAME, rngs=nnx.Rngs(0), **kwargs))
    missing = {k: v for k, v in state.items() if k != "layers.1.blocks.0.attn.relative_position_bias_table"}
    with pytest.raises(KeyError, match="layers.1.blocks.0.attn.relative_position_bias_table"):
        zoo.load_timm_weights(model, missing)
    wrong = dict(state, **{"layers.1.downsample.reduction.weight": np.zeros((16, 16), np.float32)})
    with pytest.raises(ValueError, match="layers.1.downsample.reduction"):
        zoo.load_timm_weights(model, wrong)
    extra = dict(state, **{"layers.2.blocks.0.mlp.fc1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="layers.2.blocks.0.mlp.fc1.weight"):
        zoo.load_timm_weights(model, extra)
    nat = build(lambda: zoo.create_model("nat_mini", rngs=nnx.Rngs(0), img_size=32, depths=(1, 1), num_heads=(1, 1),
                                         embed_dim=8, mixer_options={"kernel_size": 3}))
    with pytest.raises(TypeError, match="stem='conv', downsample='conv'"):
        zoo.load_timm_weights(nat, state)
