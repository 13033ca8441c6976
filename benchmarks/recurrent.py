"""Linear-attention / delta-rule ops against causal softmax attention on CPU, forward + backward.

For every sequence length T it times ``jax.jit(jax.grad(loss))`` (loss = ``sum(out * ct)`` with a
fixed random cotangent ``ct``, gradients w.r.t. every differentiable input: q, k, v, the gates g
and beta) and reports memory, for the ``impl="xla"`` path (the chunkwise-parallel engine) of

* ``linear_attention``, ``simple_gla``, ``gla``, ``delta_rule``, ``gated_delta_rule``, ``kda``
  (``attnzoo.pallas_kernels``; ``chunk_size`` from ``--chunk-size``), against
* ``attention``: ``pk.attention(q, k, v, causal=True, impl="xla")``, blockwise online softmax
  (O(T) memory, O(T^2) time).

Also ``ssd`` and ``selective_scan`` (Mamba-2 / Mamba-1; inputs: :func:`op_arguments`), and, only when named in
``--ops``: ``ssd_torch`` (transformers' PyTorch ``mamba2_chunk_scan``) and
``selective_scan_cu_seqlens`` (``selective_scan`` on the same batch packed into one row of B
sequences with ``cu_seqlens``, whose backward is JAX's autodiff; a line per T gives the ratio).

Inputs: q, k, v standard normal ``[B, T, H, K|V]`` (the same draws for every op at a given T);
for the delta-rule ops (``delta_rule``, ``gated_delta_rule``, ``kda``) the keys are L2-normalised
and ``beta ~ U(0.05, 0.95)`` ``[B, T, H]``, as their layers do; log-decays ``g = -U(0.01, 0.5)``,
``[B, T, H]`` for ``simple_gla`` / ``gated_delta_rule`` and ``[B, T, H, K]`` for ``gla`` / ``kda``.

Method
------
* Correctness first, at every T, against a float64 oracle computed on exactly the values the
  timed function sees (``jax_enable_x64`` on, inputs cast to float64); relative RMS error per
  array, tolerance ``attnzoo.pallas_kernels.testing.tolerance(dtype)``; beyond it the op prints
  FAIL instead of a time (and the script exits with status 1).
  - ``ssd`` and ``selective_scan``: ``dA`` is a sum over every row and token of per-token terms
    that largely cancel (their float64 condition number ``kappa``, see
    :func:`decay_rate_condition`, is printed in the "checked" column); a float32 sum of such terms
    is only accurate to ``kappa`` times the terms' own error, so ``dA`` is checked at ``kappa`` x
    the tolerance. The per-token terms themselves (the gradient of the per-token log-decay) are
    within the plain tolerance (tests/pallas_kernels/test_linear_rnn.py checks the gates' gradients).
  - Recurrent ops: the oracle is the op's own ``impl="reference"`` (the token-by-token
    ``lax.scan``). Its forward is O(T) in time and memory (about 0.5 s at T=16384 in float64), so
    the **whole output** ``o`` is compared at every T. Its gradient keeps a state per token
    (about 0.5 GiB per 1024 tokens at B=1, H=4, K=V=64 in float64), so the gradients of every
    input (dq, dk, dv, dg, dbeta) are compared only for T <= ``--grad-check-max-t`` (default
    2048). Above it only ``o`` is checked: the ``xla`` path's backward (JAX autodiff of the chunked
    forward, or for ``selective_scan`` a written-out backward walking the same chunks in reverse)
    does not change with T, only the number of chunks, so a full-length forward check plus full
    gradient checks at the smaller lengths cover it.
  - Attention: for T <= ``--grad-check-max-t`` against ``pk.attention(..., impl="reference")`` in
    float64 (materialised scores), output and dq/dk/dv; above it the output on
    ``--check-samples`` sampled query rows (both ends, the middle and random ones) against a
    float64 numpy softmax over those rows' full causal prefixes (O(rows x T)).
  The table's "checked" column says which was done.
* Time: after compile and one warm-up call (the correctness check), ``--repeats`` calls per op,
  interleaved (every round runs each op once, in rotating order) so the machine's noise is
  shared; the median is reported. Rounds are cut to fit ``--time-budget``, never below 3.
* Memory, two numbers (as in ``benchmarks/attention.py``):
  - "XLA MiB": ``compiled.memory_analysis()`` temp + argument + output bytes of the jitted
    gradient function. On CPU the temp size is a lower bound (YNNPACK scratch is not counted).
  - "RSS MiB": peak resident-set increase of one call, measured in a fresh subprocess per
    (T, op): inputs are created and the function compiled, then the kernel's peak-RSS counter is
    reset (``/proc/self/clear_refs``), one call runs, and ``VmHWM - VmRSS(before)`` is reported.
* An op whose XLA estimate exceeds ``--mem-limit-gib`` is not run and prints ``OOM (est. X GiB)``.

After the tables: per op the crossover length, the smallest measured T from which the op is
faster than causal softmax attention at every larger measured T; then the targets: at T=16384
``gated_delta_rule`` at least 5x faster than attention, and its memory growing linearly in T
(the ratio of memory between successive measured T against the ratio of the lengths).

``--smoke`` runs a tiny configuration (T=128,256, H=2, K=V=32, 1 round, RSS of attention and
gated_delta_rule at T=256 only) for CI; nothing there is asserted on time.

Example::

    python benchmarks/recurrent.py --output benchmarks/results/recurrent.md   # T = 512 .. 16384
    python benchmarks/recurrent.py --lengths 512,1024 --ops gated_delta_rule,kda
    python benchmarks/recurrent.py --smoke

``--output X.md`` appends the Markdown report to ``X.md`` and the full results (every timed run,
errors, memory, machine, command, date) to the list in ``X.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (benchmarks/common.py)
    GIB,
    MIB,
    cpu_model,
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

# op -> (gate: None | "scalar" [B,T,H] | "channel" [B,T,H,K], uses beta)
RECURRENT_OPS = {
    "linear_attention": (None, False),
    "simple_gla": ("scalar", False),
    "gla": ("channel", False),
    "delta_rule": (None, True),
    "gated_delta_rule": ("scalar", True),
    "kda": ("channel", True),
    "ssd": ("ssd", False),
    "selective_scan": ("selective_scan", False),
    # transformers' Mamba-2 chunked scan in PyTorch (mamba2_chunk_scan, what its Mamba2Mixer runs
    # on CPU), on the same inputs as ssd: needs torch and transformers (e.g. .venv-parity).
    "ssd_torch": ("ssd", False),
    # selective_scan on the same batch packed into one row of B sequences (cu_seqlens): the same sums
    # through the varlen path (resets folded into every token, backward by autodiff of the loop).
    "selective_scan_cu_seqlens": ("selective_scan", False),
}
OPTIONAL_OPS = ("ssd_torch", "selective_scan_cu_seqlens")  # run only when asked for with --ops
SSD_STATE_GROUPS = 1  # B, C [B, T, G, N] shared by all heads, as Mamba-2's default ngroups
SCAN_STATE_DIM = 16  # selective_scan's N (Mamba-1's d_state)
BASELINE = "attention"
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
TARGET_OP, TARGET_LENGTH, TARGET_SPEEDUP = "gated_delta_rule", 16384, 5.0
LINEAR_SLACK = 1.25  # memory "grows linearly" while each step's ratio is <= 1.25 x the length ratio
SMOKE_RSS_OPS = (BASELINE, TARGET_OP)


# --------------------------------------------------------------------------------------------
# inputs


def make_inputs(args, length):
    """float32 numpy arrays, the same draws for every op: q, k, k_unit (L2-normalised), v, ct,
    g_scalar, g_channel, beta."""
    rng = np.random.default_rng(args.seed + length)
    b, h, dk, dv = args.batch, args.heads, args.key_dim, args.value_dim
    q = rng.standard_normal((b, length, h, dk), dtype=np.float32)
    k = rng.standard_normal((b, length, h, dk), dtype=np.float32)
    v = rng.standard_normal((b, length, h, dv), dtype=np.float32)
    ct = rng.standard_normal((b, length, h, dv), dtype=np.float32)
    inputs = {
        "q": q, "k": k, "k_unit": k / np.linalg.norm(k, axis=-1, keepdims=True), "v": v, "ct": ct,
        "g_scalar": -rng.uniform(0.01, 0.5, size=(b, length, h)).astype(np.float32),
        "g_channel": -rng.uniform(0.01, 0.5, size=(b, length, h, dk)).astype(np.float32),
        "beta": rng.uniform(0.05, 0.95, size=(b, length, h)).astype(np.float32),
        # Mamba initial ranges: dt in [0.001, 0.1], A = -[1, 16]
        "dt": rng.uniform(0.001, 0.1, size=(b, length, h)).astype(np.float32),
        "A_heads": -rng.uniform(1.0, 16.0, size=(h,)).astype(np.float32),
        "delta": rng.uniform(0.001, 0.1, size=(b, length, h * dv)).astype(np.float32),
        "A_channels": -rng.uniform(1.0, 16.0, size=(h * dv, SCAN_STATE_DIM)).astype(np.float32),
    }
    if args.dtype != "float32":  # the oracle sees exactly the values the ops see
        import jax.numpy as jnp

        dtype = jax_dtype(args.dtype)
        inputs = {n: x if n == "ct" else np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for n, x in inputs.items()}
    return inputs


def op_arguments(op, inputs):
    """``(names, arrays)``: the op's positional differentiable inputs."""
    if op == BASELINE:
        return ["q", "k", "v"], [inputs["q"], inputs["k"], inputs["v"]]
    gate, beta = RECURRENT_OPS[op]
    b, length, h, dv = inputs["v"].shape
    if gate == "ssd":  # x [B,T,H,P] = v, B / C [B,T,G,N] from k / q
        g = SSD_STATE_GROUPS
        return ["x", "dt", "A", "B", "C"], [inputs["v"], inputs["dt"], inputs["A_heads"], inputs["k"][:, :, :g],
                                            inputs["q"][:, :, :g]]
    if gate == "selective_scan":  # u [B,T,D] = v flattened (D = H*V), B / C [B,T,N] from k / q
        n = SCAN_STATE_DIM
        return ["u", "delta", "A", "B", "C"], [inputs["v"].reshape(b, length, h * dv), inputs["delta"],
                                               inputs["A_channels"], inputs["k"][:, :, 0, :n], inputs["q"][:, :, 0, :n]]
    names, arrays = ["q", "k", "v"], [inputs["q"], inputs["k_unit"] if beta else inputs["k"], inputs["v"]]
    if gate:
        names.append("g")
        arrays.append(inputs["g_scalar"] if gate == "scalar" else inputs["g_channel"])
    if beta:
        names.append("beta")
        arrays.append(inputs["beta"])
    return names, arrays


def forward_fn(op, impl, chunk_size):
    import jax.numpy as jnp

    from attnzoo import pallas_kernels as pk

    if op == BASELINE:
        return lambda q, k, v: pk.attention(q, k, v, causal=True, impl=impl)
    if op == "ssd_torch":
        op = "ssd"  # its oracle is pk.ssd's reference
    if op == "selective_scan":
        return lambda *xs: pk.selective_scan(*xs, impl=impl)[0]
    if op == "selective_scan_cu_seqlens":
        def packed(u, delta, A, B, C):  # [B, T, ...] -> one row [1, B*T, ...] of B sequences, and back
            batch, length = u.shape[:2]
            row = lambda x: x.reshape((1, batch * length) + x.shape[2:])  # noqa: E731
            cu_seqlens = jnp.arange(batch + 1, dtype=jnp.int32) * length
            return pk.selective_scan(row(u), row(delta), A, row(B), row(C), cu_seqlens=cu_seqlens,
                                     impl=impl)[0].reshape(u.shape)

        return packed
    fn = getattr(pk, op)
    return lambda *xs: fn(*xs, chunk_size=chunk_size, impl=impl)[0]


# --------------------------------------------------------------------------------------------
# the timed function and the oracle


def build_torch_ssd(inputs, args):
    """``(run, None)``: one forward + backward (torch autograd) of transformers' Mamba-2 chunked scan
    ``mamba2_chunk_scan`` (float32, the same chunk size), returning ``(out, grads)`` as numpy."""
    import torch
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    torch.set_num_threads(os.cpu_count() or 1)
    _, arrays = op_arguments("ssd", inputs)
    xs = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in arrays]
    ct = torch.tensor(inputs["ct"])

    def run():
        for x in xs:
            x.grad = None
        out = mamba2_chunk_scan(*xs, chunk_size=args.chunk_size)
        torch.sum(out * ct).backward()
        return out.detach().numpy(), tuple(x.grad.numpy() for x in xs)

    return run, None


def build(op, inputs, args):
    """``(run, compiled)``: ``run()`` is one forward + backward of the ``xla`` path, blocking,
    returning ``(out, grads)``."""
    import jax
    import jax.numpy as jnp

    if op == "ssd_torch":
        return build_torch_ssd(inputs, args)
    dtype = jax_dtype(args.dtype)
    _, arrays = op_arguments(op, inputs)
    xs = [jnp.asarray(x, dtype) for x in arrays]
    ct = jnp.asarray(inputs["ct"], jnp.float32)
    forward = forward_fn(op, "xla", args.chunk_size)

    def loss(*xs_ct):
        out = forward(*xs_ct[:-1])
        return jnp.sum(out.astype(jnp.float32) * xs_ct[-1].reshape(out.shape)), out

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs))), has_aux=True))
    compiled = grad.lower(*xs, ct).compile()

    def run():
        grads, out = compiled(*xs, ct)
        return jax.block_until_ready((out, grads))

    return run, compiled


def attention_rows_float64(q, k, v, rows):
    """Causal softmax attention output of query ``rows`` in float64 numpy, ``[B, |rows|, H, V]``."""
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    s = np.einsum("bhqd,bhkd->bhqk", q[:, :, rows], k) * q.shape[-1] ** -0.5
    s = np.where(np.arange(k.shape[2])[None, :] <= rows[:, None], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    out = np.einsum("bhqk,bhkd->bhqd", p / p.sum(axis=-1, keepdims=True), v)
    return out.transpose(0, 2, 1, 3)


def decay_rate_condition(op, arrays, ct):
    """Condition number of ``dA``, a sum over every batch row and token: with ``c[e, t]`` the
    float64 contribution of token ``t`` to element ``e`` of ``dA`` (the gradient of a per-token
    copy of A), ``kappa = ||sum_t |c[e, t]| || / ||sum_t c[e, t]||``. A float32 sum of such terms
    carries an error proportional to ``kappa`` times the terms' own relative error, whatever the
    algorithm, so ``dA`` is checked at ``kappa`` times the dtype's tolerance (every other array at the
    tolerance itself). Call inside ``float64()``."""
    import jax
    import jax.numpy as jnp

    from attnzoo import pallas_kernels as pk
    from attnzoo.pallas_kernels.ssm.ssd import ssd_inputs

    xs = [jnp.asarray(x, jnp.float64) for x in arrays]
    ct = jnp.asarray(ct, jnp.float64)
    if op in ("ssd", "ssd_torch"):
        x, dt, A, B, C = xs

        def loss(a_tok):
            q, k, v, _ = ssd_inputs(x, dt, A, B, C)
            g = dt * a_tok
            return jnp.sum(pk.simple_gla(q, k, v, g, scale=1.0, impl="reference")[0] * ct.reshape(x.shape))

        terms = jax.grad(loss)(jnp.broadcast_to(A, dt.shape))  # [B, T, H]
    else:
        u, delta, A, B, C = xs

        def loss(a_tok):  # the selective scan token by token with A per token [B, T, D, N]
            def step(h, inputs):
                u_t, d_t, a_t, b_t, c_t = inputs
                h = jnp.exp(d_t[..., None] * a_t) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
                return h, jnp.einsum("bdn,bn->bd", h, c_t)

            h0 = jnp.zeros(u.shape[:1] + A.shape, jnp.float64)
            seq = [jnp.moveaxis(z, 1, 0) for z in (u, delta, a_tok, B, C)]
            _, y = jax.lax.scan(step, h0, seq)
            return jnp.sum(jnp.moveaxis(y, 0, 1) * ct.reshape(u.shape))

        terms = jax.grad(loss)(jnp.broadcast_to(A, u.shape + A.shape[-1:]))  # [B, T, D, N]
    terms = np.asarray(terms).reshape((-1,) + tuple(A.shape))
    return float(np.linalg.norm(np.abs(terms).sum(0)) / np.linalg.norm(terms.sum(0)))


def oracle(op, inputs, args, length):
    """float64 expectations ``{name: array}``, a selector ``got -> {name: array}`` picking the same
    entries from the ``xla`` path's ``(out, grads)``, and a description of what is checked."""
    import jax
    import jax.numpy as jnp

    from attnzoo.pallas_kernels.testing import float64

    names, arrays = op_arguments(op, inputs)
    if length <= args.grad_check_max_t:  # output and every gradient, against impl="reference"
        with float64():
            xs = [np.asarray(x, np.float64) for x in arrays]
            ct = np.asarray(inputs["ct"], np.float64)
            forward = forward_fn(op, "reference", args.chunk_size)

            def loss(*xs):
                out = forward(*xs)
                return jnp.sum(out * ct.reshape(out.shape)), out

            grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs))), has_aux=True))(*xs)
            expected = {"out": np.asarray(out)} | {f"d{n}": np.asarray(g) for n, g in zip(names, grads)}
            if RECURRENT_OPS.get(op, (None,))[0] in ("ssd", "selective_scan"):
                expected["condition"] = {"dA": decay_rate_condition(op, arrays, inputs["ct"])}

        def select(got):
            out, grads = got
            return {"out": out} | {f"d{n}": g for n, g in zip(names, grads)}

        checked = "out+grads vs reference"
        if "condition" in expected:
            checked += f" (dA: kappa {expected['condition']['dA']:.0f})"
        return expected, select, checked
    if op == BASELINE:  # sampled rows of the output, float64 numpy
        rows = sample_positions(length, args.check_samples, args.seed + 1)
        expected = {"out": attention_rows_float64(*arrays, rows)}
        return expected, lambda got: {"out": np.asarray(got[0])[:, rows]}, f"out on {rows.size} rows (f64 numpy)"
    with float64():  # the whole output, against impl="reference"
        out = jax.jit(forward_fn(op, "reference", args.chunk_size))(*(np.asarray(x, np.float64) for x in arrays))
        expected = {"out": np.asarray(out)}
    return expected, lambda got: {"out": got[0]}, "out vs reference"


# --------------------------------------------------------------------------------------------
# peak RSS of one call, in a fresh process


def rss_worker(args):
    """Run inside the subprocess: prints ``{"rss_delta": bytes}`` for one call of one op."""
    inputs = make_inputs(args, args.lengths[0])
    run, compiled = build(args.rss_worker, inputs, args)
    del inputs, compiled
    print_rss_worker_result(peak_rss_delta(run))


def measure_rss(op, length, args):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--rss-worker", op, "--lengths", str(length),
        "--batch", str(args.batch), "--heads", str(args.heads), "--key-dim", str(args.key_dim),
        "--value-dim", str(args.value_dim), "--dtype", args.dtype, "--seed", str(args.seed),
        "--chunk-size", str(args.chunk_size),
    ]
    return rss_from_worker(cmd, f"{op} at T={length}")


# --------------------------------------------------------------------------------------------
# the benchmark


def benchmark_length(length, ops, args, log):
    from attnzoo.pallas_kernels import testing

    inputs = make_inputs(args, length)
    tol = testing.tolerance(jax_dtype(args.dtype))
    results = {}
    runners = {}
    for op in ops:
        entry = results[op] = {"status": "ok", "xla_bytes": None, "rss_bytes": None, "times": []}
        try:
            t0 = time.perf_counter()
            expected, select, entry["checked"] = oracle(op, inputs, args, length)
            oracle_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            run, compiled = build(op, inputs, args)
            entry["compile_s"] = time.perf_counter() - t0
            entry["xla_bytes"] = None if compiled is None else memory_bytes(compiled)
            del compiled
            if entry["xla_bytes"] is not None and entry["xla_bytes"] > args.mem_limit_gib * GIB:
                entry["status"] = f"OOM (est. {entry['xla_bytes'] / GIB:.1f} GiB)"
                log(f"T={length} {op}: skipped, XLA estimate {entry['xla_bytes'] / GIB:.1f} GiB > --mem-limit-gib {args.mem_limit_gib}")
                continue
            t0 = time.perf_counter()
            got = run()  # warm-up and the correctness check
            entry["first_call_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported in the table
            entry["status"] = f"ERROR ({type(e).__name__})"
            log(f"T={length} {op}: {type(e).__name__}: {e}")
            continue
        got = select(got)
        condition = expected.pop("condition", {})
        entry["errors"] = {name: rel_rms(got[name], expected[name]) for name in expected}
        del got, expected
        entry["max_err"] = max(entry["errors"].values())
        limits = {name: tol * max(1.0, condition.get(name, 1.0)) for name in entry["errors"]}
        if condition:
            entry["condition"] = condition
        if not all(np.isfinite(e) and e <= limits[name] for name, e in entry["errors"].items()):
            entry["status"] = "FAIL"
            log(f"T={length} {op}: FAIL ({entry['checked']}), rel. RMS errors {entry['errors']} (tolerances {limits})")
            continue
        runners[op] = run
        log(f"T={length} {op}: check ok ({entry['checked']}, max rel. RMS error {entry['max_err']:.1e}); oracle "
            f"{oracle_s:.1f} s, compile {entry['compile_s']:.1f} s, first call {entry['first_call_s']:.2f} s")

    first_call_s = {op: results[op]["first_call_s"] for op in runners}
    for op, times in interleaved_times(runners, first_call_s, args.repeats, args.time_budget).items():
        results[op]["times"].extend(times)
    runners.clear()
    for op, entry in results.items():
        if entry["times"]:
            entry["time_ms"] = float(np.median(entry["times"])) * 1e3
            log(f"T={length} {op}: {entry['time_ms']:.1f} ms (runs: {', '.join(f'{t * 1e3:.1f}' for t in entry['times'])})")
    if args.rss and (not args.smoke or length == args.lengths[-1]):
        for op, entry in results.items():
            if entry["status"] == "ok" and op != "ssd_torch" and (not args.smoke or op in SMOKE_RSS_OPS):
                entry["rss_bytes"] = measure_rss(op, length, args)
    return results


def speedup(results, op):
    """attention time / op time at one T, or None."""
    base, entry = results.get(BASELINE, {}), results.get(op, {})
    if "time_ms" in base and "time_ms" in entry:
        return base["time_ms"] / entry["time_ms"]
    return None


def tables(all_results, ops):
    out = []
    for length, results in all_results.items():
        out += [
            f"#### T = {length}",
            "",
            "| op | time (ms) | speed-up vs attention | XLA MiB | peak RSS MiB | max rel err | checked |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for op in ops:
            e = results.get(op)
            if e is None:
                continue
            time_s = f"{e['time_ms']:,.1f}" if "time_ms" in e else e["status"]
            s = speedup(results, op)
            err = f"{e['max_err']:.1e}" if "max_err" in e else "-"
            out.append(
                f"| {op} | {time_s} | {'-' if s is None else f'{s:.2f}'} | {fmt_mib(e['xla_bytes'])} | "
                f"{fmt_mib(e['rss_bytes'])} | {err} | {e.get('checked', '-')} |"
            )
        out.append("")
    return out


def faster_than_attention(results, op):
    entry, base = results.get(op, {}), results.get(BASELINE, {})
    if "time_ms" not in entry:
        return False
    if "time_ms" not in base:  # attention did not run: faster only if it ran out of memory
        return base.get("status", "").startswith("OOM")
    return entry["time_ms"] < base["time_ms"]


def crossovers(all_results, ops):
    """``{op: T or None}``: the smallest measured T from which the op beats attention at every
    larger measured T."""
    lengths = list(all_results)
    found = {}
    for op in ops:
        if op == BASELINE:
            continue
        cross = None
        for length in reversed(lengths):
            if not faster_than_attention(all_results[length], op):
                break
            cross = length
        found[op] = cross
    return found


def crossover_lines(all_results, ops):
    lengths = list(all_results)
    last = lengths[-1]
    lines = []
    for op, cross in crossovers(all_results, ops).items():
        s = speedup(all_results[last], op)
        at_last = f"speed-up {s:.2f} at T={last}" if s is not None else f"{all_results[last][op]['status']} at T={last}"
        if cross is None:
            lines.append(f"{op}: none up to T={last} ({at_last})")
        elif cross == lengths[0]:
            lines.append(f"{op}: T={cross}, faster at every measured T ({at_last})")
        else:
            lines.append(f"{op}: T={cross} ({at_last})")
    return lines


def memory_growth(all_results, op, key):
    """``[(T_prev, T, ratio)]`` of memory ``key`` between successive measured T (both known)."""
    points = [(t, r[op][key]) for t, r in all_results.items() if r.get(op, {}).get(key)]
    return [(t0, t1, m1 / m0) for (t0, m0), (t1, m1) in zip(points, points[1:])]


def torch_ssd_lines(all_results):
    """Per T: ``ssd`` (xla) against transformers' PyTorch Mamba-2 chunked scan, when both ran."""
    lines = []
    for length, results in all_results.items():
        ours, theirs = results.get("ssd", {}), results.get("ssd_torch", {})
        if "time_ms" in ours and "time_ms" in theirs:
            ratio = ours["time_ms"] / theirs["time_ms"]
            verdict = "at or below" if ratio <= 1.0 else "ABOVE"
            lines.append(f"T={length}: ssd {ours['time_ms']:,.1f} ms, transformers mamba2_chunk_scan (torch) "
                         f"{theirs['time_ms']:,.1f} ms: ratio {ratio:.2f} ({verdict} its time)")
    return lines


def packed_scan_lines(all_results):
    """Per T: ``selective_scan`` against the same call through its ``cu_seqlens`` path, when both ran."""
    lines = []
    for length, results in all_results.items():
        plain, packed = results.get("selective_scan", {}), results.get("selective_scan_cu_seqlens", {})
        if "time_ms" in plain and "time_ms" in packed:
            lines.append(f"T={length}: selective_scan {plain['time_ms']:,.1f} ms, the batch packed with cu_seqlens "
                         f"(autodiff backward) {packed['time_ms']:,.1f} ms: {packed['time_ms'] / plain['time_ms']:.2f}x its time")
    return lines


def target_lines(all_results):
    lines = torch_ssd_lines(all_results) + packed_scan_lines(all_results)
    op = TARGET_OP
    if not any(op in r for r in all_results.values()):
        return lines
    if TARGET_LENGTH in all_results:
        s = speedup(all_results[TARGET_LENGTH], op)
        if s is None:
            lines.append(f"T={TARGET_LENGTH}: {op} speed-up vs attention not measured "
                         f"({op}: {all_results[TARGET_LENGTH][op]['status']}, attention: "
                         f"{all_results[TARGET_LENGTH].get(BASELINE, {}).get('status', 'not run')}): NOT MET")
        else:
            verdict = "met" if s >= TARGET_SPEEDUP else "NOT MET"
            lines.append(f"T={TARGET_LENGTH}: {op} is {s:.2f}x faster than causal softmax attention "
                         f"(target >= {TARGET_SPEEDUP:g}x): {verdict}")
    else:
        last = list(all_results)[-1]
        s = speedup(all_results[last], op)
        lines.append(f"T={TARGET_LENGTH} not measured (target {op} >= {TARGET_SPEEDUP:g}x faster than attention); "
                     f"at the largest measured T={last}: {'-' if s is None else f'{s:.2f}x'}")
    for key, label in (("xla_bytes", "XLA MiB"), ("rss_bytes", "peak RSS MiB")):
        steps = memory_growth(all_results, op, key)
        if not steps:
            continue
        text = ", ".join(f"{t1}/{t0}: {ratio:.2f}" for t0, t1, ratio in steps)
        linear = all(ratio <= LINEAR_SLACK * t1 / t0 for t0, t1, ratio in steps)
        verdict = ("at most linear (each ratio <= %.2f x the length ratio)" % LINEAR_SLACK if linear
                   else "NOT linear (a ratio exceeds %.2f x the length ratio)" % LINEAR_SLACK)
        lines.append(f"{op} memory growth, {label}(T) / {label}(T_prev): {text}: {verdict}")
    return lines


def machine_info(jax):
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def write_outputs(path, text, record):
    """Appends the Markdown report to ``path`` (with a header if new) and ``record`` to the JSON list
    next to it (``path`` with ``.json``)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a") as f:
        if new:
            f.write(
                "# Recurrent ops vs causal softmax attention on CPU: forward + backward\n\n"
                "Produced by `benchmarks/recurrent.py` (the exact command is above each table); the "
                "full results, every timed run included, are in the `.json` file next to this one.\n\n"
            )
        f.write(text + "\n\n")
    json_path = os.path.splitext(path)[0] + ".json"
    runs = []
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                runs = json.load(f)
        except (OSError, ValueError):
            runs = []
        if not isinstance(runs, list):
            runs = [runs]
    runs.append(record)
    with open(json_path, "w") as f:
        json.dump(runs, f, indent=1)
        f.write("\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_LENGTHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--key-dim", type=int, default=64, help="K, the q/k head dimension")
    p.add_argument("--value-dim", type=int, default=64, help="V, the v head dimension")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chunk-size", type=int, default=64, help="chunk_size of the recurrent ops' xla engine")
    p.add_argument("--ops", type=lambda s: s.split(","), default=[op for op in RECURRENT_OPS if op not in OPTIONAL_OPS],
                   help=f"comma-separated subset of {','.join(RECURRENT_OPS)} (default: all but "
                        f"{','.join(OPTIONAL_OPS)}; ssd_torch needs torch + transformers); attention always runs")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per op (after a warm-up), fewer (not below 3) where that would "
                        "exceed --time-budget")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds of timed rounds per length before --repeats is cut")
    p.add_argument("--grad-check-max-t", type=int, default=2048,
                   help="check gradients against the float64 reference up to this T (output only above)")
    p.add_argument("--check-samples", type=int, default=32,
                   help="attention query rows checked in float64 above --grad-check-max-t")
    p.add_argument("--mem-limit-gib", type=float, default=12.0,
                   help="skip an op whose XLA memory estimate exceeds this")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak RSS in a fresh subprocess per (T, op)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="append the Markdown report to this file and the results to the .json list next to it")
    p.add_argument("--smoke", action="store_true",
                   help="tiny fast run (CI): T=128,256, B=1, H=2, K=V=32, 1 repeat, RSS of "
                        f"{' and '.join(SMOKE_RSS_OPS)} at T=256 only")
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.key_dim, args.value_dim, args.repeats = [128, 256], 2, 32, 32, 1
    unknown = set(args.ops) - set(RECURRENT_OPS)
    if unknown:
        p.error(f"unknown --ops {sorted(unknown)}; choose from {tuple(RECURRENT_OPS)}")
    if args.lengths != sorted(set(args.lengths)):
        p.error("--lengths must be increasing")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rss_worker:
        return rss_worker(args)
    import jax

    ops = [BASELINE] + [op for op in RECURRENT_OPS if op in args.ops]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    log(f"{command}\njax {jax.__version__}, devices {jax.devices()}, ops {ops}")
    started = datetime.datetime.now()
    load_start = load_average()
    all_results = {}
    for length in args.lengths:
        all_results[length] = benchmark_length(length, ops, args, log)
    load_end = load_average()
    machine = machine_info(jax)

    report = [
        f"### Recurrent ops vs causal softmax attention, forward + backward, B={args.batch}, H={args.heads}, "
        f"K={args.key_dim}, V={args.value_dim}, {args.dtype}, chunk_size={args.chunk_size}",
        "",
        f"`{command}` on {started.date().isoformat()}, {machine['machine']} CPU ({machine['cpu']}), "
        f"{machine['cores']} cores, jax {machine['jax']}; median of {args.repeats} interleaved runs (fewer, at "
        f"least 3, where a round of all ops exceeds {args.time_budget / args.repeats:.0f} s); "
        f"1-minute load average {load_start} at the start and {load_end} at the end.",
        "",
        *tables(all_results, ops),
        "Time: `jax.jit(jax.grad(sum(out * ct)))` w.r.t. every input (q, k, v, g, beta; ssd: x, dt, A, B, C "
        f"with G={SSD_STATE_GROUPS}, N=K; selective_scan: u, delta, A, B, C with D=H*V, N={SCAN_STATE_DIM}), the "
        "`xla` path (ssd_torch: transformers' `mamba2_chunk_scan`, torch autograd, same chunk size; "
        "selective_scan_cu_seqlens: selective_scan on the batch packed into one row with `cu_seqlens`). Speed-up: "
        "attention's time / the op's time (> 1: faster than causal softmax attention). XLA MiB: "
        "`compiled.memory_analysis()` temp + argument + output (temp is a lower bound on CPU). Peak RSS "
        "MiB: peak resident-set increase of one call in a fresh process (compile excluded). max rel err: "
        "largest relative RMS error of what is checked against the float64 oracle: the op's "
        f"`impl=\"reference\"`, out and every gradient for T <= {args.grad_check_max_t}, the whole out above; "
        "attention above that: out on sampled query rows against float64 numpy.",
    ]
    cross = crossover_lines(all_results, ops)
    if cross:
        report += ["", "Crossover: the smallest measured T from which the op is faster than causal softmax "
                   "attention at every larger measured T.", ""] + [f"- {line}" for line in cross]
    targets = target_lines(all_results)
    if targets:
        report += ["", "Targets:", ""] + [f"- {line}" for line in targets]
    text = "\n".join(report)
    print(text)
    if args.output:
        record = {
            "command": command,
            "date": started.isoformat(timespec="seconds"),
            "machine": machine,
            "load_average": {"start": load_start, "end": load_end},
            "config": {k: v for k, v in vars(args).items() if k not in ("rss_worker", "output")},
            "results": {
                str(length): {
                    op: {k: v for k, v in entry.items() if k != "times"}
                    | {"times_ms": [t * 1e3 for t in entry["times"]], "xla_mib": _mib(entry["xla_bytes"]),
                       "rss_mib": _mib(entry["rss_bytes"]), "speedup_vs_attention": speedup(results, op)}
                    for op, entry in results.items()
                }
                for length, results in all_results.items()
            },
            "crossover": crossovers(all_results, ops),
            "targets": targets,
        }
        write_outputs(args.output, text, record)
    failed = any(e["status"] == "FAIL" or e["status"].startswith("ERROR") for r in all_results.values() for e in r.values())
    return 1 if failed else 0


def _mib(x):
    return None if x is None else x / MIB


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()  # XLA:CPU's per-call buffers without page faults (attnzoo/runtime.py)
    sys.exit(main())
