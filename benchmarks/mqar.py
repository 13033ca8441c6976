"""Zoology's MQAR sweep (Figure 2) scaled to this CPU: recall accuracy per (mixer, width, length).

A thin driver over the trainer (:func:`attnzoo.train.train.train_and_evaluate`) and attnzoo's
``mqar`` dataset (its builder, with this sweep's configs: :func:`sweep_builder_class`): for every
(mixer, model width, (sequence length, key-value pairs), learning rate) it builds a config from
``attnzoo/configs/mqar.py``'s ``get_config()``, overrides the data, the model and the optimizer,
trains in a workdir of its own under ``--runs-dir`` and records the trainer's final eval
accuracy at the query positions (``mqar`` task, the whole 1,000-example test split).

    python benchmarks/mqar.py                      # the full sweep (resumes; see the cost below)
    python benchmarks/mqar.py --workers 2          # the same, two points at once (one per core here)
    python benchmarks/mqar.py --workers 2 --until 17:30   # only the runs that end by 17:30
    python benchmarks/mqar.py --plot               # only redraw the PNG / table from the CSV
    python benchmarks/mqar.py --smoke              # 2 mixers, width 64, length 64, 20 steps, one LR

Outputs (``--output``, default ``benchmarks/results/mqar.md``; the CSV and PNG sit next to it):

* ``mqar.csv``: one row per finished run, appended as it finishes (mixer, pattern, layers, mlp,
  width, seq_len, num_kv_pairs, vocab_size, learning_rate, seed, batch_size, steps, stopped_at,
  accuracy, loss, seconds, step_ms, status, date). A rerun skips every run already in it (same mixer,
  pattern, MLP, width, length, LR, seed, steps and batch) and the other LRs of a solved point, so an
  interrupted sweep resumes; ``--mixers``, ``--widths``, ``--lengths``, ``--lrs``, ``--steps``,
  ``--seed`` select a part. Rows from before the seed column read as seed 0.
* ``mqar.png``: like Zoology's Figure 2, one panel per (seq_len, kv pairs), accuracy against model
  width, one line per mixer, the best learning rate taken at each point (matplotlib, imported only
  when plotting).
* ``mqar.md``: the command, date and machine, the sweep's progress, the best accuracy per (mixer,
  width, length) at ``--seed`` (default 0), Zoology's qualitative results checked on the finished
  points (:func:`zoology_checks`), every run repeated at other seeds with its spread
  (:func:`seed_spread`) and every point also run at other training budgets (:func:`budget_variants`).
* stdout: that table, each run's time, and the projected time of the whole sweep on this machine
  from the runs measured so far (see :func:`projected_sweep_seconds`).

Mixers (``--mixers``; DecoderLM patterns of 2 mixer-only layers, as all of Zoology's models):

    attention        attn                        two global causal softmax attention layers (Figure 2)
    sliding_window   base_conv,swa               window of --window (16) tokens
    linear_attention base_conv,linear_attention  fla-style (layer defaults)
    based            base_conv,based             Taylor-feature linear attention (Based's mixer)
    retnet           base_conv,retnet
    gla              base_conv,gla
    deltanet         base_conv,deltanet
    gated_deltanet   base_conv,gated_deltanet
    kda              base_conv,kda
    mamba            mamba                       two Mamba layers (their own short convolutions)
    mamba2           mamba2                      two Mamba-2 layers
    hybrid           gated_deltanet,attn         one Gated DeltaNet layer, then one global attention
                                                 layer (the Gated DeltaNet paper's / Qwen3-Next's
                                                 recurrent + attention interleaving)

``base_conv`` is Based's gated short convolution (``attnzoo.layers.BaseConv``, kernel 3, ``D``
channels: ``expand_proj=2``), in layer 0 exactly where Zoology puts its ``BaseConv``.

What Zoology did (HazyResearch/zoology, read at commit d88d6f5,
``zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py`` and its README, and for
the newer mixers ``zoology/experiments/models_repo.py`` with
``zoology/experiments/mqar_example_configs/original_mqar_configs.py``; ``zoology/config.py``,
``zoology/train.py`` and ``zoology/mixers/hybrid.py`` for the defaults):

* data: vocab 8,192, (seq_len, kv) = (64, 4), (128, 8), (256, 16) (and (512, 64), commented out),
  100,000 train / 3,000 test examples, power_a 0.01, ``random_non_queries=False`` (attnzoo's
  dataset fills the non-query slots with random tokens, the generator's default);
* models: ``n_layers=2`` for every mixer, no MLP (state mixer ``Identity``). Based in Figure 2,
  and attention, Based, sliding window, DeltaNet, Gated DeltaNet, GLA in ``models_repo.py``, use
  the ``Hybrid`` mixer over ``[BaseConv(kernel 3), mixer]``, which gives layer ``i`` the config
  ``i % 2``: layer 0 is a BaseConv, layer 1 the mixer. Attention in Figure 2 (two attention
  layers, 1 head), Mamba and Mamba-2 are not wrapped. Widths 64, 128, 256, 512;
* training: AdamW, weight decay 0.1, cosine schedule to 0, 64 epochs, early stop at 0.99 eval
  accuracy, batch 512 (seq 64, 128) or 256 (seq 256), i.e. about 12,500 steps at seq 64 / 128
  and 25,000 at seq 256; learning rates ``np.logspace(-4, -2, 4)`` = 1e-4, 4.6e-4, 2.2e-3, 1e-2,
  the best of the four plotted (the newer configs: ``np.logspace(-3, -1.5, 4)``, 32 epochs).

How this sweep is scaled down: the same three (seq_len, kv) points, power law and generator, the
same 2 mixer-only layers, BaseConv placement, early stop and widths 64, 128, 256 (512 dropped), but

* vocab 512 instead of 8,192 (keys from [1, 256), values from [256, 512); 100k train / 1k test
  examples per length, the ``mqar_sweep`` builder of :func:`sweep_builder_class`): the model
  computes logits over the whole vocab at every position, and at vocab 8,192 that head is ~85% of
  the FLOPs of a width-64, length-64 step (~6% at vocab 512);
* attnzoo's layers with their defaults (fla's where they follow fla), 2 heads everywhere, RoPE in
  attention, ``swa`` window 16 tokens, pre-norm RMSNorm blocks (``mlp="none"``);
* batch 64 (``--batch-size``) for at most ``--steps`` (default 1,000) steps, i.e. 64k examples
  (0.64 epoch) against Zoology's 6.4M, evaluated every 100 steps on the 1,000 test examples and
  stopped at accuracy >= 0.99 (``config.early_stop``); AdamW as in ``attnzoo/configs/common.py``
  (weight decay 0.1 as Zoology, 100 warmup steps, cosine to 0.1 of the peak, clip 1.0);
* learning rates 3e-3, 1e-2, 3e-2 (``--lrs``, run in that order): the top three of Zoology's newer
  grid ``np.logspace(-3, -1.5, 4)`` (3.2e-3, 1e-2, 3.2e-2), rounded; the best taken per point. Once
  one LR reaches 0.99 the point's best is known to within 0.01 and its other LRs are skipped. The
  sweep began with 1e-3 in place of 3e-2: at width 64, length 64 that was the worst LR of every
  mixer that had not solved the point at 3e-3 (sliding window 0.083, linear attention 0.123, RetNet
  0.034, GLA 0.028, against 0.584, 0.527, 0.427, 0.230 at 1e-2), so a 1,000-step budget wants the
  higher end of the grid; those runs stay in the CSV and count towards the best. 3e-2 then proved
  too high at every unsolved point at length 64 (0.007-0.23), so the grid brackets the best LR
  (1e-2 almost everywhere) on both sides. Runs that stop on a non-finite loss are recorded with
  accuracy 0. From 2026-12-06 (after 40 points) a point also skips its higher LRs once the
  accuracy falls from one LR to the next (:func:`lr_search_settled`): at all 19 of the first 40
  points run at three or more LRs, accuracy against LR rose to one peak and then fell (e.g.
  RetNet at width 128, length 64: 0.463, 0.782, 0.007; GLA at width 256: 0.913, 0.004, 0.002;
  past the peak only chance-level wobble, Mamba at width 128: 0.256, 0.004, 0.005), and 3e-2
  was never the best: the rule would have skipped no best LR there, and saves up to a third of
  an unsolved point's time.

Expected shape (Zoology, Figure 2; Based paper, Figure 2): attention solves MQAR (accuracy ~1) at
every width and length; the gated-convolution / recurrent mixers need larger widths (a larger
recurrent state) as the number of pairs grows, so their curves fall to the right (longer sequences,
more pairs) and rise with width; Based and the delta-rule mixers (DeltaNet, Gated DeltaNet, KDA)
close most of the gap; sliding-window attention fails once keys sit further back than its window;
the hybrid behaves like attention. With ~1/100 of Zoology's training the sub-quadratic mixers (and
attention at seq 256) land lower than in the paper; the ordering is the result to read.

A first protocol, and what it taught (rows with ``mlp=swiglu`` in the CSV, 2026-12-05/06; the
table and plot use only the current protocol): pre-norm blocks with a SwiGLU MLP, no BaseConv,
width 64, seq 64 / 4 pairs, LR 3e-3, 1,000 steps. Attention 0.869; DeltaNet 0.994, Gated DeltaNet
0.990, KDA 0.998; but linear attention 0.233, Based 0.238, RetNet 0.234, GLA 0.224, sliding window
0.288 and the hybrid 0.242 (0.202 / 0.232 at LR 1e-3 / 1e-2). About 0.25 is what a model earns by
knowing which 4 values occur in the sequence without binding them to their keys. Two causes,
each checked by changing only it:

* without a short convolution, a linear-attention layer has no way to store the pair "key at
  ``t-1`` -> value at ``t``": it sees no positions (no RoPE), and a decay only says how far back.
  The delta-rule mixers carry their own short convolutions and solved it. Zoology puts a BaseConv
  in layer 0 for exactly this reason; with it (and no MLP, as Zoology) Based reaches 0.962 at
  LR 3e-3 in 1,000 steps (0.94 at step 800 and rising);
* the hybrid has a Gated DeltaNet layer with its short convolutions, yet failed at all three LRs
  with MLPs; the same model without MLPs reaches 0.924 in 1,000 steps (LR 3e-3). The SwiGLU MLPs
  delay the retrieval circuit past this budget. (One Gated DeltaNet layer alone, which could
  store and read the pairs by itself, reached only 0.098 in 1,000 steps: the circuit is found far
  sooner with two layers.)

Linear attention's fall with width at length 64 (0.526 at width 64, 0.384 at width 128, seed 0:
the one check of the first 22 points that disagreed with Zoology) is seed noise. The same runs at
seeds 1 and 2 (``--seed``; each run's accuracy per seed is in ``mqar.md``), LR 1e-2 / 3e-3:

* width 64: seed 0 0.527 / 0.161, seed 1 0.207 / 0.173, seed 2 0.883 / 0.185;
* width 128: seed 0 0.202 / 0.384, seed 1 0.202 / 0.574, seed 2 0.951 / 0.790.

Best over the LRs, seed 1 rises with width (0.207 -> 0.574) and seed 2 too (0.883 -> 0.951). At
this budget an unsolved point is a race between the retrieval circuit forming and the 1,000 steps
running out, and a seed moves one run's accuracy by up to 0.75: differences between single-seed
cells below 0.99 are weak evidence, and the checks say "within seed noise" where the seed spread
measured at a point covers them. Zoology's 64 epochs (about 12,500 steps at batch 512) leave no
such race; this sweep runs 1/100 of that.

RetNet's rise with length at width 64 (0.427 at length 64, 0.593 at length 128, seed 0, LR 1e-2:
the length check's disagreement once the first length-128 points were in) is seed noise too. At
LR 1e-2, seed 1 gives 0.265 -> 0.259 (flat) and seed 2 0.773 -> 0.685 (falling); the seeds spread
by 0.51 at length 64 and 0.43 at length 128.

Sliding-window attention's fall with width at length 128 (0.314 at width 64, LR 1e-2, to 0.191 at
width 128, LR 3e-3, seed 0) is seed noise as well: at seed 1 the same runs give 0.059 and 0.129
(best over 3e-3 / 1e-2: 0.056 / 0.059 at width 64, 0.129 / 0.034 at width 128), rising with
width. What a window lets through is counted exactly (:func:`window_reach`, on the test split):
the queries whose value lies within 16 tokens are 0.584 of them at length 64, 0.323 at 128 and
0.069 at 256, whatever the width, and no weights of this model can beat 0.633, 0.380 and 0.093
(the value within the window plus BaseConv's 2 taps, or a blind guess; a test perturbs one token
at a time and finds the model's logits depend on exactly those 19 tokens). At length 64 every
width lands on the first share (0.584, 0.570, 0.584): the runs answer every query whose value
is in the window and none other, as the mask says they must. At length 128 width 64 comes close
(0.314 of 0.323) and the wider models do not get there in 1,000 steps. From width 128 to 256 the
fall is not seed noise: width 256 gives 0.068 at both seeds (LR 3e-3; 0.005 at 1e-2 for both),
against 0.191 / 0.129 at width 128, so the width check reads "disagrees". It is a race the
wider models lose at this budget, not a capacity limit: the width decides nothing about what the
window lets through, so Zoology's "more width, more recall" has nothing to act on for this mixer.
GLA's rise with length at width 128 (0.753 at length 64, LR 1e-2, to 0.792 at length 128, LR
3e-3, seed 0) too: at seed 1 it falls, 0.859 -> 0.780 (3e-3 / 1e-2: 0.859 / 0.313 at length 64,
0.482 / 0.780 at length 128).

Linear attention's rise with length at width 64 (seed 0: 0.526 at length 64, 0.572 at 128,
0.895 at 256) is not seed noise (seed 1: 0.207 at length 64, 0.760 at 256) but this protocol's
fixed step budget. A length-256 example holds 16 queries, a length-64 one 4, so 1,000 steps of
batch 64 train on 1,024k query positions at length 256 and 256k at length 64. Holding the queries
equal reverses the order (the runs are in ``mqar.md``'s table of other budgets; LR 1e-2 / 3e-2,
one number where only 1e-2 ran):

* 256k queries: length 64, 1,000 x 64: 0.526 / 0.197 (seed 0), 0.207 (seed 1), 0.883 (seed 2);
  length 256, 250 x 64: 0.036 / 0.108, 0.036 / 0.037, 0.035 / 0.026;
* 1,024k queries, 1,000 updates each: length 64, 1,000 x 256: 0.952 / 0.961 (seed 0), 0.680 /
  0.991 (seed 1); length 256, 1,000 x 64: 0.351 / 0.895, 0.620 / 0.760.

At equal training a length-64 model recalls more than a length-256 one, at every seed, as
Zoology reports: the longer sequences only gave more to learn from. Zoology fixes epochs, not
steps, so its longer sequences carry more queries too, but 64 epochs train every run to the end,
where that no longer decides. RetNet and GLA (whose decays let far-back pairs fade) do fall at
length 256, as Zoology expects (width 64: 0.084 and 0.049, from 0.593 and 0.105 at length 128).

The hybrid at width 64, length 256 (seed 0: 0.122 at LR 3e-3, 0.009 at 1e-2, against
attention's 0.997 at 1e-2; the hybrid check's one disagreement) is a race that the seed decides,
for attention as much as for the hybrid. At seeds 1 and 2 the hybrid gives 0.155 / 0.918 and
0.066 / 0.120 (3e-3 / 1e-2), and attention at seed 1 0.056 / 0.451: at seed 1 the hybrid beats
attention by 0.47, at seed 0 attention beats it by 0.88. Every run starts on the same plateau
(loss ~5.55 = ln 256, a uniform guess among the 256 values), and its accuracy is set by when it
leaves it. At 3e-3 no run of either model left it in time (hybrid 0.066-0.155, attention 0.056 /
0.058), but the hybrid's seed-0 run was on its way (0.021 at step 400, 0.076 at 800, 0.122 at
1,000): trained for 2,000 steps (its cosine schedule stretched to match) it has 0.815 at step
1,000 and 0.913 at 2,000, level from step 1,700 as the LR decays. The check reads "disagrees,
within seed noise": the gap is within the hybrid's seed spread at 1e-2 (0.909).

At length 256 width is what Zoology says it is for every mixer (seed 0, best LR, width 64 -> 128
-> 256 where run): RetNet 0.084 -> 0.292 -> 0.918, linear attention 0.895 -> 0.960 -> 0.983,
Based 0.988 -> 0.991 -> 0.991, DeltaNet 0.992 -> 0.991 -> 0.991, Gated DeltaNet 0.968 -> 0.991
-> 0.991, KDA 0.674 -> 0.993 -> 0.994, Mamba 0.022 -> 0.063 (LR 3e-3; 0.004 at 1e-2; width 256
still running), Mamba-2 0.262 -> 0.999 -> 0.997, and GLA once a second seed is counted (below).
Sliding window stays at 0.004-0.005 at every width and LR run, where the window lets 0.069 of
the queries through. Attention is 0.997 / 0.998 / 0.998. GLA at seed 0 rises 0.049 -> 0.831 and
falls to 0.260 at width 256 (LR 3e-3; at 1e-2 it never leaves the plateau, 0.004, and 3e-2 is
skipped), the width check's third disagreement, and it is seed noise. Seed 0's LR-3e-3 run left
the plateau late and was climbing fast when the budget ran out (0.061 at step 600, 0.067 at 800,
0.109 at 900, 0.260 at 1,000); at seed 1 the same run has left it by step 500 (0.592, then 0.927
at step 600) and ends at 0.989. One point, two seeds, a spread of 0.729: width 256 can recall
the 16 pairs, and seed 0 lost the race this budget sets, as the hybrid's width-64 run did
(above). RetNet at width 256 rises with length by 0.02 (0.895 -> 0.916 -> 0.918), within what
one seed moves a run here. GLA at width 256 rises from length 64 to 128 (seed 0: 0.913 -> 0.993,
LR 3e-3). At length 64 seed 1 gives 0.971 and was still climbing at step 1,000 (0.927, 0.951,
0.966, 0.971 at steps 700-1,000), so this reads as linear attention's rise does (above): the
same 1,000 steps carry twice the queries at length 128 (not rerun at equal queries for GLA). The
hybrid at width 128, length 256 is 0.917 at LR 3e-3 (seed 0; 0.029 at 1e-2, 3e-2 skipped), 0.948
at seed 1 and 0.806 at seed 2, against attention's 0.998. All three runs were still climbing at
step 1,000 (0.908, 0.938 and 0.757 at step 900), as its width-64 run was (0.913 after 2,000
steps, above): at this budget the hybrid forms the recall circuit later than two attention
layers do, at every seed, so the hybrid check's disagreement at this point is the budget's, not
seed noise alone.

Mamba's best LR is the grid's lowest, 3e-3, at all six points run (1e-2 falls to 0.002-0.249),
so the grid does not bracket it from below. At width 128, length 64, LR 1e-3 (the lowest of
Zoology's newer grid) gives 0.2545 against 0.2555 at 3e-3: the same ~0.25 plateau (the values
that occur, not bound to their keys), not a better LR the grid missed. Okpekpe and Orvieto
("Revisiting associative recall in modern recurrent models", 2025) find Mamba's MQAR success
confined to a narrow LR window, and width helping it more than depth; here it forms the recall
circuit within 1,000 steps only at width 256, length 64 (0.930).

Cost: the CSV has every run's seconds (data, compile, training, evals) and ms per step. At width
64, length 64 a step of the attention, sliding-window, linear-attention or GLA model takes 50-100 ms
here when the CPU is otherwise idle (the CSV's slower steps were measured beside other jobs), a
run 1-4 minutes; compute per step grows about like width x length (the projections and the head
with width, every mixer's work with length), so a run at width 256, length 256 costs about 16
times as much. After each invocation the script prints the projected time of the whole sweep and
of what is still to run (:func:`projected_sweep_seconds`: measured runs count as measured, other
runs at full length, scaled from the same mixer's runs); on 2026-12-06, from the first 39 runs (all
at length 64), that was at most 51.5 hours for the sweep, 49.4 of them still to run; from the
first 53 (Mamba's among them, at 0.6-1.2 s a step at width 64: its selective scan's backward pass
was ~14 times its forward on XLA:CPU; the scan's unpacked path since made forward + backward 1.46x
as fast at these shapes, and its written-out backward pass another 1.6-1.8x, which took the
2-layer Mamba model's forward + backward at width 128 from 0.76-0.81 s to 0.59-0.66 s), at most
84 hours, 80 still to run, an overestimate where runs were timed
beside other jobs. Far beyond one session on this CPU, so the sweep runs in parts and
resumes where it stopped (cheapest points first: ``--lengths 64`` before 128 and 256).

``--workers N`` trains N points at once, each point (its LRs in order) in a child process of this
script pinned to its share of the CPUs (``os.sched_setaffinity``, round robin), the children
appending to the same CSV (one short append per run); the parent builds the datasets first, logs
the children's output with ``[slot k]`` in front, and writes the table, plot and projection once
they are done. SIGTERM or Ctrl-C stops every child between steps.

Stopping loses no training: a run stopped by SIGTERM or Ctrl-C (with or without ``--workers``)
saves a checkpoint in its workdir (``--runs-dir``, default ``~/.cache/attnzoo/mqar_runs``, one
directory per run) and writes no row; the next sweep resumes it from that step, data order
included, and its row counts the seconds of every part. A finished run's workdir is removed once
its row is written, and a stopped run's when its point settles without it (an LR skipped). A run
killed without a signal (SIGKILL, power) starts over.

``--until`` (``HH:MM``, its next occurrence, or ``YYYY-MM-DDTHH:MM``) fits a sweep into a slot
of time: a run starts only if its projected time (:func:`projected_run_seconds`: 1.2 x
:func:`run_seconds_model`) ends before then, so with ``--workers`` a free core takes the first
pending point whose run fits; at that time a run still going is stopped as by SIGTERM
(checkpointed). On a machine whose ``--runs-dir`` does not outlast the session, this is what
keeps the session's end from throwing away a partly trained run.

These small models leave XLA:CPU's second thread mostly idle: on 2026-12-06, GLA at width
128, length 128 trained at 230 ms/step alone on both cores and at 345 ms/step each as two
one-core workers side by side, 1.33 times the throughput (``--workers 2``); the projection above
counts single-process seconds.

``--smoke`` (CI): attention and linear_attention, width 64, length 64, 20 steps, LR 3e-3, writing
to a temporary directory unless ``--output`` is given; 64 s here, dataset build included
(``--data-dir``, default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``; the seq-64 dataset,
100k examples, is built there on first use in ~15 s).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, load_average  # noqa: E402

# mixer name -> DecoderLM pattern of its LAYERS layers. As in Zoology's models_repo.py, the
# mixers Zoology wraps in its Hybrid (BaseConv in layer 0, the mixer in layer 1) get a BaseConv
# layer first; attention (Figure 2: two attention layers), Mamba and Mamba-2 (their own short
# convolutions) do not; the hybrid is one Gated DeltaNet and one attention layer.
MIXERS = {
    "attention": "attn",
    "sliding_window": "base_conv,swa",
    "linear_attention": "base_conv,linear_attention",
    "based": "base_conv,based",
    "retnet": "base_conv,retnet",
    "gla": "base_conv,gla",
    "deltanet": "base_conv,deltanet",
    "gated_deltanet": "base_conv,gated_deltanet",
    "kda": "base_conv,kda",
    "mamba": "mamba",
    "mamba2": "mamba2",
    "hybrid": "gated_deltanet,attn",
}
LAYERS = 2  # Zoology: n_layers=2 for every mixer (attention included)
MLP = "none"  # Zoology: state_mixer Identity (mixer-only layers)
BASE_CONV = {"expand_proj": 2, "kernel_size": 3}  # Zoology's BaseConv: d_model channels, kernel 3
# seq_len -> num_kv_pairs (Zoology Figure 2); the datasets are mqar_sweep/v512_t{T}_kv{K}
LENGTHS = {64: 4, 128: 8, 256: 16}
VOCAB_SIZE = 512  # Zoology: 8192 (see the module docstring)
WIDTHS = (64, 128, 256)
LEARNING_RATES = (3e-3, 1e-2, 3e-2)  # run in this order; a point solved at one LR skips the rest
STEPS = 1000
BATCH_SIZE = 64
HEADS = 2
WINDOW = 16
EVAL_EVERY = 100  # Zoology evaluates every epoch and stops at TARGET_ACCURACY
TARGET_ACCURACY = 0.99
UNTIL_MARGIN = 1.2  # --until budgets each run at 1.2 x its projected time (run_seconds_model)

SMOKE = dict(mixers=["attention", "linear_attention"], widths=[64], lengths=[64], lrs=[3e-3], steps=20)

COLUMNS = ["mixer", "pattern", "layers", "mlp", "width", "seq_len", "num_kv_pairs", "vocab_size", "learning_rate", "seed",
           "batch_size", "steps", "stopped_at", "accuracy", "loss", "seconds", "step_ms", "status", "date"]
DONE_STATUSES = ("ok", "nonfinite")  # rows a rerun skips (errors are retried)

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mqar.md")
DEFAULT_RUNS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "attnzoo", "mqar_runs")
ELAPSED_FILE = "mqar_seconds_before.txt"  # in a stopped run's workdir: the seconds it had run


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


def _deadline(text):
    """``--until``: a naive local datetime from ``HH:MM`` (its next occurrence) or an ISO datetime."""
    now = datetime.datetime.now()
    try:
        clock = datetime.datetime.strptime(text, "%H:%M")
    except ValueError:
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected HH:MM or YYYY-MM-DDTHH:MM[:SS], got {text!r}") from None
    until = now.replace(hour=clock.hour, minute=clock.minute, second=0, microsecond=0)
    return until if until > now else until + datetime.timedelta(days=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", type=_list(str, tuple(MIXERS)), default=list(MIXERS),
                   help=f"comma-separated subset of {','.join(MIXERS)}")
    p.add_argument("--widths", type=_list(int), default=list(WIDTHS),
                   help="model widths (dim), multiples of 2 * --heads (default 64,128,256)")
    p.add_argument("--lengths", type=_list(int, tuple(LENGTHS)), default=list(LENGTHS),
                   help="sequence lengths, from 64,128,256 (kv pairs 4, 8, 16 follow)")
    p.add_argument("--lrs", type=_list(float), default=list(LEARNING_RATES),
                   help="peak learning rates, run in this order; the best is taken per point (default 3e-3,1e-2,3e-2)")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training batch size")
    p.add_argument("--heads", type=int, default=HEADS, help="heads of every mixer")
    p.add_argument("--window", type=int, default=WINDOW, help="sliding_window's window (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--runs-dir", default=None,
                   help="one workdir per run in flight; a run stopped by SIGTERM / Ctrl-C keeps its checkpoint there "
                        f"and resumes from it (default {DEFAULT_RUNS_DIR}, with --smoke a temporary directory)")
    p.add_argument("--output", default=None,
                   help=f"the Markdown table; the CSV and PNG go next to it (default {os.path.relpath(DEFAULT_OUTPUT)}, "
                        "with --smoke a temporary directory)")
    p.add_argument("--plot", action="store_true", help="run nothing: redraw the PNG and table from the CSV")
    p.add_argument("--workers", type=int, default=1,
                   help="points trained at once, each in its own process pinned to its share of the CPUs "
                        "(see the docstring's cost section)")
    p.add_argument("--until", type=_deadline, default=None,
                   help="a local time, HH:MM (the next one) or YYYY-MM-DDTHH:MM[:SS]: start no run projected to end "
                        "after it, and stop (checkpoint) the runs still going then (see the docstring)")
    p.add_argument("--no-report", action="store_true",
                   help="train only; leave the table, plot and projection alone (how --workers runs each point)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run (CI): attention and linear_attention, width 64, length 64, 20 steps, LR 3e-3")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        if args.output is None:
            args.output = os.path.join(tempfile.mkdtemp(prefix="mqar_smoke_"), "mqar.md")
        if args.runs_dir is None:
            args.runs_dir = os.path.join(os.path.dirname(os.path.abspath(args.output)), "runs")
    if args.output is None:
        args.output = DEFAULT_OUTPUT
    if args.runs_dir is None:
        args.runs_dir = DEFAULT_RUNS_DIR
    if not args.output.endswith(".md"):
        p.error(f"--output must name a .md file (the .csv and .png go next to it), got {args.output!r}")
    for name in ("steps", "batch_size", "heads", "window", "workers"):
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
    args.lrs = sorted(args.lrs)  # run in ascending order (lr_search_settled)
    if args.until is not None and args.until <= datetime.datetime.now():
        p.error(f"--until must be in the future, got {args.until.isoformat(timespec='seconds')}")
    return args


# ------------------------------------------------------------------------------------------------
# one run


DATASET = "mqar_sweep"  # the builder below; its configs are v{VOCAB_SIZE}_t{T}_kv{K}
_builder_class = None


def dataset_name(seq_len: int) -> str:
    return f"{DATASET}/v{VOCAB_SIZE}_t{seq_len}_kv{LENGTHS[seq_len]}"


def sweep_configs():
    """The ``MqarConfig`` of each (seq_len, kv) point of ``LENGTHS``: vocab ``VOCAB_SIZE``, 100k
    train (as Zoology's Figure 2) and 1k test examples."""
    from attnzoo.train.datasets.mqar import MqarConfig

    return [
        MqarConfig(
            name=f"v{VOCAB_SIZE}_t{seq_len}_kv{kv}",
            description=f"vocab_size={VOCAB_SIZE}, seq_len={seq_len}, num_kv_pairs={kv}, power_a=0.01, "
                        f"100000 train / 1000 test examples",
            vocab_size=VOCAB_SIZE, seq_len=seq_len, num_kv_pairs=kv,
            num_train_examples=100_000, num_test_examples=1_000,
        )
        for seq_len, kv in LENGTHS.items()
    ]


def sweep_builder_class():
    """A TFDS builder (``mqar_sweep``) of attnzoo's ``Mqar`` with this sweep's configs
    (:func:`sweep_configs`), registered on first call. ``attnzoo.train.datasets.mqar`` registers only
    vocab-256 configs at seq_len 64 and Zoology's vocab-8192 ones, whose output head is too slow
    here (see the module docstring)."""
    global _builder_class
    if _builder_class is None:
        from attnzoo.train.datasets.mqar import Mqar

        class MqarSweep(Mqar):
            """MQAR at the (seq_len, kv) points of benchmarks/mqar.py, vocab VOCAB_SIZE."""

            BUILDER_CONFIGS = sweep_configs()
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
    config.model.kwargs.mlp = MLP
    if "base_conv" in MIXERS[mixer]:
        config.model.kwargs.mixer_options = {"base_conv": dict(BASE_CONV)}
    config.batch_size = batch_size
    config.num_steps = steps
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = min(100, max(steps // 10, 1))
    config.log_every_steps = max(steps // 5, 1)
    config.eval_every_steps = EVAL_EVERY if steps > EVAL_EVERY else 0
    if config.eval_every_steps:
        config.early_stop.metric = "accuracy"
        config.early_stop.threshold = TARGET_ACCURACY
    config.checkpoint.every_steps = 0  # the final step and a stop by signal (the trainer always saves those)
    config.checkpoint.keep = 1
    config.checkpoint.async_save = False
    return config


def run_dir(runs_dir, mixer, width, seq_len, lr, steps, batch_size, seed):
    """The workdir of one run (one per :func:`run_key`)."""
    return os.path.join(runs_dir, f"{mixer}_d{width}_t{seq_len}_lr{lr:g}_seed{seed}_steps{steps}_batch{batch_size}")


def train_one(config, workdir):
    """(accuracy, loss, status, seconds, ms per train step, last step) of one run in ``workdir``.

    A run stopped by SIGTERM / SIGINT leaves its checkpoint (the trainer saves one when it stops)
    and the seconds it ran (``ELAPSED_FILE``) in ``workdir`` and raises KeyboardInterrupt; called
    again with the same workdir it resumes from that step, exactly (the trainer restores the data
    iterator too). ``seconds`` is the whole run (data, compile, train, evals) over all its parts;
    the step time is the trainer's, from the last log interval (compile excluded); the last step is
    ``config.num_steps`` unless the run stopped early at ``TARGET_ACCURACY``. The caller removes
    ``workdir`` once the run is recorded."""
    from attnzoo.train.train import NonFiniteLossError, train_and_evaluate

    elapsed_path = os.path.join(workdir, ELAPSED_FILE)
    before = 0.0
    if os.path.exists(elapsed_path):
        with open(elapsed_path) as f:
            before = float(f.read())
    started = time.perf_counter()
    try:
        result = train_and_evaluate(config, workdir)
    except NonFiniteLossError as error:
        print(f"  non-finite loss: {error}", flush=True)
        return 0.0, float("nan"), "nonfinite", before + time.perf_counter() - started, float("nan"), 0
    seconds = before + time.perf_counter() - started
    if result.stopped_by_signal:
        partial = elapsed_path + ".tmp"
        with open(partial, "w") as f:
            f.write(f"{seconds:.3f}")
        os.replace(partial, elapsed_path)
        raise KeyboardInterrupt(f"stopped by {result.stopped_by_signal} at step {result.step}; resumes from there")
    step_ms = 1e3 * float(result.train_metrics.get("step_time_s", float("nan")))
    return (float(result.eval_metrics["accuracy"]), float(result.eval_metrics.get("loss", float("nan"))), "ok",
            seconds, step_ms, result.step)


# ------------------------------------------------------------------------------------------------
# several points at once (--workers)


def pending_points(rows, args):
    """The (mixer, width, seq_len) points of the selected grid whose LR search is not settled
    (:func:`lr_search_settled` over ``--lrs``), cheapest first (length, then width, then mixer)."""
    return [(mixer, width, seq_len) for seq_len in args.lengths for width in args.widths for mixer in args.mixers
            if lr_search_settled(rows, mixer, width, seq_len, args.steps, args.batch_size, args.seed, args.lrs) is None]


def point_command(args, mixer, width, seq_len):
    """The argv that trains one point's LRs (this script with ``--no-report``) into the same CSV."""
    command = [sys.executable, os.path.abspath(__file__), "--mixers", mixer, "--widths", str(width),
               "--lengths", str(seq_len), "--lrs", ",".join(repr(lr) for lr in args.lrs), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--heads", str(args.heads), "--window", str(args.window),
               "--seed", str(args.seed), "--output", os.path.abspath(args.output),
               "--runs-dir", os.path.abspath(args.runs_dir), "--no-report"]
    if args.until is not None:
        command += ["--until", args.until.isoformat(timespec="seconds")]
    return command + (["--data-dir", args.data_dir] if args.data_dir else [])


def cpu_slots(workers, cpus=None):
    """``workers`` disjoint CPU sets covering ``cpus`` (default: this process's), round robin; with
    fewer CPUs than workers, slots share them."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    return [set(cpus[k::workers]) or {cpus[k % len(cpus)]} for k in range(workers)]


def _forward_lines(stream, prefix, log):
    for line in stream:
        log(prefix + line.rstrip("\n"))


def run_in_workers(jobs, workers, log, cpus=None, poll_seconds=0.5, until=None):
    """Runs ``jobs`` (``(name, argv, projected seconds or None)``) as subprocesses, at most
    ``workers`` at a time, the job in slot ``k`` pinned to ``cpu_slots(workers, cpus)[k]``; their
    output is logged line by line with ``[slot k]`` in front. Returns the number of jobs that exited
    non-zero.

    With ``until`` (a ``time.time()``), a free slot takes the first job whose projected seconds
    fit before it (None: unknown, taken); a job that does not fit is left out, as time only runs
    down. Stopping the jobs at ``until`` is theirs to do (``--until`` in their argv).

    On KeyboardInterrupt (or SIGTERM, which :func:`main` turns into one) every running job gets
    SIGTERM, is waited for (the trainer stops between steps and checkpoints the run in flight, which
    writes no row: :func:`train_one`) and the interrupt is re-raised."""
    slots = cpu_slots(workers, cpus)
    queue = list(jobs)
    running = {}  # slot -> (name, process, output thread)
    failures = 0

    def next_job():
        while queue:
            name, argv, seconds = queue.pop(0)
            left = None if until is None else until - time.time()
            if left is None or seconds is None or seconds <= left:
                return name, argv
            log(f"left out {name}: projected {fmt_duration(seconds)}, {fmt_duration(max(left, 0.0))} left before --until")
        return None

    try:
        while queue or running:
            for slot in range(workers):
                if slot in running:
                    continue
                job = next_job()
                if job is None:
                    break
                name, argv = job
                process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           preexec_fn=lambda cpus=slots[slot]: os.sched_setaffinity(0, cpus))
                thread = threading.Thread(target=_forward_lines, args=(process.stdout, f"[slot {slot}] ", log),
                                          daemon=True)
                thread.start()
                running[slot] = (name, process, thread)
                log(f"[slot {slot}] started {name} on CPUs {sorted(slots[slot])}")
            time.sleep(poll_seconds)
            for slot, (name, process, thread) in list(running.items()):
                if process.poll() is None:
                    continue
                thread.join()
                del running[slot]
                if process.returncode:
                    failures += 1
                log(f"[slot {slot}] finished {name} (exit code {process.returncode})")
    except BaseException:
        for _, process, _ in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, thread in running.values():
            process.wait()
            thread.join()
        raise
    return failures


_stops = {"deferred": False, "pending": None}  # stops_deferred's state, read by _interrupt


def _interrupt(signum, frame):
    if _stops["deferred"]:
        _stops["pending"] = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stops_deferred():
    """A SIGTERM / SIGINT handled by :func:`_interrupt` inside the block stops the process when the
    block ends (a KeyboardInterrupt then), not inside it."""
    _stops["deferred"] = True
    try:
        yield
    finally:
        _stops["deferred"] = False
        pending, _stops["pending"] = _stops["pending"], None
    if pending is not None:
        raise KeyboardInterrupt(f"signal {pending}")


# ------------------------------------------------------------------------------------------------
# the CSV


def read_rows(path):
    """The CSV's rows with typed fields; rows from before the ``mlp`` / ``stopped_at`` columns
    (2026-12-05/06: SwiGLU MLPs, no early stop) read as ``mlp="swiglu"``, ``stopped_at=steps``."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["mlp"] = row.get("mlp") or "swiglu"
        row["stopped_at"] = row.get("stopped_at") or row["steps"]
        row["seed"] = row.get("seed") or 0
        for key in ("layers", "width", "seq_len", "num_kv_pairs", "vocab_size", "seed", "batch_size", "steps",
                    "stopped_at"):
            row[key] = int(row[key])
        for key in ("learning_rate", "accuracy", "loss", "seconds", "step_ms"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
    return rows


def append_row(path, row):
    """Appends ``row``; a CSV with other columns (an older version of this script) is first
    rewritten with ``COLUMNS`` (atomically, its rows as :func:`read_rows` reads them)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            old_rows = read_rows(path)
            with open(path + ".tmp", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                for old in old_rows:
                    writer.writerow({key: _csv_value(old[key]) for key in COLUMNS})
            os.replace(path + ".tmp", path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({key: row[key] for key in COLUMNS})


def _csv_value(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def run_key(mixer, width, seq_len, lr, steps, batch_size, seed=0):
    return (mixer, MIXERS[mixer], MLP, width, seq_len, f"{lr:.6g}", seed, steps, batch_size)


def row_key(row):
    return (row["mixer"], row["pattern"], row["mlp"], row["width"], row["seq_len"], f"{row['learning_rate']:.6g}",
            row["seed"], row["steps"], row["batch_size"])


def current(row, steps, batch_size, seed=0):
    """Whether ``row`` is a finished run of this sweep's protocol (patterns, MLP, steps, batch) at
    ``seed`` (None: any seed)."""
    return (row["status"] in DONE_STATUSES and row["mixer"] in MIXERS and row["pattern"] == MIXERS[row["mixer"]]
            and row["mlp"] == MLP and row["steps"] == steps and row["batch_size"] == batch_size
            and (seed is None or row["seed"] == seed))


# ------------------------------------------------------------------------------------------------
# cost


def run_cost(row):
    """(overhead seconds, seconds per step) of a measured run: the step time is the trainer's
    (compile excluded); the overhead the rest (data, compile, eval)."""
    steps = row.get("stopped_at") or row["steps"]
    step_s = row["step_ms"] / 1e3 if math.isfinite(row.get("step_ms", float("nan"))) else row["seconds"] / steps
    return max(row["seconds"] - steps * step_s, 0.0), step_s


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _measured_rows(rows, batch_size):
    return [r for r in rows if r["status"] in DONE_STATUSES and r["batch_size"] == batch_size
            and r["mixer"] in MIXERS and r["pattern"] == MIXERS[r["mixer"]] and r["mlp"] == MLP]


def run_seconds_model(rows, batch_size):
    """The projected seconds of one run on this machine, as a function of (mixer, width, seq_len,
    steps), from the finished runs in ``rows`` at ``batch_size`` (None when there are none).

    A run costs ``overhead + steps x step time`` (:func:`run_cost`): both from measured runs (any
    LR, seed or step count) of the same (mixer, width, length) where there are some (the LR does
    not change the cost); else the step time is the same mixer's median seconds per (step x width x
    length) times this run's width x length (else all mixers'), and the overhead the median over
    that mixer's runs. Compute per step grows at most like width x length here (the output head and
    MLP scale with width, attention with length^2 but is small at T <= 256), so the scaled
    estimates are rough; measure the largest points."""
    measured = _measured_rows(rows, batch_size)
    if not measured:
        return None
    by_point, by_mixer = {}, {}
    for r in measured:
        by_point.setdefault((r["mixer"], r["width"], r["seq_len"]), []).append(run_cost(r))
        by_mixer.setdefault(r["mixer"], []).append(r)
    overall_rate = _median(run_cost(r)[1] / (r["width"] * r["seq_len"]) for r in measured)
    overall_overhead = _median(run_cost(r)[0] for r in measured)

    def seconds(mixer, width, seq_len, steps):
        point = by_point.get((mixer, width, seq_len))
        if point:
            return _median(c[0] for c in point) + steps * _median(c[1] for c in point)
        mixer_rows = by_mixer.get(mixer)
        rate = _median(run_cost(r)[1] / (r["width"] * r["seq_len"]) for r in mixer_rows) if mixer_rows else overall_rate
        overhead = _median(run_cost(r)[0] for r in mixer_rows) if mixer_rows else overall_overhead
        return overhead + steps * rate * width * seq_len

    return seconds


def projected_run_seconds(rows, args, mixer, width, seq_len):
    """What ``--until`` budgets for one run of a point: ``UNTIL_MARGIN`` x :func:`run_seconds_model`'s
    projection at ``args.steps`` (None while the CSV has no finished run at ``args.batch_size``)."""
    seconds = run_seconds_model(rows, args.batch_size)
    return None if seconds is None else UNTIL_MARGIN * seconds(mixer, width, seq_len, args.steps)


def projected_sweep_seconds(rows, steps, batch_size, mixers=tuple(MIXERS), widths=WIDTHS, lengths=tuple(LENGTHS),
                            lrs=LEARNING_RATES, seed=0):
    """(total seconds, runs measured, runs estimated, seconds still to run) of the sweep ``mixers
    x widths x lengths x lrs`` at ``steps`` / ``batch_size`` and ``seed`` on this machine.

    A run in ``rows`` counts its measured time; the LRs not run at a point whose LR search is
    settled (:func:`lr_search_settled`) cost nothing, every other LR counts (an upper bound) at
    :func:`run_seconds_model`'s projection."""
    seconds = run_seconds_model(rows, batch_size)
    if seconds is None:
        return None, 0, 0, None
    measured = _measured_rows(rows, batch_size)
    done = {row_key(r): r["seconds"] for r in measured if r["seed"] == seed}
    total, n_measured, n_estimated, remaining = 0.0, 0, 0, 0.0
    for mixer in mixers:
        for width in widths:
            for seq_len in lengths:
                for lr in lrs:
                    key = run_key(mixer, width, seq_len, lr, steps, batch_size, seed)
                    if key in done:
                        total += done[key]
                        n_measured += 1
                        continue
                    if lr_search_settled(measured, mixer, width, seq_len, steps, batch_size, seed, lrs) is not None:
                        continue
                    n_estimated += 1
                    cost = seconds(mixer, width, seq_len, steps)
                    total += cost
                    remaining += cost
    return total, n_measured, n_estimated, remaining


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


def best_accuracy(rows, steps, batch_size, seed=0):
    """{(mixer, seq_len, width): (best accuracy over LRs, its LR)} for runs at ``steps``/``batch_size``
    and ``seed``."""
    best = {}
    for r in rows:
        if not current(r, steps, batch_size, seed):
            continue
        key = (r["mixer"], r["seq_len"], r["width"])
        accuracy = r["accuracy"] if math.isfinite(r["accuracy"]) else 0.0
        if key not in best or accuracy > best[key][0]:
            best[key] = (accuracy, r["learning_rate"])
    return best


def solved_at(rows, mixer, width, seq_len, steps, batch_size, seed=0):
    """The learning rate of a finished run of this point at ``seed`` with accuracy >=
    ``TARGET_ACCURACY`` (the best over LRs is then known to within 1 - TARGET_ACCURACY: the other
    LRs are not run), or None."""
    for r in rows:
        if (current(r, steps, batch_size, seed) and (r["mixer"], r["width"], r["seq_len"]) == (mixer, width, seq_len)
                and r["accuracy"] >= TARGET_ACCURACY):
            return r["learning_rate"]
    return None


def lr_search_settled(rows, mixer, width, seq_len, steps, batch_size, seed=0, lrs=LEARNING_RATES):
    """Why this point at ``seed`` needs no further learning rate of ``lrs`` (ascending, run in
    that order), or None while one is still to run:

    * ``"solved at lr X"``: a finished run reached ``TARGET_ACCURACY`` (:func:`solved_at`);
    * ``"past its best: lr X < lr W"``: the accuracy fell from one LR of ``lrs`` to the next, so
      the best lies at or below the lower of the two and the higher LRs are skipped (accuracy
      against LR has one peak at every point measured with three LRs; see the module docstring);
    * ``"every lr ran"``.
    """
    lr = solved_at(rows, mixer, width, seq_len, steps, batch_size, seed)
    if lr is not None:
        return f"solved at lr {lr:g}"
    accuracy = {f"{r['learning_rate']:.6g}": (r["accuracy"] if math.isfinite(r["accuracy"]) else 0.0)
                for r in rows if current(r, steps, batch_size, seed)
                and (r["mixer"], r["width"], r["seq_len"]) == (mixer, width, seq_len)}
    previous = None
    for lr in lrs:
        value = accuracy.get(f"{lr:.6g}")
        if value is None:
            return None
        if previous is not None and value < previous[1]:
            return f"past its best: lr {lr:g} < lr {previous[0]:g}"
        previous = lr, value
    return "every lr ran"


def finished_points(rows, steps, batch_size, seed=0):
    """The (mixer, seq_len, width) points of the default grid whose best accuracy at ``seed`` is
    final over ``LEARNING_RATES`` (:func:`lr_search_settled`)."""
    return {(mixer, seq_len, width) for mixer in MIXERS for width in WIDTHS for seq_len in LENGTHS
            if lr_search_settled(rows, mixer, width, seq_len, steps, batch_size, seed) is not None}


def seed_spread(rows, steps, batch_size):
    """{(mixer, seq_len, width, learning rate): {seed: accuracy}} of this protocol's runs made at
    more than one seed (``--seed``), seeds in order."""
    runs = {}
    for r in rows:
        if current(r, steps, batch_size, seed=None):
            accuracy = r["accuracy"] if math.isfinite(r["accuracy"]) else 0.0
            runs.setdefault((r["mixer"], r["seq_len"], r["width"], r["learning_rate"]), {})[r["seed"]] = accuracy
    return {key: dict(sorted(by_seed.items())) for key, by_seed in sorted(runs.items()) if len(by_seed) > 1}


def accuracy_range(by_seed):
    """The largest accuracy of ``{seed: accuracy}`` minus the smallest."""
    return max(by_seed.values()) - min(by_seed.values())


def seed_spread_lines(spread, seed):
    """Markdown: the runs of :func:`seed_spread`, each with its accuracy per seed and the spread."""
    if not spread:
        return []
    lines = [f"Runs repeated at other seeds (`--seed`; the table and checks above use seed {seed}); the spread is "
             "the largest accuracy minus the smallest:", "",
             "| mixer | T | d | LR | accuracy by seed | spread |", "|---|---:|---:|---:|---|---:|"]
    for (mixer, seq_len, width, lr), by_seed in spread.items():
        cells = ", ".join(f"seed {k}: {v:.3f}" for k, v in by_seed.items())
        lines.append(f"| {mixer} | {seq_len} | {width} | {lr:.0e} | {cells} | "
                     f"{accuracy_range(by_seed):.3f} |")
    widest = max(accuracy_range(by_seed) for by_seed in spread.values())
    lines += ["", f"Seeds alone move one run's accuracy by up to {widest:.3f}; a difference between two single-seed "
                  f"cells below that may be noise rather than a trend."]
    return lines


def budget_variants(rows, steps, batch_size):
    """{(mixer, seq_len, width, steps, batch size, learning rate): {seed: accuracy}} of the points
    run at another training budget (``--steps`` / ``--batch-size``) than ``steps`` x ``batch_size``,
    with this budget's runs of the same (mixer, seq_len, width, LR) beside them; budgets in order of
    the queries they train on (steps x batch x pairs), seeds in order."""
    runs = {}
    for r in rows:
        if (r["status"] in DONE_STATUSES and r["mixer"] in MIXERS and r["pattern"] == MIXERS[r["mixer"]]
                and r["mlp"] == MLP):
            accuracy = r["accuracy"] if math.isfinite(r["accuracy"]) else 0.0
            key = (r["mixer"], r["seq_len"], r["width"], r["steps"], r["batch_size"], r["learning_rate"])
            runs.setdefault(key, {})[r["seed"]] = accuracy
    other_lrs = {}  # (mixer, seq_len, width) -> the LRs run at another budget
    for mixer, seq_len, width, run_steps, run_batch, lr in runs:
        if (run_steps, run_batch) != (steps, batch_size):
            other_lrs.setdefault((mixer, seq_len, width), set()).add(lr)
    variants = [key for key in runs if key[5] in other_lrs.get(key[:3], ())]
    variants.sort(key=lambda k: (k[0], k[2], k[3] * k[4] * LENGTHS[k[1]], k[1], k[5]))
    return {key: dict(sorted(runs[key].items())) for key in variants}


def budget_variant_lines(variants, steps, batch_size):
    """Markdown: the runs of :func:`budget_variants`, with the queries each budget trains on."""
    if not variants:
        return []
    lines = [f"Points also run at other training budgets (`--steps`, `--batch-size`; the table and checks above use "
             f"{steps} steps x batch {batch_size}); queries: the query positions trained on, steps x batch x pairs "
             "(what the docstring of `benchmarks/mqar.py` reads from them):", "",
             "| mixer | d | T | steps x batch | queries | LR | accuracy by seed |", "|---|---:|---:|---|---:|---:|---|"]
    for (mixer, seq_len, width, run_steps, run_batch, lr), by_seed in variants.items():
        cells = ", ".join(f"seed {k}: {v:.3f}" for k, v in by_seed.items())
        queries = run_steps * run_batch * LENGTHS[seq_len]
        lines.append(f"| {mixer} | {width} | {seq_len} | {run_steps} x {run_batch} | {queries / 1e3:,.0f}k | {lr:.0e} | "
                     f"{cells} |")
    return lines


def sweep_progress(rows, steps, batch_size, seed=0):
    """(finished points, all points) of the default grid at ``seed`` (:func:`finished_points`)."""
    return len(finished_points(rows, steps, batch_size, seed)), len(MIXERS) * len(WIDTHS) * len(LENGTHS)


def window_reach(seq_len, window=WINDOW, kernel_size=BASE_CONV["kernel_size"]):
    """(in_window, ceiling): two shares of the query positions of the sweep's test split at
    ``seq_len`` (the exact 1,000 examples the runs are scored on) for the ``sliding_window`` model:
    a BaseConv layer (``kernel_size`` causal taps), then attention over the keys ``i - window .. i``.

    A query at position ``p`` (its token is key ``k_i``) is answered by the value token at ``v``
    (``k_i`` sits at ``v - 1``).

    * ``in_window``: the share with ``p - v <= window``, whose value the attention can read at the
      value's own position (where BaseConv has put the previous token, the key, beside it);
    * ``ceiling``: an upper bound for any weights of this model. The value's identity reaches
      position ``p`` only if ``p - v <= window + kernel_size - 1`` (the two layers' receptive field);
      the other queries can at best be guessed among the values not seen (``VOCAB_SIZE / 2`` value
      tokens, each used once per example), at most ``1 / (VOCAB_SIZE / 2 - K + 1)`` each.
    """
    import numpy as np

    from attnzoo.train.datasets.mqar import IGNORE_LABEL, multiquery_ar

    config = next(c for c in sweep_configs() if c.seq_len == seq_len)
    inputs, labels = multiquery_ar(**config.generator_kwargs("test"))
    pairs = config.num_kv_pairs
    example, position = np.nonzero(labels != IGNORE_LABEL)
    keys = inputs[:, 0:2 * pairs:2][example]  # [queries, K]: the key tokens at 0, 2, ..., 2K - 2
    which = np.argmax(keys == inputs[example, position][:, None], axis=1)
    distance = position - (2 * which + 1)
    in_window = float(np.mean(distance <= window))
    reachable = float(np.mean(distance <= window + kernel_size - 1))
    return in_window, reachable + (1 - reachable) / (config.vocab_size // 2 - pairs + 1)


RECALL_MIXERS = ("based", "deltanet", "gated_deltanet", "kda")  # "close most of the gap" (Zoology, DeltaNet)
OTHER_SUBQUADRATIC = ("linear_attention", "retnet", "gla", "mamba", "mamba2")
SLACK = 0.02  # accuracy differences below this count as equal in the shape checks


def zoology_checks(best, finished, spread=None, reach=None):
    """Markdown lines: each qualitative result of Zoology's Figure 2 (as the issue lists them),
    checked on the finished points only, with the numbers and a verdict (agrees / disagrees / not
    measured yet). ``best``: :func:`best_accuracy`; ``finished``: :func:`finished_points`;
    ``spread``: :func:`seed_spread`; ``reach``: {seq_len: :func:`window_reach`} (default: computed
    for the lengths with a finished sliding-window point). A width or length trend broken only by
    steps no larger than the seed spread measured at one of the step's two points is "disagrees,
    within seed noise", and so is a hybrid that differs from attention by no more than the seed
    spread measured at that point for either of them."""
    final = {key: value[0] for key, value in best.items() if key in finished}
    noise = {}  # (mixer, seq_len, width) -> the largest seed spread of its runs
    for (mixer, seq_len, width, _), by_seed in (spread or {}).items():
        key = (mixer, seq_len, width)
        noise[key] = max(noise.get(key, 0.0), accuracy_range(by_seed))
    points = sorted({(t, w) for (_, t, w) in final})
    lines = []

    def verdict(ok, measured):
        return "not measured yet" if not measured else "**agrees**" if ok else "**disagrees**"

    def cells(mixer):
        return ", ".join(f"T={t} d={w}: {final[(mixer, t, w)]:.3f}" for t, w in points if (mixer, t, w) in final)

    attention = {p: final[("attention", *p)] for p in points if ("attention", *p) in final}
    lines.append(f"- Attention solves MQAR at every width and length (accuracy >= {TARGET_ACCURACY}): "
                 f"{verdict(all(a >= TARGET_ACCURACY for a in attention.values()), attention)}"
                 + (f" ({cells('attention')})" if attention else ""))

    def broken(curve, sign):
        """(``curve``'s accuracies ``a -> b -> ...``, the largest seed spread at the ends of a step
        against the trend (0.0 if none measured), whether every such step is within it) or None
        when no step goes against the trend ``sign`` (+1: should not fall, -1: should not rise)."""
        series = [final[p] for p in curve]
        against = [(p, q) for p, q in zip(curve, curve[1:], strict=False)
                   if sign * (final[q] - final[p]) < -SLACK]
        if not against:
            return None
        spreads = [max(noise.get(p, 0.0), noise.get(q, 0.0)) for p, q in against]
        within = all(abs(final[q] - final[p]) <= spread for (p, q), spread in zip(against, spreads, strict=True))
        return " -> ".join(f"{a:.3f}" for a in series), max(spreads), within

    def trend_verdict(items, measured):
        if not measured:
            return "not measured yet"
        if not items:
            return "**agrees**"
        return "**disagrees, within seed noise**" if all(within for *_, within in items) else "**disagrees**"

    def describe(items):
        return "; ".join(f"{label}: {series}" + (f" (seeds spread up to {spread:.3f} at these points)" if spread else "")
                         for label, series, spread, _ in items)

    against_width, against_length, pairs_w, pairs_t = [], [], 0, 0
    for mixer in MIXERS:
        if mixer in ("attention", "hybrid"):
            continue
        for t in LENGTHS:
            curve = [(mixer, t, w) for w in WIDTHS if (mixer, t, w) in final]
            if len(curve) >= 2:
                pairs_w += 1
                if (found := broken(curve, +1)) is not None:
                    against_width.append((f"{mixer} at T={t}", *found))
        for w in WIDTHS:
            curve = [(mixer, t, w) for t in LENGTHS if (mixer, t, w) in final]
            if len(curve) >= 2:
                pairs_t += 1
                if (found := broken(curve, -1)) is not None:
                    against_length.append((f"{mixer} at d={w}", *found))
    lines.append(f"- Sub-quadratic mixers do no worse with more width (the curves rise to the right): "
                 f"{trend_verdict(against_width, pairs_w)} ({pairs_w} (mixer, length) curves with 2+ widths"
                 + (f"; falling: {describe(against_width)}" if against_width else "") + ")")
    lines.append(f"- ... and no better with longer sequences and more pairs: {trend_verdict(against_length, pairs_t)} "
                 f"({pairs_t} (mixer, width) series with 2+ lengths"
                 + (f"; rising: {describe(against_length)}" if against_length else "") + ")")

    gaps = []
    for t, w in points:
        recall = [final[(m, t, w)] for m in RECALL_MIXERS if (m, t, w) in final]
        other = [final[(m, t, w)] for m in OTHER_SUBQUADRATIC if (m, t, w) in final]
        if recall and other and ("attention", t, w) in final:
            gaps.append((t, w, final[("attention", t, w)], sum(recall) / len(recall), sum(other) / len(other)))
    closes = all(a - r <= (a - o) / 2 + SLACK for _, _, a, r, o in gaps)
    lines.append("- Based and the delta-rule mixers close most of the gap to attention (their mean accuracy "
                 "within half of the other sub-quadratic mixers' distance to attention): "
                 f"{verdict(closes, gaps)}" + (" (" + "; ".join(
                     f"T={t} d={w}: attention {a:.3f}, Based/delta {r:.3f}, others {o:.3f}" for t, w, a, r, o in gaps)
                     + ")" if gaps else ""))

    window = {p: final[("sliding_window", *p)] for p in points if ("sliding_window", *p) in final}
    lengths = sorted({t for t, _ in window})
    reach = reach if reach is not None else {t: window_reach(t) for t in lengths}
    within = all(v < TARGET_ACCURACY and v <= reach[t][1] + SLACK for (t, _), v in window.items())
    lines.append(f"- Sliding-window attention ({WINDOW} tokens) fails once keys sit beyond its window (below "
                 f"{TARGET_ACCURACY} at every length, and no higher than the ceiling its window sets): "
                 f"{verdict(within, window)}" + (f" ({cells('sliding_window')}; queries whose value lies in the "
                 "window: " + ", ".join(f"T={t}: {reach[t][0]:.3f}" for t in lengths) + "; ceiling for any weights "
                 "(the value within the window + BaseConv's reach, or a blind guess): "
                 + ", ".join(f"T={t}: {reach[t][1]:.3f}" for t in lengths) + ")" if window else ""))

    hybrid = [(p, final[("hybrid", *p)], attention[p]) for p in points if ("hybrid", *p) in final and p in attention]
    apart = [(p, h, a, max(noise.get(("hybrid", *p), 0.0), noise.get(("attention", *p), 0.0)))
             for p, h, a in hybrid if abs(h - a) > SLACK and min(h, a) < TARGET_ACCURACY]
    hybrid_verdict = trend_verdict([(p, None, spread, abs(h - a) <= spread) for p, h, a, spread in apart], hybrid)
    lines.append(f"- The Gated DeltaNet + attention hybrid behaves like attention (within {SLACK} of it or both >= "
                 f"{TARGET_ACCURACY}): {hybrid_verdict}"
                 + (" (" + "; ".join(f"T={p[0]} d={p[1]}: hybrid {h:.3f}, attention {a:.3f}" for p, h, a in hybrid)
                    + ")" if hybrid else "")
                 + ("; seeds spread up to " + ", ".join(f"{spread:.3f} at T={p[0]} d={p[1]}" for p, *_, spread in apart
                                                       if spread) if any(spread for *_, spread in apart) else ""))
    return lines


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
    if not args.plot and args.workers > 1:
        points = pending_points(read_rows(csv_path), args)
        for seq_len in dict.fromkeys(t for _, _, t in points):
            prepare_dataset(seq_len, args.data_dir)  # once, before the workers read it
        log(f"{len(points)} points to train, {args.workers} at a time"
            + (f", until {args.until.isoformat(timespec='minutes')}" if args.until else ""))
        signal.signal(signal.SIGTERM, _interrupt)
        rows = read_rows(csv_path)
        jobs = [(f"{m} width {w} seq_len {t}", point_command(args, m, w, t), projected_run_seconds(rows, args, m, w, t))
                for m, w, t in points]
        failures += run_in_workers(jobs, args.workers, log, until=args.until and args.until.timestamp())
    elif not args.plot:
        done = {row_key(r) for r in read_rows(csv_path) if r["status"] in DONE_STATUSES}
        todo = [(m, w, t, lr) for t in args.lengths for w in args.widths for m in args.mixers for lr in args.lrs
                if run_key(m, w, t, lr, args.steps, args.batch_size, args.seed) not in done]
        total = len(args.mixers) * len(args.widths) * len(args.lengths) * len(args.lrs)
        log(f"{total - len(todo)} of {total} selected runs already in the CSV; at most {len(todo)} to run")
        # between runs too, SIGTERM / SIGINT stop cleanly, never inside a row's append
        previous_handlers = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
        alarm = None
        if args.until is not None:  # the trainer checkpoints the run in flight on SIGTERM (train_one)
            alarm = threading.Timer(max((args.until - datetime.datetime.now()).total_seconds(), 0.0),
                                    os.kill, (os.getpid(), signal.SIGTERM))
            alarm.daemon = True
            alarm.start()
        try:
            for index, (mixer, width, seq_len, lr) in enumerate(todo, 1):
                rows = read_rows(csv_path)
                settled = lr_search_settled(rows, mixer, width, seq_len, args.steps, args.batch_size, args.seed, args.lrs)
                if settled is not None:
                    log(f"[{index}/{len(todo)}] {mixer} width {width} seq_len {seq_len}: {settled}; lr {lr:g} skipped")
                    # a run of this LR stopped before the point settled will not be resumed
                    shutil.rmtree(run_dir(args.runs_dir, mixer, width, seq_len, lr, args.steps, args.batch_size,
                                          args.seed), ignore_errors=True)
                    continue
                projected = projected_run_seconds(rows, args, mixer, width, seq_len)
                if args.until is not None and projected is not None:
                    left = (args.until - datetime.datetime.now()).total_seconds()
                    if projected > left:
                        log(f"[{index}/{len(todo)}] {mixer} width {width} seq_len {seq_len} lr {lr:g}: projected "
                            f"{fmt_duration(projected)}, {fmt_duration(max(left, 0.0))} left before --until; not started")
                        continue
                config = make_config(mixer, width, seq_len, lr, steps=args.steps, batch_size=args.batch_size,
                                     heads=args.heads, window=args.window, seed=args.seed, data_dir=args.data_dir)
                prepare_dataset(seq_len, args.data_dir)
                log(f"[{index}/{len(todo)}] {mixer} ({MIXERS[mixer]}) width {width} seq_len {seq_len} "
                    f"kv {LENGTHS[seq_len]} lr {lr:g} steps {args.steps}")
                workdir = run_dir(args.runs_dir, mixer, width, seq_len, lr, args.steps, args.batch_size, args.seed)
                try:
                    accuracy, loss, status, seconds, step_ms, stopped_at = train_one(config, workdir)
                except Exception as error:  # recorded, retried from scratch on the next run
                    failures += 1
                    accuracy, loss, status, seconds, step_ms, stopped_at = (
                        float("nan"), float("nan"), f"error: {type(error).__name__}", 0.0, float("nan"), 0)
                    log(f"  ERROR {type(error).__name__}: {error}")
                with stops_deferred():  # a stop arriving now waits until the row is written
                    append_row(csv_path, dict(
                        mixer=mixer, pattern=MIXERS[mixer], layers=LAYERS, mlp=MLP, width=width, seq_len=seq_len,
                        num_kv_pairs=LENGTHS[seq_len], vocab_size=VOCAB_SIZE, learning_rate=f"{lr:.6g}", seed=args.seed,
                        batch_size=args.batch_size, steps=args.steps, stopped_at=stopped_at, accuracy=f"{accuracy:.4f}",
                        loss=f"{loss:.4f}",
                        seconds=f"{seconds:.1f}", step_ms=f"{step_ms:.1f}", status=status,
                        date=datetime.datetime.now().isoformat(timespec="seconds"),
                    ))
                    shutil.rmtree(workdir, ignore_errors=True)
                log(f"  accuracy {accuracy:.4f} at step {stopped_at}, {seconds:.1f} s, {step_ms:.0f} ms/step ({status})")
        except KeyboardInterrupt as interrupt:
            if args.until is None or datetime.datetime.now() < args.until:
                raise
            log(f"stopped at --until {args.until.isoformat(timespec='minutes')} ({interrupt}); a run in flight is "
                "checkpointed in --runs-dir and resumes on the next sweep")
        finally:
            if alarm is not None:
                alarm.cancel()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    if args.no_report:
        return 1 if failures else 0
    rows = read_rows(csv_path)
    best = best_accuracy(rows, args.steps, args.batch_size, args.seed)
    date = datetime.date.today().isoformat()
    table = markdown_table(best) if best else "(no finished runs)"
    finished, points = sweep_progress(rows, args.steps, args.batch_size, args.seed)
    spread = seed_spread(rows, args.steps, args.batch_size)
    checks = zoology_checks(best, finished_points(rows, args.steps, args.batch_size, args.seed), spread)
    spread_lines = seed_spread_lines(spread, args.seed)
    variant_lines = budget_variant_lines(budget_variants(rows, args.steps, args.batch_size), args.steps,
                                         args.batch_size)
    heading = (f"### MQAR (Zoology Figure 2, scaled down): best accuracy over LRs, {LAYERS} mixer-only layers, "
               f"vocab {VOCAB_SIZE}, at most {args.steps} steps x batch {args.batch_size} (stopped at accuracy "
               f"{TARGET_ACCURACY})" + (f", seed {args.seed}" if args.seed else ""))
    text = "\n".join([
        heading, "",
        f"`{command}` on {date}, {machine_line(jax)}. Cells: accuracy at the query positions of the 1,000 test "
        f"examples (the LR that gave it); `-`: not run yet. Patterns, how this differs from Zoology and what "
        f"each disagreement below was found to be: the docstring of `benchmarks/mqar.py`. Every run: "
        f"`{os.path.basename(csv_path)}`.", "",
        f"Sweep progress: {finished} of {points} (mixer, width, length) points finished (one LR reached "
        f"{TARGET_ACCURACY}, the accuracy fell from one LR to the next, or all {len(LEARNING_RATES)} LRs ran); "
        "it resumes where it stopped.", "", table, "",
        "Zoology's qualitative results, checked on the finished points (differences below "
        f"{SLACK} count as equal):", "", *checks,
    ] + ["", *spread_lines] * bool(spread_lines) + ["", *variant_lines] * bool(variant_lines))
    print(text)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    if best:
        title = (f"MQAR, {LAYERS} mixer-only layers, vocab {VOCAB_SIZE}, <= {args.steps} steps x batch "
                 f"{args.batch_size}, best LR" + (f", seed {args.seed}" if args.seed else "") + f" ({date})")
        if write_plot(best, png_path, title):
            log(f"plot: {png_path}")

    measured = [r for r in rows if current(r, args.steps, args.batch_size, args.seed)]
    if measured:
        log("\nmeasured runs (seconds, compile + train + evals):")
        for r in measured[-12:]:
            log(f"  {r['mixer']:>16} d={r['width']:<4} T={r['seq_len']:<4} lr={r['learning_rate']:<7g} "
                f"{r['stopped_at']} of {r['steps']} steps: {r['seconds']:.1f} s")
    for steps in dict.fromkeys([args.steps, STEPS]):
        total, n_measured, n_estimated, remaining = projected_sweep_seconds(rows, steps, args.batch_size,
                                                                            seed=args.seed)
        log(f"projected full sweep ({len(MIXERS)} mixers x {len(WIDTHS)} widths x {len(LENGTHS)} lengths x "
            f"{len(LEARNING_RATES)} LRs, at most {steps} steps x batch {args.batch_size}): {fmt_duration(total)}, "
            f"{fmt_duration(remaining)} of it still to run ({n_measured} runs measured, at most {n_estimated} "
            f"estimated at full length)")
    return 1 if failures else 0


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()  # XLA:CPU's per-call buffers without page faults (attnzoo/runtime.py)
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:
        print(f"stopped ({interrupt or 'interrupted'}); the finished runs are in the CSV, the stopped ones "
              "checkpointed in --runs-dir: rerun the same command to resume", flush=True)
        sys.exit(130)
