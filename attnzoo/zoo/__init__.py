"""Backbones built from attnzoo layers, created by name.

>>> from attnzoo import zoo
>>> zoo.list_models("vit_*")
['vit_base_patch16_224', 'vit_small_patch16_224', 'vit_tiny_patch16_224']
>>> m = zoo.create_model("vit_tiny_patch16_224", num_classes=10, rngs=nnx.Rngs(0))
>>> lm = zoo.create_model("lm_tiny", pattern="swa,swa,swa,attn", depth=8, rngs=nnx.Rngs(0))
>>> new_tokens = zoo.generate(lm, prompts, max_new_tokens=32, temperature=0.8, top_k=40, rng=key)
"""

from attnzoo.zoo.common import LayerStack, remat_policy
from attnzoo.zoo.registry import create_model, get_model_factory, list_models, register_model

# Importing the model modules registers their presets.
from attnzoo.zoo.lm import DecoderLM  # noqa: E402
from attnzoo.zoo.vit import VisionTransformer  # noqa: E402
from attnzoo.zoo.swin import SwinTransformer  # noqa: E402
from attnzoo.zoo.maxvit import MaxViT  # noqa: E402
from attnzoo.zoo.twins import Twins  # noqa: E402
from attnzoo.zoo.crossformer import CrossFormer  # noqa: E402
from attnzoo.zoo.van import VAN  # noqa: E402
from attnzoo.zoo.davit import DaViT  # noqa: E402
from attnzoo.zoo.biformer import BiFormer  # noqa: E402
from attnzoo.zoo.hat import HAT  # noqa: E402  (super-resolution, not a classifier)
from attnzoo.zoo import vision_linear  # noqa: E402  (Agent-Swin, FLatten-Swin, Efficient-Attention Swin presets)
from attnzoo.zoo import hybrid_lm as _hybrid_lm  # noqa: E402,F401  (hybrid LM presets)
from attnzoo.zoo.zamba import ZambaLM  # noqa: E402
from attnzoo.zoo.lm import LMCache  # noqa: E402
from attnzoo.zoo.generation import generate, prefill, sample_logits  # noqa: E402
from attnzoo.zoo.timm_convert import load_timm_weights, register_timm_converter  # noqa: E402

__all__ = [
    "list_models",
    "create_model",
    "register_model",
    "get_model_factory",
    "VisionTransformer",
    "SwinTransformer",
    "MaxViT",
    "Twins",
    "CrossFormer",
    "VAN",
    "DaViT",
    "BiFormer",
    "HAT",
    "vision_linear",
    "DecoderLM",
    "ZambaLM",
    "LMCache",
    "generate",
    "prefill",
    "sample_logits",
    "load_timm_weights",
    "register_timm_converter",
    "LayerStack",
    "remat_policy",
]
