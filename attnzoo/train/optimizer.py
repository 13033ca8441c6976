"""AdamW with linear warmup and cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

# Parameter leaves (last path component) that are never decayed, as in timm and big_vision.
NO_DECAY_LEAVES = frozenset({"bias", "scale", "pos_embed", "cls_token", "A_log", "dt_bias"})


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        names.append(str(key))
    return names


def decays(path) -> bool:
    """Whether the parameter at ``path`` gets weight decay: not biases, norm scales, position
    embeddings, class tokens or SSM-style decay parameters (``A_log``, ``dt_bias``, as fla and
    Mamba exempt them), and nothing inside a module whose name contains ``norm``."""
    names = _path_names(path)
    if names and names[-1] in NO_DECAY_LEAVES:
        return False
    return not any("norm" in name for name in names[:-1])


def weight_decay_mask(params):
    """A pytree of bools shaped like ``params``: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def learning_rate_schedule(config: Mapping, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``config.learning_rate`` over ``warmup_steps``, then cosine decay to
    ``learning_rate * min_lr_ratio`` at ``num_steps``."""
    peak = float(config["learning_rate"])
    warmup = int(config.get("warmup_steps", 0))
    if peak <= 0:
        raise ValueError(f"config.optimizer.learning_rate must be positive, got {peak}")
    if not 0 <= warmup <= num_steps:
        raise ValueError(f"config.optimizer.warmup_steps must be in [0, num_steps={num_steps}], got {warmup}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(num_steps, 1),
        end_value=peak * float(config.get("min_lr_ratio", 0.1)),
    )


def make_optimizer(config: Mapping, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``optax.adamw`` (decoupled weight decay, masked) after global-norm clipping.

    ``config`` keys: learning_rate, warmup_steps, min_lr_ratio, b1, b2, eps, weight_decay,
    clip_norm (None or 0 = no clipping).
    """
    schedule = learning_rate_schedule(config, num_steps)
    clip = config.get("clip_norm", 1.0)
    steps = [optax.clip_by_global_norm(float(clip))] if clip else []
    steps.append(
        optax.adamw(
            schedule,
            b1=float(config.get("b1", 0.9)),
            b2=float(config.get("b2", 0.95)),
            eps=float(config.get("eps", 1e-8)),
            weight_decay=float(config.get("weight_decay", 0.1)),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*steps), schedule
