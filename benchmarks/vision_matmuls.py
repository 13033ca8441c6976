"""The dense layers of a vision train step alone, attnzoo (XLA:CPU) against torch, same CPU.

``benchmarks/vision.py`` times whole train steps. This script isolates their largest part, the
dense (linear) layers, to tell a gap in how the models are written from a gap in the matrix
multiplication libraries underneath (XLA:CPU's YNNPACK and Eigen against torch's oneDNN / MKL).

For each group of layers of one shape it runs the forward products ``y = x W`` and their
backward ``dx = dy W^T``, ``dW = x^T dy`` for every layer of the group (ViT-Ti at batch 8: 12
blocks of q/k/v, attention output, MLP up and down, and the patch embedding), with

* attnzoo: ``attnzoo.layers.common.project`` (what every ``Dense`` runs) under ``jax.jit`` of
  ``jax.value_and_grad``, one program per group;
* torch: ``torch.nn.functional.linear`` (what timm's ``nn.Linear`` runs) and ``backward()``.

Correctness first: both gradients of every input must agree to a relative RMS error below 1e-4,
or the group prints FAIL and is not timed. Times are medians over ``--repeats`` interleaved
rounds (each round runs both, in alternating order) of ``--steps`` calls, after one warm-up.

    .venv-timm/bin/python benchmarks/vision_matmuls.py
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attnzoo.layers.common import project  # noqa: E402
from attnzoo.pallas_kernels.testing import rel_rms  # noqa: E402
from common import print_and_save_table  # noqa: E402

# ViT-Ti/16 at 224, batch 8: (name, rows, fan_in, fan_out, layers)
VIT_TINY = (
    ("qkv", 8 * 197, 192, 576, 12),
    ("attention out", 8 * 197, 192, 192, 12),
    ("mlp up", 8 * 197, 192, 768, 12),
    ("mlp down", 8 * 197, 768, 192, 12),
    ("patch embedding", 8 * 196, 768, 192, 1),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    parser.add_argument("--smoke", action="store_true", help="96 rows, 2 layers per group, 1 round: checks the script runs")
    return parser.parse_args(argv)


def group_inputs(rows, fan_in, fan_out, layers, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(rows, fan_in)).astype(np.float32) for _ in range(layers)]
    ws = [(rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32) for _ in range(layers)]
    cts = [rng.normal(size=(rows, fan_out)).astype(np.float32) for _ in range(layers)]
    return xs, ws, cts


def attnzoo_group(xs, ws, cts):
    """A jitted ``() -> (loss, (dxs, dws))`` and its gradients once. The loss value keeps the
    forward products in the program (the gradients of a linear loss do not need them)."""
    cts = [jnp.asarray(c) for c in cts]

    def loss(xs, ws):
        return sum(jnp.vdot(project(x, w, 1, jnp.float32), c) for x, w, c in zip(xs, ws, cts, strict=True))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = ([jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws])

    def run():
        return jax.block_until_ready(grad(*args))

    return run, run()[1]


def torch_group(xs, ws, cts):
    import torch

    xs = [torch.from_numpy(x).requires_grad_() for x in xs]
    ws = [torch.from_numpy(np.ascontiguousarray(w.T)).requires_grad_() for w in ws]  # [out, in], as nn.Linear
    cts = [torch.from_numpy(c) for c in cts]

    def run():
        for tensor in xs + ws:
            tensor.grad = None
        loss = sum((torch.nn.functional.linear(x, w) * c).sum() for x, w, c in zip(xs, ws, cts, strict=True))
        loss.backward()
        return [x.grad for x in xs], [w.grad for w in ws]

    dxs, dws = run()
    return run, ([d.numpy() for d in dxs], [d.numpy().T for d in dws])


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    groups = VIT_TINY
    if args.smoke:
        args.repeats, args.steps = 1, 1
        groups = tuple((name, 96, fan_in, fan_out, min(layers, 2)) for name, _, fan_in, fan_out, layers in VIT_TINY)
    print(f"# dense layers of ViT-Ti, batch 8: jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs", flush=True)
    runners, flops, failed = {}, {}, False
    for index, (name, rows, fan_in, fan_out, layers) in enumerate(groups):
        inputs = group_inputs(rows, fan_in, fan_out, layers, seed=index)
        ours, (our_dx, our_dw) = attnzoo_group(*inputs)
        theirs, (their_dx, their_dw) = torch_group(*inputs)
        error = max(rel_rms(np.asarray(a), b) for a, b in zip(list(our_dx) + list(our_dw), their_dx + their_dw, strict=True))
        status = "ok" if error < 1e-4 else "FAIL"
        print(f"check {name}: gradients relative RMS error {error:.1e} {status}", flush=True)
        if status == "FAIL":
            failed = True
            continue
        runners[name] = {"attnzoo": ours, "torch": theirs}
        flops[name] = 3 * 2 * rows * fan_in * fan_out * layers

    times = {(name, side): [] for name in runners for side in ("attnzoo", "torch")}
    for round_index in range(args.repeats):
        for name, sides in runners.items():
            order = ("attnzoo", "torch") if round_index % 2 == 0 else ("torch", "attnzoo")
            for side in order:
                sides[side]()
                for _ in range(args.steps):
                    started = time.perf_counter()
                    sides[side]()
                    times[(name, side)].append(time.perf_counter() - started)

    lines = [
        f"Dense layers of ViT-Ti{' (smoke: 96 rows, 2 layers per group)' if args.smoke else ', batch 8'}: forward + backward (dx and dW); median of {args.repeats} interleaved rounds x {args.steps}.",
        "",
        "| layers | shape | attnzoo (ms) | torch (ms) | attnzoo GFLOP/s | torch GFLOP/s | attnzoo / torch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    total = {"attnzoo": 0.0, "torch": 0.0}
    for name, rows, fan_in, fan_out, layers in groups:
        if name not in runners:
            continue
        ours, theirs = (statistics.median(times[(name, side)]) for side in ("attnzoo", "torch"))
        total["attnzoo"] += ours
        total["torch"] += theirs
        lines.append(
            f"| {name} x {layers} | [{rows}, {fan_in}] x [{fan_in}, {fan_out}] | {ours * 1e3:.1f} | {theirs * 1e3:.1f} "
            f"| {flops[name] / ours / 1e9:.0f} | {flops[name] / theirs / 1e9:.0f} | {ours / theirs:.2f} |"
        )
    lines.append(f"| all | | {total['attnzoo'] * 1e3:.1f} | {total['torch'] * 1e3:.1f} | | | "
                 f"{total['attnzoo'] / max(total['torch'], 1e-12):.2f} |")
    print_and_save_table("\n".join(lines), "benchmarks/vision_matmuls.py", argv, args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()
    sys.exit(main())
