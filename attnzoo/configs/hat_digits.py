"""HAT-S x2 super-resolution of scikit-learn's 8x8 handwritten digits from 4x4 box averages (no
download; needs the ``digits`` extra): a smoke run of the super-resolution task.

    python -m attnzoo.train --config attnzoo/configs/hat_digits.py --workdir runs/hat_digits

Expected: test PSNR ~18.8 dB at step 600 (18.82 measured; 17.2 at step 200, 18.4 at step 400)
against 13.17 dB for nearest-neighbour upsampling of the 4x4 input (the ``psnr_nearest`` metric;
bicubic upsampling, ``jax.image.resize(method="cubic")``, gives 13.41 and bilinear 12.78 on the same split),
in ~1.5 minutes on a 2-core CPU (~1.2k images/s; reproduced exactly in a second run);
the train L1 loss falls from ~0.13 to ~0.07 (pixels in [0, 1]).
The task: the target is the 8x8 digit scaled to [0, 1] (pixels / 16), the input the mean of each
2x2 block (``task="super_resolution"``, ``scale=2``, random flips / 90-degree rotations of the pair
as HAT's training augments); the loss is HAT's L1. The model is ``hat_s_x2``'s layout shrunk by
overrides (298k parameters): one input channel (the mean subtracted inside the model is the
training split's pixel mean, 0.305, as HAT subtracts DIV2K's RGB mean), width 36, two residual
hybrid attention groups of two blocks with 3 heads and 4x4 windows (the whole 4x4 input, so no
block is shifted, as in the official code when the window covers the image), the convolution
branch at 36 / 4 = 9 channels with channel attention squeezing 36 to 12, overlapping
cross-attention windows of 4 * 1.5 = 6; the upsampler keeps the official 64 features.
"""

from attnzoo.configs.common import base_config

DIGITS_PIXEL_MEAN = 0.305  # mean of the digits train split's pixels / 16


def get_config():
    config = base_config()
    config.task = "super_resolution"
    config.data.name = "digits"
    config.data.eval_split = "test"
    config.data.options.scale = 2
    config.data.options.flip = True

    config.model.name = "hat_s_x2"
    config.model.kwargs.in_chans = 1
    config.model.kwargs.img_size = 4
    config.model.kwargs.upscale = 2
    config.model.kwargs.embed_dim = 36
    config.model.kwargs.depths = (2, 2)
    config.model.kwargs.num_heads = (3, 3)
    config.model.kwargs.window_size = 4
    config.model.kwargs.compress_ratio = 4
    config.model.kwargs.squeeze_factor = 3
    config.model.kwargs.overlap_ratio = 0.5
    config.model.kwargs.mlp_ratio = 2.0
    config.model.kwargs.img_range = 1.0
    config.model.kwargs.rgb_mean = (DIGITS_PIXEL_MEAN,)

    config.batch_size = 64
    config.eval_batch_size = 120
    config.num_steps = 600
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.b2 = 0.99
    config.optimizer.weight_decay = 0.0
    config.checkpoint.every_steps = 200
    config.log_every_steps = 50
    config.eval_every_steps = 200
    return config
