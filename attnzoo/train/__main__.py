"""Command line: ``python -m attnzoo.train --config attnzoo/configs/NAME.py[:arg] --workdir DIR [--config.key=value]``.

Exit status: 0 when the run finished or stopped cleanly on SIGTERM/SIGINT (checkpoint saved;
rerun the command to resume), 1 when the loss became non-finite, 2 for a bad config.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an attnzoo config file (.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # library INFO logs (Orbax, TFDS) stay quiet
    logging.getLogger("attnzoo.train").setLevel(logging.INFO)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    from attnzoo.train.train import ConfigError, NonFiniteLossError, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from attnzoo.runtime import reexec_with_hugepages

    reexec_with_hugepages()  # XLA:CPU's per-step buffers without page faults; ATTNZOO_HUGEPAGES=0 opts out
    app.run(main)
