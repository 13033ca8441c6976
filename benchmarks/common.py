"""Pieces shared by the benchmark scripts (``attention.py``, ``recurrent.py``, ``vision*.py``).

Errors and sampled check positions, memory figures (XLA's estimate and the peak RSS of one call
measured in a fresh process), interleaved timing rounds and a description of the machine. The scripts import this as
``common`` (their own directory is on ``sys.path``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time

import numpy as np

MIB = 1 << 20
GIB = 1 << 30


def rel_rms(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def sample_positions(length, count, seed):
    """Sorted distinct positions: both ends plus a spread of random ones."""
    rng = np.random.default_rng(seed)
    picks = {0, length - 1, length // 2}
    picks.update(rng.integers(0, length, size=count).tolist())
    return np.array(sorted(picks))


def jax_dtype(name):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def memory_bytes(compiled):
    """``compiled.memory_analysis()`` temp + argument + output bytes (None if unavailable)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def fmt_mib(x):
    return "-" if x is None else f"{x / MIB:,.0f}"


# --------------------------------------------------------------------------------------------
# the machine


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "n/a"


# --------------------------------------------------------------------------------------------
# peak RSS of one call, in a fresh process


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta(run):
    """Peak resident-set increase (bytes) of one ``run()``: resets the kernel's peak counter first."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = proc_status("VmRSS")
    run()
    return proc_status("VmHWM") - before


def print_rss_worker_result(rss_delta):
    """The worker's answer: one JSON line on stdout, read back by :func:`rss_from_worker`."""
    print(json.dumps({"rss_delta": rss_delta}))


def rss_from_worker(cmd, what):
    """Runs ``cmd`` (a worker process) and returns its ``rss_delta``, or None if it failed."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["rss_delta"]
    sys.stderr.write(f"RSS worker for {what} failed:\n{proc.stderr[-2000:]}\n")
    return None


# --------------------------------------------------------------------------------------------
# timing


def interleaved_times(runners, first_call_s, repeats, time_budget):
    """Seconds of each timed call, ``{name: [s, ...]}``, the runners interleaved.

    Every round calls each runner once, in rotating order, so the machine's noise is shared. Where
    one round (estimated from ``first_call_s``) is long, the rounds are cut to fit ``time_budget``,
    never below 3 (nor above ``repeats``).
    """
    order = list(runners)
    times = {name: [] for name in order}
    round_s = sum(first_call_s[name] for name in order)
    rounds = repeats if round_s * repeats <= time_budget else max(min(repeats, 3), int(time_budget / max(round_s, 1e-9)))
    for repeat in range(rounds):
        shift = repeat % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def print_and_save_table(table: str, script: str, argv, output: str | None) -> None:
    """Prints a markdown table and, with ``output``, writes it there under the command that made it
    (``script`` and its arguments, default ``sys.argv[1:]``)."""
    print(table)
    if output:
        command = " ".join([script, *(argv if argv is not None else sys.argv[1:])])
        with open(output, "w") as handle:
            handle.write(f"`{command}`\n\n{table}\n")
