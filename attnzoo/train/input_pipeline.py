"""Data for the trainer: TFDS array_record sources -> grain -> per-host numpy batches.

TensorFlow is never needed: datasets are read with ``builder.as_data_source()`` (array_record) and
decoded by TFDS in numpy (images via PIL). The three embedded datasets (:mod:`attnzoo.train.datasets`:
``mqar``, ``python_stdlib_text``, ``digits``) are built on first use; any other TFDS dataset must
already be prepared as array_record in ``data_dir``.

Batches (numpy dicts; B = the local batch, ``global_batch_size // process_count``):

``task="lm"`` (byte level, vocabulary 256)
  ``inputs`` int32 [B,T], ``targets`` int32 [B,T] (the next byte), ``mask`` float32 [B,T] (1 where
  the target is a real byte; 0 on padding).
``task="mqar"``
  ``inputs`` int32 [B,T], ``targets`` int32 [B,T] (the stored label, with -100 replaced by 0),
  ``mask`` float32 [B,T] (1 where the stored label is not -100, i.e. at the queries).
``task="classification"``
  ``image`` float32 [B,H,W,C] (pixels / pixel_max, then ``(x - mean) / std``), ``label`` int32 [B];
  with ``drop_remainder=False`` also ``weight`` float32 [B] (1 for real examples, 0 for padding).
``task="super_resolution"`` (option ``scale`` = s, an int >= 2 dividing H and W)
  ``image`` float32 [B,H,W,C], the high-resolution target: pixels / pixel_max, in [0, 1] (no
  mean/std: super-resolution models take [0, 1] images); ``lowres`` float32 [B,H/s,W/s,C], the
  model input: the area (box) average of every s x s block of ``image``, so ``lowres[i, j] =
  mean(image[i*s:(i+1)*s, j*s:(j+1)*s])``; with ``drop_remainder=False`` also ``weight`` float32
  [B] as for classification. Option ``flip`` (default False) augments the pair: a random horizontal
  flip and a random rotation by a multiple of 90 degrees (0 or 180 degrees for non-square images),
  applied to the target before it is averaged (the block grid maps onto itself, so ``lowres`` is
  the same transform of the unaugmented ``lowres``).

With ``drop_remainder=False`` (eval) the last batch is completed with padding rows whose every field
is 0, so ``mask`` / ``weight`` is 0 on them and every example is counted exactly once.

Order and sharding: source -> seeded shuffle (a new permutation each epoch) -> repeat ->
per-example preprocessing (random augmentation seeded by the global example index) -> global
batches; host ``p`` of ``P`` takes rows ``[p*B, (p+1)*B)`` of every global batch, so the global
batches do not depend on the number of processes. :meth:`Pipeline.iterator` returns a grain
iterator whose ``get_state()`` is a JSON-serialisable dict; ``set_state`` resumes with exactly the
next batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from attnzoo.train import datasets as embedded_datasets
from attnzoo.train.datasets import python_stdlib_text
from attnzoo.train.datasets._base import is_prepared

TASKS = ("lm", "mqar", "classification", "super_resolution")
EMBEDDED = embedded_datasets.EMBEDDED
IGNORE_LABEL = -100
TEXT_WINDOW = python_stdlib_text.WINDOW

_TASK_OPTIONS = {
    "lm": {"text_key": "text"},
    "mqar": {},
    "classification": {
        "image_key": "image",
        "label_key": "label",
        "mean": 0.5,
        "std": 0.5,
        "pixel_max": None,
        "augment": None,
        "crop_fraction": 0.875,
        "resize_method": "nearest",
    },
    "super_resolution": {
        "image_key": "image",
        "scale": 2,
        "pixel_max": None,
        "flip": False,
    },
}
_RESIZE_METHODS = ("nearest", "bilinear")


# ----------------------------------------------------------------------------------------------
# Sources.


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def dataset_base_name(name: str) -> str:
    """``"mqar/v256_t64_kv8:1.0.0"`` -> ``"mqar"``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (a TFDS dataset name), got {name!r}")
    return re.split(r"[/:]", name, maxsplit=1)[0]


def _split_base(split: str) -> str:
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty str such as 'train', got {split!r}")
    return re.split(r"[\[+]", split, maxsplit=1)[0]


def _prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"Prepare it as array_record in an environment with TensorFlow installed:\n"
        f"    tfds build {dataset_base_name(name)} --file_format=array_record --data_dir {data_dir}\n"
        f"(manual-download datasets such as imagenet2012 also need --manual_dir), then point "
        f"config.data.data_dir (or $TFDS_DATA_DIR) at that directory. Reading needs no TensorFlow."
    )


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
    """Serialises building an embedded dataset among processes of this machine (fcntl lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f".attnzoo_build_{dataset_base_name(name)}.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared builder of ``name`` in ``data_dir`` (embedded datasets are built if missing)."""
    base = dataset_base_name(name)
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if base in EMBEDDED:
        builder = tfds.builder(name, data_dir=data_dir)
        if not is_prepared(builder):
            with _build_lock(data_dir, name):
                builder = tfds.builder(name, data_dir=data_dir)
                builder.download_and_prepare()
        built_with = (builder.info.metadata or {}).get("python_version")
        if base == "python_stdlib_text" and built_with != platform.python_version():
            logging.warning(
                "python_stdlib_text in %s was built from the Python %s standard library; this is "
                "Python %s (the data is that of the build)", data_dir, built_with, platform.python_version()
            )
        return builder
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is neither a known TFDS builder nor prepared in data_dir "
            f"{data_dir!r}. " + _prepare_hint(name, data_dir)
        ) from e
    if not is_prepared(builder):
        root = os.path.join(data_dir, base)
        found = sorted(str(p.relative_to(data_dir)) for p in _dataset_info_dirs(root))
        seen = f" Found other versions/configs: {found}." if found else ""
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r} (looked for "
            f"{os.fspath(builder.data_path)}).{seen} " + _prepare_hint(name, data_dir)
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise ValueError(
            f"TFDS dataset {name!r} in {os.fspath(builder.data_path)} is stored as "
            f"{sorted(formats) or 'an unknown format'}, but reading it without TensorFlow needs "
            f"array_record. Rebuild it with --file_format=array_record:\n"
            f"    tfds build {base} --file_format=array_record --data_dir {data_dir}"
        )
    return builder


def _dataset_info_dirs(root: str):
    root = epath.Path(root)
    if not root.exists():
        return []
    return [p.parent for p in root.glob("**/dataset_info.json")]


def _check_split(builder, name: str, split: str) -> None:
    base = _split_base(split)
    available = list(builder.info.splits)
    if base not in available:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {base!r} (from split={split!r}); available: "
            f"{available}"
        )


def check_dataset_available(name: str, split: str, data_dir: str | None = None) -> int:
    """Checks (cheaply) that ``split`` of ``name`` can be read from ``data_dir``.

    Embedded datasets are built if missing; other datasets are only looked up. Returns the number
    of examples in the split. Raises FileNotFoundError (not prepared, with the command that
    prepares it) or ValueError (not array_record, unknown split).
    """
    builder = _get_builder(name, data_dir)
    _check_split(builder, name, split)
    return int(builder.info.splits[split].num_examples)


def get_data_source(name: str, split: str, data_dir: str | None = None) -> Sequence[dict]:
    """The random-access source of ``split`` of TFDS dataset ``name``: ``src[i]`` is a dict of
    numpy features (decoded without TensorFlow), ``len(src)`` the number of examples.

    ``data_dir`` defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``. The embedded datasets
    (``mqar[/config]``, ``python_stdlib_text``, ``digits``) are built there on first use; others
    must be prepared as array_record (see :func:`check_dataset_available` for the errors).
    """
    builder = _get_builder(name, data_dir)
    _check_split(builder, name, split)
    return builder.as_data_source(split=split)


class _Source:
    """A grain random-access source over a TFDS data source, with batched reads."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        return self._source[int(index)]

    def _getitems(self, indices: Sequence[int]):
        return list(self._source.__getitems__([int(i) for i in indices]))

    def __repr__(self) -> str:
        return f"_Source(len={len(self)})"


class _WindowSource(_Source):
    """Example j -> bytes ``[(j % k)*T, (j % k)*T + T + 1)`` of record ``j // k``, ``k = W // T``.

    Over records ``bytes`` uint8 [W + 1] (W bytes and the next one); yields ``{"tokens": uint8
    [T + 1]}``.
    """

    def __init__(self, source, seq_len: int, window: int):
        super().__init__(source)
        self._seq_len = seq_len
        self._per_record = window // seq_len

    def __len__(self) -> int:
        return len(self._source) * self._per_record

    def _cut(self, record, index: int):
        offset = (index % self._per_record) * self._seq_len
        return {"tokens": record["bytes"][offset : offset + self._seq_len + 1]}

    def __getitem__(self, index: int):
        index = int(index)
        return self._cut(self._source[index // self._per_record], index)

    def _getitems(self, indices: Sequence[int]):
        indices = [int(i) for i in indices]
        records = self._source.__getitems__([i // self._per_record for i in indices])
        return [self._cut(r, i) for r, i in zip(records, indices)]


# ----------------------------------------------------------------------------------------------
# Per-example preprocessing (module-level classes: picklable for grain worker processes).


class _LmFromTokens:
    """``{"tokens": [T+1]}`` -> inputs / targets int32 [T], mask float32 [T] of ones."""

    def __call__(self, example):
        tokens = np.asarray(example["tokens"], np.int32)
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "mask": np.ones(tokens.shape[0] - 1, np.float32),
        }


class _LmFromText:
    """A text example -> ``0 + utf8 bytes + 0`` truncated / zero-padded to T+1 -> inputs / targets
    int32 [T], mask float32 [T] (1 where the target is part of the text or its closing 0)."""

    def __init__(self, seq_len: int, text_key: str):
        self.seq_len = seq_len
        self.text_key = text_key

    def __call__(self, example):
        text = example[self.text_key]
        if isinstance(text, np.ndarray):
            text = text.item()
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"lm: feature {self.text_key!r} must be text, got {type(text).__name__}")
        data = np.frombuffer(b"\0" + bytes(text) + b"\0", np.uint8)[: self.seq_len + 1]
        tokens = np.zeros(self.seq_len + 1, np.int32)
        tokens[: data.size] = data
        mask = np.zeros(self.seq_len, np.float32)
        mask[: data.size - 1] = 1.0
        return {"inputs": tokens[:-1], "targets": tokens[1:], "mask": mask}


class _Mqar:
    """``{"inputs", "labels"}`` int32 [T] -> inputs, targets (labels, -100 -> 0), mask float32."""

    def __call__(self, example):
        labels = np.asarray(example["labels"], np.int32)
        keep = labels != IGNORE_LABEL
        return {
            "inputs": np.asarray(example["inputs"], np.int32),
            "targets": np.where(keep, labels, 0).astype(np.int32),
            "mask": keep.astype(np.float32),
        }


def _resize(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """uint8/float [h,w,C] -> [height,width,C]; nearest (numpy) or bilinear (PIL, uint8 only)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if method == "bilinear" and image.dtype == np.uint8 and image.shape[2] in (1, 3, 4):
        import PIL.Image

        pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((width, height), resample=PIL.Image.BILINEAR))
        return out.reshape(height, width, image.shape[2])
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return image[rows][:, cols]


class _Classify:
    """An image example -> ``{"image": float32 [H,W,C], "label": int32 []}`` (+ ``weight``).

    With ``image_size``: the image is resized (keeping its aspect ratio) so that it covers
    ``image_size / crop_fraction`` and cropped to ``image_size``: at the centre, or at a random
    place with a random horizontal flip when ``augment``. An image already of size ``image_size``
    is left alone unless ``augment``.
    """

    def __init__(self, *, image_size, mean, std, pixel_max, augment, crop_fraction, resize_method,
                 image_key, label_key, with_weight):
        self.image_size = image_size
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.pixel_max = float(pixel_max)
        self.augment = augment
        self.crop_fraction = crop_fraction
        self.resize_method = resize_method
        self.image_key = image_key
        self.label_key = label_key
        self.with_weight = with_weight

    def _geometry(self, image: np.ndarray, rng) -> np.ndarray:
        if self.image_size is None or (image.shape[:2] == self.image_size and not self.augment):
            return image
        th, tw = self.image_size
        h, w = image.shape[:2]
        scale = max(th / h, tw / w) / self.crop_fraction
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        image = _resize(image, rh, rw, self.resize_method)
        if self.augment:
            top = int(rng.integers(0, rh - th + 1))
            left = int(rng.integers(0, rw - tw + 1))
        else:
            top, left = (rh - th) // 2, (rw - tw) // 2
        image = image[top : top + th, left : left + tw]
        if self.augment and rng.random() < 0.5:
            image = image[:, ::-1]
        return image

    def __call__(self, example, rng=None):
        image = np.asarray(example[self.image_key])
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"classification: {self.image_key!r} must be [H,W,C], got shape {image.shape}")
        image = self._geometry(image, rng)
        x = image.astype(np.float32) / self.pixel_max
        x = (x - self.mean) / self.std
        out = {"image": np.ascontiguousarray(x, np.float32), "label": np.asarray(example[self.label_key], np.int32)}
        if self.with_weight:
            out["weight"] = np.float32(1.0)
        return out


def box_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    """float [H,W,C] -> float32 [H/scale, W/scale, C]: the mean of every scale x scale block."""
    h, w, c = image.shape
    blocks = np.asarray(image, np.float32).reshape(h // scale, scale, w // scale, scale, c)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


class _SuperResolve:
    """An image example -> ``{"image": float32 [H,W,C] in [0,1], "lowres": float32 [H/s,W/s,C]}``
    (+ ``weight``); see the module docstring. With ``flip`` (as a ``random_map`` transform, ``rng``
    given) the target is randomly flipped / rotated first."""

    def __init__(self, *, scale, pixel_max, flip, image_key, with_weight):
        self.scale = scale
        self.pixel_max = float(pixel_max)
        self.flip = flip
        self.image_key = image_key
        self.with_weight = with_weight

    def __call__(self, example, rng=None):
        image = np.asarray(example[self.image_key])
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"super_resolution: {self.image_key!r} must be [H,W,C], got shape {image.shape}")
        h, w = image.shape[:2]
        if h % self.scale or w % self.scale:
            raise ValueError(
                f"super_resolution: option scale={self.scale} must divide the image height and width, "
                f"got an image of {h}x{w}"
            )
        if self.flip:
            if rng.random() < 0.5:
                image = image[:, ::-1]
            turns = int(rng.integers(0, 4)) if h == w else 2 * int(rng.integers(0, 2))
            image = np.rot90(image, turns, axes=(0, 1))
        x = np.ascontiguousarray(image, np.float32) / np.float32(self.pixel_max)
        out = {"image": x, "lowres": box_downsample(x, self.scale)}
        if self.with_weight:
            out["weight"] = np.float32(1.0)
        return out


# ----------------------------------------------------------------------------------------------
# Index-level datasets: padding and per-host global-batch rows.


class _PadToMultiple(grain.MapDataset):
    """Extends the parent to a multiple of ``multiple`` with all-zero copies of element 0."""

    def __init__(self, parent: grain.MapDataset, multiple: int):
        super().__init__(parent)
        self._real = len(parent)
        self._length = math.ceil(self._real / multiple) * multiple
        self._pad = None

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"_PadToMultiple(real={self._real}, length={self._length})"

    def _padding(self):
        if self._pad is None:
            self._pad = {k: np.zeros_like(v) for k, v in self._parent[0].items()}
        return self._pad

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[index] if index < self._real else self._padding()

    def _getitems(self, indices):
        real = [i for i in indices if i < self._real]
        got = iter(self._parent._getitems(real) if real else [])
        return [next(got) if i < self._real else self._padding() for i in indices]


class _HostBatches(grain.MapDataset):
    """Element ``step``: rows ``[p*b, (p+1)*b)`` of global batch ``step`` (b = B / P), stacked."""

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local
        self._length = len(parent) // global_batch_size

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"_HostBatches(global={self._global}, local={self._local}, offset={self._offset})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = index * self._global + self._offset
        rows = self._parent._getitems(list(range(start, start + self._local)))
        try:
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        except ValueError as e:
            shapes = {k: sorted({np.shape(r[k]) for r in rows}) for k in rows[0]}
            raise ValueError(
                f"make_dataset: examples of batch {index} differ in shape ({shapes}); for images of "
                f"varying size pass image_size"
            ) from e


# ----------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """Per-host batches of one dataset split; see the module docstring for the batch fields.

    Attributes:
      dataset: ``grain.MapDataset`` of this host's batches: ``dataset[step]`` is batch ``step``.
      num_examples: examples in one epoch of the split (for windowed text: ``seq_len`` windows).
      num_batches: batches over all epochs (``None``: repeats forever); also ``len(pipeline)``.
      padded: whether the last batch may hold padding rows (``drop_remainder=False``).
      vocab_size: token vocabulary for ``lm`` / ``mqar``; ``num_classes`` for ``classification``.
    """

    dataset: grain.MapDataset
    name: str
    split: str
    task: str
    global_batch_size: int
    local_batch_size: int
    process_index: int
    process_count: int
    num_examples: int
    num_epochs: int | None
    num_batches: int | None
    padded: bool
    seq_len: int | None = None
    image_size: tuple[int, int] | None = None
    vocab_size: int | None = None
    num_classes: int | None = None
    worker_count: int = 0

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"Pipeline({self.name!r}, {self.split!r}) repeats forever (num_epochs=None): no len()")
        return self.num_batches

    def iterator(self, *, num_threads: int = 2, prefetch_buffer_size: int = 4) -> grain.DatasetIterator:
        """A new iterator from the first batch, prefetching ``prefetch_buffer_size`` batches in
        ``num_threads`` threads (and in ``worker_count`` processes if > 0).

        ``it.get_state()`` is a JSON-serialisable dict; ``it.set_state(state)`` on any iterator of
        an identical pipeline resumes with the batch that followed when the state was taken.
        """
        ds = self.dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
        )
        if self.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():
                # grain's worker processes read absl flags; outside an absl app, take defaults.
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return iter(ds)

    def batch_spec(self, *, global_batch: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{field: (shape, dtype)}`` of a local (or global) batch, read from batch 0."""
        batch = self.dataset[0]
        rows = self.global_batch_size if global_batch else self.local_batch_size
        return {k: ((rows,) + v.shape[1:], v.dtype) for k, v in batch.items()}


def _check_int(name: str, value, minimum: int, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"make_dataset: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"make_dataset: {name} must be >= {minimum}, got {value}")
    return int(value)


def _image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in image_size)
    ):
        raise ValueError(f"make_dataset: image_size must be a positive int or (height, width), got {image_size!r}")
    return (int(image_size[0]), int(image_size[1]))


def _task_options(task: str, options: dict) -> dict:
    allowed = _TASK_OPTIONS[task]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"make_dataset: unknown option(s) {unknown} for task {task!r}; allowed: {sorted(allowed)}"
        )
    return {**allowed, **options}


def _features(source) -> dict:
    info = getattr(source, "dataset_info", None)
    return dict(info.features) if info is not None and info.features is not None else {}


def _super_resolution(name, options, features, metadata, image_size, *, with_weight):
    """Checks the ``super_resolution`` options; returns ``(transform, random_transform)``."""
    image_key = options["image_key"]
    if image_key not in features:
        raise ValueError(
            f"make_dataset: task 'super_resolution' needs feature {image_key!r} (option image_key) in "
            f"{name!r}; its features are {sorted(features)}"
        )
    if image_size is not None:
        raise ValueError(
            f"make_dataset: task 'super_resolution' takes the stored image size; image_size must be None, "
            f"got {image_size!r}"
        )
    scale = options["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 2:
        raise ValueError(f"make_dataset: option scale must be an int >= 2, got {scale!r}")
    shape = getattr(features[image_key], "shape", None)
    if shape is not None and len(shape) >= 2:
        h, w = shape[0], shape[1]
        if h is not None and w is not None and (h % scale or w % scale):
            raise ValueError(
                f"make_dataset: option scale must divide the image height and width of {name!r} "
                f"({h}x{w}), got scale={scale}"
            )
    pixel_max = options["pixel_max"]
    if pixel_max is None:
        pixel_max = metadata.get("pixel_max", 255)
    if isinstance(pixel_max, bool) or not isinstance(pixel_max, (int, float)) or pixel_max <= 0:
        raise ValueError(f"make_dataset: pixel_max must be a positive number, got {pixel_max!r}")
    flip = options["flip"]
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"make_dataset: option flip must be a bool, got {flip!r}")
    transform = _SuperResolve(scale=int(scale), pixel_max=pixel_max, flip=bool(flip), image_key=image_key,
                              with_weight=with_weight)
    return (None, transform) if flip else (transform, None)


def make_dataset(
    *,
    name: str,
    split: str,
    task: str,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    seq_len: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    data_dir: str | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    **task_options: Any,
) -> Pipeline:
    """Builds this host's batches of ``split`` of TFDS dataset ``name`` for ``task``.

    Args:
      name: TFDS name, e.g. ``"mqar/v256_t64_kv8"``, ``"python_stdlib_text"``, ``"digits"``,
        ``"cifar10"``, ``"imagenet2012"``, ``"lm1b"``.
      split: TFDS split, e.g. ``"train"``, ``"test"``, ``"validation"``, ``"train[:90%]"``.
      task: ``"lm"``, ``"mqar"``, ``"classification"`` or ``"super_resolution"`` (batch fields in
        the module docstring).
      global_batch_size: rows of a global batch, divisible by ``process_count``.
      seed: int in [0, 2**32): the shuffle permutation (per epoch) and augmentation randomness.
      shuffle: shuffle the examples (a different permutation each epoch).
      num_epochs: passes over the split; ``None`` repeats forever (training).
      process_index, process_count: this host and the number of hosts (``jax.process_index()``,
        ``jax.process_count()``).
      seq_len: tokens per example (``lm``: required; windowed text needs ``4096 % seq_len == 0``;
        ``mqar``: optional, must equal the stored length).
      image_size: ``classification``: resize/crop to this (int or (H, W)); ``None`` keeps the
        stored size (which must then be fixed). ``super_resolution`` takes the stored size: must
        be ``None``.
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      drop_remainder: drop the last partial global batch; ``False`` pads it (eval), adding
        ``weight`` for classification.
      worker_count: grain worker processes (0: threads of this process only).
      **task_options: ``lm``: ``text_key="text"`` (for per-example text datasets such as lm1b).
        ``classification``: ``mean=0.5``, ``std=0.5`` (scalars or per channel), ``pixel_max``
        (default 16 for digits, else 255), ``augment`` (default: ``shuffle and image_size is not
        None``; random crop + horizontal flip), ``crop_fraction=0.875``,
        ``resize_method="nearest"`` (or ``"bilinear"``), ``image_key="image"``,
        ``label_key="label"``. ``super_resolution``: ``scale=2`` (int >= 2 dividing H and W),
        ``pixel_max`` (as for classification), ``flip=False`` (random flip + 90-degree rotations
        of the pair), ``image_key="image"``.

    Returns:
      A :class:`Pipeline`; ``pipeline.iterator()`` yields the batches.
    """
    if task not in TASKS:
        raise ValueError(f"make_dataset: task must be one of {TASKS}, got {task!r}")
    options = _task_options(task, task_options)
    global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
    process_count = _check_int("process_count", process_count, 1)
    process_index = _check_int("process_index", process_index, 0)
    if process_index >= process_count:
        raise ValueError(f"make_dataset: process_index must be < process_count ({process_count}), got {process_index}")
    if global_batch_size % process_count:
        raise ValueError(
            f"make_dataset: global_batch_size ({global_batch_size}) must be divisible by "
            f"process_count ({process_count})"
        )
    seed = _check_int("seed", seed, 0)
    if seed >= 2**32:
        raise ValueError(f"make_dataset: seed must be < 2**32, got {seed}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"make_dataset: shuffle must be a bool, got {shuffle!r}")
    num_epochs = _check_int("num_epochs", num_epochs, 1, allow_none=True)
    seq_len = _check_int("seq_len", seq_len, 1, allow_none=True)
    image_size = _image_size(image_size)
    worker_count = _check_int("worker_count", worker_count, 0)
    if task == "lm" and seq_len is None:
        raise ValueError("make_dataset: task 'lm' needs seq_len (tokens per example), got None")

    raw = get_data_source(name, split, data_dir)
    features = _features(raw)
    metadata = dict(raw.dataset_info.metadata or {}) if getattr(raw, "dataset_info", None) else {}
    vocab_size = num_classes = None
    transform = None
    random_transform = None

    if task == "lm":
        vocab_size = 256
        if "bytes" in features and "window" in metadata:
            window = int(metadata["window"])
            if window % seq_len:
                raise ValueError(
                    f"make_dataset: seq_len must divide the stored window of {window} bytes for "
                    f"{name!r}, got seq_len={seq_len}"
                )
            source = _WindowSource(raw, seq_len, window)
            transform = _LmFromTokens()
        elif options["text_key"] in features:
            source = _Source(raw)
            transform = _LmFromText(seq_len, options["text_key"])
        else:
            raise ValueError(
                f"make_dataset: task 'lm' needs byte windows ('bytes') or a text feature "
                f"(text_key={options['text_key']!r}) in {name!r}; its features are {sorted(features)}"
            )
    elif task == "mqar":
        if not {"inputs", "labels"} <= set(features):
            raise ValueError(
                f"make_dataset: task 'mqar' needs features 'inputs' and 'labels' in {name!r}; its "
                f"features are {sorted(features)}"
            )
        stored = features["inputs"].shape[0]
        if seq_len is not None and seq_len != stored:
            raise ValueError(
                f"make_dataset: {name!r} stores sequences of {stored} tokens, got seq_len={seq_len}"
            )
        seq_len = stored
        vocab_size = int(metadata.get("vocab_size", 0)) or None
        source = _Source(raw)
        transform = _Mqar()
    elif task == "super_resolution":
        transform, random_transform = _super_resolution(name, options, features, metadata, image_size,
                                                        with_weight=not drop_remainder)
        source = _Source(raw)
    else:
        image_key, label_key = options["image_key"], options["label_key"]
        if not {image_key, label_key} <= set(features):
            raise ValueError(
                f"make_dataset: task 'classification' needs features {image_key!r} and "
                f"{label_key!r} in {name!r}; its features are {sorted(features)}"
            )
        num_classes = getattr(features[label_key], "num_classes", None)
        if options["resize_method"] not in _RESIZE_METHODS:
            raise ValueError(
                f"make_dataset: resize_method must be one of {_RESIZE_METHODS}, got {options['resize_method']!r}"
            )
        crop_fraction = options["crop_fraction"]
        if not isinstance(crop_fraction, (int, float)) or not 0 < crop_fraction <= 1:
            raise ValueError(f"make_dataset: crop_fraction must be in (0, 1], got {crop_fraction!r}")
        pixel_max = options["pixel_max"]
        if pixel_max is None:
            pixel_max = metadata.get("pixel_max", 255)
        if not isinstance(pixel_max, (int, float)) or pixel_max <= 0:
            raise ValueError(f"make_dataset: pixel_max must be a positive number, got {pixel_max!r}")
        augment = options["augment"]
        if augment is None:
            augment = shuffle and image_size is not None
        std = np.asarray(options["std"], np.float32)
        if np.any(std <= 0):
            raise ValueError(f"make_dataset: std must be positive, got {options['std']!r}")
        classify = _Classify(
            image_size=image_size,
            mean=options["mean"],
            std=options["std"],
            pixel_max=pixel_max,
            augment=bool(augment),
            crop_fraction=float(crop_fraction),
            resize_method=options["resize_method"],
            image_key=image_key,
            label_key=label_key,
            with_weight=not drop_remainder,
        )
        if augment:
            random_transform = classify
        else:
            transform = classify
        source = _Source(raw)

    num_examples = len(source)
    if num_examples == 0:
        raise ValueError(f"make_dataset: split {split!r} of {name!r} is empty")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if random_transform is not None:
        augment_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
        ds = ds.random_map(random_transform, seed=augment_seed)
    else:
        ds = ds.map(transform)
    if num_epochs is None:
        num_batches = None
    else:
        total = num_examples * num_epochs
        if not drop_remainder:
            ds = _PadToMultiple(ds, global_batch_size)
            num_batches = math.ceil(total / global_batch_size)
        else:
            num_batches = total // global_batch_size
        if num_batches == 0:
            raise ValueError(
                f"make_dataset: {total} examples of {name!r} {split!r} make no full global batch "
                f"of {global_batch_size} (use drop_remainder=False or a smaller batch)"
            )
    ds = _HostBatches(ds, global_batch_size, process_index, process_count)
    return Pipeline(
        dataset=ds,
        name=name,
        split=split,
        task=task,
        global_batch_size=global_batch_size,
        local_batch_size=global_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
        num_examples=num_examples,
        num_epochs=num_epochs,
        num_batches=num_batches,
        padded=not drop_remainder,
        seq_len=seq_len,
        image_size=image_size,
        vocab_size=vocab_size,
        num_classes=num_classes,
        worker_count=worker_count,
    )
