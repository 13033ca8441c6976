"""Every registered model: parameter count (no allocation), a small real forward, FLOPs, logical
axis names; the registry's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers, zoo
from attnzoo.zoo import DecoderLM, VisionTransformer, ZambaLM
from tests.zoo.helpers import KNOWN_LOGICAL_AXES, build, fast_jit, logical_axes, num_params
from tests.zoo.vision_cases import sr_models, vision_models

TIMM_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "maxvit_tiny_tf_224": 30_916_528,
    "maxvit_small_tf_224": 68_927_956,
    "maxvit_base_tf_224": 119_467_708,
    "maxvit_large_tf_224": 211_785_560,
    "twins_pcpvt_small": 24_106_216,
    "twins_pcpvt_base": 43_828_456,
    "twins_pcpvt_large": 60_989_672,
    "twins_svt_small": 24_060_776,
    "twins_svt_base": 56_070_952,
    "twins_svt_large": 99_271_400,
    "davit_tiny": 28_360_168,
    "davit_small": 49_745_896,
    "davit_base": 87_954_408,
}
# Models timm does not have: the count of the official code's model (SHI-Labs nat.py / dinat.py,
# DiNAT's dilations adding no parameters; cheerss/CrossFormer; LeapLabTHU's Agent-Swin-T and
# FLatten-Swin-T configs, whose mixers were checked against the official modules).
OFFICIAL_PARAMS = {
    "nat_mini": 19_984_174,
    "nat_tiny": 27_901_582,
    "dinat_mini": 19_984_174,
    "dinat_tiny": 27_901_582,
    "crossformer_tiny": 27_776_794,
    "crossformer_small": 30_657_394,
    "crossformer_base": 51_971_554,
    "crossformer_large": 91_971_184,
    "agent_swin_tiny": 28_902_964,
    "flatten_swin_tiny": 29_192_384,
    # rayleizhu/BiFormer models/biformer.py, built in torch (paper: 13.1M / 25.5M / 56.8M).
    "biformer_tiny": 13_142_760,
    "biformer_small": 25_536_232,
    "biformer_base": 56_804_968,
    # XPixelGroup/HAT hat/archs/hat_arch.py with options/test/HAT-S_SRx*.yml / HAT_SRx*.yml, built in
    # torch (paper, x4: HAT-S 9.6M, HAT 20.8M).
    "hat_s_x2": 9_473_471,
    "hat_s_x3": 9_658_111,
    "hat_s_x4": 9_621_183,
    "hat_x2": 20_624_795,
    "hat_x3": 20_809_435,
    "hat_x4": 20_772_507,
}
# Only the paper's rounded count is known (millions, one decimal): VAN's Table of variants.
PAPER_PARAMS_M = {"van_b0": 4.1, "van_b1": 13.9, "van_b2": 26.6, "van_b3": 44.8}

# Small overrides for real forwards (full-size models are only built abstractly).
# ViT and LM share most parameter shapes, so their initializers compile once.
SMALL = {
    VisionTransformer: dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=4, num_classes=64),
    DecoderLM: dict(dim=32, depth=2, num_heads=4, vocab_size=64),
    ZambaLM: dict(dim=32, depth=4, num_heads=4, vocab_size=64, shared_every=2, adapter_rank=4),
}


def _abstract(name):
    return nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))


def _expected_lm_params(model: DecoderLM) -> int:
    d, v = model.dim, model.vocab_size
    attn = model.blocks.layers.blocks[0].mixer
    per_layer = (
        2 * d  # two RMSNorm scales
        + d * attn.head_dim * (2 * attn.num_heads + 2 * attn.num_kv_heads)  # q, k, v, o
        + 3 * d * model.mlp_dim  # swiglu gate, up, down
    )
    return v * d + model.depth * per_layer + d + (0 if model.tie_embeddings else d * v)


def test_registry_lists_the_presets():
    assert zoo.list_models("vit_*") == ["vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224"]
    assert zoo.list_models("lm_*") == ["lm_base", "lm_nano", "lm_small", "lm_tiny"]
    assert zoo.list_models() == sorted(zoo.list_models())
    assert zoo.list_models("nothing*") == []


@pytest.mark.parametrize("name", zoo.list_models())
def test_parameter_count(name):
    model = _abstract(name)
    count = num_params(model)
    if name in TIMM_PARAMS or name in OFFICIAL_PARAMS:
        assert count == TIMM_PARAMS.get(name, OFFICIAL_PARAMS.get(name))
    elif name in PAPER_PARAMS_M:
        assert round(count / 1e6, 1) == PAPER_PARAMS_M[name]
    elif name.startswith("lm_"):
        assert count == _expected_lm_params(model)
    else:  # hybrid presets and our own compositions: their mixers' parameter counts are checked in tests/layers
        assert count > 0
    # nothing was allocated
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))


# SR models: their axis names do not depend on the preset; checked once on a narrowed HAT in tests/zoo/test_hat.py.
@pytest.mark.parametrize("name", [n for n in zoo.list_models() if n not in sr_models()])
def test_logical_axis_names(name):
    model = _abstract(name)
    axes = logical_axes(model)
    assert axes
    stacked = isinstance(model, (VisionTransformer, DecoderLM, ZambaLM))  # blocks in a LayerStack
    for path, (names, ndim) in axes.items():
        assert names is not None and len(names) == ndim, (path, names)
        assert set(names) <= KNOWN_LOGICAL_AXES, (path, names)
        if stacked and "blocks" in path:
            assert names[0] == "layers", (path, names)


@pytest.mark.parametrize("name", [n for n in zoo.list_models()
                                  if (n not in vision_models() or n.startswith("vit_")) and n not in sr_models()])
def test_small_forward_and_flops(name):  # the other vision models: test_vision_models.py; SR models: test_hat.py
    factory_model = _abstract(name)
    assert factory_model.forward_flops(*(() if isinstance(factory_model, VisionTransformer) else (256,))) > 0
    overrides = dict(SMALL[type(factory_model)])
    if isinstance(factory_model, DecoderLM):
        overrides["depth"] = len(factory_model.pattern)  # one super-block of the preset's pattern
    model = zoo.create_model(name, rngs=nnx.Rngs(0), **overrides)
    if isinstance(model, VisionTransformer):
        inputs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
        shape = (2, 64)
    else:
        inputs = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 9)), jnp.int32)
        shape = (2, 9, 64)
    out = fast_jit(lambda m, x: m(x))(model, inputs)
    assert out.shape == shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    flops = model.forward_flops() if isinstance(model, VisionTransformer) else model.forward_flops(9)
    assert isinstance(flops, int) and flops > 0


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny'; did you mean .*'vit_tiny_patch16_224'.*list_models\(\)"):
        zoo.create_model("vit_tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown model 'lm_tiyn'; did you mean 'lm_tiny'"):
        zoo.get_model_factory("lm_tiyn")
    with pytest.raises(ValueError, match=r"unknown model 'zzz' Call attnzoo.zoo.list_models\(\)"):
        zoo.create_model("zzz", rngs=nnx.Rngs(0))


def test_register_model():
    with pytest.raises(ValueError, match="'lm_nano' is already registered"):
        zoo.register_model("lm_nano")(lambda *, rngs: None)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        zoo.register_model("")


def test_mixer_without_flops_is_reported():
    """A registered mixer without a ``flops`` method runs, but forward_flops names it."""

    class NoFlops(nnx.Module):
        def __init__(self, dim, num_heads, *, rngs, dtype=None, param_dtype=jnp.float32):
            self.proj = layers.Dense(dim, dim, logical_axes=("embed", "mlp"), rngs=rngs)

        def __call__(self, x, *, segment_ids=None, positions=None):
            return self.proj(x)

    name = "_zoo_test_no_flops"
    layers.register_mixer(name)(NoFlops)
    try:
        lm = build(lambda: DecoderLM(vocab_size=16, dim=8, depth=2, num_heads=2, pattern=f"attn,{name}", rngs=nnx.Rngs(0)))
        assert fast_jit(lambda m, x: m(x))(lm, jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 16)
        with pytest.raises(TypeError, match=r"DecoderLM.forward_flops: mixer .*NoFlops has no flops\(seq_len\)"):
            lm.forward_flops(4)
        vit = nnx.eval_shape(lambda: VisionTransformer(
            img_size=8, patch_size=4, in_chans=1, num_classes=2, dim=8, depth=1, num_heads=2, mixer=name, rngs=nnx.Rngs(0)))
        with pytest.raises(TypeError, match=r"VisionTransformer.forward_flops: mixer .*NoFlops"):
            vit.forward_flops()
    finally:
        from attnzoo.layers import registry

        registry._MIXERS.pop(name)


def test_remat_policy_names():
    assert zoo.remat_policy("none") == (False, None)
    assert zoo.remat_policy("full") == zoo.remat_policy("save_nothing") == (True, None)
    assert zoo.remat_policy("dots") == (True, jax.checkpoint_policies.checkpoint_dots)
    assert zoo.remat_policy("dots_no_batch") == (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    with pytest.raises(ValueError, match=r"remat must be one of \['dots', 'dots_no_batch', 'full', 'none', 'save_nothing'\], got 'all'"):
        zoo.remat_policy("all")
