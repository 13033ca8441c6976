"""Losses and metrics per task, on batches from :mod:`attnzoo.train.input_pipeline`.

Every metric is returned as a pair of float32 sums ``(total, weight)`` so that sums over devices,
micro-batches and eval batches combine exactly; :func:`summarize` divides them.

Batches:
  ``lm`` / ``mqar``: ``inputs`` int32 [B,T], ``targets`` int32 [B,T], ``mask`` float32 [B,T]
    (the loss is taken where mask is 1: every token for text, the query positions for MQAR).
  ``classification``: ``image`` float32 [B,H,W,C], ``label`` int32 [B], optional ``weight``
    float32 [B] (0 marks eval padding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnzoo.train.input_pipeline import TASKS


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {task!r}")
    return task


def _token_metrics(logits, targets, mask):
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weight = jnp.sum(mask)
    return {"loss": (jnp.sum(loss * mask), weight), "accuracy": (jnp.sum(correct * mask), weight)}


def metric_sums(task: str, model, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Runs ``model`` on ``batch``; returns ``{name: (sum, weight)}`` float32 scalars."""
    if task in ("lm", "mqar"):
        logits = model(batch["inputs"])
        return _token_metrics(logits, batch["targets"], batch["mask"].astype(jnp.float32))
    logits = model(batch["image"]).astype(jnp.float32)
    label = batch["label"]
    weight = batch.get("weight", jnp.ones(label.shape, jnp.float32)).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    correct = (jnp.argmax(logits, axis=-1) == label).astype(jnp.float32)
    total = jnp.sum(weight)
    return {"loss": (jnp.sum(loss * weight), total), "accuracy": (jnp.sum(correct * weight), total)}


def summarize(task: str, sums: dict) -> dict[str, float]:
    """Means from metric sums; adds perplexity and bits per token for the language tasks."""
    out = {name: float(total) / max(float(weight), 1e-9) for name, (total, weight) in sums.items()}
    if task == "lm":
        out["perplexity"] = math.exp(min(out["loss"], 80.0))
        out["bits_per_token"] = out["loss"] / math.log(2.0)
    return out


def headline_metric(task: str) -> str:
    """The eval metric a config's docstring promises (printed at the end of a run)."""
    return {"lm": "bits_per_token", "mqar": "accuracy", "classification": "accuracy"}[task]


def units(task: str, batch_shapes: dict) -> tuple[str, int]:
    """Throughput unit and how many of them one global batch holds (tokens or images)."""
    if task in ("lm", "mqar"):
        batch, length = batch_shapes["inputs"]
        return "tokens", batch * length
    return "images", batch_shapes["image"][0]


def example_flops(task: str, model, batch_shapes: dict) -> int:
    """Forward FLOPs of one example: the model's analytic ``forward_flops`` where it has one,
    else XLA's cost analysis of the compiled forward pass of one example (``model`` may be
    abstract, from ``nnx.eval_shape``: nothing is allocated or run)."""
    if hasattr(model, "forward_flops"):
        if task in ("lm", "mqar"):
            return int(model.forward_flops(batch_shapes["inputs"][1]))
        return int(model.forward_flops(tuple(batch_shapes["image"][1:])))
    key = "inputs" if task in ("lm", "mqar") else "image"
    example = jax.ShapeDtypeStruct((1, *batch_shapes[key][1:]), jnp.int32 if key == "inputs" else jnp.float32)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, example).compile()
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    return int(costs.get("flops", 0.0)) if costs else 0


def loss_weight(task: str, batch: dict) -> jax.Array:
    """Total weight of the loss positions in ``batch`` (the mean's denominator for the whole batch,
    so gradient accumulation over micro-batches sums to the full-batch gradient)."""
    if task in ("lm", "mqar"):
        return jnp.sum(batch["mask"].astype(jnp.float32))
    label = batch["label"]
    return jnp.sum(batch.get("weight", jnp.ones(label.shape, jnp.float32)).astype(jnp.float32))
