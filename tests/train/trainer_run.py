"""Runs the trainer (or a restore) in a fresh process for tests/train/test_trainer.py.

Usage: ``python trainer_run.py JSON`` where JSON holds:
  devices: number of simulated CPU devices (sets XLA_FLAGS before JAX is imported)
  action: "train" | "restore"
  workdir, overrides (dotted config keys -> values), config (a config file name, default mqar),
  dump: optional path of an .npz to write the final (or restored) parameters to,
  imports: optional module names (importable from this directory) to import first; a module's
  ``register()``, if it has one, is called (sr_standin registers a test-only model so).
Prints one JSON line ``RESULT {...}`` at the end.
"""

import json
import os
import sys

spec = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec.get('devices', 1)}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib  # noqa: E402
import logging  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from attnzoo.train import restore_model, train_and_evaluate  # noqa: E402
from attnzoo.train.train import ConfigError, NonFiniteLossError  # noqa: E402


def build_config(spec):
    module = importlib.import_module(f"attnzoo.configs.{spec.get('config', 'mqar')}")
    config = module.get_config()
    for dotted, value in spec.get("overrides", {}).items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def dump_params(model, path):
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
    np.savez(path, **{jax.tree_util.keystr(key): np.asarray(jax.device_get(value)) for key, value in flat})


def main():
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    logging.getLogger("attnzoo.train").setLevel(logging.INFO)
    jax.config.update("jax_log_compiles", True)  # "Compiling ..." on stderr: tests check when it happens
    for name in spec.get("imports", []):
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register()
    config = build_config(spec)
    result = {"devices": jax.device_count()}
    try:
        if spec["action"] == "train":
            run = train_and_evaluate(config, spec["workdir"])
            result.update(step=run.step, eval=run.eval_metrics, train=run.train_metrics,
                          stopped_by_signal=run.stopped_by_signal, seconds=run.seconds,
                          early_stopped=run.early_stopped)
    except ConfigError as error:
        result.update(config_error=str(error))
    except NonFiniteLossError as error:
        result.update(nonfinite_error=str(error))
    if spec.get("dump"):  # the newest checkpoint, also after a stopped run
        dump_params(restore_model(config, spec["workdir"]), spec["dump"])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
