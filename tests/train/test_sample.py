"""``python -m attnzoo.sample``: restores a trained run from its workdir and generates text.

A few steps of a narrowed Hymba-style preset (meta tokens, sliding-window and global attention,
Mamba heads) are trained through the trainer; the command's greedy output must equal a greedy loop
over full forwards of the restored model (no cache), prompt by prompt.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.configs import mqar
from attnzoo.sample import decode_bytes, encode_prompts
from attnzoo.train import load_config, restore_model, train_and_evaluate
from tests.train.presets_testing import narrowed_preset_config

pytestmark = pytest.mark.slow

PROMPTS = ["def ", "import o"]
NEW_TOKENS = 12


def run_sample(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "attnzoo.sample", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sample_run")
    config = narrowed_preset_config("hymba_lm_tiny", str(tmp_path_factory.getbasetemp() / "tfds_sample"), num_steps=6)
    config.log_every_steps = 3
    train_and_evaluate(config, str(workdir))
    return workdir, config


def test_the_trainer_writes_its_config(trained_workdir):
    workdir, config = trained_workdir
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "hymba_lm_tiny"
    loaded = load_config(str(workdir))
    assert loaded.to_dict() == config.to_dict()


def greedy_reference(model, prompt):
    """Greedy decoding by full forwards over a fixed-width buffer (one compile): the model is causal,
    so the unwritten tail of the buffer cannot change the logits at the last written position."""
    tokens, _ = encode_prompts([prompt])
    start = tokens.shape[1]
    buffer = np.zeros((1, start + NEW_TOKENS), np.int32)
    buffer[0, :start] = tokens[0]
    forward = nnx.jit(lambda m, t: m(t))
    for position in range(start, start + NEW_TOKENS):
        logits = np.asarray(forward(model, jnp.asarray(buffer)))[0, position - 1]
        buffer[0, position] = int(np.argmax(logits))
    return decode_bytes(buffer[0, start:])


def test_sample_command_generates_what_the_restored_model_predicts(trained_workdir):
    workdir, config = trained_workdir
    args = ["--workdir", str(workdir), "--max_new_tokens", str(NEW_TOKENS), "--temperature", "0"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = run_sample(*args)
    assert result.returncode == 0, result.stderr
    model = restore_model(config, str(workdir))
    blocks = result.stdout.split("-" * 40 + "\n")
    for prompt, block in zip(PROMPTS, blocks):
        assert block == f"{prompt}{greedy_reference(model, prompt)}\n", (prompt, block)


def test_sample_command_errors(tmp_path, trained_workdir):
    result = run_sample("--workdir", str(tmp_path))
    assert result.returncode == 2 and "config.json" in result.stderr
    mqar_config = mqar.get_config()
    mqar_config.model.name = "lm_nano"
    (tmp_path / "config.json").write_text(mqar_config.to_json_best_effort())
    result = run_sample("--workdir", str(tmp_path))
    assert result.returncode == 2 and "only 'lm' runs generate text" in result.stderr
    workdir, _ = trained_workdir
    result = run_sample("--workdir", str(workdir), "--temperature", "-1", "--max_new_tokens", "2")
    assert result.returncode == 2 and "temperature" in result.stderr


def test_prompts_are_framed_as_documents():
    tokens, lengths = encode_prompts(["ab", ""])
    np.testing.assert_array_equal(tokens, [[0, 97, 98], [0, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 1])
    assert decode_bytes(np.array([104, 105, 0, 120])) == "hi"
