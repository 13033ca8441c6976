"""Orbax checkpoints of the train state and the data iterator position, with safe fallback.

Layout: ``workdir/checkpoints/<step>/{state,data}``. Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a killed save leaves no step behind. A step that is
complete on disk but fails to restore (truncated or corrupted files) is moved to
``workdir/checkpoints_corrupt/`` with a warning, and the previous step is restored instead:
nothing is deleted, and a later save of the same step cannot collide with the bad one.
"""

from __future__ import annotations

import collections
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("attnzoo.train")


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint holds a different train state (another model or optimizer)."""


def _array_signature(tree) -> collections.Counter:
    """The multiset of (shape, dtype) of a tree's arrays: what a checkpoint must match to restore."""
    return collections.Counter((tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


class Checkpoints:
    """Periodic (async) saves, keep-N, and restore of the newest good checkpoint.

    Args:
      workdir: run directory; checkpoints go to ``workdir/checkpoints``.
      keep: how many recent checkpoints to keep (``max_to_keep``).
      async_save: write in a background thread while training continues.
    """

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"config.checkpoint.keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.corrupt_directory = os.path.abspath(os.path.join(workdir, "checkpoints_corrupt"))
        self.keep = keep
        self.async_save = async_save
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=self.async_save, create=True
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None):
        """Saves ``state`` (a pytree of arrays) and the iterator state (JSON) at ``step``."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )
        self.manager.save(step, args=args, force=True)

    def wait(self):
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Restores the newest readable checkpoint (or ``step``) onto ``abstract_state``'s shardings.

        ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set, so a
        checkpoint written on any mesh restores onto this one. Returns ``(step, state, data_state)``
        or None when there is no checkpoint. Unreadable steps are moved aside with a warning.
        """
        candidates = self.steps() if step is None else [step]
        wanted = _array_signature(abstract_state)
        for candidate in reversed(candidates):
            try:
                saved = _array_signature(self.manager.item_metadata(candidate)["state"].tree)
            except Exception as error:  # noqa: BLE001 - unreadable metadata: this step is unusable
                if step is not None:
                    raise
                self._set_aside(candidate, error)
                continue
            if saved != wanted:
                raise IncompatibleCheckpointError(
                    f"the checkpoint at step {candidate} in {self.directory} holds a different train state than "
                    f"this config builds ({sum(saved.values())} arrays saved, {sum(wanted.values())} expected, "
                    "different shapes): it was written for another model or optimizer. Use a new --workdir, or "
                    "the config that wrote it."
                )
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
                state = restored["state"]
                jax.block_until_ready(state)
                return candidate, state, restored["data"]
            except Exception as error:  # noqa: BLE001 - any failure to read means this step is unusable
                if step is not None:
                    raise
                self._set_aside(candidate, error)
        return None

    def _set_aside(self, step: int, error: Exception):
        os.makedirs(self.corrupt_directory, exist_ok=True)
        target = os.path.join(self.corrupt_directory, f"{step}-{int(time.time())}")
        source = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.exists(source):
            os.replace(source, target)
        log.warning(
            "checkpoint at step %d could not be restored (%s: %s); moved it to %s and falling back to the "
            "previous checkpoint",
            step, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", target,
        )
        self.manager.close()
        self.manager = self._open()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
