"""The registered vision models and the narrowed versions of them that tests run.

A narrowed model keeps its family's structure (stages, block kinds, stems, heads) with small
widths, depths and images, so one forward and backward compile in seconds.
"""

from attnzoo import zoo

VISION_PATTERNS = ("vit_*", "swin_*", "maxvit_*", "nat_*", "dinat_*")
LM_PATTERNS = ("lm_*", "*_lm", "*_lm_*", "zamba*")

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
}

BATCH = 2


def vision_models() -> list[str]:
    return sorted({name for pattern in VISION_PATTERNS for name in zoo.list_models(pattern)})


def lm_models() -> list[str]:
    return sorted({name for pattern in LM_PATTERNS for name in zoo.list_models(pattern)})


def small_overrides(name: str) -> dict:
    for prefix, overrides in SMALL_OVERRIDES.items():
        if name.startswith(prefix):
            return dict(overrides)
    raise KeyError(f"no narrowed overrides for the vision model {name!r}: add its family to SMALL_OVERRIDES")


def image_size(model) -> tuple[int, int]:
    size = model.img_size
    return (size, size) if isinstance(size, int) else tuple(size)
