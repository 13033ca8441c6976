"""Defaults every config starts from (each config overrides what it needs)."""

import ml_collections
from ml_collections import config_dict

from attnzoo.train.partitioning import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    """The trainer's full set of keys with their defaults."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "lm"  # "lm" | "mqar" | "classification" | "super_resolution"

    config.data = ml_collections.ConfigDict()
    config.data.name = "python_stdlib_text"  # any TFDS name (prepared as array_record) or an embedded one
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.data_dir = config_dict.placeholder(str)  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.seq_len = config_dict.placeholder(int)  # lm / mqar
    config.data.image_size = config_dict.placeholder(int)  # classification: resize/crop side
    config.data.worker_count = 0  # grain worker processes (0: in the main process)
    config.data.options = ml_collections.ConfigDict()  # task options, e.g. mean/std for images, scale for SR

    config.model = ml_collections.ConfigDict()
    config.model.name = "lm_tiny"
    config.model.kwargs = ml_collections.ConfigDict()

    config.dtype = "float32"  # compute dtype: "float32" | "bfloat16"; params are always float32
    config.batch_size = 64  # global, over all devices and hosts
    config.eval_batch_size = 128
    config.grad_accum_steps = 1
    config.num_steps = 1000

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.clip_norm = 1.0

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = DEFAULT_RULES

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True

    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0: evaluate only at the end
    config.eval_max_batches = config_dict.placeholder(int)  # None: the whole eval split
    # Early stopping (Zoology's MQAR runs stop at eval accuracy 0.99): at each periodic eval, stop
    # (checkpoint saved) once early_stop.metric >= threshold (mode "max") or <= threshold ("min").
    config.early_stop = ml_collections.ConfigDict()
    config.early_stop.metric = config_dict.placeholder(str)  # None: off; an eval metric, e.g. "accuracy"
    config.early_stop.threshold = config_dict.placeholder(float)
    config.early_stop.mode = "max"
    config.peak_flops_per_device = config_dict.placeholder(float)  # None: table by device kind
    return config
