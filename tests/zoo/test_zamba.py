"""ZambaLM: the scanned super-blocks equal the layer loop, every parameter (shared blocks, per-call
projections and adapters) gets a gradient, packed documents stay apart, presets build, and bad
arguments are rejected. Parity with transformers' Zamba2 is in test_hf_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import zoo
from attnzoo.pallas_kernels.testing import assert_close
from attnzoo.zoo.zamba import ZambaLM
from tests.zoo.helpers import fast_jit

SMALL = dict(shared_every=2, num_shared_blocks=2, adapter_rank=4, attention_adapters=True,
             mixer_options=dict(state_dim=8, chunk_size=16))


def _model(scan_layers=True, **overrides):
    options = dict(SMALL, **overrides)
    return ZambaLM(48, 16, 4, 2, scan_layers=scan_layers, rngs=nnx.Rngs(0), **options)


_forward = fast_jit(lambda m, t, s: m(t, segment_ids=s))


def test_scan_equals_loop_and_gradients_reach_every_parameter():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 11)))
    scanned, looped = _model(True), _model(False)
    out = _forward(scanned, tokens, None)
    assert out.shape == (2, 11, 48) and out.dtype == jnp.float32
    assert_close(_forward(looped, tokens, None), out, "loop vs scan", dtype=jnp.float32)
    grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(scanned)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree.leaves(nnx.state(scanned, nnx.Param)))
    for path, leaf in leaves:
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), jax.tree_util.keystr(path)


def test_packed_documents_do_not_mix():
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 48, (1, 14)))
    ids = jnp.asarray([[0] * 6 + [1] * 8])
    model = _model()
    packed = _forward(model, tokens, ids)
    alone = _forward(model, tokens[:, 6:], None)
    positions = jnp.asarray([list(range(6)) + list(range(8))])
    packed_positions = fast_jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p))(model, tokens, ids, positions)
    assert_close(packed_positions[:, 6:], alone, "second document", dtype=jnp.float32)
    assert np.all(np.isfinite(packed))


def test_presets_and_flops():
    for name in ("zamba_lm_tiny", "zamba_lm_small"):
        model = nnx.eval_shape(lambda: zoo.create_model(name, rngs=nnx.Rngs(0)))
        assert isinstance(model, ZambaLM) and model.forward_flops(128) > 0
    model = _model()
    assert model.forward_flops(10) > sum(
        layer.mixer.flops(10) for layer in model.blocks.layers.layers
    ) * model.num_repeats


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shared_every=3), ValueError, r"depth \(4\) must be a multiple of shared_every \* num_shared_blocks \(6\)"),
        (dict(shared_offset=2), ValueError, r"shared_offset must be in \[0, shared_every=2\)"),
        (dict(num_heads=3), ValueError, r"num_heads \(3\) must divide 2 \* dim \(32\)"),
        (dict(use_rope=1), TypeError, "use_rope must be a bool"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    options = dict(SMALL)
    heads = kwargs.pop("num_heads", 2)
    options.update(kwargs)
    with pytest.raises(error, match=match):
        ZambaLM(48, 16, 4, heads, rngs=nnx.Rngs(0), **options)
