"""Where metrics go: a live progress line, ``metrics.jsonl`` and TensorBoard event files in the workdir.

FLOPs and MFU (model FLOPs utilisation):

  step FLOPs = 3 * forward FLOPs per example * global batch      (backward = 2 x forward)
  MFU        = step FLOPs / step seconds / (peak FLOP/s per device * devices)

Forward FLOPs are analytic (the model's ``forward_flops``): 2 per multiply-add of every matmul,
attention scores and values counted over the visible (query, key) pairs only, so causal
attention counts T(T+1)/2 pairs and a window of w counts at most w+1 keys per query. Remat's
recomputation is not counted (this is MFU, not hardware utilisation).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

# Dense peak FLOP/s per device by device kind (bfloat16; float32 for CPU). Override with
# config.peak_flops_per_device. CPU: measured XLA matmul peak of this project's 2-core machine
# (float32 2048^3 ~265 GFLOP/s, bfloat16 operands with float32 result ~740 GFLOP/s) for the whole
# host, shared by all simulated devices.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}
CPU_HOST_PEAK = {"float32": 265e9, "bfloat16": 740e9}


def peak_flops_per_device(configured: float | None, dtype: str) -> float:
    """The configured peak, or the table's entry for this device kind."""
    if configured:
        return float(configured)
    device = jax.devices()[0]
    if device.platform == "cpu":
        return CPU_HOST_PEAK.get(dtype, CPU_HOST_PEAK["float32"]) / jax.device_count()
    for prefix, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return peak
    return float("nan")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def format_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


class MetricsWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tensorboard``) and
    prints progress. Only process 0 writes.

    On resume from step ``s`` the JSONL keeps only records with ``step <= s`` (rewritten
    atomically), so a restarted run's curve has no duplicated or orphaned steps.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._live = sys.stdout.isatty()
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def _truncate_after(self, step: int):
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= step:
                    kept.append(json.dumps(record))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, split: str, scalars: dict[str, float]):
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def progress(self, text: str, *, final: bool = False):
        """A status line: rewritten in place on a terminal, one line per call otherwise."""
        if not self.enabled:
            return
        if self._live and not final:
            print("\r" + text.ljust(110), end="", flush=True)
        else:
            print(("\r" if self._live else "") + text, flush=True)

    def close(self):
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Step timing between log points: steps/s, units/s, MFU and ETA."""

    def __init__(self, *, units_per_step: int, flops_per_step: float, peak_flops: float, first_step: int):
        self.units_per_step = units_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self._step, self._time = first_step, None

    def start(self, step: int):
        self._step, self._time = step, time.perf_counter()

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self._step
        elapsed = now - self._time if self._time is not None else float("nan")
        self._step, self._time = step, now
        if steps <= 0 or not elapsed > 0:
            return {}
        step_time = elapsed / steps
        return {
            "step_time_s": step_time,
            "units_per_s": self.units_per_step / step_time,
            "flops_per_s": self.flops_per_step / step_time,
            "mfu": self.flops_per_step / step_time / self.peak_flops,
        }
