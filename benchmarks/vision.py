"""Vision train steps against timm on the same CPU: forward + backward + AdamW update.

For each model that both attnzoo and timm have (default: ViT-Ti/16, Swin-T, MaxViT-T, Twins-SVT-S,
Twins-PCPVT-S and DaViT-T at 224, batch 8) it

1. checks correctness first: timm's model with random weights is converted with
   ``zoo.load_timm_weights`` and both forwards (evaluation mode, float32) must agree on random
   images to a relative RMS error below ``--check-tol``; a model that fails prints FAIL and is not
   timed (the script exits with status 1);
2. times train steps of each, interleaved: every round runs each (model, framework) in rotating
   order, so the machine's noise is shared, as one untimed step then ``--steps`` timed ones (the
   first step after the other framework ran measured up to 1.5x slower, for either); the median
   over ``--repeats`` rounds x ``--steps`` is reported with the ratio attnzoo / timm.

Both run in this one process, which re-executes itself with glibc's huge-page malloc tunable
(``attnzoo/runtime.py``): XLA:CPU's per-step buffers then cost no page faults, and torch runs
with the same setting.

The step is the same on both sides: softmax cross-entropy on random labels, AdamW (lr 1e-3,
weight decay 0.05, betas 0.9 / 0.999, eps 1e-8) over every parameter, training mode (BatchNorm
with batch statistics), no drop path. attnzoo's step is one ``jax.jit`` with donated state;
timm's is eager PyTorch (``torch.compile`` was measured no faster on this CPU).

``--dtype bfloat16`` runs attnzoo's compute in bfloat16 (parameters and optimizer in float32,
matmuls with float32 accumulation) and timm's forward under ``torch.autocast("cpu", bfloat16)``.

    .venv-timm/bin/python benchmarks/vision.py                      # make bench-vision
    .venv-timm/bin/python benchmarks/vision.py --models vit_tiny_patch16_224 --repeats 3 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attnzoo import zoo  # noqa: E402
from attnzoo.pallas_kernels.testing import rel_rms  # noqa: E402
from common import print_and_save_table  # noqa: E402

DEFAULT_MODELS = ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224", "twins_svt_small",
                  "twins_pcpvt_small", "davit_tiny")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated attnzoo = timm names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median of all timed steps reported)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per framework per round, after one untimed step")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--check-tol", type=float, default=1e-4)
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny images, 1 round: checks the script runs")
    parser.add_argument("--without-attention", action="store_true",
                        help="ablation (ViT only): attention replaced by v + 0 * (q + k) on both sides, so the "
                             "table shows everything but attention; the difference from a normal run is attention's cost")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# attnzoo
# ------------------------------------------------------------------------------------------------


def attnzoo_step(model, learning_rate=1e-3):
    """A jitted ``step(state, images, labels) -> (state, loss)`` and its initial state."""
    tx = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Plain arrays, as the trainer keeps them: nnx Variables passed into jax.grad from outside
    # could not be updated (BatchNorm statistics) at the inner trace level.
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    state = {"params": params, "rest": rest, "opt": tx.init(params)}

    def loss_fn(params, rest, images, labels):
        model = nnx.merge(graphdef, params, rest)
        logits = model(images).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return loss, rest.to_pure_dict()

    def step(state, images, labels):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["rest"], images, labels)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "rest": rest, "opt": opt}, loss

    return jax.jit(step, donate_argnums=(0,)), state


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------


def timm_step(module, dtype: str):
    import torch

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    module.train()

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        if dtype == "bfloat16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = module(images)
        else:
            logits = module(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def timm_model(name: str, img_size: int):
    """timm's ``name`` without pretrained weights or drop path, built for ``img_size`` (models that take
    any image size, such as DaViT, have no ``img_size`` argument)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, img_size=img_size, drop_path_rate=0.0)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, pretrained=False, drop_path_rate=0.0)


def randomized(module, seed: int):
    """timm module with every floating parameter and persistent buffer random (norm scales and
    variances ~1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    persistent = set(module.state_dict())  # not the derived buffers (Swin's shift masks, lookups)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point() or name not in persistent:
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            if name.endswith("running_var") or (tensor.ndim == 1 and name.endswith("weight")):
                noise = 1.0 + noise
            tensor.copy_(noise)
    return module


def without_attention(names):
    """Replaces softmax attention by ``v + 0 * (q + k)`` in attnzoo (``pk.attention``, at trace
    time) and torch (``scaled_dot_product_attention``, which timm's ViT calls): the q / k / v
    projections and their gradients stay, the attention itself is gone."""
    import torch

    from attnzoo import pallas_kernels

    if any(not name.startswith("vit_") for name in names):
        raise SystemExit(f"--without-attention: ViT models only (timm's ViT calls torch's SDPA), got {names}")

    def identity_attention(q, k, v, **_):
        return v + 0 * (q + k)

    pallas_kernels.attention = identity_attention
    torch.nn.functional.scaled_dot_product_attention = identity_attention


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    import timm
    import torch

    args = parse_args(argv)
    if args.smoke:
        args.img_size, args.batch, args.repeats, args.steps = 64, 2, 1, 1
    names = [name for name in args.models.split(",") if name]
    if args.without_attention:
        without_attention(names)
    rng = np.random.default_rng(0)
    images_np = rng.normal(size=(args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
    labels_np = rng.integers(0, 1000, size=(args.batch,)).astype(np.int64)
    images_t = torch.from_numpy(np.ascontiguousarray(images_np.transpose(0, 3, 1, 2)))
    labels_t = torch.from_numpy(labels_np)
    images_j, labels_j = jnp.asarray(images_np), jnp.asarray(labels_np, jnp.int32)

    print(f"# vision train steps: batch {args.batch} at {args.img_size}, {args.dtype}, jax {jax.__version__}, "
          f"torch {torch.__version__}, timm {timm.__version__}, {os.cpu_count()} CPUs", flush=True)
    runners, failed = {}, False
    for name in names:
        source = randomized(timm_model(name, args.img_size), 1)
        source.eval()
        model = zoo.create_model(name, rngs=nnx.Rngs(0), img_size=args.img_size, dtype=DTYPES[args.dtype])
        zoo.load_timm_weights(model, {k: v.detach().float().numpy() for k, v in source.state_dict().items()})
        model.eval()
        check = images_np[:2]
        with torch.no_grad():
            theirs = source(torch.from_numpy(np.ascontiguousarray(check.transpose(0, 3, 1, 2)))).numpy()
        ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(check)), np.float32)
        error = rel_rms(ours, theirs)
        tolerance = args.check_tol if args.dtype == "float32" else 3e-2
        status = "ok" if error < tolerance else "FAIL"
        print(f"check {name}: logits relative RMS error {error:.2e} (tolerance {tolerance:.0e}) {status}", flush=True)
        if status == "FAIL":
            failed = True
            continue
        step, state = attnzoo_step(model)
        torch_step = timm_step(source, args.dtype)
        started = time.perf_counter()
        state, loss = step(state, images_j, labels_j)
        jax.block_until_ready(loss)
        compile_s = time.perf_counter() - started
        torch_step(images_t, labels_t)
        holder = {"state": state}

        def run_ours(step=step, holder=holder):
            holder["state"], loss = step(holder["state"], images_j, labels_j)
            jax.block_until_ready(loss)

        runners[name] = {"attnzoo": run_ours, "timm": lambda f=torch_step: f(images_t, labels_t)}
        print(f"compiled {name} in {compile_s:.1f} s", flush=True)

    keys = [(name, framework) for name in runners for framework in ("attnzoo", "timm")]
    times = {key: [] for key in keys}
    for round_index in range(args.repeats):
        order = keys[round_index % len(keys):] + keys[: round_index % len(keys)] if keys else []
        for key in order:
            runners[key[0]][key[1]]()  # untimed: the first step after the other framework ran is slower
            for _ in range(args.steps):
                started = time.perf_counter()
                runners[key[0]][key[1]]()
                times[key].append(time.perf_counter() - started)

    lines = [
        f"Train step (forward + backward + AdamW), batch {args.batch} at {args.img_size}, {args.dtype}; "
        f"median of {args.repeats} interleaved rounds x {args.steps} steps"
        + (", attention replaced by v + 0 * (q + k) on both sides." if args.without_attention else "."),
        "",
        "| model | attnzoo (s) | timm (s) | attnzoo / timm |",
        "|---|---:|---:|---:|",
    ]
    for name in runners:
        ours, theirs = statistics.median(times[(name, "attnzoo")]), statistics.median(times[(name, "timm")])
        lines.append(f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |")
    print_and_save_table("\n".join(lines), "benchmarks/vision.py", argv, args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()  # both frameworks then run with huge pages (attnzoo/runtime.py)
    sys.exit(main())
