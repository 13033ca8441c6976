"""The batched products inside vision attention, XLA:CPU against torch, on all cores and on one.

``benchmarks/vision.py --without-attention`` shows that attention is most of ViT-Ti's gap to timm
and ``benchmarks/vision_matmuls.py`` that the dense layers are not. This script times what is left:
the per-(image, head) products of softmax attention, a batch of small matrices,

* scores ``S = Q K^T``: ``[G, T, D] x [G, S, D] -> [G, T, S]``;
* output ``O = P V``: ``[G, T, S] x [G, S, D] -> [G, T, D]``,

at the shapes of ViT-Ti (one 197-token tile per image and head), Swin-T's first stage (7x7
windows) and MaxViT-T's first stage (7x7 blocks), batch 8 at 224 px, with

* attnzoo: ``jnp.einsum`` under ``jax.jit`` (XLA's ``dot_general`` with one batch dimension,
  exactly what the one-tile attention in ``attnzoo.pallas_kernels.attention.xla`` runs);
* torch: ``torch.bmm`` (what SDPA's math path and timm's explicit attention run).

Every product is first checked against a float64 numpy product (relative RMS below 1e-5) or the
row prints FAIL and is not timed. The same table is then measured again in a child process pinned
to one core (``os.sched_setaffinity`` before either library starts its threads). The GFLOP/s columns
tell whether a library uses the second core for these shapes: XLA:CPU measured the same speed on
one core as on two, torch nearly twice as fast on two.

    .venv-timm/bin/python benchmarks/attention_products.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import print_and_save_table, rel_rms  # noqa: E402

# (model, groups = batch * windows * heads, tokens per group, head dim), batch 8 at 224 px
SHAPES = (
    ("ViT-Ti", 8 * 3, 197, 64),
    ("Swin-T stage 1", 8 * 64 * 3, 49, 32),
    ("MaxViT-T stage 1", 8 * 64 * 2, 49, 32),
)
PRODUCTS = ("scores Q K^T", "output P V")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median reported)")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round")
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    parser.add_argument("--smoke", action="store_true", help="2 groups per shape, 1 round: checks the script runs")
    parser.add_argument("--one-core-json", action="store_true", help=argparse.SUPPRESS)  # the pinned child
    return parser.parse_args(argv)


def operands(product, groups, tokens, dim, seed):
    rng = np.random.default_rng(seed)
    if product == "scores Q K^T":
        return rng.normal(size=(groups, tokens, dim)).astype(np.float32), rng.normal(size=(groups, tokens, dim)).astype(np.float32)
    probabilities = rng.random(size=(groups, tokens, tokens)).astype(np.float32)
    return probabilities / probabilities.sum(-1, keepdims=True), rng.normal(size=(groups, tokens, dim)).astype(np.float32)


def oracle(product, a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.einsum("gtd,gsd->gts", a, b) if product == "scores Q K^T" else np.einsum("gts,gsd->gtd", a, b)


def runners(product, a, b):
    import jax
    import jax.numpy as jnp
    import torch

    spec = "gtd,gsd->gts" if product == "scores Q K^T" else "gts,gsd->gtd"
    ours = jax.jit(lambda x, y: jnp.einsum(spec, x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    theirs = (lambda: torch.bmm(ta, tb.transpose(1, 2))) if product == "scores Q K^T" else (lambda: torch.bmm(ta, tb))
    return {
        "attnzoo": lambda: jax.block_until_ready(ours(ja, jb)),
        "torch": theirs,
    }


def measure(args):
    """``({(shape, product): {"attnzoo": s, "torch": s}}, failed)``, seconds per call."""
    results, failed = {}, False
    for index, (name, groups, tokens, dim) in enumerate(SHAPES):
        groups = 2 if args.smoke else groups
        for product in PRODUCTS:
            a, b = operands(product, groups, tokens, dim, seed=index)
            run = runners(product, a, b)
            reference = oracle(product, a, b)
            error = max(rel_rms(np.asarray(run[side]()), reference) for side in run)
            status = "ok" if error < 1e-5 else "FAIL"
            if not args.one_core_json:
                print(f"check {name} {product}: relative RMS error to float64 {error:.1e} {status}", flush=True)
            if status == "FAIL":
                failed = True
                continue
            times = {side: [] for side in run}
            for round_index in range(args.repeats):
                order = list(run) if round_index % 2 == 0 else list(run)[::-1]
                for side in order:
                    started = time.perf_counter()
                    for _ in range(args.calls):
                        run[side]()
                    times[side].append((time.perf_counter() - started) / args.calls)
            results[(name, product)] = {side: statistics.median(values) for side, values in times.items()}
    return results, failed


def one_core_results(argv):
    """The same measurement in a child process pinned to one core."""
    command = [sys.executable, os.path.abspath(__file__), "--one-core-json", *(argv if argv is not None else sys.argv[1:])]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"one-core child failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    rows = json.loads(child.stdout.strip().splitlines()[-1])
    return {(row["shape"], row["product"]): row["seconds"] for row in rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.repeats, args.calls = 1, 1
    if args.one_core_json:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import jax
    import torch

    if args.one_core_json:
        torch.set_num_threads(1)
    results, failed = measure(args)
    if args.one_core_json:
        print(json.dumps([{"shape": s, "product": p, "seconds": v} for (s, p), v in results.items()]))
        return 1 if failed else 0
    cores = len(os.sched_getaffinity(0))
    print(f"# jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), {cores} cores", flush=True)
    single = one_core_results(argv)
    lines = [
        f"Batched attention products{' (smoke: 2 groups per shape)' if args.smoke else ', batch 8 at 224 px'}: "
        f"GFLOP/s (median of {args.repeats} interleaved rounds x {args.calls} calls) on all {cores} cores "
        "and in a process pinned to one core.",
        "",
        "| shape | product | [G, T, S, D] | attnzoo | torch | attnzoo, 1 core | torch, 1 core | attnzoo / torch time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, groups, tokens, dim in SHAPES:
        groups = 2 if args.smoke else groups
        flops = 2 * groups * tokens * tokens * dim
        for product in PRODUCTS:
            if (name, product) not in results:
                continue
            both, one = results[(name, product)], single[(name, product)]
            lines.append(
                f"| {name} | {product} | [{groups}, {tokens}, {tokens}, {dim}] "
                f"| {flops / both['attnzoo'] / 1e9:.0f} | {flops / both['torch'] / 1e9:.0f} "
                f"| {flops / one['attnzoo'] / 1e9:.0f} | {flops / one['torch'] / 1e9:.0f} "
                f"| {both['attnzoo'] / both['torch']:.2f} |"
            )
    print_and_save_table("\n".join(lines), "benchmarks/attention_products.py", argv, args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()
    sys.exit(main())
