"""A small ViT on scikit-learn's 1,797 8x8 handwritten digits (no download; needs the ``digits`` extra).

    python -m attnzoo.train --config attnzoo/configs/vit_digits.py --workdir runs/vit_digits

Expected: test accuracy ~0.95 at step 600, in ~1.5 minutes on a 2-core CPU (~800 images/s);
the train loss reaches ~0.001 (360 test images; the model overfits 1,437 training images).
The ViT is ``vit_tiny_patch16_224``'s layout shrunk by overrides: 2x2 patches of the 8x8 image
(16 tokens + class token), width 64, depth 4.
"""

from attnzoo.configs.common import base_config


def get_config():
    config = base_config()
    config.task = "classification"
    config.data.name = "digits"
    config.data.eval_split = "test"
    config.data.options.mean = 0.5
    config.data.options.std = 0.5

    config.model.name = "vit_tiny_patch16_224"
    config.model.kwargs.img_size = 8
    config.model.kwargs.patch_size = 2
    config.model.kwargs.in_chans = 1
    config.model.kwargs.num_classes = 10
    config.model.kwargs.dim = 64
    config.model.kwargs.depth = 4
    config.model.kwargs.num_heads = 4

    config.batch_size = 64
    config.eval_batch_size = 120
    config.num_steps = 600
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.05
    config.checkpoint.every_steps = 200
    config.log_every_steps = 50
    config.eval_every_steps = 200
    return config
