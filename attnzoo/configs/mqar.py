"""The default run: a 2-layer attention LM learns multi-query associative recall (MQAR, Zoology).

    python -m attnzoo.train --config attnzoo/configs/mqar.py --workdir runs/mqar

Expected: eval accuracy at the query positions ~0.996 (>= 0.99) at step 1000, in ~2 minutes on a
2-core CPU (~42k tokens/s, MFU ~12% of the machine's float32 matmul peak); the loss falls
sharply between steps 400 and 600 once the induction circuit forms.
Other mixer patterns: ``--config attnzoo/configs/mqar.py:swa,attn`` (or
``--config.model.kwargs.pattern=swa,attn``) trains a sliding-window (16 tokens) + global model.
"""

from attnzoo.configs.common import base_config


def get_config(pattern: str | None = None):
    config = base_config()
    config.task = "mqar"
    config.data.name = "mqar/v256_t64_kv8"
    config.data.eval_split = "test"
    config.data.seq_len = 64

    config.model.name = "lm_nano"
    config.model.kwargs.vocab_size = 256
    config.model.kwargs.dim = 64
    config.model.kwargs.depth = 2
    config.model.kwargs.num_heads = 2
    config.model.kwargs.pattern = pattern or "attn"
    config.model.kwargs.sliding_window = 16

    config.batch_size = 64
    config.eval_batch_size = 250
    config.num_steps = 1000
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1
    config.checkpoint.every_steps = 500
    config.log_every_steps = 50
    config.eval_every_steps = 500
    return config
