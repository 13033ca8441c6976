"""Backbones with linear-complexity global attention: Agent-Swin, FLatten-Swin, a Swin-T with Efficient
Attention in every stage, and Agent-DeiT.

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

Agent-DeiT (``agent_deit_*``) is :class:`attnzoo.zoo.vit.VisionTransformer` (DeiT's shape: 16x16
patches, class token, qkv biases) with ``agent_attention_tokens`` blocks: agents pooled from the
patch queries, the class token attending and attended with its own biases, the depthwise
convolution on the patch grid (LeapLabTHU/Agent-Attention ``agent_deit.py``). FLatten's token mixer
``focused_linear_attention_tokens`` drops into the ViT the same way (``mixer=...``); FLatten's code
publishes no DeiT model, so there is no FLatten-DeiT preset.

No timm checkpoints exist for these models (timm does not have them), so no converter is registered.
"""

from __future__ import annotations

from flax import nnx

from attnzoo.zoo.common import build_from_preset
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.swin import SwinTransformer
from attnzoo.zoo.vit import VisionTransformer

__all__ = ["agent_swin_tiny", "flatten_swin_tiny", "efficient_attention_swin_tiny", "agent_deit_tiny",
           "agent_deit_small", "agent_deit_small_448", "agent_deit_base"]

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


# Agent-DeiT: the official VisionTransformer with AgentBlocks in the first ``agent_layer`` blocks (all
# 12 unless set) and DeiT's attention blocks after; agents per block from ``AGENT.NUM`` by stage
# (blocks 0-1, 2-3, 4-9, 10-11); the window is the patch grid (img_size // 16).
_DEIT = dict(patch_size=16, in_chans=3, num_classes=1000, depth=12, qkv_bias=True)


def _agent_deit(name: str, preset: dict, agent_blocks: int, agent_num: int, overrides: dict, rngs: nnx.Rngs):
    depth = overrides.get("depth", _DEIT["depth"])
    agent_blocks = min(agent_blocks, depth)
    mixers = ("agent_attention_tokens",) * agent_blocks + ("attention",) * (depth - agent_blocks)
    options = ({"agent_num": agent_num},) * agent_blocks + ({},) * (depth - agent_blocks)
    preset = dict(_DEIT, **preset, mixer=mixers, mixer_options=options)
    return build_from_preset(VisionTransformer, name, preset, overrides, rngs)


@register_model("agent_deit_tiny")
def agent_deit_tiny(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """Agent-DeiT-T (``agent_deit_t.yaml``: 49 agents in all 12 blocks), DeiT-T's shape (D 192, 3 heads)
    at 224: 6,015,640 parameters, as the official model (the paper: 6.0M, 1.2G FLOPs)."""
    return _agent_deit("agent_deit_tiny", dict(img_size=224, dim=192, num_heads=3), 12, 49, overrides, rngs)


@register_model("agent_deit_small")
def agent_deit_small(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """Agent-DeiT-S (``agent_deit_s.yaml``: 49 agents in all 12 blocks), DeiT-S's shape (D 384, 6 heads)
    at 224: 22,647,112 parameters, as the official model (the paper: 22.7M, 4.4G FLOPs). Trained with
    drop_path_rate 0.1 (not modelled here)."""
    return _agent_deit("agent_deit_small", dict(img_size=224, dim=384, num_heads=6), 12, 49, overrides, rngs)


@register_model("agent_deit_small_448")
def agent_deit_small_448(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """Agent-DeiT-S at 448 (``agent_deit_s_448.yaml``): a 28x28 patch grid, 49 agents in all 12 blocks;
    23,070,472 parameters, as the official model (the larger position embedding and bias tables)."""
    return _agent_deit("agent_deit_small_448", dict(img_size=448, dim=384, num_heads=6), 12, 49, overrides, rngs)


@register_model("agent_deit_base")
def agent_deit_base(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """Agent-DeiT-B (``agent_deit_b.yaml``: ``agent_layer=4``, 81 agents): agent attention in the first
    4 blocks, DeiT-B's softmax attention in the other 8 (D 768, 12 heads) at 224; 87,204,904
    parameters, as the official model (the paper: 87.2M, 17.6G FLOPs). Trained with drop_path_rate 0.3
    (not modelled here)."""
    return _agent_deit("agent_deit_base", dict(img_size=224, dim=768, num_heads=12), 4, 81, overrides, rngs)
