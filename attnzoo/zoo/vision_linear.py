"""Swin-T backbones with linear-complexity global attention: Agent-Swin, FLatten-Swin and a Swin-T with
Efficient Attention in every stage.

>>> from attnzoo import zoo
>>> m = zoo.create_model("agent_swin_tiny", rngs=nnx.Rngs(0))
>>> logits = m(images)                          # images [B,224,224,3] NHWC -> [B,1000] float32
>>> f = zoo.create_model("flatten_swin_tiny", num_classes=10, rngs=nnx.Rngs(0))

All are :class:`attnzoo.zoo.swin.SwinTransformer` (timm's Swin contract: ``forward_features``,
``forward_head``, ``forward_intermediates``, ``features_only``, ...) with Swin-T's shape (C 96,
depths (2, 2, 6, 2), heads (3, 6, 12, 24), 4x4 patches, MLP ratio 4, qkv biases) and another mixer
in some stages. The official models set the window to 56, the first stage's whole map: in a stage
whose map is at most that window the attention is global and unshifted, which is how
``agent_attention`` / ``focused_linear_attention`` run here (the backbone passes each stage's
``resolution``). The official window-attention stages ('B' / 'S') use 7x7 Swin windows.

The ViT backbone (:mod:`attnzoo.zoo.vit`) calls its mixer on ``[B, 1 + N, D]`` tokens with a class
token, so these 2-D mixers do not drop into it; Agent-DeiT's and FLatten-DeiT's class-token
handling is not reproduced here.

No timm checkpoints exist for these models (timm does not have them), so no converter is registered.
"""

from __future__ import annotations

from flax import nnx

from attnzoo.zoo.common import build_from_preset
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.swin import SwinTransformer

__all__ = ["agent_swin_tiny", "flatten_swin_tiny", "efficient_attention_swin_tiny"]

_SWIN_T = dict(img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
               num_heads=(3, 6, 12, 24), window_size=7)


@register_model("agent_swin_tiny")
def agent_swin_tiny(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """Agent-Swin-T (LeapLabTHU/Agent-Attention ``agent_swin_t.yaml``: ``ATTN_TYPE: AAAB``,
    ``NUM: 9-16-49-49``, window 56): agent attention over the whole map in stages 1-3 with 9, 16
    and 49 agents, 7x7 window attention in stage 4 (its map is 7x7, so one unshifted window);
    28,902,964 parameters, 4.50 GMACs (the paper: 29M, 4.5G). Trained with drop_path_rate 0.2 (default here 0)."""
    preset = dict(_SWIN_T, mixer=("agent_attention", "agent_attention", "agent_attention", "swin_window"),
                  mixer_options=({"agent_num": 9}, {"agent_num": 16}, {"agent_num": 49}, {}))
    return build_from_preset(SwinTransformer, "agent_swin_tiny", preset, overrides, rngs)


@register_model("flatten_swin_tiny")
def flatten_swin_tiny(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """FLatten-Swin-T (LeapLabTHU/FLatten-Transformer ``flatten_swin_t.yaml``: ``ATTN_TYPE: LLSS``,
    window 56, focusing factor 3, 5x5 DWC): focused linear attention over the whole map in stages
    1-2, Swin's (shifted) 7x7 window attention in stages 3-4; 29,192,384 parameters, 4.48 GMACs (the
    paper: 29M, 4.5G). Trained with drop_path_rate 0.2 (default here 0)."""
    preset = dict(_SWIN_T, mixer=("focused_linear_attention",) * 2 + ("swin_window",) * 2)
    return build_from_preset(SwinTransformer, "flatten_swin_tiny", preset, overrides, rngs)


@register_model("efficient_attention_swin_tiny")
def efficient_attention_swin_tiny(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """Swin-T with Efficient Attention (Shen et al. 2021, softmax normalisation) over the whole map
    in every stage, key and value features per head as Swin-T's heads (32); no published model
    (the paper uses the module in detection and segmentation necks): 28,265,032 parameters (Swin-T's
    less its relative position tables), 4.44 GMACs by our count. Our own composition, for comparison."""
    preset = dict(_SWIN_T, mixer="efficient_attention")
    return build_from_preset(SwinTransformer, "efficient_attention_swin_tiny", preset, overrides, rngs)
