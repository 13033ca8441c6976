"""Routed (BiFormer) attention on CPU: attnzoo ``routed_attention`` impl="xla" vs impl="reference".

Shapes are BiFormer-T's at 224 px (7x7 regions; dims 64/128/256, 32-dim heads; topk 1/4/16):

* stage 1: 56x56 tokens, 64-token regions, 2 heads, topk 1,
* stage 2: 28x28 tokens, 16-token regions, 4 heads, topk 4,
* stage 3: 14x14 tokens, 4-token regions, 8 heads, topk 16.

Method: correctness first (each impl's output and q/k/v gradients against the float64 reference;
beyond ``testing.tolerance(float32)`` relative RMS error prints FAIL instead of a time); then
``jax.jit`` forward and ``jax.jit(jax.grad(sum(out * ct)))`` forward+backward, compiled and warmed
up, ``--repeats`` calls interleaved between the impls, median reported, as a markdown table.
``--smoke`` runs batch 1 and two repeats (seconds). The Pallas kernels are not timed here (CPU only
runs them in the interpreter).

    python benchmarks/routed_attention.py [--batch 8] [--repeats 10] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, load_average, print_and_save_table  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnzoo.pallas_kernels import testing  # noqa: E402
from attnzoo.pallas_kernels.attention import routed_attention  # noqa: E402

# name, tokens, region, heads, topk (head dim 32, kv regions = query regions: BiFormer's identity
# kv downsampling).
STAGES = (
    ("stage1", 56 * 56, 64, 2, 1),
    ("stage2", 28 * 28, 16, 4, 4),
    ("stage3", 14 * 14, 4, 8, 16),
)
IMPLS = ("reference", "xla")
HEAD_DIM = 32


def make_inputs(batch, tokens, region, heads, topk, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, tokens, heads, HEAD_DIM)
    q, k, v, ct = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    regions = tokens // region
    # Distinct routes per query region, as BiFormer's top-k gives.
    routes = np.argsort(rng.random((batch, regions, regions)), axis=-1)[..., :topk].astype(np.int32)
    return q, k, v, ct, routes


def functions(impl, routes, region, ct):
    def fwd(q, k, v):
        return routed_attention(q, k, v, routes, q_region=region, kv_region=region, impl=impl)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32) * ct)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def check(impl, q, k, v, ct, routes, region) -> float:
    """Worst relative RMS error of out, dq, dk, dv against the float64 reference."""
    fwd, grad = functions(impl, routes, region, ct)
    got = (fwd(q, k, v), *grad(q, k, v))
    with testing.float64():
        args64 = testing.to_float64((q, k, v, ct))
        fwd64, grad64 = functions("reference", routes, region, args64[3])
        ref = (fwd64(*args64[:3]), *grad64(*args64[:3]))
        ref = [np.asarray(r) for r in ref]
    return max(testing.rel_rms(g, r) for g, r in zip(got, ref, strict=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--time-budget", type=float, default=60.0, help="seconds of timing per stage")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    batch, repeats = (1, 2) if args.smoke else (args.batch, args.repeats)
    tol = testing.tolerance(jnp.float32)
    rows = [
        f"routed_attention on {jax.devices()[0].platform} (load {load_average()}), batch {batch}, float32, "
        f"median of interleaved calls (ms)",
        "",
        "| stage | tokens x heads | region | topk | impl | max rel err | forward | fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, tokens, region, heads, topk in STAGES:
        q, k, v, ct, routes = make_inputs(batch, tokens, region, heads, topk)
        runners, first, errors = {}, {}, {}
        for impl in IMPLS:
            errors[impl] = check(impl, q, k, v, ct, routes, region)
            if not errors[impl] <= tol:
                continue
            fwd, grad = functions(impl, routes, region, ct)
            for kind, fn in (("fwd", fwd), ("bwd", grad)):
                jax.block_until_ready(fn(q, k, v))  # compile + warm-up
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                first[(impl, kind)] = time.perf_counter() - t0
                runners[(impl, kind)] = lambda fn=fn, a=(q, k, v): jax.block_until_ready(fn(*a))
        times = interleaved_times(runners, first, repeats, args.time_budget)
        for impl in IMPLS:
            if not errors[impl] <= tol:
                cells = ["FAIL", "FAIL"]
            else:
                cells = [f"{1e3 * np.median(times[(impl, kind)]):.2f}" for kind in ("fwd", "bwd")]
            rows.append(
                f"| {name} | {tokens} x {heads} | {region} | {topk} | {impl} | {errors[impl]:.1e} | "
                + " | ".join(cells) + " |"
            )
    print_and_save_table("\n".join(rows), "benchmarks/routed_attention.py", argv, args.output)


if __name__ == "__main__":
    main()
