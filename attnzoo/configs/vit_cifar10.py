"""ViT-S/4 on CIFAR-10 from TFDS (prepare the data first; see the error message or README).

    tfds build cifar10 --file_format=array_record --data_dir ~/tensorflow_datasets   # once, needs TensorFlow
    python -m attnzoo.train --config attnzoo/configs/vit_cifar10.py --workdir runs/vit_cifar10

Expected: an accelerator-scale run (not measured on this project's CPU machine); the config is
tested for validity, and it runs unchanged once cifar10 is prepared.
"""

from attnzoo.configs.common import base_config


def get_config():
    config = base_config()
    config.task = "classification"
    config.data.name = "cifar10"
    config.data.eval_split = "test"
    config.data.image_size = 32
    config.data.options.mean = (0.4914, 0.4822, 0.4465)
    config.data.options.std = (0.2470, 0.2435, 0.2616)

    config.model.name = "vit_small_patch16_224"
    config.model.kwargs.img_size = 32
    config.model.kwargs.patch_size = 4
    config.model.kwargs.num_classes = 10

    config.dtype = "bfloat16"
    config.batch_size = 512
    config.eval_batch_size = 1000
    config.num_steps = 20000
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 1000
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.05
    config.checkpoint.every_steps = 2000
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.mesh.data = -1
    return config
