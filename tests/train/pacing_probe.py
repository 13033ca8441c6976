"""Records when the trainer asks for each training batch, for tests/train/test_trainer.py.

:func:`register` (called by trainer_run.py's ``imports``) wraps the trainer's training iterator.
When the trainer asks for batch number ``PACING_PROBE_SIGNAL_AT`` (1-based), the process sends
itself SIGTERM before handing the batch over. It also wraps the trainer's checkpoint manager. At
exit it writes ``{"requests": [...], "saves": [...]}`` to the JSON file ``PACING_PROBE_OUTPUT``: the
``time.perf_counter()`` of each batch request, and ``[step, time]`` of each checkpoint save call
(the trainer calls ``save`` once the device has finished every dispatched step). Only the
trainer's subprocesses import this; pytest's own process never does.
"""

import atexit
import json
import os
import signal
import time

from attnzoo.train import train as trainer


class RecordingIterator:
    """Forwards ``next``, ``get_state`` and ``set_state`` to ``inner``; appends to ``requests``."""

    def __init__(self, inner, requests: list[float], signal_at: int):
        self.inner, self.requests, self.signal_at = inner, requests, signal_at

    def __iter__(self):
        return self

    def __next__(self):
        self.requests.append(time.perf_counter())
        if len(self.requests) == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


class RecordingDataset:
    """The trainer's dataset, whose ``iterator()`` records (every other attribute is forwarded)."""

    def __init__(self, inner, requests: list[float], signal_at: int):
        self.inner, self.requests, self.signal_at = inner, requests, signal_at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def iterator(self, **kwargs):
        return RecordingIterator(self.inner.iterator(**kwargs), self.requests, self.signal_at)


def register():
    requests: list[float] = []
    saves: list[tuple[int, float]] = []
    signal_at = int(os.environ["PACING_PROBE_SIGNAL_AT"])
    output = os.environ["PACING_PROBE_OUTPUT"]
    make_train_dataset = trainer.make_train_dataset

    def recording_train_dataset(config):
        return RecordingDataset(make_train_dataset(config), requests, signal_at)

    class RecordingCheckpoints(trainer.Checkpoints):
        def save(self, step, *args, **kwargs):
            saves.append((step, time.perf_counter()))
            return super().save(step, *args, **kwargs)

    def write():
        with open(output, "w") as f:
            json.dump({"requests": requests, "saves": saves}, f)

    trainer.make_train_dataset = recording_train_dataset
    trainer.Checkpoints = RecordingCheckpoints
    atexit.register(write)
