"""The 1,797 8x8 handwritten digits of scikit-learn (UCI optical recognition of handwritten digits).

Needs scikit-learn (the ``digits`` extra: ``pip install 'attnzoo[digits]'``) only to build; the
built dataset is read without it. Features: ``image`` uint8 [8, 8, 1] with values 0..16 (sklearn's
counts of set pixels per 4x4 block, *not* 0..255: divide by 16 to get [0, 1]), ``label``
ClassLabel(10), ``index`` int32 (row of ``sklearn.datasets.load_digits()``).

Split (deterministic, stratified): 360 test and 1437 train examples. Each class c of n_c examples
gets a test quota ``n_c * 360 / 1797`` rounded by largest remainder (ties to the smaller class
id) so the quotas sum to 360; its examples are ordered by a ``default_rng(0)`` permutation and the
first quota go to test. Records within a split are in sklearn row order.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from attnzoo.train.datasets._base import ArrayRecordBuilder

NUM_TEST = 360
SPLIT_SEED = 0
PIXEL_MAX = 16


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ``(images uint8 [1797, 8, 8], labels int64 [1797])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "The digits dataset is built from scikit-learn, which is not installed: "
            "pip install 'attnzoo[digits]' (or pip install scikit-learn)"
        ) from e
    bunch = load_digits()
    images = np.asarray(bunch.images)
    if images.min() < 0 or images.max() > PIXEL_MAX:
        raise ValueError(f"digits: sklearn images outside [0, {PIXEL_MAX}]")
    return images.astype(np.uint8), np.asarray(bunch.target, np.int64)


def test_indices(labels: np.ndarray, num_test: int = NUM_TEST, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted int64 indices of the stratified test split of ``labels`` (int [N], classes 0..9)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota_f = counts * num_test / labels.size
    quota = np.floor(quota_f).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda i: (-(quota_f[i] - quota[i]), classes[i]))
    for i in order[: num_test - int(quota.sum())]:
        quota[i] += 1
    perm = np.random.default_rng(seed).permutation(labels.size)
    chosen = []
    for c, q in zip(classes, quota):
        members = perm[labels[perm] == c]
        chosen.append(members[:q])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class Digits(ArrayRecordBuilder):
    """sklearn's 8x8 digits as array_record (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's 1,797 8x8 handwritten digits. image: uint8 [8,8,1] with values "
                "0..16 (not 0..255); label: 0..9; index: row in sklearn.datasets.load_digits(). "
                "Stratified split: 1437 train / 360 test."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/dataset/80",
            metadata=tfds.core.MetadataDict(pixel_max=PIXEL_MAX, num_test=NUM_TEST, split_seed=SPLIT_SEED),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images, labels = load_sklearn_digits()
        test = np.zeros(labels.size, bool)
        test[test_indices(labels)] = True
        return {
            "train": self._generate_examples(images, labels, np.flatnonzero(~test)),
            "test": self._generate_examples(images, labels, np.flatnonzero(test)),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i][:, :, None], "label": int(labels[i]), "index": np.int32(i)}
