"""The super-resolution task: the input pipeline's (lowres, image) pairs, the metric sums (L1,
PSNR, nearest-neighbour baseline) against float64 numpy, a short trainer run, and the hat_digits
config's model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.train import input_pipeline as ip
from attnzoo.train import tasks
from attnzoo.train.train import model_kwargs

sys.path.insert(0, os.path.dirname(__file__))
from sr_standin import PixelShuffleSR  # noqa: E402  (importing registers nothing; see sr_standin.register)

pytest.importorskip("sklearn.datasets", reason="scikit-learn (attnzoo[digits]) is not installed")

RUNNER = os.path.join(os.path.dirname(__file__), "trainer_run.py")
PIXEL_MAX = 16


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The TFDS data_dir that test_data.py also uses (digits is built once, under a lock)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "tfds_data"
    path.mkdir(exist_ok=True)
    return str(path)


def _digits(data_dir, split):
    source = ip.get_data_source("digits", split, data_dir)
    return np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float64) / PIXEL_MAX


def _box_average(images, s):
    """float64 [N,H,W,C] -> [N,H/s,W/s,C] with explicit loops over the blocks."""
    n, h, w, c = images.shape
    out = np.zeros((n, h // s, w // s, c))
    for i in range(h // s):
        for j in range(w // s):
            out[:, i, j] = images[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(n, s * s, c).mean(axis=1)
    return out


def _batches(pipe):
    batches = list(pipe.iterator())
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


# ------------------------------------------------------------------------------------------------
# Input pipeline.


@pytest.mark.parametrize("scale", [2, 4])
def test_lowres_is_the_box_average_of_the_target_and_padding_has_zero_weight(data_dir, scale):
    want = _digits(data_dir, "test")
    pipe = ip.make_dataset(name="digits", split="test", task="super_resolution", global_batch_size=64, seed=0,
                           shuffle=False, num_epochs=1, drop_remainder=False, data_dir=data_dir, scale=scale)
    got = _batches(pipe)
    assert len(pipe) == 6 and got["image"].shape == (384, 8, 8, 1)
    assert got["lowres"].shape == (384, 8 // scale, 8 // scale, 1)
    assert got["image"].dtype == got["lowres"].dtype == got["weight"].dtype == np.float32
    np.testing.assert_allclose(got["image"][:360], want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got["lowres"][:360], _box_average(want, scale), rtol=0, atol=1e-6)
    assert got["weight"][:360].sum() == 360 and (got["weight"][360:] == 0).all()
    assert (got["image"][360:] == 0).all() and (got["lowres"][360:] == 0).all()
    # The comparison can fail: a strided subsample is not the box average.
    assert not np.allclose(got["lowres"][:360], want[:, ::scale, ::scale], atol=1e-3)


def _dihedral(image):
    """The 8 flips / 90-degree rotations of a square [H,W,C] image."""
    out = []
    for flipped in (image, image[:, ::-1]):
        out += [np.rot90(flipped, k, axes=(0, 1)) for k in range(4)]
    return out


def test_flip_augments_the_pair_consistently_and_is_seeded(data_dir):
    want = _digits(data_dir, "train")[:96]
    kw = dict(name="digits", split="train[:96]", task="super_resolution", global_batch_size=32, shuffle=False,
              num_epochs=1, data_dir=data_dir, flip=True)
    got = _batches(ip.make_dataset(seed=3, **kw))
    assert "weight" not in got
    used = set()
    for i in range(96):
        matches = [k for k, t in enumerate(_dihedral(want[i])) if np.allclose(got["image"][i], t, atol=1e-7)]
        assert matches, i
        used.add(matches[0])
    np.testing.assert_allclose(got["lowres"], _box_average(got["image"].astype(np.float64), 2), atol=1e-6)
    assert len(used) == 8  # every flip / rotation occurs (so the augmentation is not the identity)
    again = _batches(ip.make_dataset(seed=3, **kw))
    other = _batches(ip.make_dataset(seed=4, **kw))
    np.testing.assert_array_equal(again["image"], got["image"])
    assert not np.array_equal(other["image"], got["image"])


def test_flip_keeps_the_shape_of_non_square_images():
    image = np.arange(4 * 6 * 2, dtype=np.uint8).reshape(4, 6, 2)
    transform = ip._SuperResolve(scale=2, pixel_max=255, flip=True, image_key="image", with_weight=True)
    x = image.astype(np.float64) / 255
    allowed = [x, x[::-1, ::-1], x[:, ::-1], x[::-1]]  # identity, 180 degrees, and their horizontal flips
    seen = set()
    for seed in range(40):
        out = transform({"image": image}, np.random.default_rng(seed))
        assert out["image"].shape == (4, 6, 2) and out["lowres"].shape == (2, 3, 2) and out["weight"] == 1
        seen.add(next(k for k, t in enumerate(allowed) if np.allclose(out["image"], t, atol=1e-7)))
        np.testing.assert_allclose(out["lowres"], _box_average(out["image"][None].astype(np.float64), 2)[0],
                                   atol=1e-6)
    assert seen == {0, 1, 2, 3}


def test_super_resolution_options_are_checked(data_dir):
    base = dict(name="digits", split="test", task="super_resolution", global_batch_size=8, seed=0,
                shuffle=False, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"scale must divide the image height and width of 'digits' \(8x8\), got scale=3"):
        ip.make_dataset(**base, scale=3)
    for bad in (1, 0, 2.0, "2", True):
        with pytest.raises(ValueError, match=rf"option scale must be an int >= 2, got {bad!r}"):
            ip.make_dataset(**base, scale=bad)
    with pytest.raises(ValueError, match="image_size must be None, got"):
        ip.make_dataset(**base, image_size=8)
    with pytest.raises(TypeError, match="option flip must be a bool, got 'yes'"):
        ip.make_dataset(**base, flip="yes")
    with pytest.raises(ValueError, match="pixel_max must be a positive number, got 0"):
        ip.make_dataset(**base, pixel_max=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['mean'\] for task 'super_resolution'"):
        ip.make_dataset(**base, mean=0.5)
    with pytest.raises(ValueError, match="needs feature 'pixels'"):
        ip.make_dataset(**base, image_key="pixels")
    # A stored image that the scale does not divide (no static shape to check) fails per example.
    transform = ip._SuperResolve(scale=2, pixel_max=16, flip=False, image_key="image", with_weight=False)
    with pytest.raises(ValueError, match="option scale=2 must divide the image height and width, got an image of 7x8"):
        transform({"image": np.zeros((7, 8), np.uint8)})


# ------------------------------------------------------------------------------------------------
# Metrics.


def _numpy_metrics(prediction, image, lowres, weight):
    """float64 reference: weighted sums of per-image L1, PSNR (clipped prediction) and the PSNR of
    the nearest-neighbour upsampling (index i of the target reads input row i // s)."""
    prediction, image, lowres = (np.asarray(a, np.float64) for a in (prediction, image, lowres))
    n, h, w, _ = image.shape
    s = h // lowres.shape[1]
    rows, cols = np.arange(h) // s, np.arange(w) // s
    nearest = lowres[:, rows][:, :, cols]
    l1 = np.abs(prediction - image).reshape(n, -1).mean(axis=1)

    def psnr(p):
        mse = np.square(np.clip(p, 0, 1) - image).reshape(n, -1).mean(axis=1)
        return 10 * np.log10(1 / np.maximum(mse, 1e-10))

    total = weight.sum()
    return {"loss": ((l1 * weight).sum(), total), "psnr": ((psnr(prediction) * weight).sum(), total),
            "psnr_nearest": ((psnr(nearest) * weight).sum(), total)}


@pytest.mark.parametrize("seed,shape,scale", [(0, (4, 8, 8, 1), 2), (1, (5, 9, 15, 2), 3), (2, (3, 12, 4, 3), 4)])
def test_metric_sums_match_numpy(seed, shape, scale):
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    image = rng.random(shape).astype(np.float32)
    lowres = _box_average(image.astype(np.float64), scale).astype(np.float32)
    prediction = (image + rng.normal(0, 0.2, shape)).astype(np.float32)  # partly outside [0, 1]
    weight = np.ones(n, np.float32)
    weight[-1] = 0.0  # an eval padding row: all zeros, whatever the model predicts there
    image[-1], lowres[-1] = 0.0, 0.0
    prediction[-1] = 0.0  # a perfect prediction: MSE 0 must not turn the sums into NaN
    batch = {"image": jnp.asarray(image), "lowres": jnp.asarray(lowres), "weight": jnp.asarray(weight)}
    seen = []

    def model(x):
        seen.append(x.shape)
        return jnp.asarray(prediction)

    got = jax.device_get(tasks.metric_sums("super_resolution", model, batch))
    assert seen == [(n, h // scale, w // scale, c)]  # the model is fed lowres
    want = _numpy_metrics(prediction, image, lowres, weight)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(got[name][1], want[name][1], rtol=0, err_msg=name)
    # The PSNR reference can fail: without clipping it differs.
    mse = np.square(prediction[:-1].astype(np.float64) - image[:-1]).reshape(n - 1, -1).mean(axis=1)
    assert not np.isclose(got["psnr"][0], np.sum(10 * np.log10(1 / mse)), rtol=1e-4)
    summary = tasks.summarize("super_resolution", got)
    assert summary["psnr"] == pytest.approx(want["psnr"][0] / (n - 1), rel=2e-5)
    assert tasks.headline_metric("super_resolution") == "psnr"
    assert float(tasks.loss_weight("super_resolution", batch)) == n - 1
    no_weight = {"image": batch["image"], "lowres": batch["lowres"]}
    assert float(tasks.loss_weight("super_resolution", no_weight)) == n
    assert tasks.units("super_resolution", {k: v.shape for k, v in batch.items()}) == ("images", n)


def test_the_loss_gradient_is_the_weighted_l1_gradient():
    rng = np.random.default_rng(5)
    image = rng.random((3, 6, 6, 1)).astype(np.float32)
    lowres = _box_average(image.astype(np.float64), 2).astype(np.float32)
    weight = np.array([1.0, 0.5, 0.0], np.float32)
    prediction = rng.random(image.shape).astype(np.float32)
    batch = {"image": image, "lowres": lowres, "weight": weight}
    grad = jax.jit(jax.grad(lambda p: tasks.metric_sums("super_resolution", lambda x: p, batch)["loss"][0]))(prediction)
    want = np.sign(prediction - image) * weight[:, None, None, None] / 36
    np.testing.assert_allclose(grad, want, rtol=1e-6)


def test_example_flops_and_shape_errors():
    # Abstract (nnx.eval_shape: nothing initialised or run): the checks happen while tracing.
    model = nnx.eval_shape(lambda: PixelShuffleSR(in_chans=1, upscale=2, width=8, rngs=nnx.Rngs(0)))
    shapes = {"image": (4, 8, 8, 1), "lowres": (4, 4, 4, 1), "weight": (4,)}
    assert tasks.example_flops("super_resolution", model, shapes) == model.forward_flops((4, 4, 1))
    batch = {"image": jnp.zeros((2, 12, 12, 1)), "lowres": jnp.zeros((2, 4, 4, 1))}  # scale 3 data, x2 model
    with pytest.raises(ValueError, match=r"maps lowres \(2, 4, 4, 1\) to \(2, 8, 8, 1\), but the target image is \(2, 12, 12, 1\)"):
        nnx.eval_shape(lambda m: tasks.metric_sums("super_resolution", m, batch), model)
    good = {"image": jnp.zeros((2, 8, 8, 1)), "lowres": jnp.zeros((2, 4, 4, 1))}
    assert nnx.eval_shape(lambda m: tasks.metric_sums("super_resolution", m, good), model)["psnr"][0].shape == ()


# ------------------------------------------------------------------------------------------------
# The trainer and the config.


@pytest.mark.slow
def test_a_short_trainer_run_learns_and_reports_psnr(tmp_path, data_dir):
    overrides = {
        "data.data_dir": data_dir, "model.name": "test_sr_standin_x2", "model.kwargs": {"width": 16},
        "batch_size": 32, "eval_batch_size": 128, "num_steps": 30, "log_every_steps": 1,
        "eval_every_steps": 0, "checkpoint.every_steps": 30, "optimizer.warmup_steps": 5,
        "optimizer.learning_rate": 1e-2, "data.options.flip": False,
    }
    spec = {"action": "train", "workdir": str(tmp_path / "run"), "overrides": overrides, "devices": 1,
            "config": "hat_digits", "imports": ["sr_standin"]}
    process = subprocess.run([sys.executable, RUNNER, json.dumps(spec)], capture_output=True, text=True,
                             timeout=600)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout[-3000:] + process.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["step"] == 30, result
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 30 and all("psnr" in r and "psnr_nearest" in r for r in train)
    assert np.isfinite(train[-1]["images_per_s"]) and 0 < train[-1]["mfu"] < 1
    curve = [r["loss"] for r in train]
    assert np.mean(curve[-5:]) < 0.95 * np.mean(curve[:5])
    assert "final eval at step 30: psnr " in process.stdout
    evals = result["eval"]
    assert set(evals) == {"loss", "psnr", "psnr_nearest"}
    # The eval baseline over the 360 test images (3 batches of 128, 24 padding rows) is the numpy one.
    want = _digits(data_dir, "test")
    lowres = _box_average(want, 2)
    nearest = _numpy_metrics(np.zeros_like(want), want, lowres, np.ones(len(want)))["psnr_nearest"]
    assert evals["psnr_nearest"] == pytest.approx(nearest[0] / 360, rel=1e-5)
    assert evals["psnr"] > evals["psnr_nearest"] + 0.2  # the stand-in starts near the baseline and beats it


def test_hat_digits_config_model_maps_4x4_to_8x8():
    from attnzoo.configs import hat_digits

    config = hat_digits.get_config()
    assert config.task == "super_resolution" and config.data.options.scale == config.model.kwargs.upscale == 2
    # Abstractly (nothing compiled or run: HAT's own tests run it; the trainer run above runs the task).
    model = nnx.eval_shape(lambda: zoo.create_model(config.model.name, rngs=nnx.Rngs(0), **model_kwargs(config)))
    assert model.upscale == 2
    y = nnx.eval_shape(lambda m, v: m(v), model, jax.ShapeDtypeStruct((3, 4, 4, 1), jnp.float32))
    assert y.shape == (3, 8, 8, 1) and y.dtype == jnp.float32
    shapes = {"image": (3, 8, 8, 1), "lowres": (3, 4, 4, 1)}
    assert tasks.example_flops("super_resolution", model, shapes) == model.forward_flops((4, 4, 1)) > 0


def test_importing_the_standin_registers_nothing_here():
    """The stand-in is registered only in trainer subprocesses: tests/zoo walk this process's registry."""
    from attnzoo import zoo

    assert "test_sr_standin_x2" not in zoo.list_models()
