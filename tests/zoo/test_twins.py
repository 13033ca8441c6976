"""The Twins backbone beyond the shared vision contract (test_vision_models.py) and timm parity
(test_timm_parity_twins.py): the presets' parameter counts and mixer layouts, swapped mixers (2-D and
1-D), per-block options, and argument errors. Structure only (nnx.eval_shape) plus one small eager call."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.layers.twins import GlobalSubsampledAttention, LocallyGroupedAttention
from attnzoo.layers.window import WindowAttention
from tests.zoo.helpers import build, num_params

SMALL = dict(img_size=32, embed_dims=(8, 16), num_heads=(1, 2), depths=(3, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1),
             num_classes=4)


def _layout(model):
    return [[(type(b.mixer).__name__, getattr(b.mixer, "window_size", None), getattr(b.mixer, "sr_ratio", None))
             for b in stage.blocks] for stage in model.stages]


# Counted by timm 1.0.31 (sum of its parameters' sizes).
TIMM_PARAMETERS = {"twins_pcpvt_small": 24_106_216, "twins_svt_small": 24_060_776}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMETERS))
def test_preset_parameter_counts_and_mixer_layout(name):
    model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
    assert num_params(model) == TIMM_PARAMETERS[name]
    assert model.resolutions == ((56, 56), (28, 28), (14, 14), (7, 7))
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    for sr, layout in zip((8, 4, 2, 1), _layout(model), strict=True):
        gsa = ("GlobalSubsampledAttention", None, (sr, sr))
        if name.startswith("twins_svt"):
            lsa = ("LocallyGroupedAttention", (7, 7), None)
            assert layout == [lsa, gsa] * (len(layout) // 2)
        else:
            assert layout == [gsa] * len(layout)


def test_wss_one_makes_a_stage_global_and_mixers_swap():
    model = nnx.eval_shape(lambda: zoo.create_model("twins_svt_small", rngs=nnx.Rngs(0), wss=(3, 1), **SMALL))
    assert _layout(model) == [
        [("LocallyGroupedAttention", (3, 3), None), ("GlobalSubsampledAttention", None, (2, 2)),
         ("LocallyGroupedAttention", (3, 3), None)],
        [("GlobalSubsampledAttention", None, (1, 1))] * 2,
    ]
    # One name per stage or a cycle of names; wss reaches window mixers, per-block options override.
    swapped = nnx.eval_shape(lambda: zoo.create_model(
        "twins_pcpvt_small", rngs=nnx.Rngs(0), wss=(4, 2), mixer=[("swin_window", "twins_global_subsampled"), "attention"],
        block_options=[[{"shift_size": 0}, {}, {"shift_size": 2}], None], **SMALL))
    first, second = swapped.stages
    assert [type(b.mixer) for b in first.blocks] == [WindowAttention, GlobalSubsampledAttention, WindowAttention]
    assert first.blocks[0].mixer.window_size == (4, 4) and first.blocks[2].mixer.shift_size == (2, 2)
    assert not second.blocks[0].spatial and second.blocks[0].mixer.causal is False
    assert swapped.forward_flops() > 0
    # A swapped model traces end to end (2-D mixer on the map, 1-D mixer on the tokens).
    model = build(lambda: zoo.create_model(
        "twins_pcpvt_small", rngs=nnx.Rngs(0), mixer=["twins_locally_grouped", "attention"],
        mixer_options=[{"window_size": 3}, {}], **SMALL))
    assert isinstance(model.stages[0].blocks[1].mixer, LocallyGroupedAttention)
    logits = jax.eval_shape(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert logits.shape == (1, 4) and logits.dtype == jnp.float32


def test_errors_name_the_argument():
    def create(**overrides):
        return nnx.eval_shape(lambda: zoo.create_model("twins_svt_small", rngs=nnx.Rngs(0),
                                                    **{**SMALL, "wss": (3, 3), **overrides}))

    with pytest.raises(ValueError, match=r"Twins: img_size \(36, 36\) gives stage 1 a 9 x 9 input, not divisible by its patch size \(2, 2\)"):
        create(img_size=36)
    with pytest.raises(ValueError, match=r"Twins: wss must be an int or a sequence of 2 \(one int or \(h, w\) pair per stage\)"):
        create(wss=(7, 7, 7))
    with pytest.raises(ValueError, match=r"Twins: sr_ratios\[1\] must be an int >= 1, got 0"):
        create(sr_ratios=(2, 0))
    with pytest.raises(ValueError, match="unknown mixer 'twins_lsa'"):
        create(mixer="twins_lsa")
    with pytest.raises(ValueError, match=r"Twins: mixer must be None, a mixer name, or a sequence of 2 entries \(one per stage"):
        create(mixer=["twins_locally_grouped"])
    with pytest.raises(ValueError, match=r"Twins: global_pool must be one of \('avg', 'max'\), got 'token'"):
        create(global_pool="token")
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        create(drop_path_rate=1.0)
    with pytest.raises(TypeError, match="twins_svt_small: unknown argument\\(s\\) 'embed_dim'"):
        create(embed_dim=8)
    with pytest.raises(ValueError, match=r"forward_flops: example_shape must be \(H, W, C\) = \(32, 32, 3\)"):
        create().forward_flops((64, 64, 3))
