"""Hymba-style LMs keep the meta tokens in view of their sliding-window layers (attention sinks)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import zoo
from tests.zoo.test_generate import NARROW, assert_prefill_then_decode_matches

WINDOW, META, DEPTH, LENGTH = 3, 4, 2, 20


def _swa_hymba(sinks, seed=0):
    """``hymba_lm_tiny`` narrowed to sliding-window hybrid heads only (window 3, 4 meta tokens)."""
    options = dict(num_kv_heads=2, window=WINDOW, state_dim=16, num_sink_tokens=sinks)
    return zoo.create_model("hymba_lm_tiny", rngs=nnx.Rngs(seed), **NARROW, pattern="hymba", depth=DEPTH,
                            num_meta_tokens=META, mixer_options={"hymba": options})


def _attention_only(lm):
    """Zeroes the Mamba branch's output norm, so information moves along the sequence only through attention."""
    for path, variable in nnx.iter_graph(lm):
        if isinstance(variable, nnx.Param) and "mamba_norm" in path:
            variable[...] = jnp.zeros_like(variable[...])
    return lm


def test_preset_sets_the_meta_tokens_as_sinks_of_its_sliding_window_layers():
    lm = zoo.create_model("hymba_lm_tiny", rngs=nnx.Rngs(0), **NARROW)
    mixers = [block.mixer.attention for block in lm.blocks.layers.blocks]
    assert [m.window for m in mixers] == [None, (64, 0), (64, 0), None]
    assert [m.num_sink_tokens for m in mixers] == [0, lm.num_meta_tokens, lm.num_meta_tokens, 0]
    assert lm.num_meta_tokens > 0


@nnx.jit
def _forward(lm, tokens):
    return lm(tokens)


def _far_logit_change(sinks):
    """Largest change of the logits beyond the layers' reach of the meta tokens when they change."""
    lm = _attention_only(_swa_hymba(sinks))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, LENGTH)), jnp.int32)
    before = np.asarray(_forward(lm, tokens))
    lm.meta_tokens[...] = lm.meta_tokens[...] + 1.0
    after = np.asarray(_forward(lm, tokens))
    # Without sinks, token t (sequence position META + t) reaches back DEPTH * WINDOW positions.
    far = np.arange(LENGTH) + META - DEPTH * WINDOW > META - 1
    return np.abs(after - before)[:, far].max(), np.abs(after - before)[:, ~far].max()


def test_meta_tokens_stay_visible_beyond_the_window():
    with_sinks_far, _ = _far_logit_change(sinks=META)
    without_far, without_near = _far_logit_change(sinks=0)
    assert without_near > 1e-3  # the meta tokens matter where the window still covers them
    assert without_far == 0.0  # the control: out of reach without sinks
    assert with_sinks_far > 1e-3


def test_prefill_then_decode_equals_full_forward():
    """Right-padded prompts (junk padding) longer than window + meta tokens, then decoding steps."""
    lm = _swa_hymba(sinks=META, seed=3)
    assert_prefill_then_decode_matches(lm, [9, 4], width=9, steps=3, padding="right", seed=2)


def test_hymba_preset_sinks_follow_an_overridden_meta_token_count():
    """``num_sink_tokens="meta"`` resolves to the model's num_meta_tokens, also when overridden."""
    lm = zoo.create_model("hymba_lm_tiny", dim=32, num_heads=2, num_meta_tokens=3, rngs=nnx.Rngs(0))
    assert [block.mixer.attention.num_sink_tokens for block in lm.blocks.layers.blocks] == [0, 3, 3, 0]
