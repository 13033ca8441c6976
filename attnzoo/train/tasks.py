"""Losses and metrics per task, on batches from :mod:`attnzoo.train.input_pipeline`.

Every metric is returned as a pair of float32 sums ``(total, weight)`` so that sums over devices,
micro-batches and eval batches combine exactly; :func:`summarize` divides them.

Batches:
  ``lm`` / ``mqar``: ``inputs`` int32 [B,T], ``targets`` int32 [B,T], ``mask`` float32 [B,T]
    (the loss is taken where mask is 1: every token for text, the query positions for MQAR).
  ``classification``: ``image`` float32 [B,H,W,C], ``label`` int32 [B], optional ``weight``
    float32 [B] (0 marks eval padding).
  ``super_resolution``: ``lowres`` float32 [B,h,w,C] (the model input), ``image`` float32
    [B,H,W,C] (the target, H = s*h, W = s*w, values in [0, 1]), optional ``weight`` float32 [B].

Super-resolution metrics are per image, then weighted by ``weight`` over images: ``loss`` is the
mean absolute error (L1, HAT's training loss) over the pixels and channels of an image; ``psnr``
is ``10 log10(1 / MSE)`` dB of the prediction clipped to [0, 1] (MSE floored at 1e-10, so a
perfect image counts 100 dB); ``psnr_nearest`` is the same PSNR of the nearest-neighbour upsampling
of ``lowres`` (each input pixel repeated s x s times), the trivial baseline a model must beat.
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


PSNR_MIN_MSE = 1e-10


def psnr(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [0, 1]: [B,H,W,C] x2 -> float32 [B]; ``prediction`` is
    clipped to [0, 1] and the MSE floored at ``PSNR_MIN_MSE``."""
    prediction = jnp.clip(prediction.astype(jnp.float32), 0.0, 1.0)
    mse = jnp.mean(jnp.square(prediction - target.astype(jnp.float32)), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, PSNR_MIN_MSE))


def upsample_nearest(lowres: jax.Array, height: int, width: int) -> jax.Array:
    """[B,h,w,C] -> [B,height,width,C], each pixel repeated (height/h) x (width/w) times."""
    h, w = lowres.shape[1:3]
    if height % h or width % w or height // h != width // w:
        raise ValueError(
            f"super_resolution: the target [{height}, {width}] must be the input [{h}, {w}] times one "
            f"integer scale"
        )
    scale = height // h
    return jnp.repeat(jnp.repeat(lowres, scale, axis=1), scale, axis=2)


def _super_resolution_metrics(model, batch):
    lowres, target = batch["lowres"], batch["image"].astype(jnp.float32)
    prediction = model(lowres).astype(jnp.float32)
    if prediction.shape != target.shape:
        raise ValueError(
            f"super_resolution: the model maps lowres {tuple(lowres.shape)} to {tuple(prediction.shape)}, "
            f"but the target image is {tuple(target.shape)} (check the model's upscale and the data's scale)"
        )
    weight = _example_weight(batch, target.shape[0])
    total = jnp.sum(weight)
    l1 = jnp.mean(jnp.abs(prediction - target), axis=(1, 2, 3))
    baseline = upsample_nearest(lowres.astype(jnp.float32), target.shape[1], target.shape[2])

    def weighted(values):  # where(): padding rows never turn a sum into NaN
        return jnp.sum(jnp.where(weight > 0, values * weight, 0.0)), total

    return {
        "loss": weighted(l1),
        "psnr": weighted(psnr(prediction, target)),
        "psnr_nearest": weighted(psnr(baseline, target)),
    }


def _example_weight(batch: dict, rows: int) -> jax.Array:
    weight = batch.get("weight")
    return jnp.ones((rows,), jnp.float32) if weight is None else weight.astype(jnp.float32)


def metric_sums(task: str, model, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Runs ``model`` on ``batch``; returns ``{name: (sum, weight)}`` float32 scalars."""
    if task in ("lm", "mqar"):
        logits = model(batch["inputs"])
        return _token_metrics(logits, batch["targets"], batch["mask"].astype(jnp.float32))
    if task == "super_resolution":
        return _super_resolution_metrics(model, batch)
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


def eval_metric_names(task: str) -> tuple[str, ...]:
    """The metrics an eval of ``task`` reports (what :func:`summarize` returns)."""
    return {
        "lm": ("loss", "accuracy", "perplexity", "bits_per_token"),
        "mqar": ("loss", "accuracy"),
        "classification": ("loss", "accuracy"),
        "super_resolution": ("loss", "psnr", "psnr_nearest"),
    }[task]


def headline_metric(task: str) -> str:
    """The eval metric a config's docstring promises (printed at the end of a run)."""
    return {"lm": "bits_per_token", "mqar": "accuracy", "classification": "accuracy", "super_resolution": "psnr"}[task]


def units(task: str, batch_shapes: dict) -> tuple[str, int]:
    """Throughput unit and how many of them one global batch holds (tokens or images)."""
    if task in ("lm", "mqar"):
        batch, length = batch_shapes["inputs"]
        return "tokens", batch * length
    return "images", batch_shapes["image"][0]


def input_key(task: str) -> str:
    """The batch field the model is called on."""
    return {"lm": "inputs", "mqar": "inputs", "classification": "image", "super_resolution": "lowres"}[task]


def example_flops(task: str, model, batch_shapes: dict) -> int:
    """Forward FLOPs of one example: the model's analytic ``forward_flops`` where it has one,
    else XLA's cost analysis of the compiled forward pass of one example (``model`` may be
    abstract, from ``nnx.eval_shape``: nothing is allocated or run)."""
    if hasattr(model, "forward_flops"):
        if task in ("lm", "mqar"):
            return int(model.forward_flops(batch_shapes["inputs"][1]))
        return int(model.forward_flops(tuple(batch_shapes[input_key(task)][1:])))
    key = input_key(task)
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
    if task == "super_resolution":
        return jnp.sum(_example_weight(batch, batch["image"].shape[0]))
    label = batch["label"]
    return jnp.sum(batch.get("weight", jnp.ones(label.shape, jnp.float32)).astype(jnp.float32))
