"""A hybrid LM preset (attnzoo.zoo.hybrid_lm) trained byte-level on Python's standard library sources.

    python -m attnzoo.train --config attnzoo/configs/hybrid_lm.py:kimi_linear_lm_tiny --workdir runs/kimi_linear

The argument after the colon is any registered LM preset (``zoo.list_models("*_lm_*")``: jamba,
kimi_linear, minimax, gdn_swa, sala, zamba, hymba; ``_tiny`` or ``_small``), default
``kimi_linear_lm_tiny``. Same data, schedule and metric as ``stdlib_bytes.py`` (validation bits
per byte, sequences of 128 bytes, batch 16, 1200 steps).

Expected: ``kimi_linear_lm_tiny`` (958k parameters) reaches 1.23 validation bits per byte at step
1200 (accuracy 0.76), in ~9.5 minutes on this 2-core CPU (4-5.5k tokens/s while sharing it with other
work); the attention baseline ``stdlib_bytes.py`` reaches 1.32. The other presets train through this
config in tests/train/test_hybrid_presets.py (a few steps); their full runs are not measured yet.
"""

from attnzoo.configs.common import base_config

DEFAULT_MODEL = "kimi_linear_lm_tiny"


def get_config(model: str | None = None):
    config = base_config()
    config.task = "lm"
    config.data.name = "python_stdlib_text"
    config.data.eval_split = "validation"
    config.data.seq_len = 128

    config.model.name = model or DEFAULT_MODEL

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
