"""Embedded TFDS datasets and the grain input pipeline (no TensorFlow anywhere)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import platform
import shutil
import sys
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnzoo.train import input_pipeline as ip
from attnzoo.train.datasets import digits as digits_lib
from attnzoo.train.datasets import mqar as mqar_lib
from attnzoo.train.datasets import python_stdlib_text as text_lib
from attnzoo.train.datasets._base import ArrayRecordBuilder

MQAR = "mqar/v256_t64_kv8"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data_dir for the whole run, shared by the xdist workers (builds are locked)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "tfds_data"
    path.mkdir(exist_ok=True)
    old = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = str(path)
    yield str(path)
    if old is None:
        os.environ.pop("TFDS_DATA_DIR", None)
    else:
        os.environ["TFDS_DATA_DIR"] = old


def _stack(batches, key):
    return np.concatenate([b[key] for b in batches])


# ---------------------------------------------------------------------------------------------
# MQAR generator.


def _reference_assemble(keys, values, gaps, seq_len, num_passes=1):
    """Zoology's placement, written out with loops: kv section, then queries at 2*gap."""
    n, k = keys.shape
    context = 2 * k * num_passes
    examples = np.zeros((n, seq_len + 1), np.int64)
    labels = np.full((n, seq_len + 1), -100, np.int64)
    for i in range(n):
        for rep in range(num_passes):
            for j in range(k):
                examples[i, rep * 2 * k + 2 * j] = keys[i, j]
                examples[i, rep * 2 * k + 2 * j + 1] = values[i, j]
        for j in range(k):
            examples[i, context + 2 * gaps[i, j]] = keys[i, j]
            labels[i, context + 2 * gaps[i, j] + 1] = values[i, j]
    return examples[:, :-1], labels[:, 1:]


def _reference_generate(vocab_size, num_examples, seq_len, seed, power_a, num_kv_pairs):
    """An independent MQAR generator in Zoology's style (legacy RandomState, per-row choices)."""
    rs = np.random.RandomState(seed)
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    keys = np.stack([rs.choice(np.arange(1, half), num_kv_pairs, replace=False) for _ in range(num_examples)])
    values = np.stack([rs.choice(np.arange(half, vocab_size), num_kv_pairs, replace=False) for _ in range(num_examples)])
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack([rs.choice(space, num_kv_pairs, replace=False, p=p) for _ in range(num_examples)])
    return _reference_assemble(keys, values, gaps, seq_len)


def _decompose(inputs, labels, num_kv_pairs):
    """keys, values, gaps [N, K] of MQAR rows (gaps found from the label positions)."""
    context = 2 * num_kv_pairs
    keys, values = inputs[:, 0:context:2], inputs[:, 1:context:2]
    gaps = np.zeros_like(keys)
    for i in range(inputs.shape[0]):
        positions = np.flatnonzero(labels[i] != -100)
        for j in range(num_kv_pairs):
            (where,) = np.flatnonzero(inputs[i, positions] == keys[i, j])
            gaps[i, j] = (positions[where] - context) // 2
    return keys, values, gaps


def test_mqar_queries_recall_their_values():
    v, t, k = 256, 64, 8
    inputs, labels = mqar_lib.multiquery_ar(vocab_size=v, num_examples=400, seq_len=t, seed=987, num_kv_pairs=k)
    assert inputs.shape == labels.shape == (400, t) and inputs.dtype == labels.dtype == np.int32
    keys, values = inputs[:, 0 : 2 * k : 2], inputs[:, 1 : 2 * k : 2]
    assert ((keys >= 1) & (keys < v // 2)).all() and ((values >= v // 2) & (values < v)).all()
    assert all(len(set(row)) == k for row in keys) and all(len(set(row)) == k for row in values)
    assert ((inputs >= 0) & (inputs < v)).all()
    assert (labels[:, : 2 * k] == -100).all()
    for i in range(400):
        positions = np.flatnonzero(labels[i] != -100)
        assert len(positions) == k  # exactly one query per key; -100 everywhere else
        assert ((positions >= 2 * k) & ((positions - 2 * k) % 2 == 0)).all()
        pairs = dict(zip(keys[i], values[i]))
        for pos in positions:
            assert labels[i, pos] == pairs[inputs[i, pos]]
    # Another seed gives other data; the same seed the same.
    again = mqar_lib.multiquery_ar(vocab_size=v, num_examples=400, seq_len=t, seed=987, num_kv_pairs=k)
    other = mqar_lib.multiquery_ar(vocab_size=v, num_examples=400, seq_len=t, seed=988, num_kv_pairs=k)
    np.testing.assert_array_equal(again[0], inputs)
    assert not np.array_equal(other[0], inputs)


def test_mqar_gaps_follow_the_power_law():
    v, t, k, n = 256, 64, 8, 3000
    inputs, labels = mqar_lib.multiquery_ar(vocab_size=v, num_examples=n, seq_len=t, seed=5, num_kv_pairs=k)
    _, _, gaps = _decompose(inputs, labels, k)
    space = (t - 2 * k) // 2
    p = mqar_lib.power_law_gap_probabilities(space, 0.01)
    # The first key's gap is the first draw of sampling without replacement: distributed as p.
    empirical = np.bincount(gaps[:, 0], minlength=space) / n
    uniform = np.full(space, 1 / space)
    tv = 0.5 * np.abs(empirical - p).sum()
    assert tv < 0.05, tv  # sampling noise ~0.03 at n=3000
    assert 0.5 * np.abs(uniform - p).sum() > 0.25  # a uniform generator would fail the bound
    # Over all queries, the first quarter of the gaps holds ~50% of them (uniform: 25%).
    assert (gaps < space // 4).mean() > 0.4


def test_mqar_matches_an_independent_reimplementation():
    v, t, k = 256, 64, 8
    plain = mqar_lib.multiquery_ar(vocab_size=v, num_examples=300, seq_len=t, seed=11, num_kv_pairs=k, random_non_queries=False)
    keys, values, gaps = _decompose(*plain, k)
    # Same keys / values / gaps -> Zoology's placement gives exactly the generator's rows.
    ref_inputs, ref_labels = _reference_assemble(keys, values, gaps, t)
    np.testing.assert_array_equal(plain[0], ref_inputs)
    np.testing.assert_array_equal(plain[1], ref_labels)
    # random_non_queries only replaces the zeros (drawn last, so everything else is unchanged).
    noisy = mqar_lib.multiquery_ar(vocab_size=v, num_examples=300, seq_len=t, seed=11, num_kv_pairs=k)
    np.testing.assert_array_equal(noisy[1], plain[1])
    zeros = plain[0] == 0
    np.testing.assert_array_equal(noisy[0][~zeros], plain[0][~zeros])
    assert zeros[:, : 2 * k].sum() == 0 and abs(noisy[0][zeros].mean() - (v - 1) / 2) < 5
    # The reference generator (different RNG) has the same structure and gap statistics.
    ref = _reference_generate(v, 2000, t, 3, 0.01, k)
    mine = mqar_lib.multiquery_ar(vocab_size=v, num_examples=2000, seq_len=t, seed=3, num_kv_pairs=k, random_non_queries=False)
    np.testing.assert_array_equal((ref[1] != -100).sum(1), (mine[1] != -100).sum(1))
    np.testing.assert_array_equal((ref[0] == 0).sum(1), (mine[0] == 0).sum(1))
    space = (t - 2 * k) // 2
    hist = []
    for x in (ref, mine):
        gaps = _decompose(*x, k)[2].ravel()
        hist.append(np.bincount(gaps, minlength=space) / gaps.size)
    assert 0.5 * np.abs(hist[0] - hist[1]).sum() < 0.03


def test_mqar_num_passes_repeats_the_context():
    inputs, labels = mqar_lib.multiquery_ar(vocab_size=128, num_examples=20, seq_len=64, seed=0, num_kv_pairs=4, num_passes=3)
    np.testing.assert_array_equal(inputs[:, :8], inputs[:, 8:16])
    np.testing.assert_array_equal(inputs[:, :8], inputs[:, 16:24])
    assert ((labels != -100).sum(1) == 4).all() and (labels[:, :24] == -100).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=63), "seq_len must be even"),
        (dict(vocab_size=64), "vocab_size must exceed"),
        (dict(num_kv_pairs=17), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
    ],
)
def test_mqar_rejects_bad_arguments(kwargs, match):
    args = {**dict(vocab_size=256, num_examples=2, seq_len=64, seed=0, num_kv_pairs=8), **kwargs}
    with pytest.raises(ValueError, match=match):
        mqar_lib.multiquery_ar(**args)


def test_mqar_builder(data_dir):
    config = tfds.builder(MQAR).builder_config
    test = ip.get_data_source(MQAR, "test", data_dir)
    want = mqar_lib.multiquery_ar(**config.generator_kwargs("test"))
    assert len(test) == config.num_test_examples
    rows = test.__getitems__(list(range(len(test))))
    np.testing.assert_array_equal(np.stack([r["inputs"] for r in rows]), want[0])
    np.testing.assert_array_equal(np.stack([r["labels"] for r in rows]), want[1])
    train = ip.get_data_source(MQAR, "train", data_dir)
    assert len(train) == config.num_train_examples
    assert not np.array_equal(train[0]["inputs"], test[0]["inputs"])
    # Zoology's standard configuration is there (not built here).
    big = tfds.builder("mqar/v8192_t256_kv16", data_dir=data_dir)
    assert big.info.features["inputs"].shape == (256,) and big.builder_config.vocab_size == 8192


# ---------------------------------------------------------------------------------------------
# python_stdlib_text.


def _independent_file_list():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in skip or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def _in_validation(rel):
    return int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) < 0.05 * 2**64


def test_text_split_is_disjoint_and_deterministic():
    files = text_lib.list_files()
    assert files == _independent_file_list() and files == text_lib.list_files()
    assert not any("/test/" in f or f.startswith("test/") or "site-packages" in f for f in files)
    validation = [f for f in files if text_lib.split_of(f) == "validation"]
    train = [f for f in files if text_lib.split_of(f) == "train"]
    assert set(validation).isdisjoint(train) and len(validation) + len(train) == len(files)
    assert validation == [f for f in files if _in_validation(f)]
    assert 0.02 < len(validation) / len(files) < 0.10


def test_text_windows_reproduce_the_corpus(data_dir):
    root = sysconfig.get_paths()["stdlib"]
    files = _independent_file_list()
    for split in ("train", "validation"):
        names = [f for f in files if _in_validation(f) == (split == "validation")]
        stream = b"".join(pathlib.Path(root, f).read_bytes() + b"\0" for f in names)
        source = ip.get_data_source("python_stdlib_text", split, data_dir)
        assert len(source) == (len(stream) - 1) // 4096
        records = source.__getitems__(list(range(len(source))))
        got = np.stack([r["bytes"] for r in records])
        assert got.dtype == np.uint8 and got.shape == (len(source), 4097)
        want = np.frombuffer(stream, np.uint8)
        for i in range(len(source)):
            np.testing.assert_array_equal(got[i], want[i * 4096 : i * 4096 + 4097])
    info = tfds.builder("python_stdlib_text", data_dir=data_dir).info
    assert info.metadata["python_version"] == platform.python_version()
    assert platform.python_version() in info.description


@pytest.mark.parametrize("seq_len", [64, 256, 4096])
def test_lm_batches_are_shifted_windows(data_dir, seq_len):
    stream = np.frombuffer(
        b"".join(
            pathlib.Path(sysconfig.get_paths()["stdlib"], f).read_bytes() + b"\0"
            for f in _independent_file_list()
            if _in_validation(f)
        ),
        np.uint8,
    )
    pipe = ip.make_dataset(
        name="python_stdlib_text", split="validation", task="lm", global_batch_size=8, seed=0,
        shuffle=False, num_epochs=1, seq_len=seq_len, data_dir=data_dir,
    )
    assert pipe.num_examples == len(ip.get_data_source("python_stdlib_text", "validation", data_dir)) * (4096 // seq_len)
    assert pipe.vocab_size == 256
    for step in (0, len(pipe) - 1):
        batch = pipe.dataset[step]
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
        assert batch["inputs"].shape == (8, seq_len)
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert (batch["mask"] == 1).all()
        for row in range(8):
            i = step * 8 + row  # example i = stream bytes [i*T, (i+1)*T]
            np.testing.assert_array_equal(batch["inputs"][row], stream[i * seq_len : (i + 1) * seq_len])
            assert batch["targets"][row, -1] == stream[(i + 1) * seq_len]


def test_lm_from_text_examples():
    make = ip._LmFromText(seq_len=4, text_key="text")
    out = make({"text": b"hello"})
    np.testing.assert_array_equal(out["inputs"], [0, *b"hel"])
    np.testing.assert_array_equal(out["targets"], list(b"hell"))
    np.testing.assert_array_equal(out["mask"], [1, 1, 1, 1])
    out = ip._LmFromText(seq_len=8, text_key="text")({"text": "hé"})
    np.testing.assert_array_equal(out["inputs"], [0, *"hé".encode(), 0, 0, 0, 0, 0][:8])
    np.testing.assert_array_equal(out["targets"], [*"hé".encode(), 0, 0, 0, 0, 0, 0][:8])
    np.testing.assert_array_equal(out["mask"], [1, 1, 1, 1, 0, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# digits.


def test_digits_match_sklearn(data_dir):
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (attnzoo[digits]) is not installed")
    bunch = datasets.load_digits()
    train = ip.get_data_source("digits", "train", data_dir)
    test = ip.get_data_source("digits", "test", data_dir)
    assert (len(train), len(test)) == (1437, 360)
    seen = []
    counts = collections.Counter()
    test_counts = collections.Counter()
    for source, is_test in ((train, False), (test, True)):
        for example in source.__getitems__(list(range(len(source)))):
            i = int(example["index"])
            seen.append(i)
            assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
            np.testing.assert_array_equal(example["image"][:, :, 0], bunch.images[i])
            assert example["label"] == bunch.target[i]
            counts[int(example["label"])] += 1
            test_counts[int(example["label"])] += is_test
    assert sorted(seen) == list(range(1797))
    assert counts == collections.Counter(bunch.target.tolist())
    for c, n in counts.items():  # stratified
        assert abs(test_counts[c] - n * 360 / 1797) < 1


def test_digits_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"attnzoo\[digits\]"):
        digits_lib.load_sklearn_digits()


def test_digits_split_is_stratified_and_fixed():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    first = digits_lib.test_indices(labels)
    np.testing.assert_array_equal(first, digits_lib.test_indices(labels))
    assert len(first) == 360 and len(np.unique(first)) == 360


# ---------------------------------------------------------------------------------------------
# A non-embedded dataset with real encoded images (read like cifar10 / imagenet2012).


class AttnzooTestImages(ArrayRecordBuilder):
    """40 RGB PNG images of varying size (tfds.features.Image, encoded from PIL)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=5)}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40)}

    def _generate_examples(self, n):
        import PIL.Image

        rng = np.random.default_rng(0)
        for i in range(n):
            pixels = rng.integers(0, 256, (12 + i % 7, 20 - i % 5, 3), dtype=np.uint8)
            yield i, {"image": PIL.Image.fromarray(pixels), "label": i % 5}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    tfds.builder("attnzoo_test_images", data_dir=path).download_and_prepare()
    return str(path)


def test_encoded_images_decode_without_tensorflow(image_dir):
    source = ip.get_data_source("attnzoo_test_images", "train", image_dir)
    example = source[3]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (15, 17, 3)
    with pytest.raises(ValueError, match="image_size"):
        ip.make_dataset(
            name="attnzoo_test_images", split="train", task="classification", global_batch_size=8,
            seed=0, shuffle=False, data_dir=image_dir,
        ).dataset[0]
    kw = dict(name="attnzoo_test_images", split="train", task="classification", global_batch_size=8,
              seed=0, image_size=16, data_dir=image_dir)
    eval_batch = ip.make_dataset(shuffle=False, num_epochs=1, drop_remainder=False, **kw).dataset[0]
    assert eval_batch["image"].shape == (8, 16, 16, 3) and eval_batch["image"].dtype == np.float32
    assert eval_batch["label"].dtype == np.int32 and (eval_batch["weight"] == 1).all()
    assert -1 <= eval_batch["image"].min() and eval_batch["image"].max() <= 1
    # Augmented training batches: deterministic, and the same rows whatever the process count.
    full = ip.make_dataset(shuffle=True, **kw).dataset[1]
    np.testing.assert_array_equal(full["image"], ip.make_dataset(shuffle=True, **kw).dataset[1]["image"])
    halves = [ip.make_dataset(shuffle=True, process_index=p, process_count=2, **kw).dataset[1] for p in (0, 1)]
    np.testing.assert_array_equal(_stack(halves, "image"), full["image"])
    assert not np.array_equal(full["image"], ip.make_dataset(shuffle=True, **{**kw, "seed": 1}).dataset[1]["image"])
    assert "tensorflow" not in sys.modules


def test_tfrecord_only_dataset_asks_for_array_record(image_dir, tmp_path):
    shutil.copytree(image_dir, tmp_path, dirs_exist_ok=True)
    info_path = tmp_path / "attnzoo_test_images" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="--file_format=array_record"):
        ip.check_dataset_available("attnzoo_test_images", "train", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The pipeline.


def _mqar_rows_to_index(data_dir):
    source = ip.get_data_source(MQAR, "test", data_dir)
    rows = source.__getitems__(list(range(len(source))))
    return {r["inputs"].tobytes(): i for i, r in enumerate(rows)}


def test_pipeline_is_deterministic_per_seed(data_dir):
    kw = dict(name=MQAR, split="test", task="mqar", global_batch_size=50, shuffle=True, data_dir=data_dir)

    def first(seed, n=4):
        it = ip.make_dataset(seed=seed, **kw).iterator()
        return [next(it) for _ in range(n)]

    a, b, c = first(7), first(7), first(8)
    for x, y in zip(a, b):
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    batch = a[0]
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (50, 64)
    assert (batch["mask"].sum(1) == 8).all() and (batch["targets"][batch["mask"] == 0] == 0).all()
    assert (batch["targets"][batch["mask"] == 1] >= 128).all()


def test_every_example_once_per_epoch_and_reshuffled(data_dir):
    index = _mqar_rows_to_index(data_dir)
    pipe = ip.make_dataset(name=MQAR, split="test", task="mqar", global_batch_size=100, seed=3,
                           shuffle=True, num_epochs=2, data_dir=data_dir)
    assert len(pipe) == 20 and pipe.num_examples == 1000
    order = [index[row.tobytes()] for batch in pipe.iterator() for row in batch["inputs"]]
    first, second = order[:1000], order[1000:]
    assert sorted(first) == sorted(second) == list(range(1000))
    assert first != second and first != list(range(1000))


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_slice_the_global_batch(data_dir, process_count):
    kw = dict(name=MQAR, split="test", task="mqar", global_batch_size=40, seed=1, shuffle=True, data_dir=data_dir)
    whole = ip.make_dataset(**kw)
    parts = [ip.make_dataset(process_index=p, process_count=process_count, **kw) for p in range(process_count)]
    assert {p.local_batch_size for p in parts} == {40 // process_count}
    for step in (0, 1, 30):  # 30: past the first epoch
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(_stack([p.dataset[step] for p in parts], key), whole.dataset[step][key])
    kw = dict(name="digits", split="train", task="classification", global_batch_size=16, seed=2,
              shuffle=True, image_size=8, augment=True, data_dir=data_dir)
    whole = ip.make_dataset(**kw).dataset[5]
    parts = [ip.make_dataset(process_index=p, process_count=process_count, **kw).dataset[5] for p in range(process_count)]
    np.testing.assert_array_equal(_stack(parts, "image"), whole["image"])
    np.testing.assert_array_equal(_stack(parts, "label"), whole["label"])


def test_iterator_state_resumes_with_the_next_batch(data_dir):
    kw = dict(name="python_stdlib_text", split="train", task="lm", global_batch_size=4, seed=5,
              shuffle=True, seq_len=128, data_dir=data_dir)
    it = ip.make_dataset(**kw).iterator()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = ip.make_dataset(**kw).iterator(num_threads=1, prefetch_buffer_size=1)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])


def test_eval_padding_covers_every_example_once(data_dir):
    source = ip.get_data_source(MQAR, "test", data_dir)
    real = source.__getitems__(list(range(len(source))))
    kw = dict(name=MQAR, split="test", task="mqar", global_batch_size=64, seed=0, shuffle=False,
              num_epochs=1, drop_remainder=False, data_dir=data_dir)
    hosts = [ip.make_dataset(process_index=p, process_count=2, **kw) for p in (0, 1)]
    assert len(hosts[0]) == 16 and hosts[0].padded  # ceil(1000 / 64)
    rows = {"inputs": [], "mask": []}
    for step in range(len(hosts[0])):
        batches = [h.dataset[step] for h in hosts]
        for key in rows:
            rows[key].append(_stack(batches, key))
    inputs, mask = np.concatenate(rows["inputs"]), np.concatenate(rows["mask"])
    assert inputs.shape[0] == 1024
    np.testing.assert_array_equal(inputs[:1000], np.stack([r["inputs"] for r in real]))
    assert (mask[1000:] == 0).all() and (inputs[1000:] == 0).all() and mask[:1000].sum() == 8 * 1000

    pipe = ip.make_dataset(name="digits", split="test", task="classification", global_batch_size=64, seed=0,
                           shuffle=False, num_epochs=1, drop_remainder=False, data_dir=data_dir)
    batches = list(pipe.iterator())
    assert len(batches) == len(pipe) == 6
    weight = _stack(batches, "weight")
    assert weight.dtype == np.float32 and weight.sum() == 360 and (weight[360:] == 0).all()
    digits = ip.get_data_source("digits", "test", data_dir)
    labels = [int(digits[i]["label"]) for i in range(360)]
    np.testing.assert_array_equal(_stack(batches, "label")[:360], labels)
    image = _stack(batches, "image")[:360]
    want = np.stack([digits[i]["image"] for i in range(360)]).astype(np.float32) / 16
    np.testing.assert_allclose(image, (want - 0.5) / 0.5)


def test_embedded_datasets_are_available(data_dir):
    assert ip.check_dataset_available(MQAR, "test", data_dir) == 1000
    assert ip.check_dataset_available("digits", "train", data_dir) == 1437
    assert ip.check_dataset_available("python_stdlib_text", "validation", data_dir) > 100
    with pytest.raises(ValueError, match="no split 'validation'"):
        ip.check_dataset_available(MQAR, "validation", data_dir)


def test_bad_arguments_give_clear_errors(data_dir, tmp_path):
    base = dict(name=MQAR, split="test", task="mqar", global_batch_size=10, seed=0, shuffle=False, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"global_batch_size \(10\) must be divisible by process_count \(4\)"):
        ip.make_dataset(**{**base, "process_count": 4})
    with pytest.raises(ValueError, match="task must be one of"):
        ip.make_dataset(**{**base, "task": "translation"})
    with pytest.raises(TypeError, match="unknown option"):
        ip.make_dataset(**base, mean=0.1)
    with pytest.raises(ValueError, match="seq_len=32"):
        ip.make_dataset(**base, seq_len=32)
    with pytest.raises(ValueError, match="process_index must be < process_count"):
        ip.make_dataset(**{**base, "process_index": 1})
    text = dict(name="python_stdlib_text", split="validation", task="lm", global_batch_size=2, seed=0,
                shuffle=False, data_dir=data_dir)
    with pytest.raises(ValueError, match="seq_len must divide the stored window of 4096"):
        ip.make_dataset(**text, seq_len=100)
    with pytest.raises(ValueError, match="needs seq_len"):
        ip.make_dataset(**text)
    empty = str(tmp_path / "empty")
    for call in (
        lambda: ip.check_dataset_available("cifar10", "train", empty),
        lambda: ip.make_dataset(**{**base, "name": "cifar10", "task": "classification", "data_dir": empty}),
    ):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert "tfds build cifar10 --file_format=array_record --data_dir" in str(e.value)
        assert empty in str(e.value) and "cifar10" in str(e.value)
    with pytest.raises(FileNotFoundError, match="tfds build"):
        ip.get_data_source("no_such_dataset_xyz", "train", empty)
