"""The trainer: config -> mesh -> data -> model -> optimizer -> checkpoints.

>>> from attnzoo.train import train_and_evaluate, restore_model, evaluate_model
>>> result = train_and_evaluate(config, workdir)      # resumes from workdir's newest checkpoint
>>> model = restore_model(config, workdir)            # an nnx model with the checkpoint's parameters
>>> evaluate_model(config, model)                     # {"loss": ..., "accuracy": ...}
>>> config = load_config(workdir)                     # the config the run in workdir started with
"""

from attnzoo.train.train import (
    ConfigError,
    NonFiniteLossError,
    RunResult,
    evaluate_model,
    load_config,
    restore_model,
    train_and_evaluate,
)

__all__ = ["ConfigError", "NonFiniteLossError", "RunResult", "evaluate_model", "load_config", "restore_model", "train_and_evaluate"]
