"""Softmax attention forward+backward on CPU: attnzoo reference / xla, jax.nn, torch SDPA.

For every sequence length T it times ``jax.jit(jax.grad(loss))`` (loss = ``sum(out * ct)`` with a
fixed random cotangent ``ct``, gradients w.r.t. q, k and v) and reports memory, for

* ``reference``: attnzoo's materialised-scores oracle (``impl="reference"``),
* ``xla``: attnzoo's blockwise online-softmax path (``impl="xla"``, O(T) memory),
* ``jax_nn``: ``jax.nn.dot_product_attention(..., implementation="xla")``,
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` forward + ``backward()`` on the
  same inputs (only if ``import torch`` works; default thread count). A reference point only.

Method
------
* Correctness first: every implementation's output and gradients are compared with a float64
  numpy oracle on sampled query rows (out, dq) and key columns (dk, dv), all batch entries and
  heads, at every T. An implementation beyond ``attnzoo.pallas_kernels.testing.tolerance(dtype)``
  (relative RMS error) prints FAIL instead of a time.
* Time: after compile and one warm-up call, ``--repeats`` calls per implementation, interleaved
  (every round runs each implementation once, in rotating order) so the machine's noise is
  shared; the median is reported. Where a round is long (the materialised paths at large T) the
  rounds are cut to fit ``--time-budget``, never below 3.
* Memory, two numbers:
  - "XLA MiB": ``compiled.memory_analysis()`` temp + argument + output bytes of the jitted
    gradient function. On CPU the temp size is a lower bound (YNNPACK scratch is not counted).
  - "RSS MiB": peak resident-set increase of one call, measured in a fresh subprocess per
    (T, implementation): inputs are created and the function compiled, then the kernel's peak-RSS
    counter is reset (``/proc/self/clear_refs``), one call runs, and ``VmHWM - VmRSS(before)`` is
    reported. Compile memory is thus excluded and nothing is inherited from other runs.
* Out of memory: a JAX implementation whose XLA estimate (compile only, nothing allocated)
  exceeds ``--mem-limit-gib`` is not run and prints ``OOM (est. X GiB)``; torch's flash SDPA is
  O(T) and always runs.

``--smoke`` runs a tiny configuration in a few seconds (for CI); nothing there is asserted on time.

Example::

    python benchmarks/attention.py                      # causal, T = 512 .. 32768
    python benchmarks/attention.py --no-causal --lengths 512,1024,2048,4096
    python benchmarks/attention.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (benchmarks/common.py)
    GIB,
    fmt_mib,
    interleaved_times,
    jax_dtype,
    load_average,
    memory_bytes,
    peak_rss_delta,
    print_rss_worker_result,
    rel_rms,
    rss_from_worker,
    sample_positions,
)

ALL_IMPLS = ("reference", "xla", "jax_nn", "torch")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


# --------------------------------------------------------------------------------------------
# inputs and the float64 oracle


def make_inputs(batch, length, heads, head_dim, seed=0):
    """float32 numpy q, k, v ``[B, T, H, D]`` and the output cotangent ``ct``."""
    rng = np.random.default_rng(seed + length)
    shape = (batch, length, heads, head_dim)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(4))


def oracle(q, k, v, ct, *, causal, scale, rows, cols, block=1024):
    """float64 out/dq on query ``rows`` and dk/dv on key ``cols`` (all batches and heads).

    Loss ``sum(out * ct)``: ``dv_j = sum_i p_ij ct_i``, ``dk_j = scale sum_i ds_ij q_i``,
    ``dq_i = scale sum_j ds_ij k_j`` with ``ds_ij = p_ij (ct_i . v_j - ct_i . o_i)``.
    Needs the full forward (lse and o of every row) in float64, computed row block by row block.
    """
    q, k, v, ct = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, ct))
    batch, heads, length, _ = q.shape
    lse = np.empty((batch, heads, length))
    out = np.empty(v.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        for h in range(heads):
            for start in range(0, length, block):
                stop = min(start + block, length)
                keys = stop if causal else length
                s = q[b, h, start:stop] @ k[b, h, :keys].T * scale
                if causal:
                    s = np.where(np.arange(keys)[None, :] <= np.arange(start, stop)[:, None], s, -np.inf)
                m = s.max(axis=-1, keepdims=True)
                p = np.exp(s - m)
                denom = p.sum(axis=-1, keepdims=True)
                lse[b, h, start:stop] = (m + np.log(denom))[:, 0]
                out[b, h, start:stop] = (p / denom) @ v[b, h, :keys]
    delta = np.sum(ct * out, axis=-1)  # [B, H, T]

    def probs(qi, kj, lse_rows, q_pos, k_pos):  # [.., |q|, |k|]
        s = np.einsum("bhqd,bhkd->bhqk", qi, kj) * scale
        p = np.exp(s - lse_rows[..., None])
        if causal:
            p = np.where(k_pos[None, :] <= q_pos[:, None], p, 0.0)
        return p

    all_pos = np.arange(length)
    # rows: out and dq
    p = probs(q[:, :, rows], k, lse[:, :, rows], rows, all_pos)
    dp = np.einsum("bhqd,bhkd->bhqk", ct[:, :, rows], v)
    ds = p * (dp - delta[:, :, rows, None])
    dq = np.einsum("bhqk,bhkd->bhqd", ds, k) * scale
    out_rows = out[:, :, rows]
    # cols: dk and dv
    p = probs(q, k[:, :, cols], lse, all_pos, cols)  # [B, H, T, |C|]
    dv = np.einsum("bhqk,bhqd->bhkd", p, ct)
    dp = np.einsum("bhqd,bhkd->bhqk", ct, v[:, :, cols])
    ds = p * (dp - delta[..., None])
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    to_bthd = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    return {"out": to_bthd(out_rows), "dq": to_bthd(dq), "dk": to_bthd(dk), "dv": to_bthd(dv)}


# --------------------------------------------------------------------------------------------
# implementations: each is built into a callable ``run() -> (out, dq, dk, dv)`` on fixed inputs


def torch_available():
    try:
        import torch  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def build_jax(impl, inputs, args):
    """Returns ``(run, compiled)`` for a JAX implementation; ``run()`` blocks until done."""
    import jax
    import jax.numpy as jnp

    from attnzoo import pallas_kernels as pk

    dtype = jax_dtype(args.dtype)
    q, k, v, ct = (jnp.asarray(x, dtype) for x in inputs)
    ct = ct.astype(jnp.float32)
    block_sizes = xla_block_sizes(args) if impl == "xla" else None

    def attend(q, k, v):
        if impl == "jax_nn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=args.causal, implementation="xla")
        return pk.attention(q, k, v, causal=args.causal, impl=impl, block_sizes=block_sizes)

    def loss(q, k, v, ct):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    compiled = grad.lower(q, k, v, ct).compile()

    def run():
        (dq, dk, dv), out = compiled(q, k, v, ct)
        return jax.block_until_ready((out, dq, dk, dv))

    return run, compiled


def build_torch(inputs, args):
    import torch
    import torch.nn.functional as F

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    # torch's layout is [B, H, T, D]; transposed (and made contiguous) once, outside the timing.
    q, k, v = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(dtype).requires_grad_(True)
        for x in inputs[:3]
    )
    ct = torch.from_numpy(np.ascontiguousarray(inputs[3].transpose(0, 2, 1, 3)))

    def run():
        for x in (q, k, v):
            x.grad = None
        out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        (out.float() * ct).sum().backward()
        back = lambda x: x.detach().float().numpy().transpose(0, 2, 1, 3)  # noqa: E731
        return back(out), back(q.grad), back(k.grad), back(v.grad)

    return run


def xla_block_sizes(args):
    if not args.xla_block_sizes:
        return None
    from attnzoo import pallas_kernels as pk

    return pk.XlaBlockSizes(*(int(x) for x in args.xla_block_sizes.split(",")))


# --------------------------------------------------------------------------------------------
# peak RSS of one call, in a fresh process


def rss_worker(args):
    """Run inside the subprocess: prints ``{"rss_delta": bytes}`` for one call of one impl."""
    length = args.lengths[0]
    inputs = make_inputs(args.batch, length, args.heads, args.head_dim, args.seed)
    if args.rss_worker == "torch":
        run = build_torch(inputs, args)
    else:
        run, _ = build_jax(args.rss_worker, inputs, args)
    del inputs
    print_rss_worker_result(peak_rss_delta(run))


def measure_rss(impl, length, args):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--rss-worker", impl,
        "--lengths", str(length), "--batch", str(args.batch), "--heads", str(args.heads),
        "--head-dim", str(args.head_dim), "--dtype", args.dtype, "--seed", str(args.seed),
        "--causal" if args.causal else "--no-causal",
    ]
    if args.xla_block_sizes:
        cmd += ["--xla-block-sizes", args.xla_block_sizes]
    return rss_from_worker(cmd, f"{impl} at T={length}")


# --------------------------------------------------------------------------------------------
# the benchmark


def benchmark_length(length, impls, args, log):
    from attnzoo.pallas_kernels import testing

    inputs = make_inputs(args.batch, length, args.heads, args.head_dim, args.seed)
    if args.dtype != "float32":  # the oracle sees exactly the values the implementations see
        import jax.numpy as jnp

        inputs = tuple(np.asarray(jnp.asarray(x, jax_dtype(args.dtype)).astype(jnp.float32)) for x in inputs[:3]) + (inputs[3],)
    rows = sample_positions(length, args.check_samples, args.seed + 1)
    cols = sample_positions(length, args.check_samples, args.seed + 2)
    t0 = time.perf_counter()
    expected = oracle(*inputs, causal=args.causal, scale=args.head_dim**-0.5, rows=rows, cols=cols)
    log(f"T={length}: float64 oracle on {rows.size} rows / {cols.size} columns in {time.perf_counter() - t0:.1f} s")
    tol = testing.tolerance(jax_dtype(args.dtype))
    results = {}
    runners = {}
    for impl in impls:
        entry = results[impl] = {"status": "ok", "xla_bytes": None, "rss_bytes": None, "times": []}
        try:
            if impl == "torch":
                run = build_torch(inputs, args)
            else:
                run, compiled = build_jax(impl, inputs, args)
                entry["xla_bytes"] = memory_bytes(compiled)
                if entry["xla_bytes"] is not None and entry["xla_bytes"] > args.mem_limit_gib * GIB:
                    entry["status"] = f"OOM (est. {entry['xla_bytes'] / GIB:.1f} GiB)"
                    log(f"T={length} {impl}: skipped, XLA estimate {entry['xla_bytes'] / GIB:.1f} GiB > --mem-limit-gib {args.mem_limit_gib}")
                    del run, compiled
                    continue
                del compiled
            t0 = time.perf_counter()
            out, dq, dk, dv = run()  # warm-up and the correctness check
            entry["first_call_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported in the table
            entry["status"] = f"ERROR ({type(e).__name__})"
            log(f"T={length} {impl}: {type(e).__name__}: {e}")
            continue
        got = {
            "out": np.asarray(out, np.float64)[:, rows], "dq": np.asarray(dq, np.float64)[:, rows],
            "dk": np.asarray(dk, np.float64)[:, cols], "dv": np.asarray(dv, np.float64)[:, cols],
        }
        del out, dq, dk, dv
        errors = {name: rel_rms(got[name], expected[name]) for name in expected}
        entry["max_err"] = max(errors.values())
        if not all(np.isfinite(e) and e <= tol for e in errors.values()):
            entry["status"] = "FAIL"
            log(f"T={length} {impl}: FAIL, rel. RMS errors {errors} (tolerance {tol:g})")
            continue
        runners[impl] = run
        log(f"T={length} {impl}: check ok (max rel. RMS error {entry['max_err']:.1e}), first call {entry['first_call_s']:.2f} s")

    # Fewer rounds where one round is long (the materialised paths at large T), never below 3.
    first_call_s = {impl: results[impl]["first_call_s"] for impl in runners}
    for impl, times in interleaved_times(runners, first_call_s, args.repeats, args.time_budget).items():
        results[impl]["times"].extend(times)
    runners.clear()
    for impl, entry in results.items():
        if entry["times"]:
            entry["time_ms"] = float(np.median(entry["times"])) * 1e3
            log(f"T={length} {impl}: {entry['time_ms']:.1f} ms (runs: {', '.join(f'{t * 1e3:.0f}' for t in entry['times'])})")
    if args.rss and (not args.smoke or length == args.lengths[-1]):
        for impl, entry in results.items():
            if entry["status"] == "ok":
                entry["rss_bytes"] = measure_rss(impl, length, args)
    return results


def table(all_results, impls):
    lines = [
        "| T | impl | time (ms) | x fastest | XLA MiB | peak RSS MiB | max rel err |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for length, results in all_results.items():
        times = [e["time_ms"] for e in results.values() if "time_ms" in e]
        fastest = min(times) if times else None
        for impl in impls:
            e = results.get(impl)
            if e is None:
                continue
            if "time_ms" in e:
                time_s, ratio = f"{e['time_ms']:,.1f}", f"{e['time_ms'] / fastest:.2f}"
            else:
                time_s, ratio = e["status"], "-"
            err = f"{e['max_err']:.1e}" if "max_err" in e else "-"
            lines.append(
                f"| {length} | {impl} | {time_s} | {ratio} | {fmt_mib(e['xla_bytes'])} | {fmt_mib(e['rss_bytes'])} | {err} |"
            )
    return "\n".join(lines)


def targets(all_results):
    """The issue's targets for the xla path, as text lines."""
    lines = []
    for length, results in all_results.items():
        x = results.get("xla", {})
        if "time_ms" not in x:
            continue
        jax_times = {i: results[i]["time_ms"] for i in ("reference", "jax_nn", "xla") if "time_ms" in results.get(i, {})}
        best = min(jax_times, key=jax_times.get)
        text = f"T={length}: xla / fastest JAX ({best}) = {x['time_ms'] / jax_times[best]:.2f}"
        if "time_ms" in results.get("torch", {}):
            text += f"; xla / torch SDPA = {x['time_ms'] / results['torch']['time_ms']:.2f}"
        lines.append(text)
    # memory: xla at the largest T against the materialised reference there
    lengths = [t for t, r in all_results.items() if r.get("xla", {}).get("xla_bytes")]
    if lengths and any("reference" in r for r in all_results.values()):
        big = max(lengths)
        x = all_results[big]["xla"]
        ref = all_results[big].get("reference", {})
        if ref.get("xla_bytes"):
            lines.append(
                f"T={big} memory: xla XLA-estimate {fmt_mib(x['xla_bytes'])} MiB vs reference XLA-estimate "
                f"{fmt_mib(ref['xla_bytes'])} MiB ({'measured' if 'time_ms' in ref else 'compiled only, not run'}): "
                f"ratio 1/{ref['xla_bytes'] / x['xla_bytes']:.0f}"
            )
        ran = [t for t, r in all_results.items() if r.get("reference", {}).get("rss_bytes")]
        if ran and x.get("rss_bytes"):
            t_ref = max(ran)
            extrapolated = all_results[t_ref]["reference"]["rss_bytes"] * (big / t_ref) ** 2
            lines.append(
                f"T={big} memory: xla peak RSS {fmt_mib(x['rss_bytes'])} MiB vs reference peak RSS at T={t_ref} "
                f"extrapolated quadratically to T={big}: {fmt_mib(extrapolated)} MiB: ratio 1/{extrapolated / x['rss_bytes']:.0f}"
            )
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_LENGTHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per implementation (after a warm-up), fewer (not below 3) where "
                        "that would exceed --time-budget")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds of timed rounds per length before --repeats is cut")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(ALL_IMPLS),
                   help=f"comma-separated subset of {','.join(ALL_IMPLS)} (torch only if importable)")
    p.add_argument("--mem-limit-gib", type=float, default=12.0,
                   help="skip a JAX implementation whose XLA memory estimate exceeds this")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak RSS in a fresh subprocess per (T, impl)")
    p.add_argument("--check-samples", type=int, default=32, help="query rows / key columns checked in float64")
    p.add_argument("--xla-block-sizes", default=None, help="block_q,block_kv,scores_per_step for impl=xla")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the Markdown report to this file")
    p.add_argument("--smoke", action="store_true", help="tiny fast run (CI): T=128,256, B=1, H=2, D=32, 1 repeat, RSS at T=256 only")
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.head_dim, args.repeats, args.check_samples = [128, 256], 2, 32, 1, 8
    unknown = set(args.impls) - set(ALL_IMPLS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; choose from {ALL_IMPLS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rss_worker:
        return rss_worker(args)
    import jax

    impls = [i for i in args.impls if i != "torch" or torch_available()]
    skipped_torch = "torch" in args.impls and "torch" not in impls
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    log(f"{command}\njax {jax.__version__}, devices {jax.devices()}, impls {impls}")
    load_start = load_average()
    all_results = {}
    for length in args.lengths:
        all_results[length] = benchmark_length(length, impls, args, log)
    load_end = load_average()

    versions = f"jax {jax.__version__}"
    if "torch" in impls:
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    mode = "causal" if args.causal else "non-causal"
    report = [
        f"### {mode} attention, forward + backward, B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}, {platform.machine()} CPU, "
        f"{os.cpu_count()} cores, {versions}; median of {args.repeats} interleaved runs (fewer, at "
        f"least 3, where a round of all implementations exceeds {args.time_budget / args.repeats:.0f} s); "
        f"1-minute load average {load_start} at the start and {load_end} at the end.",
        "",
        table(all_results, impls),
        "",
        "XLA MiB: `compiled.memory_analysis()` temp + argument + output (temp is a lower bound on CPU). "
        "Peak RSS MiB: peak resident-set increase of one call in a fresh process (compile excluded). "
        "OOM (est.): not run, the XLA estimate exceeds the memory limit. max rel err: largest relative "
        "RMS error of out/dq/dk/dv against a float64 oracle on sampled rows and columns.",
    ]
    if skipped_torch:
        report += ["", "torch is not importable here: its rows are omitted."]
    target_lines = targets(all_results)
    if target_lines:
        report += ["", "Targets:", ""] + [f"- {line}" for line in target_lines]
    text = "\n".join(report)
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n\n")
    failed = any(e["status"] == "FAIL" or e["status"].startswith("ERROR") for r in all_results.values() for e in r.values())
    return 1 if failed else 0


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()  # XLA:CPU's per-call buffers without page faults (attnzoo/runtime.py)
    sys.exit(main())
