"""benchmarks/mqar.py's sweep logic without training: the configs it builds (Zoology's BaseConv
placement, mixer-only layers, early stop), the order and skipping of learning rates, resuming,
the CSV written by an older version, and which rows the table and plot use."""

import csv
import datetime
import importlib.util
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mqar():
    spec = importlib.util.spec_from_file_location("mqar_sweep_script", ROOT / "benchmarks" / "mqar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def runs_dir(mqar, tmp_path, monkeypatch):
    """Keeps every test's run workdirs out of the real sweep's (``~/.cache/attnzoo/mqar_runs``)."""
    path = tmp_path / "runs"
    monkeypatch.setattr(mqar, "DEFAULT_RUNS_DIR", str(path))
    return path


def _config(mqar, mixer, steps=1000):
    return mqar.make_config(mixer, 128, 128, 3e-3, steps=steps, batch_size=64, heads=2, window=16, seed=0,
                            data_dir="/nowhere")


def test_configs_follow_zoology(mqar):
    wrapped = {m for m, pattern in mqar.MIXERS.items() if pattern.startswith("base_conv,")}
    assert wrapped == {"sliding_window", "linear_attention", "based", "retnet", "gla", "deltanet", "gated_deltanet",
                       "kda"}
    for mixer in mqar.MIXERS:
        config = _config(mqar, mixer)
        kwargs = config.model.kwargs
        assert (kwargs.depth, kwargs.mlp, kwargs.dim, kwargs.vocab_size) == (2, "none", 128, mqar.VOCAB_SIZE)
        assert len(kwargs.pattern.split(",")) in (1, 2) and kwargs.depth % len(kwargs.pattern.split(",")) == 0
        assert config.data.name == "mqar_sweep/v512_t128_kv8" and config.data.seq_len == 128
        assert (config.eval_every_steps, config.early_stop.metric, config.early_stop.threshold) == (100, "accuracy",
                                                                                                    0.99)
        options = kwargs.get("mixer_options")
        assert (options is not None and options.to_dict() == {"base_conv": {"expand_proj": 2, "kernel_size": 3}}) == (
            mixer in wrapped)
    assert _config(mqar, "attention", steps=20).eval_every_steps == 0  # smoke runs: one final eval


def test_models_build_as_configured(mqar):
    """Every sweep model builds at the smallest point: layer 0 is a BaseConv exactly for the
    wrapped mixers, and no layer has an MLP."""
    from flax import nnx

    from attnzoo import zoo

    for mixer, pattern in mqar.MIXERS.items():
        kwargs = _config(mqar, mixer).model.kwargs.to_dict()
        kwargs["dim"] = 16
        model = nnx.eval_shape(lambda kwargs=kwargs: zoo.create_model("lm_nano", **kwargs, rngs=nnx.Rngs(0)))
        blocks = model.blocks.layers.blocks
        kinds = [type(block.mixer).__name__ for block in blocks]
        assert all(block.mlp is None for block in blocks), mixer
        if pattern.startswith("base_conv,"):
            assert kinds[0] == "BaseConv" and kinds[1] != "BaseConv", (mixer, kinds)
            assert blocks[0].mixer.inner_dim == 16 and blocks[0].mixer.kernel_size == 3
        else:
            assert "BaseConv" not in kinds, (mixer, kinds)


def test_sliding_window_model_sees_exactly_the_reach_its_ceiling_assumes(mqar):
    """The logits of the sweep's sliding_window model at the last position change with the token
    ``j`` places back exactly when ``j <= WINDOW + kernel_size - 1`` (:func:`window_reach`'s
    receptive field): the mask lets nothing further in, and everything up to there."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from attnzoo import zoo

    kwargs = _config(mqar, "sliding_window").model.kwargs.to_dict()
    kwargs["dim"] = 32
    model = zoo.create_model("lm_nano", **kwargs, rngs=nnx.Rngs(3))
    seq_len, vocab = 40, mqar.VOCAB_SIZE
    tokens = np.random.default_rng(0).integers(0, vocab, size=seq_len)
    variants = np.tile(tokens, (seq_len + 1, 1))
    variants[np.arange(seq_len), np.arange(seq_len)] = (tokens + 1 + np.arange(seq_len)) % vocab  # row j: token j changed
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, jnp.asarray(variants, jnp.int32))[:, -1]
    change = np.max(np.abs(np.asarray(logits[:seq_len]) - np.asarray(logits[seq_len])), axis=-1)
    back = seq_len - 1 - np.arange(seq_len)
    reach = mqar.WINDOW + mqar.BASE_CONV["kernel_size"] - 1
    assert np.all(change[back <= reach] > 1e-4), change[back <= reach]
    assert np.all(change[back > reach] == 0.0), change[back > reach]


def test_window_reach_counts_the_test_split_queries_by_distance(mqar):
    """:func:`window_reach` against a plain loop over the test split's queries."""
    from attnzoo.train.datasets.mqar import IGNORE_LABEL, multiquery_ar

    config = next(c for c in mqar.sweep_configs() if c.seq_len == 64)
    inputs, labels = multiquery_ar(**config.generator_kwargs("test"))
    counts = {"queries": 0, 16: 0, 18: 0, 10: 0, 20: 0}
    for tokens, targets in zip(inputs.tolist(), labels.tolist(), strict=True):
        for p, target in enumerate(targets):
            if target == IGNORE_LABEL:
                continue
            value_at = tokens.index(tokens[p]) + 1  # the key's first occurrence is in the key-value section
            assert tokens[value_at] == target
            counts["queries"] += 1
            for reach in (10, 16, 18, 20):
                counts[reach] += p - value_at <= reach
    assert counts["queries"] == 1000 * 4
    guess = 1 / (mqar.VOCAB_SIZE // 2 - 4 + 1)
    for window, kernel_size in ((16, 3), (10, 1), (16, 5)):
        in_window, ceiling = mqar.window_reach(64, window=window, kernel_size=kernel_size)
        reachable = counts[window + kernel_size - 1] / counts["queries"]
        assert in_window == counts[window] / counts["queries"]
        assert math.isclose(ceiling, reachable + (1 - reachable) * guess, rel_tol=1e-12)
        if (window, kernel_size) == (mqar.WINDOW, mqar.BASE_CONV["kernel_size"]):  # the defaults
            assert (in_window, ceiling) == mqar.window_reach(64)
            assert 0.5 < in_window < ceiling < 0.7  # over half the queries lie within 16 tokens


def _row(mqar, mixer, lr, accuracy, *, width=64, seq_len=64, steps=1000, mlp=None, pattern=None, seed=0):
    return dict(mixer=mixer, pattern=pattern or mqar.MIXERS[mixer], layers=2, mlp=mlp or mqar.MLP, width=width,
                seq_len=seq_len, num_kv_pairs=mqar.LENGTHS[seq_len], vocab_size=512, learning_rate=f"{lr:.6g}", seed=seed,
                batch_size=64, steps=steps, stopped_at=steps, accuracy=f"{accuracy:.4f}", loss="1.0", seconds="10.0",
                step_ms="5.0", status="ok", date="2026-12-06T00:00:00")


def test_learning_rates_run_in_order_and_a_solved_or_falling_point_skips_the_rest(mqar, tmp_path, monkeypatch):
    runs = []
    accuracy = {("deltanet", 3e-3): 0.995, ("gla", 3e-3): 0.4, ("gla", 1e-2): 0.6, ("gla", 3e-2): 0.2,
                ("retnet", 3e-3): 0.5, ("retnet", 1e-2): 0.3}  # retnet at 3e-2 would raise a KeyError

    def fake_train_one(config, workdir):
        mixer = {pattern: name for name, pattern in mqar.MIXERS.items()}[config.model.kwargs.pattern]
        lr = config.optimizer.learning_rate
        runs.append((mixer, lr))
        value = accuracy[(mixer, lr)]
        return value, 0.5, "ok", 12.0, 3.0, 300 if value >= 0.99 else 1000

    monkeypatch.setattr(mqar, "train_one", fake_train_one)
    monkeypatch.setattr(mqar, "prepare_dataset", lambda seq_len, data_dir: None)
    monkeypatch.setattr(mqar, "write_plot", lambda best, path, title: False)
    output = tmp_path / "mqar.md"
    argv = ["--mixers", "deltanet,gla,retnet", "--widths", "64", "--lengths", "64", "--lrs", "0.03,0.003,0.01",
            "--output", str(output)]
    assert mqar.main(argv) == 0
    assert runs == [("deltanet", 3e-3), ("gla", 3e-3), ("gla", 1e-2), ("gla", 3e-2), ("retnet", 3e-3), ("retnet", 1e-2)]
    rows = mqar.read_rows(str(tmp_path / "mqar.csv"))
    assert [(r["mixer"], r["learning_rate"], r["stopped_at"]) for r in rows] == [
        ("deltanet", 3e-3, 300), ("gla", 3e-3, 1000), ("gla", 1e-2, 1000), ("gla", 3e-2, 1000),
        ("retnet", 3e-3, 1000), ("retnet", 1e-2, 1000)]
    best = mqar.best_accuracy(rows, 1000, 64)
    assert best == {("deltanet", 64, 64): (0.995, 3e-3), ("gla", 64, 64): (0.6, 1e-2), ("retnet", 64, 64): (0.5, 3e-3)}
    assert "| deltanet | 0.995 (3e-03) |" in output.read_text() and "| gla | 0.600 (1e-02) |" in output.read_text()

    assert mqar.sweep_progress(rows, 1000, 64) == (3, 108)
    assert "Sweep progress: 3 of 108 (mixer, width, length) points finished" in output.read_text()
    # the projection counts the 6 runs as measured, nothing for deltanet's and retnet's skipped LRs
    total, measured, estimated, remaining = mqar.projected_sweep_seconds(rows, 1000, 64)
    assert (measured, estimated) == (6, 108 * 3 - 6 - 2 - 1) and math.isclose(total - remaining, 6 * 12.0)

    runs.clear()  # a rerun trains nothing: finished runs are in the CSV, the settled points' other LRs skipped
    assert mqar.main(argv) == 0
    assert runs == []
    assert len(mqar.read_rows(str(tmp_path / "mqar.csv"))) == 6


def test_the_lr_search_settles_when_solved_past_its_best_or_complete(mqar):
    def settled(*points, lrs=(3e-3, 1e-2, 3e-2), seed=0):
        rows = [{**_row(mqar, "gla", lr, accuracy, seed=seed)} for lr, accuracy in points]
        for row in rows:  # as read_rows returns them
            row.update(learning_rate=float(row["learning_rate"]), accuracy=float(row["accuracy"]))
        return mqar.lr_search_settled(rows, "gla", 64, 64, 1000, 64, 0, lrs)

    assert settled() is None
    assert settled((3e-3, 0.4)) is None
    assert settled((3e-3, 0.4), (1e-2, 0.4)) is None  # equal: not past the best yet
    assert settled((3e-3, 0.4), (1e-2, 0.6)) is None
    assert settled((3e-3, 0.4), (3e-2, 0.1)) is None  # 1e-2 not run yet: no fall between neighbours
    assert settled((3e-3, 0.4), (1e-2, 0.39)) == "past its best: lr 0.01 < lr 0.003"
    assert settled((3e-3, 0.4), (1e-2, float("nan"))) == "past its best: lr 0.01 < lr 0.003"  # non-finite: 0
    assert settled((3e-3, 0.4), (1e-2, 0.6), (3e-2, 0.7)) == "every lr ran"
    assert settled((3e-3, 0.4), (1e-2, 0.6), (3e-2, 0.2)) == "past its best: lr 0.03 < lr 0.01"
    assert settled((1e-2, 0.995)) == "solved at lr 0.01"
    assert settled((3e-3, 0.5), (1e-2, 0.3), seed=1) is None  # another seed's runs settle nothing at seed 0
    assert settled((1e-3, 0.5), (3e-3, 0.3)) is None  # 1e-3 is not in the grid searched
    assert settled((1e-3, 0.5), (3e-3, 0.3), lrs=(1e-3, 3e-3, 1e-2)) == "past its best: lr 0.003 < lr 0.001"


def test_an_older_csv_is_migrated_and_its_rows_stay_out_of_the_table(mqar, tmp_path):
    path = tmp_path / "mqar.csv"
    old_columns = [c for c in mqar.COLUMNS if c not in ("mlp", "stopped_at", "seed")]
    old = _row(mqar, "based", 3e-3, 0.238, pattern="based")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({key: old[key] for key in old_columns})
    (rows,) = [mqar.read_rows(str(path))]
    assert rows[0]["mlp"] == "swiglu" and rows[0]["stopped_at"] == 1000 and math.isclose(rows[0]["accuracy"], 0.238)
    assert mqar.best_accuracy(rows, 1000, 64) == {}  # another protocol: not plotted

    mqar.append_row(str(path), _row(mqar, "based", 3e-3, 0.9615))
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == mqar.COLUMNS
    rows = mqar.read_rows(str(path))
    assert [(r["pattern"], r["mlp"], r["accuracy"]) for r in rows] == [("based", "swiglu", 0.238),
                                                                       ("base_conv,based", "none", 0.9615)]
    assert mqar.best_accuracy(rows, 1000, 64) == {("based", 64, 64): (0.9615, 3e-3)}
    assert mqar.solved_at(rows, "based", 64, 64, 1000, 64) is None
    mqar.append_row(str(path), _row(mqar, "based", 1e-2, 0.991))
    assert mqar.solved_at(mqar.read_rows(str(path)), "based", 64, 64, 1000, 64) == 1e-2
    assert mqar.solved_at(mqar.read_rows(str(path)), "based", 128, 64, 1000, 64) is None


def test_zoology_checks_agree_and_disagree_with_the_numbers(mqar, monkeypatch):
    reach = {64: (0.58, 0.63), 128: (0.32, 0.38)}
    monkeypatch.setattr(mqar, "window_reach", lambda seq_len: reach[seq_len])

    def grid(accuracy):
        best = {(m, t, w): (accuracy(m, t, w), 3e-3) for m in mqar.MIXERS for t in (64, 128) for w in (64, 128)}
        return best, set(best)

    def paper_like(mixer, t, w):
        if mixer in ("attention", "hybrid"):
            return 0.999
        if mixer in mqar.RECALL_MIXERS:
            return 0.99 - 0.01 * (t // 64) + 0.001 * (w // 64)
        if mixer == "sliding_window":
            return 0.6 if t == 64 else 0.3
        return 0.3 + 0.1 * (w // 64) - 0.1 * (t // 64)

    lines = mqar.zoology_checks(*grid(paper_like))
    assert len(lines) == 6 and all("**agrees**" in line for line in lines), lines
    assert "T=64 d=64: attention 0.999, Based/delta 0.981, others 0.300" in lines[3]
    assert "lies in the window: T=64: 0.580, T=128: 0.320; ceiling" in lines[4]
    assert "BaseConv's reach, or a blind guess): T=64: 0.630, T=128: 0.380)" in lines[4]

    # below 0.99 but above what the window lets through (a leaking mask) is a disagreement
    best, finished = grid(paper_like)
    best[("sliding_window", 128, 128)] = (0.45, 3e-3)
    assert "**disagrees** (" in mqar.zoology_checks(best, finished)[4]
    best[("sliding_window", 128, 128)] = (0.39, 3e-3)  # within SLACK of the ceiling
    assert "**agrees** (" in mqar.zoology_checks(best, finished)[4]
    assert "**disagrees** (" in mqar.zoology_checks(best, finished, reach={64: (0.5, 0.55), 128: (0.3, 0.35)})[4]

    def unlike(mixer, t, w):
        if mixer == "attention":
            return 0.9 if (t, w) == (128, 64) else 0.999
        if mixer == "hybrid":
            return 0.5
        if mixer == "gla":
            return 0.5 - 0.1 * (w // 64) + 0.1 * (t // 64)  # falls with width, rises with length
        if mixer == "sliding_window":
            return 1.0
        return 0.3  # Based / delta rule no better than the rest

    lines = mqar.zoology_checks(*grid(unlike))
    assert all("**disagrees**" in line for line in lines), lines
    assert "T=128 d=64: 0.900" in lines[0]
    assert "gla at T=64: 0.500 -> 0.400" in lines[1] and "gla at d=64: 0.500 -> 0.600" in lines[2]
    assert "T=64 d=64: hybrid 0.500, attention 0.999" in lines[5]

    # a broken trend whose steps the seeds alone can explain is told apart from one they cannot
    best, finished = grid(paper_like)
    best[("gla", 64, 128)] = (0.1, 3e-3)  # 0.3 -> 0.1 with width at T=64; 0.1 -> 0.3 with length at d=128
    spread = {("gla", 64, 128, 3e-3): {0: 0.1, 1: 0.35}}
    lines = mqar.zoology_checks(best, finished, spread)
    for line in lines[1:3]:
        assert "**disagrees, within seed noise**" in line and "(seeds spread up to 0.250 at these points)" in line
    assert "falling: gla at T=64: 0.300 -> 0.100 (" in lines[1] and "rising: gla at d=128: 0.100 -> 0.300 (" in lines[2]
    lines = mqar.zoology_checks(best, finished, {("gla", 64, 128, 3e-3): {0: 0.1, 1: 0.2}})
    assert all("**disagrees** (" in line and "spread up to 0.100" in line for line in lines[1:3])
    assert all("**disagrees** (" in line for line in mqar.zoology_checks(best, finished)[1:3])
    assert all("**agrees**" in line for line in mqar.zoology_checks(best, finished, spread)[3:])

    # the hybrid apart from attention by no more than either one's seed spread at that point
    best, finished = grid(paper_like)
    best[("hybrid", 128, 64)] = (0.12, 3e-3)
    assert "**disagrees** (" in mqar.zoology_checks(best, finished)[5]
    for mixer in ("hybrid", "attention"):
        line = mqar.zoology_checks(best, finished, {(mixer, 128, 64, 1e-2): {0: 0.009, 1: 0.918}})[5]
        assert "**disagrees, within seed noise** (" in line, line
        assert "T=128 d=64: hybrid 0.120, attention 0.999" in line and "; seeds spread up to 0.909 at T=128 d=64" in line
    line = mqar.zoology_checks(best, finished, {("hybrid", 128, 64, 1e-2): {0: 0.009, 1: 0.5}})[5]
    assert "**disagrees** (" in line and "seeds spread up to 0.491 at T=128 d=64" in line
    assert "seeds spread" not in mqar.zoology_checks(*grid(paper_like), {("hybrid", 64, 64, 3e-3): {0: 0.98, 1: 0.999}})[5]

    # unfinished points are left out: nothing finished, nothing judged
    best, _ = grid(unlike)
    assert all("not measured yet" in line for line in mqar.zoology_checks(best, set()))


def test_workers_train_each_pending_point_once_with_the_sweep_settings(mqar, tmp_path, monkeypatch):
    """``--workers``: one job per point with a run still to do (solved and finished points are
    left out), carrying every setting of the sweep, then the report from the whole CSV."""
    path = tmp_path / "mqar.csv"
    for mixer, lr, accuracy in [("deltanet", 3e-3, 0.995), ("gla", 3e-3, 0.4), ("gla", 1e-2, 0.6), ("gla", 3e-2, 0.2),
                                ("based", 3e-3, 0.9), ("retnet", 3e-3, 0.5), ("retnet", 1e-2, 0.3)]:
        mqar.append_row(str(path), _row(mqar, mixer, lr, accuracy, seed=3))
    mqar.append_row(str(path), _row(mqar, "based", 1e-2, 0.995))  # seed 0: solves nothing at seed 3
    jobs = []

    def fake_run_in_workers(job_list, workers, log, cpus=None, poll_seconds=0.5, until=None):
        assert workers == 2 and until == pytest.approx(deadline.timestamp())
        jobs.extend(job_list)
        return 0

    monkeypatch.setattr(mqar, "run_in_workers", fake_run_in_workers)
    monkeypatch.setattr(mqar, "prepare_dataset", lambda seq_len, data_dir: None)
    monkeypatch.setattr(mqar, "write_plot", lambda best, path, title: False)
    output = tmp_path / "mqar.md"
    argv = ["--mixers", "deltanet,gla,based,retnet", "--widths", "64,128", "--lengths", "64", "--steps", "1000",
            "--workers", "2", "--window", "8", "--seed", "3", "--output", str(output)]
    deadline = (datetime.datetime.now() + datetime.timedelta(hours=1)).replace(microsecond=0)
    assert mqar.main([*argv, "--until", deadline.isoformat()]) == 0
    names = [name for name, *_ in jobs]
    assert names == ["based width 64 seq_len 64", "deltanet width 128 seq_len 64", "gla width 128 seq_len 64",
                     "based width 128 seq_len 64", "retnet width 128 seq_len 64"]
    child = mqar.parse_args(jobs[0][1][2:])
    assert (child.mixers, child.widths, child.lengths, child.lrs) == (["based"], [64], [64], list(mqar.LEARNING_RATES))
    assert (child.steps, child.batch_size, child.heads, child.window, child.seed) == (1000, 64, 2, 8, 3)
    assert (child.output, child.no_report, child.workers) == (str(output), True, 1)
    assert child.runs_dir == str(tmp_path / "runs") and child.until == deadline
    # each job's budget: 1.2 x one run's projection (rows of any seed: 10 s, 1000 steps of 5 ms);
    # deltanet has no run at width 128, so its step time scales with width x length from width 64
    assert jobs[0][2] == pytest.approx(1.2 * 10.0) and jobs[1][2] == pytest.approx(1.2 * (5.0 + 1000 * 0.010))
    assert "| gla | 0.600 (1e-02) |" in output.read_text()


def test_a_no_report_run_leaves_the_table_alone(mqar, tmp_path, monkeypatch):
    monkeypatch.setattr(mqar, "train_one", lambda config, workdir: (0.5, 1.0, "ok", 1.0, 1.0, 1000))
    monkeypatch.setattr(mqar, "prepare_dataset", lambda seq_len, data_dir: None)
    output = tmp_path / "mqar.md"
    argv = ["--mixers", "gla", "--widths", "64", "--lengths", "64", "--lrs", "0.01", "--output", str(output)]
    assert mqar.main([*argv, "--no-report"]) == 0
    assert not output.exists() and len(mqar.read_rows(str(tmp_path / "mqar.csv"))) == 1


def test_a_stopped_run_resumes_from_its_checkpoint_and_its_row_counts_every_part(mqar, tmp_path, monkeypatch,
                                                                                 runs_dir):
    """A run stopped by a signal writes no row and keeps its workdir (the trainer's checkpoint and
    the seconds so far); the next sweep trains it in the same workdir, records the seconds of both
    parts, and removes the workdir."""
    import types

    from attnzoo.train import train as trainer

    calls, clock = [], [0.0]

    def fake_train_and_evaluate(config, workdir):
        resumed = os.path.exists(os.path.join(workdir, "checkpoint"))
        calls.append((workdir, resumed))
        if not resumed:
            os.makedirs(workdir)
            open(os.path.join(workdir, "checkpoint"), "w").close()
            clock[0] += 40.0
            return types.SimpleNamespace(stopped_by_signal="SIGTERM", step=400, eval_metrics={}, train_metrics={})
        clock[0] += 25.0
        return types.SimpleNamespace(stopped_by_signal=None, step=1000, eval_metrics={"accuracy": 0.75, "loss": 0.9},
                                     train_metrics={"step_time_s": 0.05})

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_train_and_evaluate)
    monkeypatch.setattr(mqar.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(mqar, "prepare_dataset", lambda seq_len, data_dir: None)
    output = tmp_path / "mqar.md"
    argv = ["--mixers", "gla", "--widths", "64", "--lengths", "64", "--lrs", "0.01", "--output", str(output),
            "--no-report"]
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM at step 400"):
        mqar.main(argv)
    workdir = mqar.run_dir(str(runs_dir), "gla", 64, 64, 0.01, 1000, 64, 0)
    assert calls == [(workdir, False)] and not (tmp_path / "mqar.csv").exists()
    with open(os.path.join(workdir, mqar.ELAPSED_FILE)) as f:
        assert float(f.read()) == 40.0
    assert mqar.main(argv) == 0
    assert calls == [(workdir, False), (workdir, True)] and not os.path.exists(workdir)
    [row] = mqar.read_rows(str(tmp_path / "mqar.csv"))
    assert (row["accuracy"], row["stopped_at"], row["seconds"], row["step_ms"]) == (0.75, 1000, 65.0, 50.0)

    # a run stopped at an LR its point no longer needs (accuracy fell from 3e-3 to 1e-2) is not
    # resumed, and its workdir goes
    stale = mqar.run_dir(str(runs_dir), "gla", 64, 64, 0.03, 1000, 64, 0)
    os.makedirs(stale)
    open(os.path.join(stale, "checkpoint"), "w").close()
    mqar.append_row(str(tmp_path / "mqar.csv"), _row(mqar, "gla", 3e-3, 0.8))
    assert mqar.main([*argv[:6], "--lrs", "0.003,0.01,0.03", *argv[8:]]) == 0
    assert len(calls) == 2 and not os.path.exists(stale) and len(mqar.read_rows(str(tmp_path / "mqar.csv"))) == 2


def test_run_in_workers_runs_each_job_once_pinned_and_at_most_n_at_once(mqar, tmp_path):
    """Real subprocesses: each job records its CPU affinity and its start / end times."""
    script = ("import os, sys, time; start = time.time(); time.sleep(0.3); "
              "open(sys.argv[1], 'w').write(repr((sorted(os.sched_getaffinity(0)), start, time.time()))); "
              "print('done', sys.argv[1]); sys.exit(int(sys.argv[2]))")
    cpus = sorted(os.sched_getaffinity(0))
    jobs = [(f"job {i}", [sys.executable, "-c", script, str(tmp_path / f"{i}.txt"), "1" if i == 3 else "0"], None)
            for i in range(5)]
    lines = []
    assert mqar.run_in_workers(jobs, 2, lines.append, poll_seconds=0.05) == 1  # job 3 exits 1
    records = [eval((tmp_path / f"{i}.txt").read_text()) for i in range(5)]
    slots = mqar.cpu_slots(2)
    assert all(set(affinity) in [set(s) for s in slots] for affinity, _, _ in records)
    events = sorted([(start, 1) for _, start, _ in records] + [(end, -1) for _, _, end in records])
    running = [sum(step for _, step in events[:i + 1]) for i in range(len(events))]
    assert max(running) <= 2
    assert sum(line.startswith("[slot ") and " done " in line for line in lines) == 5
    assert sum("finished job" in line for line in lines) == 5 and "exit code 1" in " ".join(lines)
    assert set().union(*slots) == set(cpus)
    assert mqar.cpu_slots(3, [0, 1]) == [{0}, {1}, {0}]
    assert mqar.cpu_slots(2, [0, 1, 2, 3]) == [{0, 2}, {1, 3}]


def test_runs_at_other_seeds_are_kept_apart_and_their_spread_reported(mqar, tmp_path, monkeypatch):
    """A CSV from before the seed column reads as seed 0; runs at ``--seed 1`` neither count as
    done nor enter the seed-0 table, and the report lists each repeated run's accuracy per seed."""
    path = tmp_path / "mqar.csv"
    columns = [c for c in mqar.COLUMNS if c != "seed"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for lr, accuracy in [(3e-3, 0.16), (1e-2, 0.53), (3e-2, 0.2)]:
            row = _row(mqar, "linear_attention", lr, accuracy)
            writer.writerow({key: row[key] for key in columns})
    assert [r["seed"] for r in mqar.read_rows(str(path))] == [0, 0, 0]
    runs = []
    accuracy = {(3e-3, 1): 0.17, (1e-2, 1): 0.21, (3e-2, 1): 0.25}

    def fake_train_one(config, workdir):
        runs.append((config.optimizer.learning_rate, config.seed))
        return accuracy[runs[-1]], 0.5, "ok", 12.0, 3.0, 1000

    monkeypatch.setattr(mqar, "train_one", fake_train_one)
    monkeypatch.setattr(mqar, "prepare_dataset", lambda seq_len, data_dir: None)
    monkeypatch.setattr(mqar, "write_plot", lambda best, path, title: False)
    output = tmp_path / "mqar.md"
    argv = ["--mixers", "linear_attention", "--widths", "64", "--lengths", "64", "--output", str(output)]
    assert mqar.main(argv) == 0 and runs == []  # seed 0 is done
    assert mqar.main([*argv, "--seed", "1"]) == 0
    assert runs == [(3e-3, 1), (1e-2, 1), (3e-2, 1)]
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == mqar.COLUMNS  # migrated when the first seed-1 row was appended
    rows = mqar.read_rows(str(path))
    assert [r["seed"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert mqar.best_accuracy(rows, 1000, 64) == {("linear_attention", 64, 64): (0.53, 1e-2)}
    assert mqar.best_accuracy(rows, 1000, 64, seed=1) == {("linear_attention", 64, 64): (0.25, 3e-2)}
    text = output.read_text()
    assert "seed 1" in text.splitlines()[0] and "| linear_attention | 0.250 (3e-02) |" in text
    spread = mqar.seed_spread(rows, 1000, 64)
    assert spread[("linear_attention", 64, 64, 1e-2)] == {0: 0.53, 1: 0.21} and len(spread) == 3
    assert "| linear_attention | 64 | 64 | 1e-02 | seed 0: 0.530, seed 1: 0.210 | 0.320 |" in text
    assert "up to 0.320" in text
    mqar.main([*argv, "--plot"])
    assert "| linear_attention | 0.530 (1e-02) |" in output.read_text() and "seed 1" not in output.read_text().splitlines()[0]


def test_until_starts_only_the_runs_that_fit_and_stops_the_one_in_flight(mqar, tmp_path, monkeypatch, capsys):
    """``--until``: a run projected (1.2 x, from the CSV's timings) to end after it is not started,
    the others are; at that time the run in flight is stopped (SIGTERM, as the trainer would
    checkpoint it), no row is written, and the sweep exits cleanly with the handlers it found."""
    path = tmp_path / "mqar.csv"
    for mixer, seconds in [("gla", 100.0), ("based", 5000.0)]:  # 1000 steps; based: 6,000 s budgeted > 1 h
        mqar.append_row(str(path), {**_row(mqar, mixer, 3e-3, 0.4), "seconds": seconds, "step_ms": seconds - 10.0})
    runs = []

    def fake_train_one(config, workdir):
        runs.append((config.model.kwargs.pattern, config.optimizer.learning_rate))
        return 0.5, 1.0, "ok", 12.0, 3.0, 1000

    monkeypatch.setattr(mqar, "train_one", fake_train_one)
    monkeypatch.setattr(mqar, "prepare_dataset", lambda seq_len, data_dir: None)
    hour = (datetime.datetime.now() + datetime.timedelta(hours=1)).isoformat()
    argv = ["--mixers", "gla,based", "--widths", "64", "--lengths", "64", "--lrs", "0.003,0.01", "--output",
            str(tmp_path / "mqar.md"), "--no-report"]
    assert mqar.main([*argv, "--until", hour]) == 0
    assert runs == [("base_conv,gla", 1e-2)]
    assert re.search(r"based width 64 seq_len 64 lr 0\.01: projected 100\.0 min, (59\.9|60\.0) min left before "
                     r"--until; not started", capsys.readouterr().out)

    def sleeping_train_one(config, workdir):
        runs.append("sleeping")
        time.sleep(30)

    monkeypatch.setattr(mqar, "train_one", sleeping_train_one)
    handler, interrupt_handler = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    started = time.monotonic()
    soon = (datetime.datetime.now() + datetime.timedelta(seconds=1.5)).isoformat()
    empty = tmp_path / "empty" / "mqar.md"  # no timings: nothing to project, the run starts
    assert mqar.main([*argv[:9], str(empty), "--no-report", "--until", soon]) == 0
    assert runs[-1] == "sleeping" and time.monotonic() - started < 10
    assert "stopped at --until" in capsys.readouterr().out and not (empty.parent / "mqar.csv").exists()
    assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGINT) is interrupt_handler


def test_until_parses_a_clock_time_or_a_date_and_refuses_the_past(mqar):
    now = datetime.datetime.now()
    until = mqar._deadline("00:00")  # the next midnight
    assert until == (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    next_minute = (now + datetime.timedelta(minutes=2)).strftime("%H:%M")
    assert now < mqar._deadline(next_minute) <= now + datetime.timedelta(minutes=2)
    assert mqar._deadline("2031-05-04T10:20") == datetime.datetime(2031, 5, 4, 10, 20)
    with pytest.raises(Exception, match="expected HH:MM or YYYY-MM-DDTHH:MM"):
        mqar._deadline("half past five")
    with pytest.raises(SystemExit):
        mqar.parse_args(["--until", "2020-01-01T00:00"])


def test_run_in_workers_leaves_out_the_jobs_that_would_end_after_until(mqar, tmp_path):
    script = "import sys, time; time.sleep(0.1); open(sys.argv[1], 'w').write('ran')"
    jobs = [(name, [sys.executable, "-c", script, str(tmp_path / name)], seconds)
            for name, seconds in [("short", 1.0), ("long", 3600.0), ("unmeasured", None), ("short too", 2.0)]]
    lines = []
    assert mqar.run_in_workers(jobs, 2, lines.append, poll_seconds=0.05, until=time.time() + 60) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short", "short too", "unmeasured"]
    [left_out] = [line for line in lines if line.startswith("left out")]
    assert re.fullmatch(r"left out long: projected 60\.0 min, (59|60) s left before --until", left_out)


def test_a_stop_inside_stops_deferred_takes_effect_when_the_block_ends(mqar):
    events = []
    previous = signal.signal(signal.SIGTERM, mqar._interrupt)
    try:
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
            with mqar.stops_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                events.append("block ends")
        with mqar.stops_deferred():  # nothing pending: nothing raised
            events.append("quiet block")
        with pytest.raises(KeyboardInterrupt):  # and outside a block a stop is immediate
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert events == ["block ends", "quiet block"]


def test_points_run_at_other_budgets_are_listed_beside_the_protocols_runs(mqar):
    rows = [_row(mqar, "linear_attention", 1e-2, 0.5), _row(mqar, "linear_attention", 1e-2, 0.2, seed=1),
            _row(mqar, "linear_attention", 3e-3, 0.1),  # an LR run at no other budget: left out
            {**_row(mqar, "linear_attention", 1e-2, 0.95), "batch_size": 256},
            {**_row(mqar, "linear_attention", 1e-2, 0.04, seq_len=256), "steps": 250, "stopped_at": 250},
            _row(mqar, "gla", 1e-2, 0.3)]  # no other budget at all: left out
    rows = [{**r, "accuracy": float(r["accuracy"]), "learning_rate": float(r["learning_rate"])} for r in rows]
    variants = mqar.budget_variants(rows, 1000, 64)
    assert variants == {("linear_attention", 64, 64, 1000, 64, 1e-2): {0: 0.5, 1: 0.2},
                        ("linear_attention", 256, 64, 250, 64, 1e-2): {0: 0.04},
                        ("linear_attention", 64, 64, 1000, 256, 1e-2): {0: 0.95}}
    lines = mqar.budget_variant_lines(variants, 1000, 64)
    assert lines[-3:] == ["| linear_attention | 64 | 64 | 1000 x 64 | 256k | 1e-02 | seed 0: 0.500, seed 1: 0.200 |",
                          "| linear_attention | 64 | 256 | 250 x 64 | 256k | 1e-02 | seed 0: 0.040 |",
                          "| linear_attention | 64 | 64 | 1000 x 256 | 1,024k | 1e-02 | seed 0: 0.950 |"]
    assert mqar.budget_variants(rows[:3], 1000, 64) == {} and mqar.budget_variant_lines({}, 1000, 64) == []
