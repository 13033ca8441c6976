"""Parity with timm's MaxxVit (``maxvit_*_tf``): random timm weights and BatchNorm statistics,
converted by zoo.load_timm_weights, give the same logits and intermediates at float32 tolerance, in
evaluation mode (running statistics) and training mode (batch statistics).

Run with torch + timm installed (``make test-timm-parity``)."""

import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import rel_rms
from attnzoo.zoo import maxvit as maxvit_module
from tests.zoo.helpers import fast_jit
from tests.zoo.torch_testing import numpy_state, torch_forward

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.parity

TOLERANCE = 2e-5

forward = fast_jit(lambda model, images: model(images))
intermediates = fast_jit(lambda model, images: model.forward_intermediates(images, output_fmt="NCHW"))


def randomized(module, seed: int, scale: float = 0.2):
    """Every persistent floating parameter and buffer of ``module`` random: weights of rank >= 2
    ~ N(0, 1 / fan_in) (activations stay O(1) through the 11 residual blocks, as in a trained
    network; N(0, 0.2^2) everywhere grows them to ~1e7 and float32 rounding, amplified by that
    ill-conditioning, dominates any comparison), relative position tables, biases and running
    means ~ N(0, scale^2), norm weights and running variances ~ 1 + N(0, scale^2) (variances
    positive). Non-persistent buffers (RelPosBiasTf's one-hot ``height_lookup`` / ``width_lookup``)
    are structure, not weights, and stay. Returns the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    persistent = set(module.state_dict())
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name not in persistent or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim >= 2 and not name.endswith("relative_position_bias_table"):
                tensor.copy_(noise / float(np.prod(tensor.shape[1:])) ** 0.5)
            elif name.endswith("running_var"):
                tensor.copy_((1.0 + scale * noise).abs())
            elif tensor.ndim == 1 and name.endswith("weight"):
                tensor.copy_(1.0 + scale * noise)
            else:
                tensor.copy_(scale * noise)
    return module.eval()


# A narrow MaxViT-T with every kind of block: stage 0's first block keeps the stem width (pool-only
# shortcut), later first blocks project; non-square (2, 3) windows and grids from a 64 x 96 image.
TIMM_SMALL = dict(img_size=(64, 96), embed_dim=(32, 64, 64, 64), depths=(2, 1, 1, 1), stem_width=16,
                  head_hidden_size=64, num_classes=10)
OURS_SMALL = dict(img_size=(64, 96), embed_dims=(32, 64, 64, 64), depths=(2, 1, 1, 1), stem_width=16,
                  head_hidden_size=64, num_classes=10)


def _small_pair(seed, **overrides):
    source = randomized(timm.create_model("maxvit_tiny_tf_224", pretrained=False, **TIMM_SMALL), seed=seed)
    # Built abstractly: the converter assigns every parameter and running statistic.
    model = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), **OURS_SMALL, **overrides))
    unused = zoo.load_timm_weights(model, numpy_state(source))
    assert all(key.endswith("num_batches_tracked") for key in unused), unused
    model.eval()
    return source, model


def test_small_maxvit_matches_timm(monkeypatch):
    source, model = _small_pair(seed=1)
    images = np.random.default_rng(2).normal(size=(2, 64, 96, 3)).astype(np.float32)
    theirs = torch_forward(source, images)
    assert rel_rms(np.asarray(forward(model, images)), theirs) < TOLERANCE

    with torch.no_grad():
        maps = source.forward_intermediates(torch.from_numpy(images.transpose(0, 3, 1, 2)), intermediates_only=True)
    mine = intermediates(model, images)
    assert len(mine) == len(maps) == 5
    for ours, reference in zip(mine, maps):
        assert rel_rms(np.asarray(ours), reference.numpy()) < TOLERANCE

    # The conversion matters: relative position tables loaded without flipping timm's
    # key-minus-query offsets disagree.
    unflipped = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), **OURS_SMALL))
    monkeypatch.setattr(maxvit_module, "timm_relative_bias_table",
                        lambda table: np.ascontiguousarray(table.transpose(1, 2, 0)).reshape(-1, table.shape[0]))
    zoo.load_timm_weights(unflipped, numpy_state(source))
    unflipped.eval()
    assert rel_rms(np.asarray(forward(unflipped, images)), theirs) > 1e-3


def test_small_maxvit_training_mode_matches_timm():
    """Batch statistics in every BatchNorm; the running means move as torch's with momentum 0.1
    (ours: decay 0.9). torch tracks the unbiased batch variance, attnzoo the biased one (Flax / TF)."""
    source, model = _small_pair(seed=3, conv_norm_momentum=0.9)
    model.train()
    source.train()
    images = np.random.default_rng(4).normal(size=(3, 64, 96, 3)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda model, images: model(images))(model, images))  # updates the statistics
    theirs = torch_forward(source, images)
    assert rel_rms(ours, theirs) < TOLERANCE
    ours_mean = np.asarray(model.stages[1].blocks[0].mbconv.norm2.mean[...])
    theirs_mean = source.stages[1].blocks[0].conv.norm2.running_mean.numpy()
    assert rel_rms(ours_mean, theirs_mean) < TOLERANCE


def test_maxvit_tiny_tf_224_matches_timm():
    source = randomized(timm.create_model("maxvit_tiny_tf_224", pretrained=False), seed=5)
    model = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0)))
    zoo.load_timm_weights(model, numpy_state(source))
    model.eval()
    images = np.random.default_rng(6).normal(size=(1, 224, 224, 3)).astype(np.float32)
    assert rel_rms(np.asarray(forward(model, images)), torch_forward(source, images)) < TOLERANCE


def test_converter_errors_name_the_key():
    source = timm.create_model("maxvit_tiny_tf_224", pretrained=False, **TIMM_SMALL)
    state = numpy_state(source)
    model = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), **OURS_SMALL))
    key = "stages.1.blocks.0.conv.norm1.running_var"
    with pytest.raises(KeyError, match=key):
        zoo.load_timm_weights(model, {k: v for k, v in state.items() if k != key})
    key = "stages.2.blocks.0.attn_grid.attn.rel_pos.relative_position_bias_table"
    with pytest.raises(ValueError, match=key):
        zoo.load_timm_weights(model, dict(state, **{key: np.zeros((2, 5, 5), np.float32)}))
    extra = dict(state, **{"stages.4.blocks.0.conv.conv1_1x1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="stages.4.blocks.0.conv.conv1_1x1.weight"):
        zoo.load_timm_weights(model, extra)
    # A classifier checkpoint loads into a features_only backbone (the head keys are skipped).
    backbone = nnx.eval_shape(lambda: zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0), features_only=True,
                                                       **OURS_SMALL))
    assert all(key.endswith("num_batches_tracked") for key in zoo.load_timm_weights(backbone, state))
