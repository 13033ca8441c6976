"""Zoology's MQAR sweep (Figure 2) scaled to this CPU: recall accuracy per (mixer, width, length).

A thin driver over the trainer (:func:`attnzoo.train.train.train_and_evaluate`) and attnzoo's
``mqar`` dataset (its builder, with this sweep's configs: :func:`sweep_builder_class`): for every
(mixer, model width, (sequence length, key-value pairs), learning rate) it builds a config from
``attnzoo/configs/mqar.py``'s ``get_config()``, overrides the data, the model and the optimizer,
trains in a temporary workdir and records the trainer's final eval accuracy at the query
positions (``mqar`` task, the whole 1,000-example test split).

    python benchmarks/mqar.py                      # the full sweep (resumes; see the cost below)
    python benchmarks/mqar.py --plot               # only redraw the PNG / table from the CSV
    python benchmarks/mqar.py --smoke              # 2 mixers, width 64, length 64, 20 steps, one LR

Outputs (``--output``, default ``benchmarks/results/mqar.md``; the CSV and PNG sit next to it):

* ``mqar.csv``: one row per finished run, appended as it finishes (mixer, pattern, layers, width,
  seq_len, num_kv_pairs, vocab_size, learning_rate, batch_size, steps, accuracy, loss, seconds,
  step_ms, status, date). A rerun skips every run already in it (same mixer, width, length, LR, steps and
  batch), so an interrupted sweep resumes; ``--mixers``, ``--widths``, ``--lengths``, ``--lrs``,
  ``--steps`` select a part.
* ``mqar.png``: like Zoology's Figure 2, one panel per (seq_len, kv pairs), accuracy against model
  width, one line per mixer, the best learning rate taken at each point (matplotlib, imported only
  when plotting).
* ``mqar.md``: the command, date and machine, then the best accuracy per (mixer, width, length).
* stdout: that table, each run's time, and the projected time of the whole sweep on this machine
  from the runs measured so far (see :func:`projected_sweep_seconds`).

Mixers (``--mixers``, DecoderLM patterns; every model has 2 layers, as all of Zoology's):

    attention        attn                     global causal softmax attention
    sliding_window   swa                      window of --window (16) tokens
    linear_attention linear_attention         fla-style (layer defaults)
    based            based                    Taylor-feature linear attention (Based's mixer)
    retnet           retnet
    gla              gla
    deltanet         deltanet
    gated_deltanet   gated_deltanet
    kda              kda
    mamba            mamba
    mamba2           mamba2
    hybrid           gated_deltanet,attn      one Gated DeltaNet layer, then one global attention
                                              layer (the Gated DeltaNet paper's / Qwen3-Next's
                                              recurrent + attention interleaving)

What Zoology did (HazyResearch/zoology, read at commit d88d6f5,
``zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py`` and its README, and for
the newer mixers ``zoology/experiments/models_repo.py`` with
``zoology/experiments/mqar_example_configs/original_mqar_configs.py``; ``zoology/config.py`` and
``zoology/train.py`` for the defaults):

* data: vocab 8,192, (seq_len, kv) = (64, 4), (128, 8), (256, 16) (and (512, 64), commented out),
  100,000 train / 3,000 test examples, power_a 0.01, ``random_non_queries=False`` (attnzoo's
  dataset fills the non-query slots with random tokens, the generator's default);
* models: ``n_layers=2`` for every mixer (attention, Hyena, RWKV, H3, BaseConv, Based, Mamba in
  Figure 2; DeltaNet, Gated DeltaNet, GLA, Mamba-2, sliding window in ``models_repo.py``), no MLP
  (state mixer ``Identity``); Based in Figure 2, and every mixer in ``models_repo.py``, a hybrid
  with a short BaseConv (kernel 3) in front; attention 1 head (2 in ``models_repo.py``), widths
  64, 128, 256, 512;
* training: AdamW, weight decay 0.1, cosine schedule to 0, 64 epochs (early stop at 0.99 eval
  accuracy), batch 512 (seq 64, 128) or 256 (seq 256), i.e. about 12,500 steps at seq 64 / 128
  and 25,000 at seq 256; learning rates ``np.logspace(-4, -2, 4)`` = 1e-4, 4.6e-4, 2.2e-3, 1e-2,
  the best of the four plotted (the newer configs: ``np.logspace(-3, -1.5, 4)``, 32 epochs).

How this sweep is scaled down: the same three (seq_len, kv) points, power law and generator, the
same 2 layers and widths 64, 128, 256 (512 dropped), but

* vocab 512 instead of 8,192 (keys from [1, 256), values from [256, 512); 100k train / 1k test
  examples per length, the ``mqar_sweep`` builder of :func:`sweep_builder_class`): the model
  computes logits over the whole vocab at every position, and at vocab 8,192 that head is ~85% of
  the FLOPs of a width-64, length-64 step (0.45 s per attention step here; ~6% at vocab 512);
* attnzoo's DecoderLM blocks (pre-norm mixer + SwiGLU MLP; the mixers' own short convolutions where
  the layer has one; no BaseConv in front; 2 heads everywhere; ``swa`` window 16 tokens);
* batch 64 (``--batch-size``) for ``--steps`` (default 1,000) steps, i.e. 64k examples (0.64 epoch)
  against Zoology's 6.4M: the budget in which ``attnzoo/configs/mqar.py`` (same trainer, batch 64)
  takes 2-layer attention to ~0.996 on vocab 256, seq 64 / 8 pairs; here 2-layer attention at width
  64, seq 64 / 4 pairs, LR 3e-3 reached 0.869 in 1,000 steps (180 s; its loss falls between steps 400
  and 600), so fewer steps would leave even attention short. AdamW as in ``attnzoo/configs/common.py``
  (weight decay 0.1 as Zoology, 100 warmup steps, cosine to 0.1 of the peak, clip 1.0);
* learning rates 1e-3, 3e-3, 1e-2 (``--lrs``): half-decade steps over the top of Zoology's two grids
  (1e-4 does not train in 1,000 steps), the best taken per point. Runs that stop on a non-finite
  loss are recorded with accuracy 0.

Expected shape (Zoology, Figure 2; Based paper, Figure 2): attention solves MQAR (accuracy ~1) at
every width and length; the gated-convolution / recurrent mixers need larger widths (a larger
recurrent state) as the number of pairs grows, so their curves fall to the right (longer sequences,
more pairs) and rise with width; Based and the delta-rule mixers (DeltaNet, Gated DeltaNet, KDA)
close most of the gap; sliding-window attention fails once keys sit further back than its window;
the hybrid behaves like attention. With ~1/100 of Zoology's training the sub-quadratic mixers (and
attention at seq 256) land lower than in the paper; the ordering is the result to read.

Cost (measured 2026-12-05 on the 2-core x86 CPU of the dev container, shared with another job,
1-minute load average 3.5-5; the trainer's ms per step at batch 64, compile excluded): at width 64,
length 64, attention 99-137, linear_attention 153, gated_deltanet ~290; at width 256, length 256
(3-10 steps each), in seconds per step: gla 2.6, deltanet 3.4, attention 3.5, hybrid 3.9,
sliding_window 4.2, linear_attention 4.5, based 5.0, retnet 5.4, mamba2 6.7, gated_deltanet 8.2,
kda 8.5. Mamba then took 6.2 s per step at width 64 (> 60 s at width 256): its selective scan's
``xla`` form was an associative scan per chunk; with the token-by-token chunks that replaced it
(2026-12-06) a 2-layer Mamba step at width 64 takes 0.57 s at load 1 (attention: 0.10 s). Each run
adds 15-70 s of data loading, compiling and the eval. Projected by :func:`projected_sweep_seconds`
from the runs above (Mamba excluded), the full default sweep (12 mixers x 3 widths x 3 lengths x 3
LRs = 324 runs of 1,000 steps) costs about 150 hours of this CPU, one LR alone about a third: it is
meant to be run in parts (it resumes), e.g. ``--lengths 64`` first, or on a faster machine; the
script prints the projection after each invocation from the runs measured so far. Fewer steps
would not be a faithful sweep (2-layer attention reached 0.869 at width 64, length 64 in 1,000
steps; ``--steps 2000`` is closer to the paper at twice the cost).

``--smoke`` (CI): attention and linear_attention, width 64, length 64, 20 steps, LR 3e-3, writing
to a temporary directory unless ``--output`` is given; 64 s here, dataset build included
(``--data-dir``, default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``; the seq-64 dataset,
100k examples, is built there on first use in ~15 s).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, load_average  # noqa: E402

# mixer name -> DecoderLM pattern (one super-block; depth LAYERS repeats it)
MIXERS = {
    "attention": "attn",
    "sliding_window": "swa",
    "linear_attention": "linear_attention",
    "based": "based",
    "retnet": "retnet",
    "gla": "gla",
    "deltanet": "deltanet",
    "gated_deltanet": "gated_deltanet",
    "kda": "kda",
    "mamba": "mamba",
    "mamba2": "mamba2",
    "hybrid": "gated_deltanet,attn",
}
LAYERS = 2  # Zoology: n_layers=2 for every mixer (attention included)
# seq_len -> num_kv_pairs (Zoology Figure 2); the datasets are mqar_sweep/v512_t{T}_kv{K}
LENGTHS = {64: 4, 128: 8, 256: 16}
VOCAB_SIZE = 512  # Zoology: 8192 (see the module docstring)
WIDTHS = (64, 128, 256)
LEARNING_RATES = (1e-3, 3e-3, 1e-2)
STEPS = 1000
BATCH_SIZE = 64
HEADS = 2
WINDOW = 16

SMOKE = dict(mixers=["attention", "linear_attention"], widths=[64], lengths=[64], lrs=[3e-3], steps=20)

COLUMNS = ["mixer", "pattern", "layers", "width", "seq_len", "num_kv_pairs", "vocab_size", "learning_rate",
           "batch_size", "steps", "accuracy", "loss", "seconds", "step_ms", "status", "date"]
DONE_STATUSES = ("ok", "nonfinite")  # rows a rerun skips (errors are retried)

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mqar.md")


# ------------------------------------------------------------------------------------------------
# arguments


def _list(kind, choices=None):
    """An argparse type: comma-separated ``kind`` values (from ``choices``), duplicates dropped;
    argparse names the argument in the error."""

    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"needs at least one value, got {text!r}")
        values = []
        for item in items:
            try:
                value = kind(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not a valid {kind.__name__}") from None
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown value {item!r}; choose from {', '.join(str(c) for c in choices)}"
                )
            values.append(value)
        return list(dict.fromkeys(values))

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", type=_list(str, tuple(MIXERS)), default=list(MIXERS),
                   help=f"comma-separated subset of {','.join(MIXERS)}")
    p.add_argument("--widths", type=_list(int), default=list(WIDTHS),
                   help="model widths (dim), multiples of 2 * --heads (default 64,128,256)")
    p.add_argument("--lengths", type=_list(int, tuple(LENGTHS)), default=list(LENGTHS),
                   help="sequence lengths, from 64,128,256 (kv pairs 4, 8, 16 follow)")
    p.add_argument("--lrs", type=_list(float), default=list(LEARNING_RATES),
                   help="peak learning rates; the best is taken per point (default 1e-3,3e-3,1e-2)")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training batch size")
    p.add_argument("--heads", type=int, default=HEADS, help="heads of every mixer")
    p.add_argument("--window", type=int, default=WINDOW, help="sliding_window's window (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--output", default=None,
                   help=f"the Markdown table; the CSV and PNG go next to it (default {os.path.relpath(DEFAULT_OUTPUT)}, "
                        "with --smoke a temporary directory)")
    p.add_argument("--plot", action="store_true", help="run nothing: redraw the PNG and table from the CSV")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run (CI): attention and linear_attention, width 64, length 64, 20 steps, LR 3e-3")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        if args.output is None:
            args.output = os.path.join(tempfile.mkdtemp(prefix="mqar_smoke_"), "mqar.md")
    if args.output is None:
        args.output = DEFAULT_OUTPUT
    if not args.output.endswith(".md"):
        p.error(f"--output must name a .md file (the .csv and .png go next to it), got {args.output!r}")
    for name in ("steps", "batch_size", "heads", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    bad = [w for w in args.widths if w < 1 or w % (2 * args.heads)]
    if bad:
        p.error(f"--widths must be positive multiples of 2 * --heads = {2 * args.heads}, got {bad}")
    bad = [lr for lr in args.lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        p.error(f"--lrs must be positive, got {bad}")
    return args


# ------------------------------------------------------------------------------------------------
# one run


DATASET = "mqar_sweep"  # the builder below; its configs are v{VOCAB_SIZE}_t{T}_kv{K}
_builder_class = None


def dataset_name(seq_len: int) -> str:
    return f"{DATASET}/v{VOCAB_SIZE}_t{seq_len}_kv{LENGTHS[seq_len]}"


def sweep_builder_class():
    """A TFDS builder (``mqar_sweep``) of attnzoo's ``Mqar`` with this sweep's configs, registered
    on first call: vocab ``VOCAB_SIZE``, the (seq_len, kv) points of ``LENGTHS``, 100k train (as
    Zoology's Figure 2) and 1k test examples. ``attnzoo.train.datasets.mqar`` registers only
    vocab-256 configs at seq_len 64 and Zoology's vocab-8192 ones, whose output head is too slow
    here (see the module docstring)."""
    global _builder_class
    if _builder_class is None:
        from attnzoo.train.datasets.mqar import Mqar, MqarConfig

        class MqarSweep(Mqar):
            """MQAR at the (seq_len, kv) points of benchmarks/mqar.py, vocab VOCAB_SIZE."""

            BUILDER_CONFIGS = [
                MqarConfig(
                    name=f"v{VOCAB_SIZE}_t{seq_len}_kv{kv}",
                    description=f"vocab_size={VOCAB_SIZE}, seq_len={seq_len}, num_kv_pairs={kv}, power_a=0.01, "
                                f"100000 train / 1000 test examples",
                    vocab_size=VOCAB_SIZE, seq_len=seq_len, num_kv_pairs=kv,
                    num_train_examples=100_000, num_test_examples=1_000,
                )
                for seq_len, kv in LENGTHS.items()
            ]
            DEFAULT_CONFIG_NAME = f"v{VOCAB_SIZE}_t64_kv4"

        _builder_class = MqarSweep
    return _builder_class


def prepare_dataset(seq_len: int, data_dir: str | None) -> None:
    """Builds the sweep's dataset for ``seq_len`` in ``data_dir`` unless it is there already."""
    import tensorflow_datasets as tfds

    from attnzoo.train.datasets._base import is_prepared
    from attnzoo.train.input_pipeline import default_data_dir

    sweep_builder_class()
    builder = tfds.builder(dataset_name(seq_len), data_dir=data_dir or default_data_dir())
    if not is_prepared(builder):
        print(f"building {dataset_name(seq_len)} in {builder.data_dir} (once)", flush=True)
        builder.download_and_prepare()


def make_config(mixer, width, seq_len, lr, *, steps, batch_size, heads, window, seed, data_dir):
    """``attnzoo/configs/mqar.py``'s config with this run's data, model and optimizer."""
    from attnzoo.configs import mqar

    config = mqar.get_config(MIXERS[mixer])
    config.seed = seed
    config.data.name = dataset_name(seq_len)
    config.data.seq_len = seq_len
    config.data.data_dir = data_dir
    config.model.kwargs.vocab_size = VOCAB_SIZE
    config.model.kwargs.dim = width
    config.model.kwargs.depth = LAYERS
    config.model.kwargs.num_heads = heads
    config.model.kwargs.sliding_window = window
    config.batch_size = batch_size
    config.num_steps = steps
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = min(100, max(steps // 10, 1))
    config.log_every_steps = max(steps // 5, 1)
    config.eval_every_steps = 0
    config.checkpoint.every_steps = 0  # only the final step (the trainer always saves it)
    config.checkpoint.keep = 1
    config.checkpoint.async_save = False
    return config


def train_one(config):
    """(accuracy, loss, status, seconds, ms per train step) of one run in a throwaway workdir.

    ``seconds`` is the whole run (data, compile, train, eval); the step time is the trainer's, from
    its last log interval (compile excluded)."""
    from attnzoo.train.train import NonFiniteLossError, train_and_evaluate

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mqar_run_") as workdir:
        try:
            result = train_and_evaluate(config, workdir)
        except NonFiniteLossError as error:
            print(f"  non-finite loss: {error}", flush=True)
            return 0.0, float("nan"), "nonfinite", time.perf_counter() - started, float("nan")
    if result.stopped_by_signal:
        raise KeyboardInterrupt(f"stopped by {result.stopped_by_signal}")
    step_ms = 1e3 * float(result.train_metrics.get("step_time_s", float("nan")))
    return (float(result.eval_metrics["accuracy"]), float(result.eval_metrics.get("loss", float("nan"))), "ok",
            time.perf_counter() - started, step_ms)


# ------------------------------------------------------------------------------------------------
# the CSV


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("layers", "width", "seq_len", "num_kv_pairs", "vocab_size", "batch_size", "steps"):
            row[key] = int(row[key])
        for key in ("learning_rate", "accuracy", "loss", "seconds", "step_ms"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
    return rows


def append_row(path, row):
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({key: row[key] for key in COLUMNS})


def run_key(mixer, width, seq_len, lr, steps, batch_size):
    return (mixer, MIXERS[mixer], width, seq_len, f"{lr:.6g}", steps, batch_size)


def row_key(row):
    return (row["mixer"], row["pattern"], row["width"], row["seq_len"], f"{row['learning_rate']:.6g}", row["steps"],
            row["batch_size"])


# ------------------------------------------------------------------------------------------------
# cost


def run_cost(row):
    """(overhead seconds, seconds per step) of a measured run: the step time is the trainer's
    (compile excluded); the overhead the rest (data, compile, eval)."""
    step_s = row["step_ms"] / 1e3 if math.isfinite(row.get("step_ms", float("nan"))) else row["seconds"] / row["steps"]
    return max(row["seconds"] - row["steps"] * step_s, 0.0), step_s


def projected_sweep_seconds(rows, steps, batch_size, mixers=tuple(MIXERS), widths=WIDTHS, lengths=tuple(LENGTHS),
                            lrs=LEARNING_RATES):
    """(total seconds, runs measured, runs estimated) of the sweep ``mixers x widths x lengths x
    lrs`` at ``steps`` / ``batch_size`` on this machine.

    A run in ``rows`` counts its measured time. Another costs ``overhead + steps x step time``
    (:func:`run_cost`): both from measured runs (any LR or step count) of the same (mixer, width,
    length) where there are some (the LR does not change the cost); else the step time is the same
    mixer's median seconds per (step x width x length) times this run's width x length (else all
    mixers'), and the overhead the median over that mixer's runs. Compute per step grows at most
    like width x length here (the output head and MLP scale with width, attention with length^2
    but is small at T <= 256), so the scaled estimates are rough; measure the largest points.
    """
    measured = [r for r in rows if r["status"] in DONE_STATUSES and r["batch_size"] == batch_size]
    if not measured:
        return None, 0, 0

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    done = {row_key(r): r["seconds"] for r in measured}
    by_point = {}
    for r in measured:
        by_point.setdefault((r["mixer"], r["width"], r["seq_len"]), []).append(run_cost(r))
    overall_rate = median(run_cost(r)[1] / (r["width"] * r["seq_len"]) for r in measured)
    overall_overhead = median(run_cost(r)[0] for r in measured)
    total, n_measured, n_estimated = 0.0, 0, 0
    for mixer in mixers:
        mixer_rows = [r for r in measured if r["mixer"] == mixer]
        rate = median(run_cost(r)[1] / (r["width"] * r["seq_len"]) for r in mixer_rows) if mixer_rows else overall_rate
        overhead = median(run_cost(r)[0] for r in mixer_rows) if mixer_rows else overall_overhead
        for width in widths:
            for seq_len in lengths:
                for lr in lrs:
                    key = run_key(mixer, width, seq_len, lr, steps, batch_size)
                    if key in done:
                        total += done[key]
                        n_measured += 1
                        continue
                    n_estimated += 1
                    point = by_point.get((mixer, width, seq_len))
                    if point:
                        total += median(c[0] for c in point) + steps * median(c[1] for c in point)
                    else:
                        total += overhead + steps * rate * width * seq_len
    return total, n_measured, n_estimated


def fmt_duration(seconds):
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------
# table and plot


def best_accuracy(rows, steps, batch_size):
    """{(mixer, seq_len, width): (best accuracy over LRs, its LR)} for runs at ``steps``/``batch_size``."""
    best = {}
    for r in rows:
        if r["status"] not in DONE_STATUSES or r["steps"] != steps or r["batch_size"] != batch_size:
            continue
        key = (r["mixer"], r["seq_len"], r["width"])
        accuracy = r["accuracy"] if math.isfinite(r["accuracy"]) else 0.0
        if key not in best or accuracy > best[key][0]:
            best[key] = (accuracy, r["learning_rate"])
    return best


def markdown_table(best):
    mixers = [m for m in MIXERS if any(k[0] == m for k in best)]
    points = sorted({(k[1], k[2]) for k in best})
    header = "| mixer | " + " | ".join(f"T={t} kv={LENGTHS[t]} d={w}" for t, w in points) + " |"
    lines = [header, "|" + "---|" * (len(points) + 1)]
    for mixer in mixers:
        cells = []
        for point in points:
            entry = best.get((mixer, *point))
            cells.append("-" if entry is None else f"{entry[0]:.3f} ({entry[1]:.0e})")
        lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(best, path, title):
    """Figure 2 of Zoology: a panel per (seq_len, kv), accuracy vs width, a line per mixer."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)", flush=True)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({k[1] for k in best})
    if not lengths:
        return False
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, seq_len in zip(axes[0], lengths, strict=True):
        for index, mixer in enumerate(MIXERS):
            points = sorted((k[2], v[0]) for k, v in best.items() if k[0] == mixer and k[1] == seq_len)
            if not points:
                continue
            style = "-" if mixer in ("attention", "hybrid") else "--" if index % 2 else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=4, color=cmap(index),
                    label=mixer, lw=2.2 if mixer == "attention" else 1.4)
        ax.set_xscale("log", base=2)
        widths = sorted({k[2] for k in best if k[1] == seq_len})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("model width")
        ax.set_title(f"seq len {seq_len}, {LENGTHS[seq_len]} kv pairs")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (best LR)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------


def machine_line(jax):
    return (f"{platform.machine()} CPU ({cpu_model()}), {os.cpu_count()} cores, jax {jax.__version__}, "
            f"1-minute load average {load_average()}")


def main(argv=None):
    args = parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__)), *argv])
    base = os.path.splitext(args.output)[0]
    csv_path, png_path = base + ".csv", base + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    import jax

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"{command}\n{machine_line(jax)}\nresults: {csv_path}")

    failures = 0
    if not args.plot:
        done = {row_key(r) for r in read_rows(csv_path) if r["status"] in DONE_STATUSES}
        todo = [(m, w, t, lr) for t in args.lengths for w in args.widths for m in args.mixers for lr in args.lrs
                if run_key(m, w, t, lr, args.steps, args.batch_size) not in done]
        total = len(args.mixers) * len(args.widths) * len(args.lengths) * len(args.lrs)
        log(f"{total - len(todo)} of {total} selected runs already in the CSV; {len(todo)} to run")
        for index, (mixer, width, seq_len, lr) in enumerate(todo, 1):
            config = make_config(mixer, width, seq_len, lr, steps=args.steps, batch_size=args.batch_size,
                                 heads=args.heads, window=args.window, seed=args.seed, data_dir=args.data_dir)
            prepare_dataset(seq_len, args.data_dir)
            log(f"[{index}/{len(todo)}] {mixer} ({MIXERS[mixer]}) width {width} seq_len {seq_len} "
                f"kv {LENGTHS[seq_len]} lr {lr:g} steps {args.steps}")
            try:
                accuracy, loss, status, seconds, step_ms = train_one(config)
            except KeyboardInterrupt:
                log("interrupted; rerun the same command to resume")
                raise
            except Exception as error:  # recorded, retried on the next run
                failures += 1
                accuracy, loss, status, seconds, step_ms = (float("nan"), float("nan"),
                                                            f"error: {type(error).__name__}", 0.0, float("nan"))
                log(f"  ERROR {type(error).__name__}: {error}")
            append_row(csv_path, dict(
                mixer=mixer, pattern=MIXERS[mixer], layers=LAYERS, width=width, seq_len=seq_len,
                num_kv_pairs=LENGTHS[seq_len], vocab_size=VOCAB_SIZE, learning_rate=f"{lr:.6g}",
                batch_size=args.batch_size, steps=args.steps, accuracy=f"{accuracy:.4f}", loss=f"{loss:.4f}",
                seconds=f"{seconds:.1f}", step_ms=f"{step_ms:.1f}", status=status,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
            ))
            log(f"  accuracy {accuracy:.4f}, {seconds:.1f} s, {step_ms:.0f} ms/step ({status})")

    rows = read_rows(csv_path)
    best = best_accuracy(rows, args.steps, args.batch_size)
    date = datetime.date.today().isoformat()
    table = markdown_table(best) if best else "(no finished runs)"
    heading = (f"### MQAR (Zoology Figure 2, scaled down): best accuracy over LRs, {LAYERS} layers, vocab "
               f"{VOCAB_SIZE}, {args.steps} steps x batch {args.batch_size}")
    text = "\n".join([
        heading, "",
        f"`{command}` on {date}, {machine_line(jax)}. Cells: accuracy at the query positions of the 1,000 test "
        f"examples (the LR that gave it). Full results: `{os.path.basename(csv_path)}`.", "", table,
    ])
    print(text)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    if best:
        title = f"MQAR, {LAYERS} layers, {args.steps} steps x batch {args.batch_size}, best LR ({date})"
        if write_plot(best, png_path, title):
            log(f"plot: {png_path}")

    measured = [r for r in rows if r["status"] in DONE_STATUSES and r["batch_size"] == args.batch_size]
    if measured:
        log("\nmeasured runs (seconds, compile + train + eval):")
        for r in measured[-12:]:
            log(f"  {r['mixer']:>16} d={r['width']:<4} T={r['seq_len']:<4} lr={r['learning_rate']:<7g} "
                f"{r['steps']} steps: {r['seconds']:.1f} s")
    for steps in dict.fromkeys([args.steps, STEPS]):
        total, n_measured, n_estimated = projected_sweep_seconds(rows, steps, args.batch_size)
        log(f"projected full sweep ({len(MIXERS)} mixers x {len(WIDTHS)} widths x {len(LENGTHS)} lengths x "
            f"{len(LEARNING_RATES)} LRs, {steps} steps x batch {args.batch_size}): {fmt_duration(total)} "
            f"({n_measured} runs measured, {n_estimated} estimated)")
    return 1 if failures else 0


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()  # XLA:CPU's per-call buffers without page faults (attnzoo/runtime.py)
    sys.exit(main())
