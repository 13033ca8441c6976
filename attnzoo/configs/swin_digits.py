"""A small Swin on scikit-learn's 1,797 8x8 handwritten digits (no download; needs the ``digits`` extra).

    python -m attnzoo.train --config attnzoo/configs/swin_digits.py --workdir runs/swin_digits

Expected: test accuracy ~0.97 at step 600 (0.9667 measured), in ~1.5 minutes on a 2-core CPU
(~450 images/s); the train loss reaches ~0.0005.
The model is ``swin_tiny_patch4_window7_224``'s layout shrunk by overrides: 1x1 patches of the
8x8 image, three stages at 8x8, 4x4 and 2x2 tokens (widths 32, 64, 128), 4x4 windows, shifted by
2 in every second block of the first stage (the later stages' windows cover the whole map, so
timm's rule drops the shift there). The config argument swaps every stage's mixer: the same
backbone with 3x3 neighbourhood attention (NAT's mixer) instead of windows, expected ~0.96
(0.9556 measured):

    python -m attnzoo.train --config attnzoo/configs/swin_digits.py:neighborhood --workdir runs/nat_digits
"""

from attnzoo.configs import vit_digits


MIXERS = {
    "window": ("swin_window", {}),
    "neighborhood": ("neighborhood_attention", {"kernel_size": 3}),
}


def get_config(mixer: str = "window"):
    if mixer not in MIXERS:
        raise ValueError(f"swin_digits: the config argument must be one of {sorted(MIXERS)}, got {mixer!r}")
    config = vit_digits.get_config()
    config.model.name = "swin_tiny_patch4_window7_224"
    config.model.kwargs = dict(
        img_size=8,
        patch_size=1,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=4,
        mixer=MIXERS[mixer][0],
        mixer_options=MIXERS[mixer][1],
    )
    return config
