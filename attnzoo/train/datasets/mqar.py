"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models"
(2023). :func:`multiquery_ar` follows Zoology's generator (``zoology/data/multiquery_ar.py``,
function ``multiquery_ar``) step by step, with a seeded ``numpy.random.Generator`` in place of
NumPy's global random state, so the examples are equal in distribution to Zoology's, not
bit-identical. One example of ``seq_len`` tokens (``num_passes=1``)::

    position:  0   1   2   3  ... 2K-2 2K-1 | 2K ...                          seq_len-1
    inputs:    k1  v1  k2  v2 ... kK   vK   | noise .. k_j .. noise .. k_i .. noise
    labels:   -100 ...                      | -100  .. v_j .. -100  .. v_i .. -100

* keys ``k`` are drawn without replacement from ``[1, vocab_size // 2)`` and values ``v`` without
  replacement from ``[vocab_size // 2, vocab_size)``;
* the query for key ``i`` sits at position ``2K + 2 * gap_i``, the gaps drawn without replacement
  from ``range(space)``, ``space = (seq_len - 2K) // 2``, with probabilities
  ``p_g ∝ power_a * (g + 1) ** (power_a - 1)`` (a power law favouring early queries, small gaps);
* the label at a query position is the key's value (the next-token target); every other label is
  ``-100`` (no loss);
* with ``random_non_queries`` every remaining 0 of the inputs (the query section outside the
  queries) is replaced by a token drawn uniformly from ``[0, vocab_size)``.

The TFDS builder :class:`Mqar` stores these as ``inputs`` int32 [seq_len] and ``labels`` int32
[seq_len]; train and test splits use different seeds.
"""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import tensorflow_datasets as tfds

from attnzoo.train.datasets._base import ArrayRecordBuilder

IGNORE_LABEL = -100


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"multiquery_ar: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"multiquery_ar: {name} must be >= {minimum}, got {value}")
    return int(value)


def power_law_gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """Zoology's query-gap distribution: float64 [space], ``p_g ∝ power_a * (g+1)**(power_a-1)``."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def multiquery_ar(
    *,
    vocab_size: int,
    num_examples: int,
    seq_len: int,
    seed: int,
    power_a: float = 0.01,
    num_kv_pairs: int = 8,
    num_passes: int = 1,
    random_non_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Generates MQAR examples as in Zoology's ``multiquery_ar``.

    Args:
      vocab_size: tokens are in ``[0, vocab_size)``; keys in ``[1, vocab_size // 2)``, values in
        ``[vocab_size // 2, vocab_size)``. Must exceed ``seq_len`` (as in Zoology).
      num_examples: number of examples N.
      seq_len: tokens per example T; even.
      seed: seeds a ``numpy.random.default_rng``; the output is a pure function of the arguments.
      power_a: power-law exponent of the query gaps (1.0 = uniform, small = early queries).
      num_kv_pairs: K key-value pairs per example; ``2*K*num_passes + 2*K <= seq_len``.
      num_passes: how often the key-value section is repeated (JRT prompting; Zoology's
        ``num_passes``); 1 is the original task.
      random_non_queries: fill non-query zeros of the query section with uniform random tokens.

    Returns:
      ``(inputs, labels)``, both int32 [N, T]: ``labels`` is -100 except at the K query
      positions, where it is the value paired with the key at that position of ``inputs``.
    """
    vocab_size = _check_int("vocab_size", vocab_size, 4)
    num_examples = _check_int("num_examples", num_examples, 0)
    seq_len = _check_int("seq_len", seq_len, 2)
    num_kv_pairs = _check_int("num_kv_pairs", num_kv_pairs, 1)
    num_passes = _check_int("num_passes", num_passes, 1)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"multiquery_ar: seed must be a non-negative int, got {seed!r}")
    if not isinstance(power_a, (int, float)) or not power_a > 0:
        raise ValueError(f"multiquery_ar: power_a must be a positive number, got {power_a!r}")
    if seq_len % 2:
        raise ValueError(f"multiquery_ar: seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"multiquery_ar: vocab_size must exceed seq_len ({seq_len}), got {vocab_size}")
    if 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs > seq_len:
        raise ValueError(
            f"multiquery_ar: need 2*num_kv_pairs*num_passes + 2*num_kv_pairs <= seq_len, got "
            f"num_kv_pairs={num_kv_pairs}, num_passes={num_passes}, seq_len={seq_len}"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"multiquery_ar: the key vocabulary [1, {vocab_size // 2}) is smaller than "
            f"num_kv_pairs={num_kv_pairs}"
        )

    rng = np.random.default_rng(seed)
    context_size = 2 * num_kv_pairs * num_passes
    key_vocab_size = vocab_size // 2
    key_choices = np.arange(1, key_vocab_size)
    value_choices = np.arange(key_vocab_size, vocab_size)
    n, k = num_examples, num_kv_pairs

    # Each key (and each value) at most once per example: sampling without replacement, in order.
    keys = np.zeros((n, k), np.int64)
    for i in range(n):
        keys[i] = rng.choice(key_choices, size=k, replace=False)
    values = np.zeros((n, k), np.int64)
    for i in range(n):
        values[i] = rng.choice(value_choices, size=k, replace=False)

    kvs = np.zeros((n, 2 * k), np.int64)
    kvs[:, 0::2] = keys
    kvs[:, 1::2] = values
    kvs = np.tile(kvs, (1, num_passes))

    space = (seq_len - context_size) // 2
    p = power_law_gap_probabilities(space, power_a)
    gaps = np.zeros((n, k), np.int64)
    for i in range(n):
        gaps[i] = rng.choice(space, size=k, replace=False, p=p)

    # Query i (key i) at offset 2*gap_i of the query section; one spare slot as in Zoology.
    queries = np.zeros((n, seq_len - context_size + 1), np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)  # [n, seq_len + 1]

    labels = np.full((n, seq_len + 1), IGNORE_LABEL, np.int64)
    np.put_along_axis(labels, 2 * gaps + context_size + 1, values, axis=1)

    inputs, labels = examples[:, :-1], labels[:, 1:]
    if random_non_queries:
        fill = rng.integers(0, vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, fill, inputs)
    return inputs.astype(np.int32), labels.astype(np.int32)


@dataclasses.dataclass(eq=False)
class MqarConfig(tfds.core.BuilderConfig):
    """An MQAR variant; the name conventionally reads ``v{vocab_size}_t{seq_len}_kv{num_kv_pairs}``.

    Both splits share every parameter but the seed and the example count.
    """

    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    num_passes: int = 1
    random_non_queries: bool = True
    num_train_examples: int = 20_000
    num_test_examples: int = 1_000
    train_seed: int = 0
    test_seed: int = 1

    def generator_kwargs(self, split: str) -> dict:
        """Keyword arguments of :func:`multiquery_ar` for ``split`` ("train" or "test")."""
        if split not in ("train", "test"):
            raise ValueError(f"MqarConfig: split must be 'train' or 'test', got {split!r}")
        return dict(
            vocab_size=self.vocab_size,
            num_examples=self.num_train_examples if split == "train" else self.num_test_examples,
            seq_len=self.seq_len,
            seed=self.train_seed if split == "train" else self.test_seed,
            power_a=self.power_a,
            num_kv_pairs=self.num_kv_pairs,
            num_passes=self.num_passes,
            random_non_queries=self.random_non_queries,
        )


def _config(vocab_size: int, seq_len: int, num_kv_pairs: int, num_train: int, num_test: int = 1_000):
    return MqarConfig(
        name=f"v{vocab_size}_t{seq_len}_kv{num_kv_pairs}",
        description=(
            f"vocab_size={vocab_size}, seq_len={seq_len}, num_kv_pairs={num_kv_pairs}, power_a=0.01, "
            f"{num_train} train / {num_test} test examples"
        ),
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_kv_pairs=num_kv_pairs,
        num_train_examples=num_train,
        num_test_examples=num_test,
    )


class Mqar(ArrayRecordBuilder):
    """Zoology's multi-query associative recall, written as array_record (no TensorFlow needed).

    Configs: ``v256_t64_kv8`` (default, small enough for CPU), ``v256_t64_kv4`` (Zoology's basic
    example) and Zoology's original sweep at vocab 8192: ``v8192_t64_kv4`` (100k train),
    ``v8192_t128_kv8``, ``v8192_t256_kv16``, ``v8192_t256_kv32``, ``v8192_t256_kv64`` (20k train).
    Records are stored in generation order (example i of the split is row i of
    :func:`multiquery_ar`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        _config(256, 64, 8, 20_000),
        _config(256, 64, 4, 10_000),
        _config(8192, 64, 4, 100_000),
        _config(8192, 128, 8, 20_000),
        _config(8192, 256, 16, 20_000),
        _config(8192, 256, 32, 20_000),
        _config(8192, 256, 64, 20_000),
    ]
    DEFAULT_CONFIG_NAME = "v256_t64_kv8"

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=textwrap.dedent(
                f"""\
                Multi-query associative recall (Zoology). inputs: int32 [seq_len] tokens; labels:
                int32 [seq_len], the value at query positions and -100 elsewhere. {c.description}."""
            ),
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(c.seq_len,), dtype=np.int32),
                    "labels": tfds.features.Tensor(shape=(c.seq_len,), dtype=np.int32),
                }
            ),
            disable_shuffling=True,
            homepage="https://github.com/HazyResearch/zoology",
            metadata=tfds.core.MetadataDict(
                vocab_size=c.vocab_size,
                seq_len=c.seq_len,
                num_kv_pairs=c.num_kv_pairs,
                power_a=c.power_a,
                num_passes=c.num_passes,
                random_non_queries=c.random_non_queries,
                train_seed=c.train_seed,
                test_seed=c.test_seed,
                ignore_label=IGNORE_LABEL,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        inputs, labels = multiquery_ar(**self.builder_config.generator_kwargs(split))
        for i in range(inputs.shape[0]):
            yield i, {"inputs": inputs[i], "labels": labels[i]}
