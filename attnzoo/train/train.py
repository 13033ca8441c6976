"""The attnzoo trainer: one config -> mesh -> data -> model & optimizer -> checkpoints -> loop.

    python -m attnzoo.train --config attnzoo/configs/mqar.py --workdir /tmp/mqar [--config.key=value]

Read top to bottom; the sections follow the order in which a run happens:

  1. config and checks   everything that can be wrong with a config fails here, before compiling
  2. mesh                ``(data, fsdp, tensor)`` from ``config.mesh``; logical rules from the config
  3. data                TFDS data sources read with grain; each host loads its rows of every batch
  4. model & optimizer   abstract model (``nnx.eval_shape``) -> shardings -> params created sharded
  5. train step          ``jax.jit`` with ``NamedSharding`` in/out and the state donated
  6. checkpoints         restore the newest good checkpoint from the workdir (exact resume)
  7. eval                weighted metric sums over the whole held-out split
  8. loop                progress, metrics, periodic async checkpoints, SIGTERM/SIGINT handling,
                         early stopping at a periodic eval (``config.early_stop``)

The train state is a plain pytree ``{"step", "params", "opt_state", "rng", "model_state"}``
(``params`` is the model's ``nnx.Param`` state as a nested dict), so it checkpoints, shards and
donates as one object.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from attnzoo import zoo
from attnzoo.train import input_pipeline, partitioning, tasks
from attnzoo.train.checkpointing import Checkpoints, IncompatibleCheckpointError
from attnzoo.train.metrics import MetricsWriter, Throughput, format_count, format_duration, peak_flops_per_device
from attnzoo.train.optimizer import make_optimizer

log = logging.getLogger("attnzoo.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """The config cannot run as given; the message says what to change. Raised before compiling."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/Inf; no checkpoint was written from that state."""


@dataclasses.dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    step: int
    eval_metrics: dict[str, float]
    train_metrics: dict[str, float]
    stopped_by_signal: str | None = None
    seconds: float = 0.0
    early_stopped: bool = False  # config.early_stop's condition held at an eval before num_steps


# ------------------------------------------------------------------------------------------------
# 1. Config and checks
# ------------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Fails with a message that says what to change, before anything is compiled."""
    tasks.check_task(config.task)
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    for key in ("num_steps", "batch_size", "grad_accum_steps", "log_every_steps"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
    zoo.get_model_factory(config.model.name)  # unknown model name -> ValueError with suggestions
    make_optimizer(config.optimizer, config.num_steps)  # learning rate, warmup within num_steps
    shards = partitioning.batch_shards(mesh)
    accum = config.grad_accum_steps
    if config.batch_size % (shards * accum):
        raise ValueError(
            f"config.batch_size={config.batch_size} must divide by the batch shards (mesh data x fsdp = {shards}) "
            f"times config.grad_accum_steps={accum}; use a batch size that is a multiple of {shards * accum}"
        )
    if config.eval_batch_size % shards:
        raise ValueError(
            f"config.eval_batch_size={config.eval_batch_size} must divide by the batch shards (mesh data x fsdp = "
            f"{shards}); use a multiple of {shards}"
        )
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={config.batch_size} must divide by the {jax.process_count()} hosts")
    check_early_stop(config)
    data = config.data
    for split in (data.train_split, data.eval_split):
        input_pipeline.check_dataset_available(data.name, split, data_dir=data.get("data_dir"))


def check_early_stop(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless ``config.early_stop`` is off (no metric) or names an eval metric of
    the task, a finite threshold, a mode "max"/"min", and ``eval_every_steps >= 1``."""
    early_stop = config.get("early_stop")
    if early_stop is None or early_stop.get("metric") is None:
        return
    metrics = tasks.eval_metric_names(config.task)
    if early_stop.metric not in metrics:
        raise ValueError(
            f"config.early_stop.metric must be an eval metric of task {config.task!r} ({', '.join(metrics)}), "
            f"got {early_stop.metric!r}"
        )
    threshold = early_stop.get("threshold")
    if threshold is None or not math.isfinite(float(threshold)):
        raise ValueError(f"config.early_stop.threshold must be a finite number, got {threshold!r}")
    if early_stop.get("mode") not in ("max", "min"):
        raise ValueError(f"config.early_stop.mode must be 'max' or 'min', got {early_stop.get('mode')!r}")
    if not config.eval_every_steps or int(config.eval_every_steps) < 1:
        raise ValueError(
            f"config.early_stop needs periodic evals: set config.eval_every_steps >= 1, got {config.eval_every_steps}"
        )


def early_stop_reached(early_stop: ml_collections.ConfigDict | None, metrics: dict[str, float]) -> bool:
    """Whether ``metrics`` (one eval) meet ``config.early_stop`` (False when it is off)."""
    if early_stop is None or early_stop.get("metric") is None:
        return False
    value = metrics[early_stop.metric]
    return value >= early_stop.threshold if early_stop.mode == "max" else value <= early_stop.threshold


CONFIG_FILE = "config.json"


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes ``workdir/config.json`` atomically (a temporary file renamed over it); returns its path.

    Tools that act on a finished run (``python -m attnzoo.sample --workdir DIR``) read it back with
    :func:`load_config`. Only process 0 writes.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
            f.write("\n")
        os.replace(tmp, path)
    return path


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples configs use (windows, limits, sharding rules)."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with (from ``config.json``, see :func:`save_config`).

    Raises FileNotFoundError naming the file when the workdir has none (e.g. no run started there).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_config: {path} does not exist; is {workdir!r} the --workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    kwargs = config.model.get("kwargs", {})
    # Nested dicts of the config (e.g. mixer_options) are ConfigDicts: models get plain dicts.
    kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs)
    kwargs.setdefault("dtype", DTYPES[config.dtype])
    kwargs.setdefault("param_dtype", jnp.float32)
    return kwargs


# ------------------------------------------------------------------------------------------------
# 3. Data
# ------------------------------------------------------------------------------------------------


def _data_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    data = config.data
    return dict(
        name=data.name,
        task=config.task,
        seq_len=data.get("seq_len"),
        image_size=data.get("image_size"),
        data_dir=data.get("data_dir"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=data.get("worker_count", 0),
        **dict(data.get("options", {})),
    )


def to_global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over (data, fsdp) along the batch dimension."""
    return {
        key: jax.make_array_from_process_local_data(partitioning.batch_sharding(mesh, value.ndim), value)
        for key, value in batch.items()
    }


def make_train_dataset(config: ml_collections.ConfigDict):
    """Shuffled, repeated, deterministic per ``config.seed``; this host's rows of each global batch."""
    return input_pipeline.make_dataset(
        split=config.data.train_split, global_batch_size=config.batch_size, seed=config.seed, shuffle=True,
        num_epochs=None, drop_remainder=True, **_data_options(config),
    )


def make_eval_dataset(config: ml_collections.ConfigDict):
    """One pass over the eval split in order; the last batch is padded with zero-weight rows."""
    return input_pipeline.make_dataset(
        split=config.data.eval_split, global_batch_size=config.eval_batch_size, seed=config.seed,
        shuffle=False, num_epochs=1, drop_remainder=False, **_data_options(config),
    )


# ------------------------------------------------------------------------------------------------
# 4. Model & optimizer (shared with restore_model)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelAndOptimizer:
    """The abstract model, its optimizer and how the train state is laid out on the mesh.

    ``graphdef`` is the model in training mode (``model.train()``: BatchNorm normalises with batch
    statistics and updates its running averages, dropout is active), ``eval_graphdef`` the same
    model in evaluation mode (``model.eval()``); both merge with the same params and model state.
    """

    graphdef: Any
    eval_graphdef: Any
    abstract_model: nnx.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_sharding: dict
    init_state: Any  # jitted () -> train state, created directly in its shardings
    num_params: int

    def abstract_state(self):
        """The train state as ``ShapeDtypeStruct``s carrying their shardings (restore target)."""
        return jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
            jax.eval_shape(self.init_state),
            self.state_sharding,
        )


def model_and_optimizer(config: ml_collections.ConfigDict, mesh, rules) -> ModelAndOptimizer:
    """Builds the model abstractly (no memory), derives parameter shardings from the logical rules,
    and returns a jitted initialiser that creates params and optimizer state already sharded."""
    kwargs = model_kwargs(config)

    def build_model():
        return zoo.create_model(config.model.name, rngs=nnx.Rngs(config.seed), **kwargs)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        try:
            abstract_model = nnx.eval_shape(build_model)
        except (ValueError, TypeError) as error:  # e.g. an unknown mixer in the pattern
            raise ConfigError(f"config.model ({config.model.name}): {error}") from error
        abstract_model.eval()
        eval_graphdef = nnx.graphdef(abstract_model)
        abstract_model.train()
        graphdef, abstract_params, abstract_other = nnx.split(abstract_model, nnx.Param, ...)
        param_sharding = nnx.get_named_sharding(abstract_params, mesh).to_pure_dict()
    replicated = partitioning.replicated(mesh)
    abstract_params = abstract_params.to_pure_dict()
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))

    tx, schedule = make_optimizer(config.optimizer, config.num_steps)
    opt_sharding = optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params), param_sharding,
        transform_non_params=lambda _: replicated,
    )
    state_sharding = {
        "step": replicated,
        "params": param_sharding,
        "opt_state": opt_sharding,
        "rng": replicated,
        "model_state": jax.tree.map(lambda _: replicated, abstract_other.to_pure_dict()),
    }

    @functools.partial(jax.jit, out_shardings=state_sharding)
    def init_state():
        with nnx.logical_axis_rules(rules):
            params, other = nnx.state(build_model(), nnx.Param, ...)
        params = params.to_pure_dict()
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(config.seed),
            "model_state": other.to_pure_dict(),
        }

    return ModelAndOptimizer(graphdef, eval_graphdef, abstract_model, tx, schedule, state_sharding, init_state, num_params)


def restore_model(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> nnx.Module:
    """The model of ``config`` with parameters from the newest checkpoint in ``workdir`` (or ``step``).

    Works in a fresh process and onto any device count: the mesh comes from ``config.mesh``.
    Raises FileNotFoundError when ``workdir`` holds no checkpoint.
    """
    config = ml_collections.ConfigDict(config)
    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.logical_rules(config.get("sharding_rules"))
    spec = model_and_optimizer(config, mesh, rules)
    checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        with jax.set_mesh(mesh):
            restored = checkpoints.restore(spec.abstract_state(), step=step)
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"restore_model: no checkpoint in {checkpoints.directory}")
    _, state, _ = restored
    return nnx.merge(spec.eval_graphdef, state["params"], state["model_state"])


# ------------------------------------------------------------------------------------------------
# 7. Eval (shared with evaluate_model)
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_sums(task, graphdef, params, model_state, batch):
    return tasks.metric_sums(task, nnx.merge(graphdef, params, model_state), batch)


def eval_metrics(config, eval_data, graphdef, params, model_state, mesh) -> dict[str, float]:
    """Metrics over the eval split (every example once; padding rows carry zero weight), capped at
    ``config.eval_max_batches`` batches when set."""
    totals = None
    for index, batch in enumerate(eval_data.iterator()):
        if config.get("eval_max_batches") and index >= config.eval_max_batches:
            break
        sums = _eval_sums(config.task, graphdef, params, model_state, to_global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError(f"config.data.eval_split={config.data.eval_split!r} of {config.data.name} gave no batches")
    return tasks.summarize(config.task, jax.device_get(totals))


def evaluate_model(config: ml_collections.ConfigDict, model: nnx.Module) -> dict[str, float]:
    """Evaluates ``model`` (e.g. from :func:`restore_model`) in evaluation mode (``model.eval()``,
    applied to a copy) on ``config``'s eval split."""
    config = ml_collections.ConfigDict(config)
    mesh = partitioning.make_mesh(config.mesh)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    evaluated = nnx.merge(graphdef, params, model_state)
    evaluated.eval()
    graphdef = nnx.graphdef(evaluated)
    return eval_metrics(
        config, make_eval_dataset(config), graphdef, params.to_pure_dict(), model_state.to_pure_dict(), mesh
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint) and evaluates."""
    started = time.perf_counter()
    config = ml_collections.ConfigDict(config)
    os.makedirs(workdir, exist_ok=True)
    task = config.task

    # --------------------------------------------------------------------------------------------
    # 2. Mesh
    # --------------------------------------------------------------------------------------------
    try:
        mesh = partitioning.make_mesh(config.mesh)
        rules = partitioning.logical_rules(config.get("sharding_rules"))
        check_config(config, mesh)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as error:
        raise ConfigError(str(error)) from error
    save_config(config, workdir)  # only a config that passed the checks replaces the workdir's
    log.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(), jax.devices()[0].platform)

    # --------------------------------------------------------------------------------------------
    # 3. Data
    # --------------------------------------------------------------------------------------------
    train_data = make_train_dataset(config)
    eval_data = make_eval_dataset(config)
    train_iter = train_data.iterator()
    global_shapes = {key: shape for key, (shape, _) in train_data.batch_spec(global_batch=True).items()}

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return to_global_batch(batch, mesh)

    # --------------------------------------------------------------------------------------------
    # 4. Model & optimizer, created sharded (see model_and_optimizer above)
    # --------------------------------------------------------------------------------------------
    spec = model_and_optimizer(config, mesh, rules)
    graphdef, tx, schedule, state_sharding = spec.graphdef, spec.tx, spec.schedule, spec.state_sharding
    eval_graphdef = spec.eval_graphdef
    init_state, abstract_model, num_params = spec.init_state, spec.abstract_model, spec.num_params
    replicated = partitioning.replicated(mesh)

    flops_per_example = tasks.example_flops(task, abstract_model, global_shapes)
    flops_per_step = 3.0 * flops_per_example * config.batch_size
    unit, units_per_step = tasks.units(task, global_shapes)

    # --------------------------------------------------------------------------------------------
    # 5. Train step
    # --------------------------------------------------------------------------------------------
    accum = config.grad_accum_steps
    batch_sharding = {key: partitioning.batch_sharding(mesh, len(shape)) for key, shape in global_shapes.items()}

    def loss_of(params, model_state, batch, normalizer):
        """Loss and metric sums; the model state after the forward pass (e.g. BatchNorm running
        averages) comes back with them."""
        model = nnx.merge(graphdef, params, model_state)
        sums = tasks.metric_sums(task, model, batch)
        total, _ = sums["loss"]
        _, _, new_model_state = nnx.split(model, nnx.Param, ...)
        return total / normalizer, (sums, new_model_state.to_pure_dict())

    @functools.partial(
        jax.jit,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    def train_step(state, batch):
        params = state["params"]
        normalizer = jnp.maximum(tasks.loss_weight(task, batch), 1.0)
        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if accum == 1:
            (loss, (sums, model_state)), grads = grad_fn(params, state["model_state"], batch, normalizer)
        else:
            # Micro-batch i holds rows i, i+accum, ...: every micro-batch stays sharded over the mesh.
            # Gradients, losses and metric sums add up; the model state threads through in order.
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch
            )

            def accumulate(carry, micro_batch):
                totals, model_state = carry
                (loss, (sums, model_state)), grads = grad_fn(params, model_state, micro_batch, normalizer)
                return (jax.tree.map(jnp.add, totals, (loss, sums, grads)), model_state), None

            (loss_shape, (sums_shape, _)), grad_shapes = jax.eval_shape(
                grad_fn, params, state["model_state"], jax.tree.map(lambda x: x[0], micro), normalizer
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, sums_shape, grad_shapes))
            ((loss, sums, grads), model_state), _ = jax.lax.scan(
                accumulate, (zeros, state["model_state"]), micro
            )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "rng": state["rng"],
            "model_state": model_state,
        }
        # A non-finite step leaves the state untouched; the host stops the run when it sees it.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        # The task's other metrics (accuracy; psnr and psnr_nearest for super_resolution) as means.
        means = {name: total / jnp.maximum(weight, 1.0) for name, (total, weight) in sums.items() if name != "loss"}
        metrics = {
            "loss": loss,
            **means,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "finite": finite,
        }
        return new_state, metrics

    # --------------------------------------------------------------------------------------------
    # 6. Checkpoints: resume from the workdir when it holds one
    # --------------------------------------------------------------------------------------------
    checkpoint_config = config.checkpoint
    checkpoints = Checkpoints(workdir, keep=checkpoint_config.keep, async_save=checkpoint_config.async_save)
    try:
        restored = checkpoints.restore(spec.abstract_state())
    except IncompatibleCheckpointError as error:
        checkpoints.close()
        raise ConfigError(str(error)) from error
    if restored is None:
        state = init_state()
        start_step = 0
        log.info("%s: %s parameters, starting from scratch in %s", config.model.name, format_count(num_params),
                 workdir)
    else:
        start_step, state, data_state = restored
        train_iter.set_state(data_state)
        log.info("resumed from the checkpoint at step %d in %s", start_step, workdir)

    # --------------------------------------------------------------------------------------------
    # 7. Eval
    # --------------------------------------------------------------------------------------------
    def evaluate(state) -> dict[str, float]:
        return eval_metrics(config, eval_data, eval_graphdef, state["params"], state["model_state"], mesh)

    # --------------------------------------------------------------------------------------------
    # 8. Loop
    # --------------------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, resume_step=start_step)
    peak = peak_flops_per_device(config.get("peak_flops_per_device"), config.dtype) * jax.device_count()
    throughput = Throughput(
        units_per_step=units_per_step, flops_per_step=flops_per_step, peak_flops=peak, first_step=start_step
    )
    stop_signal: dict[str, str | None] = {"name": None}

    def request_stop(signum, _frame):
        stop_signal["name"] = signal.Signals(signum).name

    previous_handlers = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous_handlers[signum] = signal.signal(signum, request_stop)
        except ValueError:  # not the main thread (e.g. some notebook runners): no signal handling
            pass

    log.info(
        "%s, %s, %s FLOPs/step (%s forward per example), %d steps of %d %s",
        config.model.name, config.task, format_count(flops_per_step), format_count(flops_per_example),
        config.num_steps, units_per_step, unit,
    )
    pending: list[tuple[int, dict]] = []
    train_summary: dict[str, float] = {}
    eval_summary: dict[str, float] = {}
    last_good_step = start_step
    step = start_step

    def drain_pending() -> dict[str, float]:
        """Fetches the queued step metrics; raises NonFiniteLossError on a NaN/Inf step."""
        nonlocal last_good_step
        fetched = jax.device_get(pending)
        pending.clear()
        for at, metrics in fetched:
            if not metrics["finite"]:
                raise NonFiniteLossError(
                    f"loss or gradients became non-finite at step {at} (loss={float(metrics['loss'])}, "
                    f"grad_norm={float(metrics['grad_norm'])}); stopped without saving. The newest good "
                    f"checkpoint is step {max(checkpoints.steps(), default=0)}. Lower "
                    "config.optimizer.learning_rate, raise warmup_steps or use float32, then rerun to resume."
                )
            last_good_step = at
        return {k: float(v) for k, v in fetched[-1][1].items() if k != "finite"} if fetched else {}

    def save(at: int):
        checkpoints.save(at, state, train_iter.get_state())

    early_stop = config.get("early_stop")

    def stop_early(at: int, summary: dict[str, float]) -> RunResult:
        writer.progress(
            f"early stop at step {at}: {early_stop.metric} {summary[early_stop.metric]:.4g} "
            f"{'>=' if early_stop.mode == 'max' else '<='} {early_stop.threshold} | " + _format_metrics(summary),
            final=True,
        )
        return RunResult(at, summary, train_summary, None, time.perf_counter() - started, early_stopped=True)

    try:
        if start_step and start_step < config.num_steps and early_stop is not None and early_stop.metric:
            # A rerun of an early-stopped run: its checkpoint still meets the condition; train no further.
            eval_summary = evaluate(state)
            if early_stop_reached(early_stop, eval_summary):
                return stop_early(step, eval_summary)
        loop_started = time.perf_counter()
        throughput.start(step)
        while step < config.num_steps:
            batch = next(train_iter)
            state, metrics = train_step(state, to_global(batch))
            step += 1
            pending.append((step, metrics))
            # At most two steps in flight: the host prepares batch n+1 while step n runs, but never
            # queues more, so a stop signal waits for one step, not for a log interval of them.
            if len(pending) >= 2:
                jax.block_until_ready(pending[-2][1])
            if step == start_step + 1:  # the first step compiled: time from here on
                jax.block_until_ready(state)
                log.info("first step (compile + run) took %.1f s", time.perf_counter() - loop_started)
                throughput.start(step)

            if step % config.log_every_steps == 0 or step == config.num_steps:
                train_summary = drain_pending()
                rates = throughput.measure(step)
                if rates:
                    train_summary.update(
                        {f"{unit}_per_s": rates["units_per_s"], "step_time_s": rates["step_time_s"],
                         "mfu": rates["mfu"]}
                    )
                writer.write(step, "train", train_summary)
                eta = (config.num_steps - step) * rates.get("step_time_s", float("nan"))
                writer.progress(
                    f"step {step}/{config.num_steps} | loss {train_summary['loss']:.4f} | "
                    f"{format_count(rates.get('units_per_s', float('nan')))} {unit}/s | "
                    f"{1e3 * rates.get('step_time_s', float('nan')):.1f} ms/step | "
                    f"MFU {100 * rates.get('mfu', float('nan')):.2f}% | ETA {format_duration(eta)}"
                )

            every = checkpoint_config.every_steps
            if stop_signal["name"] or (every and step % every == 0) or step == config.num_steps:
                drain_pending()  # never checkpoint a state produced after a non-finite step
                save(step)

            if stop_signal["name"]:
                checkpoints.wait()
                writer.progress(
                    f"stopped by {stop_signal['name']} at step {step}; checkpoint saved in {checkpoints.directory}. "
                    "Run the same command to resume.",
                    final=True,
                )
                return RunResult(step, {}, train_summary, stop_signal["name"], time.perf_counter() - started)

            if config.eval_every_steps and step % config.eval_every_steps == 0 and step != config.num_steps:
                eval_summary = evaluate(state)
                writer.write(step, "eval", eval_summary)
                if early_stop_reached(early_stop, eval_summary):
                    drain_pending()
                    if step not in checkpoints.steps():
                        save(step)
                    checkpoints.wait()
                    return stop_early(step, eval_summary)
                writer.progress(f"eval at step {step}: " + _format_metrics(eval_summary), final=True)
                throughput.start(step)

        eval_summary = evaluate(state)
        writer.write(step, "eval", eval_summary)
        headline = tasks.headline_metric(task)
        writer.progress(
            f"final eval at step {step}: {headline} {eval_summary[headline]:.4f} | " + _format_metrics(eval_summary),
            final=True,
        )
        return RunResult(step, eval_summary, train_summary, None, time.perf_counter() - started)
    finally:
        checkpoints.close()
        writer.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" if math.isfinite(value) else f"{name} {value}"
                     for name, value in sorted(metrics.items()))
