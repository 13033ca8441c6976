"""A byte-level text corpus: the ``.py`` sources of the running Python's standard library.

Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``, test
directories (``test``, ``tests``, ``idle_test``), ``__pycache__``, the build-specific
``config-*`` directory and ``_sysconfigdata*`` modules; sorted by relative POSIX path. A file goes to
``validation`` when the first 8 bytes of ``sha256(relative path)`` as a big-endian integer are
``< 5%`` of 2**64 (about 5% of files), else to ``train``: the split is a pure function of the path.

Each split's byte stream is its files' raw bytes in path order, each followed by the separator
byte 0 (``SEPARATOR``). Record i of the split is ``stream[i*WINDOW : i*WINDOW + WINDOW + 1]``
(``bytes``: uint8 [4097]: a window of 4096 bytes plus the byte after it, stride 4096), for every i
with a full record; the tail shorter than a record is dropped. Any ``seq_len`` dividing 4096 is
then served by random access: example j of length T -> record ``j // (4096 // T)``, bytes
``[(j % k) * T, (j % k) * T + T + 1)``.

The contents depend on the Python version: the builder records it in ``info.metadata``
(``python_version``, ``stdlib_dir``, file and byte counts per split).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from attnzoo.train.datasets._base import ArrayRecordBuilder

WINDOW = 4096
SEPARATOR = 0
VALIDATION_FRACTION = 0.05
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files under ``root`` (default :func:`stdlib_dir`), sorted."""
    root = stdlib_dir() if root is None else root
    if not os.path.isdir(root):
        raise FileNotFoundError(f"python_stdlib_text: standard-library directory {root!r} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for filename in filenames:
            if filename.endswith(".py") and not filename.startswith("_sysconfigdata"):
                rel = os.path.relpath(os.path.join(dirpath, filename), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def split_of(relpath: str) -> str:
    """``"validation"`` for about 5% of paths (by sha256 of the path), else ``"train"``."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return "validation" if h < VALIDATION_FRACTION * 2**64 else "train"


def byte_stream(relpaths: list[str], root: str | None = None) -> bytes:
    """The files' bytes in the given order, each followed by the separator byte 0."""
    root = stdlib_dir() if root is None else root
    parts = []
    for rel in relpaths:
        with open(os.path.join(root, rel), "rb") as f:
            parts.append(f.read())
        parts.append(bytes([SEPARATOR]))
    return b"".join(parts)


def windows(stream: bytes, window: int = WINDOW) -> np.ndarray:
    """uint8 [num_records, window + 1]: record i = ``stream[i*window : i*window + window + 1]``."""
    data = np.frombuffer(stream, dtype=np.uint8)
    num = max(0, (len(data) - 1) // window)
    starts = np.arange(num)[:, None] * window + np.arange(window + 1)[None, :]
    return data[starts] if num else np.zeros((0, window + 1), np.uint8)


class PythonStdlibText(ArrayRecordBuilder):
    """Byte windows of the Python standard library sources (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        version = platform.python_version()
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Byte windows (uint8 [{WINDOW + 1}] = {WINDOW} bytes + the next, stride {WINDOW}) "
                f"of the .py files of the Python {version} standard library (no tests, no "
                "site-packages), files joined with byte 0; ~5% of files (by path hash) in "
                "validation."
            ),
            features=tfds.features.FeaturesDict(
                {"bytes": tfds.features.Tensor(shape=(WINDOW + 1,), dtype=np.uint8)}
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                python_version=version,
                implementation=platform.python_implementation(),
                stdlib_dir=stdlib_dir(),
                window=WINDOW,
                separator=SEPARATOR,
                vocab_size=256,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        files = list_files()
        by_split = {"train": [], "validation": []}
        for rel in files:
            by_split[split_of(rel)].append(rel)
        generators = {}
        for split, relpaths in by_split.items():
            stream = byte_stream(relpaths)
            self.info.metadata[f"{split}_num_files"] = len(relpaths)
            self.info.metadata[f"{split}_num_bytes"] = len(stream)
            generators[split] = self._generate_examples(stream)
        return generators

    def _generate_examples(self, stream):
        for i, record in enumerate(windows(stream)):
            yield i, {"bytes": record}
