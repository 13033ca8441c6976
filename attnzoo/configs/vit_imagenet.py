"""ViT-B/16 on ImageNet-1k from TFDS (prepare the data first; see the error message or README).

    tfds build imagenet2012 --file_format=array_record --data_dir ~/tensorflow_datasets   # manual download
    python -m attnzoo.train --config attnzoo/configs/vit_imagenet.py --workdir runs/vit_imagenet

Expected: a pod-scale run (not measured on this project's CPU machine). ``:ti``, ``:s`` or ``:b``
after the file name picks the width. FSDP over 8 devices per data replica: ``--config.mesh.fsdp=8``.
"""

from attnzoo.configs.common import base_config

VARIANTS = {"ti": "vit_tiny_patch16_224", "s": "vit_small_patch16_224", "b": "vit_base_patch16_224"}


def get_config(variant: str = "b"):
    if variant not in VARIANTS:
        raise ValueError(f"vit_imagenet.py: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    config = base_config()
    config.task = "classification"
    config.data.name = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.image_size = 224
    config.data.options.mean = (0.485, 0.456, 0.406)
    config.data.options.std = (0.229, 0.224, 0.225)

    config.model.name = VARIANTS[variant]
    config.model.kwargs.num_classes = 1000
    config.model.kwargs.remat = "dots"

    config.dtype = "bfloat16"
    config.batch_size = 4096
    config.eval_batch_size = 4096
    config.num_steps = 93_000  # 300 epochs
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 10_000
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.3
    config.checkpoint.every_steps = 1000
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    return config
