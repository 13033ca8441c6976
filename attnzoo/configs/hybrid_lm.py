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

import ml_collections

from attnzoo.configs import stdlib_bytes

DEFAULT_MODEL = "kimi_linear_lm_tiny"


def get_config(model: str | None = None):
    """``stdlib_bytes``'s data, schedule and metric with the LM preset ``model`` (its own defaults)."""
    config = stdlib_bytes.get_config()
    config.model.name = model or DEFAULT_MODEL
    config.model.kwargs = ml_collections.ConfigDict()
    return config
