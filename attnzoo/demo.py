"""Every softmax-attention implementation side by side: agreement with a float64 oracle, and time.

    python -m attnzoo.demo                 # ~30 s on a 2-core CPU
    python -m attnzoo.demo --seq-len 512 --impls reference,xla

For a few masks (causal, sliding window, packed segments, chunked) it runs, on the same random
float32 inputs (GQA: 4 query heads sharing 2 key/value heads),

* ``reference``: attnzoo's materialised-scores oracle, in float32,
* ``xla``: attnzoo's blockwise online-softmax path (the CPU default),
* ``pallas``: attnzoo's Pallas kernels (interpreted on CPU, so slow and kept small here),
* ``jax.nn``: ``jax.nn.dot_product_attention(implementation="xla")`` with the same mask,

and compares each output and its gradients (of ``sum(out * ct)`` w.r.t. q, k, v) with
``impl="reference"`` evaluated in float64. The error is the relative RMS error
``||x - ref|| / ||ref||``; anything above ``attnzoo.pallas_kernels.testing.tolerance(float32)``
is a FAIL and the command exits with status 1 (so does an implementation that cannot be
imported, unless ``--allow-unavailable``). Times are forward + backward of the jitted
gradient, median of a few calls after compilation (the Pallas interpreter is not a speed
reference).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing
from attnzoo.pallas_kernels.attention.masks import build_mask
from attnzoo.pallas_kernels.attention.reference import visibility

IMPLS = ("reference", "xla", "pallas", "jax.nn")


def mask_cases(seq_len: int, batch: int):
    """(name, attention keyword arguments) for each mask shown."""
    # Packed documents of unequal lengths, a different packing per batch row.
    rng = np.random.default_rng(1)
    segment_ids = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=3, replace=False))
        segment_ids[b] = np.searchsorted(cuts, np.arange(seq_len), side="right")
    window = max(1, seq_len // 4)
    chunk = max(1, seq_len // 4)
    return [
        ("causal", dict(causal=True)),
        (f"sliding window ({window}, 0)", dict(causal=True, window=(window, 0))),
        ("packed segments (4 docs)", dict(causal=True, segment_ids=jnp.asarray(segment_ids))),
        (f"chunked causal ({chunk})", dict(mask=pk.ChunkedCausalMask(chunk))),
    ]


def attend(impl: str, q, k, v, options: dict):
    if impl != "jax.nn":
        return pk.attention(q, k, v, impl=impl, **options)
    q_len, kv_len = q.shape[1], k.shape[1]
    mask = build_mask(
        causal=options.get("causal", False), window=options.get("window"), mask=options.get("mask"),
        q_len=q_len, kv_len=kv_len,
    )
    segments = options.get("segment_ids")
    segments = None if segments is None else (segments, segments)
    visible = visibility(mask, q_len, kv_len, segments)[:, None]  # [B or 1, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=visible, implementation="xla")


def gradient_fn(impl: str, options: dict):
    """jit(q, k, v, ct -> (out, (dq, dk, dv))) for ``loss = sum(out * ct)``."""

    def loss(q, k, v, ct):
        out = attend(impl, q, k, v, options)
        return jnp.sum(out * ct), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda q, k, v, ct: grad(q, k, v, ct)[::-1])


def float64_oracle(inputs, options: dict):
    with testing.float64():
        q, k, v, ct = testing.to_float64(inputs)
        out, grads = gradient_fn("reference", options)(q, k, v, ct)
        return np.asarray(out), tuple(np.asarray(g) for g in grads)


def run_case(impl: str, inputs, options: dict, expected, repeats: int):
    """Returns a result row: errors, time, status."""
    f = gradient_fn(impl, options)
    start = time.perf_counter()
    out, grads = jax.block_until_ready(f(*inputs))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*inputs))
        times.append(time.perf_counter() - start)
    out_err = testing.rel_rms(out, expected[0])
    grad_err = max(testing.rel_rms(g, e) for g, e in zip(grads, expected[1]))
    return dict(out_err=out_err, grad_err=grad_err, ms=1e3 * float(np.median(times)), first_s=compile_s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS), help=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-unavailable", action="store_true",
                   help="exit 0 even if an implementation cannot be imported (it is still reported)")
    args = p.parse_args(argv)
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tol = testing.tolerance(jnp.float32)
    rng = np.random.default_rng(args.seed)
    shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
    inputs = tuple(
        jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        for shape in (shape_q, shape_kv, shape_kv, shape_q)
    )
    print(
        f"attnzoo attention demo: B={args.batch} T={args.seq_len} Hq={args.heads} Hkv={args.kv_heads} "
        f"D={args.head_dim} float32 on {jax.devices()[0].platform}; errors are relative RMS vs "
        f"impl='reference' in float64 (tolerance {tol:g}); time = jitted forward + backward.\n"
    )
    header = f"| {'mask':28s} | {'impl':9s} | {'out err':>8s} | {'grad err':>8s} | {'time ms':>8s} | status |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    failures, unavailable = [], {}
    for name, options in mask_cases(args.seq_len, args.batch):
        expected = float64_oracle(inputs, options)
        for impl in args.impls:
            if impl in unavailable:
                row, status = None, "unavailable (see below)"
            else:
                try:
                    row = run_case(impl, inputs, options, expected, args.repeats)
                except ImportError as e:  # e.g. a kernel module missing from this checkout
                    unavailable[impl] = f"{type(e).__name__}: {e}"
                    row, status = None, "unavailable (see below)"
                except Exception as e:  # noqa: BLE001 - reported, and a failure
                    row, status = None, f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    failures.append((name, impl, status))
            if row is not None:
                ok = row["out_err"] <= tol and row["grad_err"] <= tol
                status = "ok" if ok else "FAIL"
                if not ok:
                    failures.append((name, impl, f"errors {row['out_err']:.1e} / {row['grad_err']:.1e}"))
                print(
                    f"| {name:28s} | {impl:9s} | {row['out_err']:8.1e} | {row['grad_err']:8.1e} | "
                    f"{row['ms']:8.1f} | {status} |",
                    flush=True,
                )
            else:
                print(f"| {name:28s} | {impl:9s} | {'-':>8s} | {'-':>8s} | {'-':>8s} | {status} |", flush=True)
    print()
    for impl, why in unavailable.items():
        print(f"{impl} could not be imported, not run: {why}")
        if not args.allow_unavailable:
            failures.append(("-", impl, "unavailable (pass --allow-unavailable to accept)"))
    if failures:
        print(f"FAILED: {len(failures)} case(s) beyond tolerance {tol:g} or erroring:")
        for name, impl, why in failures:
            print(f"  {name} / {impl}: {why}")
        return 1
    ran = [impl for impl in args.impls if impl not in unavailable]
    print(f"all implementations run ({', '.join(ran)}) agree with the float64 reference within {tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
