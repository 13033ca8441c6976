"""A byte-level local/global hybrid LM on LM1B from TFDS (prepare the data first).

    tfds build lm1b --file_format=array_record --data_dir ~/tensorflow_datasets   # once, needs TensorFlow
    python -m attnzoo.train --config attnzoo/configs/lm1b.py --workdir runs/lm1b

Expected: an accelerator-scale run (not measured on this project's CPU machine); the config is
tested for validity, and it runs unchanged once lm1b is prepared.
"""

from attnzoo.configs.common import base_config


def get_config(pattern: str = "swa,swa,swa,attn"):
    config = base_config()
    config.task = "lm"
    config.data.name = "lm1b"
    config.data.eval_split = "test"
    config.data.seq_len = 512

    config.model.name = "lm_small"
    config.model.kwargs.vocab_size = 256
    config.model.kwargs.pattern = pattern
    config.model.kwargs.depth = 8
    config.model.kwargs.sliding_window = 128

    config.dtype = "bfloat16"
    config.batch_size = 256
    config.eval_batch_size = 256
    config.eval_max_batches = 50
    config.num_steps = 50_000
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 2000
    config.checkpoint.every_steps = 2000
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    return config
