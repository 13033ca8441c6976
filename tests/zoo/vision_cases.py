"""The registered vision models and the narrowed versions of them that tests run.

A narrowed model keeps its family's structure (stages, block kinds, stems, heads) with small
widths, depths and images, so one forward and backward compile in seconds.
"""

from attnzoo import zoo

VISION_PATTERNS = ("vit_*", "swin_*", "maxvit_*", "nat_*", "dinat_*", "agent_*", "flatten_*", "efficient_attention_*",
                   "davit_*", "van_*", "twins_*", "crossformer_*", "biformer_*")
LM_PATTERNS = ("lm_*", "*_lm", "*_lm_*", "zamba*")
# Image-to-image super-resolution models (not classifiers: their contract is tested in tests/zoo/test_hat.py).
SR_PATTERNS = ("hat_*",)

# Name prefix -> overrides; the first matching prefix wins.
SMALL_OVERRIDES = {
    "vit_": dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=4, num_classes=10),
    # 16x16 tokens after the 4x4 patches: 4x4 windows shifted by 2 in stages 0 and 1; the last
    # stage's 2x2 map clamps the window (a 1x1 map would leave the bias table without gradient).
    "swin_": dict(img_size=64, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
                  num_classes=10),
    # Conv stem to 8x8 tokens; DiNAT's dilations (8, 4, 2 per stage) pad the small maps as NATTEN does.
    "nat_": dict(img_size=32, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    "dinat_": dict(img_size=32, embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    # Stem to 32x32, stages 16..2: 2x2 windows and grids (img_size // 32); stage 0 has a stride-1 block.
    "maxvit_": dict(img_size=64, embed_dims=(16, 32, 32, 32), depths=(2, 1, 1, 1), stem_width=16, head_dim=16,
                    head_hidden_size=32, num_classes=10),
    # Agent-DeiT (before "agent_": the Swin variants): a 4x4 patch grid with a class token; 49 / 81
    # agents pooled up from it; depth 5 keeps Agent-DeiT-B's two runs (4 agent blocks, 1 attention).
    "agent_deit_": dict(img_size=32, patch_size=8, dim=16, depth=5, num_heads=2, num_classes=10),
    # Swin-T variants with global linear attention (agent: stages 0-2, 9 / 16 / 49 agents pooled from
    # 16x16, 8x8 and 4x4 maps; FLatten: stages 0-1; efficient: all), one block per stage; the last
    # stage's 2x2 map keeps Swin's bias table and efficient attention's keys trained.
    "agent_": dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    "flatten_": dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    "efficient_attention_": dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                                 num_classes=10),
    # Two stages (a DaViT block compiles ~2x a Swin block: two position encodings each): the stem pads
    # 28 px to 7x7, the downsample pads 7x7 to 8x8 -> 4x4; 3x3 windows padded on both maps; one dual
    # block (window, then channel attention) per stage.
    "davit_": dict(img_size=28, embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), window_size=3,
                   num_classes=10),
    # Overlapping patch embeddings to 12x12, 6x6, 3x3 and 2x2 maps; every preset narrows to this
    # structure (they share the MLP ratios).
    "van_": dict(img_size=48, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_classes=10),
    # Twins (PCPVT and SVT narrow alike): maps 16, 8, 4, 2; stage 0 is SVT-like (3x3 LSA windows, padded,
    # then GSA sub-sampling 4), stages 1-3 PCPVT-like (wss 1: GSA only, sub-sampling 2, 2, 1); PEG in each.
    "twins_": dict(img_size=64, embed_dims=(16, 16, 32, 32), num_heads=(1, 2, 2, 4), depths=(2, 1, 1, 1),
                   mlp_ratios=(2, 2, 2, 2), sr_ratios=(4, 2, 2, 1), wss=(3, 1, 1, 1), num_classes=10),
    # CEL stem to 16x16, maps 16, 8, 4, 2 with 3x3 groups: SDA padded to 18 / 9 / 6, stage 0's LDA with
    # interval 4 padded to 24 (groups of padding only); the 2x2 map shrinks to one 2x2 SDA group.
    # Width 64 keeps the dynamic position bias MLP (dim // 16 = 4 wide) away from a degenerate LayerNorm.
    "crossformer_": dict(img_size=64, embed_dim=(64, 64, 64, 64), depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 2),
                         group_size=3, intervals=(4, 2, 1, 1), num_classes=10),
    # BiFormer (T/S/B narrow alike): conv stem to 16x16, maps 16, 8, 4, 2; 3x3 routing regions padded
    # to 18 / 9 / 6 (auto_pad) with top-k 1, 2, 4; attention with LePE on the 2x2 map.
    "biformer_": dict(img_size=64, embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), n_win=3,
                      topk=(1, 2, 4, None), auto_pad=True, num_classes=10),
}

BATCH = 2


def vision_models() -> list[str]:
    return sorted({name for pattern in VISION_PATTERNS for name in zoo.list_models(pattern)})


def lm_models() -> list[str]:
    return sorted({name for pattern in LM_PATTERNS for name in zoo.list_models(pattern)})


def sr_models() -> list[str]:
    return sorted({name for pattern in SR_PATTERNS for name in zoo.list_models(pattern)})


def small_overrides(name: str) -> dict:
    for prefix, overrides in SMALL_OVERRIDES.items():
        if name.startswith(prefix):
            return dict(overrides)
    raise KeyError(f"no narrowed overrides for the vision model {name!r}: add its family to SMALL_OVERRIDES")


def image_size(model) -> tuple[int, int]:
    size = model.img_size
    return (size, size) if isinstance(size, int) else tuple(size)
