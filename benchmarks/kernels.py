"""One table for every op of ``attnzoo.pallas_kernels``: cost, CPU time, memory, lowering, roofline.

For each op (every public function with an ``impl`` argument: the attention family, the chunked
linear recurrences and the state-space scans) at one problem size, the script

1. checks correctness first: the ``xla`` path's output and the gradients of every differentiable
   input (``jax.vjp`` with a fixed random cotangent) against the op's own ``impl="reference"``
   evaluated in float64 on the same values; relative RMS error within
   ``attnzoo.pallas_kernels.testing.tolerance(float32)``. A failing op prints FAIL instead of its
   times, and the script exits with status 1. ``attention_decode`` has no backward (decoding) and
   is checked forward only.
2. reads FLOPs and bytes accessed of the compiled ``xla`` forward + backward from XLA's cost
   analysis (``compiled.cost_analysis()``), and XLA's memory estimate (temp + arguments + outputs,
   ``compiled.memory_analysis()``) for ``xla`` and ``reference``. XLA counts a while loop's body
   once, so for ``selective_scan`` (whose ``xla`` path is a token-by-token scan inside a scan over
   chunks) the FLOPs are counted by hand, marked "(by hand)", and its bytes are marked "(loops once)";
3. times forward + backward of ``xla`` and ``reference`` (float32) on this CPU, interleaved rounds,
   median of ``--repeats``;
4. lowers the op's Pallas kernels (``impl="pallas"``, forward, and backward where the op has one)
   for TPU (Mosaic) and GPU (Triton) on this machine, the way the tests do
   (``attnzoo.pallas_kernels.testing.assert_lowers``): "fwd+bwd" means both passes lower to the
   platform's kernel call;
5. states the kernel's default block sizes;
6. gives a roofline *estimate*: the arithmetic intensity of an ideally fused kernel, FLOPs over
   the bytes it cannot avoid moving (the forward + backward program's arguments and outputs, from
   ``memory_analysis()``; the XLA:CPU program's own "bytes accessed" are shown beside it), against
   the ridge points of a TPU v5e (197 TFLOP/s bf16, 819 GB/s: 240 FLOP/byte) and an H100 SXM
   (989 TFLOP/s dense bf16, 3.35 TB/s: 295 FLOP/byte), and which side of each ridge the op falls.
   Nothing here was run on a TPU or GPU.

Example::

    python benchmarks/kernels.py --output benchmarks/results/kernels.md
    python benchmarks/kernels.py --ops attention,gated_delta_rule --length 2048
    python benchmarks/kernels.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, fmt_mib, interleaved_times, load_average, memory_bytes  # noqa: E402
from recurrent import OPTIONAL_OPS, RECURRENT_OPS, make_inputs, op_arguments  # noqa: E402

RIDGES = {  # name: (peak FLOP/s, bytes/s); dense bf16 matmul peaks from the vendors' data sheets
    "TPU v5e": (197e12, 819e9),
    "H100 SXM": (989e12, 3.35e12),
}
CHUNK_SIZE = 64
REGION = 16  # routed_attention: tokens per region (BiFormer-T stage 2 at 224 px: 4x4)
TOPK = 4
NEIGHBORHOOD_KERNEL = 7


@dataclass
class OpCase:
    """One op at one size: ``forward(impl)(*arrays) -> output array``; ``diff`` the positions of the
    differentiable arrays (empty: forward only); ``blocks`` the kernel's default tiling."""

    name: str
    shape: str
    arrays: list
    forward: Callable[[str], Callable]
    diff: tuple[int, ...]
    blocks: str
    # FLOPs of forward + backward counted by hand, for an op whose xla path does its work inside
    # nested loops: XLA's cost analysis counts a while loop's body once, not per iteration.
    analytic_flops: float | None = None


def _recurrent_case(op, args) -> OpCase:
    from attnzoo import pallas_kernels as pk

    inputs = make_inputs(args, args.length)
    _, arrays = op_arguments(op, inputs)
    analytic = None
    if op == "selective_scan":
        forward = lambda impl: lambda *xs: pk.selective_scan(*xs, chunk_size=CHUNK_SIZE, impl=impl)[0]  # noqa: E731
        blocks = f"chunk {CHUNK_SIZE}, {pk.ScanBlockSizes()}"
        # Per token, channel and state: decay (multiply, exp), input (multiply), update (multiply,
        # add), readout (multiply, add) = 7 forward; the backward ~2x the forward.
        batch, length, channels = arrays[0].shape
        analytic = 3 * 7 * batch * length * channels * arrays[2].shape[-1]
    else:
        fn = getattr(pk, op)
        forward = lambda impl: lambda *xs: fn(*xs, chunk_size=CHUNK_SIZE, impl=impl)[0]  # noqa: E731
        blocks = f"chunk {CHUNK_SIZE}, {pk.RecurrentBlockSizes()}" if op != "ssd" else f"chunk {CHUNK_SIZE}"
    shape = "x".join(str(d) for d in arrays[0].shape)
    return OpCase(op, shape, arrays, forward, tuple(range(len(arrays))), blocks, analytic)


def _attention_case(args) -> OpCase:
    from attnzoo import pallas_kernels as pk

    inputs = make_inputs(args, args.length)
    arrays = [inputs["q"], inputs["k"], inputs["v"]]
    return OpCase(
        "attention", "x".join(map(str, inputs["q"].shape)) + " causal", arrays,
        lambda impl: lambda q, k, v: pk.attention(q, k, v, causal=True, impl=impl), (0, 1, 2),
        str(pk.BlockSizes()),
    )


def _decode_case(args) -> OpCase:
    from attnzoo import pallas_kernels as pk

    rng = np.random.default_rng(args.seed)
    b, h, d = args.batch, args.heads, args.key_dim
    q = rng.standard_normal((b, h, d), dtype=np.float32)
    k = rng.standard_normal((b, args.length, h, d), dtype=np.float32)
    v = rng.standard_normal((b, args.length, h, args.value_dim), dtype=np.float32)
    lengths = np.full((b,), args.length - args.length // 3, np.int32)
    return OpCase(
        "attention_decode", f"q {b}x{h}x{d}, cache {args.length}", [q, k, v, lengths],
        lambda impl: lambda q, k, v, n: pk.attention_decode(q, k, v, n, impl=impl), (),
        str(pk.DecodeBlockSizes()),
    )


def _neighborhood_case(args) -> OpCase:
    from attnzoo import pallas_kernels as pk

    side = max(NEIGHBORHOOD_KERNEL, int(round(args.length ** 0.5)))
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, side, side, args.heads, args.key_dim)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    return OpCase(
        "neighborhood_attention", f"{args.batch}x{side}x{side}x{args.heads}x{args.key_dim}, 7x7", arrays,
        lambda impl: lambda q, k, v: pk.neighborhood_attention(q, k, v, NEIGHBORHOOD_KERNEL, impl=impl),
        (0, 1, 2), f"attention engine, {pk.BlockSizes()}",
    )


def _routed_case(args) -> OpCase:
    from attnzoo.pallas_kernels.attention import routed_attention

    rng = np.random.default_rng(args.seed)
    regions = max(TOPK, args.length // REGION)
    tokens = regions * REGION
    shape = (args.batch, tokens, args.heads, args.key_dim)
    q, k = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    v = rng.standard_normal(shape[:3] + (args.value_dim,), dtype=np.float32)
    routes = np.stack([
        np.stack([rng.permutation(regions)[:TOPK] for _ in range(regions)]) for _ in range(args.batch)
    ]).astype(np.int32)
    return OpCase(
        "routed_attention", f"{args.batch}x{tokens}x{args.heads}x{args.key_dim}, {regions} regions of "
        f"{REGION}, top-{TOPK}", [q, k, v, routes],
        lambda impl: lambda q, k, v, r: routed_attention(q, k, v, r, q_region=REGION, kv_region=REGION, impl=impl),
        (0, 1, 2), f"one region per tile ({REGION} tokens)",
    )


def build_cases(args) -> list[OpCase]:
    builders = {
        "attention": lambda: _attention_case(args),
        "attention_decode": lambda: _decode_case(args),
        "neighborhood_attention": lambda: _neighborhood_case(args),
        "routed_attention": lambda: _routed_case(args),
        **{op: (lambda op=op: _recurrent_case(op, args)) for op in RECURRENT_OPS if op not in OPTIONAL_OPS},
    }
    unknown = sorted(set(args.ops) - set(builders))
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; known: {sorted(builders)}")
    return [builders[name]() for name in args.ops]


# --------------------------------------------------------------------------------------------
# measuring one op


def _loss_and_grad(forward, diff, ct):
    """``f(*arrays) -> (out, grads)``: the output and the gradients of ``sum(out * ct)``."""
    import jax
    import jax.numpy as jnp

    def f(*xs):
        if not diff:
            return forward(*xs), ()

        def loss(*d):
            full = list(xs)
            for i, x in zip(diff, d, strict=True):
                full[i] = x
            out = forward(*full)
            return jnp.sum(out.astype(ct.dtype) * ct), out

        grads, out = jax.grad(loss, argnums=tuple(range(len(diff))), has_aux=True)(*[xs[i] for i in diff])
        return out, grads

    return f


def check(case: OpCase, ct64) -> tuple[float, bool]:
    """Largest relative RMS error of the ``xla`` output and gradients against float64 ``reference``."""
    import jax
    import jax.numpy as jnp

    from attnzoo.pallas_kernels import testing

    def cast(x, dtype):
        x = np.asarray(x)
        return jnp.asarray(x, dtype) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)

    with testing.float64():
        ref = _loss_and_grad(case.forward("reference"), case.diff, jnp.asarray(ct64))
        ref_out, ref_grads = jax.jit(ref)(*[cast(x, jnp.float64) for x in case.arrays])
        ref_leaves = [np.asarray(ref_out)] + [np.asarray(g) for g in ref_grads]
    got = _loss_and_grad(case.forward("xla"), case.diff, jnp.asarray(ct64, jnp.float32))
    out, grads = jax.jit(got)(*[cast(x, jnp.float32) for x in case.arrays])
    errors = [testing.rel_rms(a, b) for a, b in zip([out, *grads], ref_leaves, strict=True)]
    worst = max(errors)
    return worst, worst <= testing.tolerance(jnp.float32)


def lowering(case: OpCase) -> dict[str, str]:
    import jax.numpy as jnp

    from attnzoo.pallas_kernels import testing

    arrays = [jnp.asarray(x) for x in case.arrays]
    result = {}
    for platform, label in (("tpu", "TPU"), ("cuda", "GPU")):
        try:
            testing.assert_lowers(case.forward("pallas"), *arrays, platforms=(platform,), backward=False)
        except Exception as error:  # noqa: BLE001  (the table says what failed)
            result[label] = f"no ({type(error).__name__})"
            continue
        if not case.diff:
            result[label] = "fwd (no bwd)"
            continue
        try:
            testing.assert_lowers(case.forward("pallas"), *arrays, platforms=(platform,), backward=True,
                                  argnums=case.diff)
            result[label] = "fwd+bwd"
        except Exception as error:  # noqa: BLE001
            result[label] = f"fwd only ({type(error).__name__})"
    return result


def measure(case: OpCase, args) -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(args.seed + 1)
    probe = jax.eval_shape(case.forward("xla"), *[jnp.asarray(x) for x in case.arrays])
    ct = rng.standard_normal(probe.shape).astype(np.float32)
    row = {"op": case.name, "shape": case.shape, "blocks": case.blocks}
    error, ok = check(case, ct.astype(np.float64))
    row["error"], row["ok"] = error, ok
    arrays = [jnp.asarray(x) for x in case.arrays]
    runners, first = {}, {}
    for impl in ("xla", "reference"):
        fn = jax.jit(_loss_and_grad(case.forward(impl), case.diff, jnp.asarray(ct)))
        compiled = fn.lower(*arrays).compile()
        row[f"mem_{impl}"] = memory_bytes(compiled)
        if impl == "xla":
            costs = compiled.cost_analysis()
            costs = (costs[0] if isinstance(costs, (list, tuple)) else costs) or {}
            row["flops"] = float(costs.get("flops", 0.0)) if case.analytic_flops is None else float(case.analytic_flops)
            row["analytic"] = case.analytic_flops is not None
            row["bytes"] = float(costs.get("bytes accessed", 0.0))
            stats = compiled.memory_analysis()
            row["io_bytes"] = float(stats.argument_size_in_bytes + stats.output_size_in_bytes) if stats else 0.0
        runners[impl] = (lambda c=compiled: jax.block_until_ready(c(*arrays)))
        t0 = time.perf_counter()
        runners[impl]()
        first[impl] = time.perf_counter() - t0
    if ok:
        times = interleaved_times(runners, first, args.repeats, args.time_budget)
        for impl, ts in times.items():
            row[f"ms_{impl}"] = 1e3 * statistics.median(ts)
    row.update(lowering(case))
    return row


# --------------------------------------------------------------------------------------------
# the table


def roofline(row) -> str:
    if not row.get("io_bytes"):
        return "-"
    intensity = row["flops"] / row["io_bytes"]
    sides = []
    for name, (peak, bandwidth) in RIDGES.items():
        ridge = peak / bandwidth
        sides.append(f"{name}: {'compute' if intensity >= ridge else 'memory'}")
    return f"{intensity:.1f} ({'; '.join(sides)})"


def table(rows) -> str:
    lines = [
        "| op | shape | check (rel. err.) | GFLOP fwd+bwd | MB accessed (XLA:CPU) | MB in+out "
        "| fused FLOP/byte, bound (estimate) "
        "| xla ms | reference ms | reference / xla | xla MiB | reference MiB | TPU lowers | GPU lowers | blocks |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        check_text = f"{r['error']:.1e}" if r["ok"] else f"FAIL ({r['error']:.1e})"
        if r["ok"]:
            times = [f"{r['ms_xla']:.1f}", f"{r['ms_reference']:.1f}", f"{r['ms_reference'] / r['ms_xla']:.2f}"]
        else:
            times = ["FAIL"] * 3
        lines.append(
            f"| {r['op']} | {r['shape']} | {check_text} | {r['flops'] / 1e9:.3f}{' (by hand)' if r.get('analytic') else ''} "
            f"| {r['bytes'] / 1e6:.1f}{' (loops once)' if r.get('analytic') else ''} "
            f"| {r['io_bytes'] / 1e6:.2f} "
            f"| {roofline(r)} | {' | '.join(times)} | {fmt_mib(r['mem_xla'])} | {fmt_mib(r['mem_reference'])} "
            f"| {r['TPU']} | {r['GPU']} | {r['blocks']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    all_ops = ["attention", "attention_decode", "neighborhood_attention", "routed_attention",
               *[op for op in RECURRENT_OPS if op not in OPTIONAL_OPS]]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(all_ops), help="comma-separated ops (default: all)")
    parser.add_argument("--length", type=int, default=1024, help="sequence length (tokens; a square map "
                        "of about as many for neighborhood_attention)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=30.0, help="seconds of timed rounds per op")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (for CI)")
    parser.add_argument("--output", help="write the table (with the command and the machine) to this .md file")
    args = parser.parse_args(argv)
    args.ops = [op for op in args.ops.split(",") if op]
    args.dtype = "float32"
    if args.smoke:
        args.length, args.heads, args.key_dim, args.value_dim, args.repeats = 128, 2, 16, 16, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    import jax

    cases = build_cases(args)
    rows = []
    for case in cases:
        print(f"{case.name}: {case.shape}", file=sys.stderr, flush=True)
        rows.append(measure(case, args))
    text = table(rows)
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}, load {load_average()}, "
               f"{datetime.date.today().isoformat()}")
    print(text)
    print(f"\nMachine: {machine}. Times are CPU forward + backward (float32); the roofline column is "
          "an estimate from XLA:CPU's cost analysis, not a measurement on TPU or GPU.")
    if args.output:
        command = " ".join(["python benchmarks/kernels.py", *(argv if argv is not None else sys.argv[1:])])
        with open(args.output, "w") as handle:
            handle.write(f"`{command}`\n\n{text}\n\nMachine: {machine}.\n")
    failed = [r["op"] for r in rows if not r["ok"]]
    if failed:
        print(f"FAIL: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
