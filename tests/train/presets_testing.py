"""A hybrid LM preset's config narrowed to train a few steps in tests (shared by the trainer tests)."""

from attnzoo.configs import hybrid_lm


def narrowed_preset_config(model: str, data_dir: str, num_steps: int):
    """``configs/hybrid_lm.py:model`` at width 32 (2 heads), sequences of 32 bytes, batches of 8,
    ``num_steps`` steps (warm-up 2) with one checkpoint at the end and one eval batch."""
    config = hybrid_lm.get_config(model)
    config.data.data_dir = data_dir
    config.data.seq_len = 32
    config.model.kwargs.dim = 32
    config.model.kwargs.num_heads = 2
    config.batch_size = 8
    config.eval_batch_size = 8
    config.eval_max_batches = 1
    config.num_steps = num_steps
    config.optimizer.warmup_steps = 2
    config.checkpoint.every_steps = num_steps
    return config
