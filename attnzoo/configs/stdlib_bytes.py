"""A byte-level transformer LM on Python's own standard library sources (no download).

    python -m attnzoo.train --config attnzoo/configs/stdlib_bytes.py --workdir runs/stdlib_bytes

Expected: validation bits per byte ~1.32 at step 1200 (train loss ~1.2 nats), in ~8 minutes on a
2-core CPU (~5k tokens/s, MFU ~10%).
The corpus is the running Python's standard library ``.py`` files (tests excluded), split by file
into train and validation; the metric is validation bits per byte.
"""

from attnzoo.configs.common import base_config


def get_config(pattern: str | None = None):
    config = base_config()
    config.task = "lm"
    config.data.name = "python_stdlib_text"
    config.data.eval_split = "validation"
    config.data.seq_len = 128

    config.model.name = "lm_tiny"
    config.model.kwargs.vocab_size = 256
    config.model.kwargs.pattern = pattern or "swa,attn"
    config.model.kwargs.sliding_window = 32

    config.batch_size = 16
    config.eval_batch_size = 64
    config.eval_max_batches = 20
    config.num_steps = 1200
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 100
    config.checkpoint.every_steps = 300
    config.log_every_steps = 50
    config.eval_every_steps = 600
    return config
