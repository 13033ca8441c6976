"""Hybrid language-model presets of the seed papers, as :class:`attnzoo.zoo.lm.DecoderLM` patterns.

>>> lm = zoo.create_model("kimi_linear_lm_tiny", rngs=nnx.Rngs(0))        # 3 KDA : 1 attention
>>> lm = zoo.create_model("jamba_lm_small", vocab_size=32000, rngs=nnx.Rngs(0))

Every preset has a ``_tiny`` (D 128, 4 heads) and a ``_small`` (D 384, 6 heads) size with a
byte-level vocabulary; any :class:`DecoderLM` argument can be overridden. Train one with
``python -m attnzoo.train --config attnzoo/configs/hybrid_lm.py:NAME --workdir DIR``.

==========================  ========================================  ==============================
preset                      super-block (repeated to depth)           from the paper
==========================  ========================================  ==============================
``hymba_lm_*``              hymba:global, hymba x2, hymba:global       Hymba: parallel attention +
                                                                      Mamba heads, SWA inside
                                                                      (meta tokens as sinks),
                                                                      meta tokens
``jamba_lm_*``              mamba x4, attn, mamba x3                  Jamba: 1 attention : 7 Mamba,
                                                                      attention at offset 4, no
                                                                      RoPE, RMSNorm on dt/B/C
``kimi_linear_lm_*``        kda, kda, kda, attn                       Kimi Linear: 3 KDA : 1 global
                                                                      attention (NoPE; MLA there)
``minimax_lm_*``            lightning x7, attn                        MiniMax-M1: 7 lightning : 1
                                                                      softmax, RoPE on half the head
``gdn_swa_lm_*``            gated_deltanet, swa                       Gated DeltaNet-H1: GDN and
                                                                      sliding-window attention
``sala_lm_*``               swa, lightning x3                         MiniCPM-SALA: 1 sparse/local :
                                                                      3 lightning (local = SWA here)
==========================  ========================================  ==============================

Deviations from the papers, all for lack of a block not in attnzoo yet (and named in each
preset's docstring): the mixture-of-experts MLPs (Jamba, Kimi Linear, MiniMax) are dense SwiGLU
MLPs; Kimi Linear's MLA layers are GQA attention without RoPE; MiniCPM-SALA's InfLLM-V2 sparse
attention is sliding-window attention; Hymba's layers do not share KV caches. (Hymba's
sliding-window layers keep the meta tokens in view beyond the window, as in its released
``modeling_hymba.py``: ``hymba_lm`` sets ``num_sink_tokens="meta"`` on them, which the model
resolves to its ``num_meta_tokens``, also when that is overridden.)

MiniMax scales each lightning layer's decay rates by its depth (``1 - l / (L - 1)``, deeper layers
forget slower). The rates are constants of a layer, and a scanned stack repeats one super-block, so
``minimax_lm`` makes its super-block the whole model: every layer is its own labelled pattern token
(``lightning:0 .. lightning:6, attn:7, lightning:8, ...``) with its own ``layer_idx``.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from attnzoo.zoo.common import build_from_preset
from attnzoo.zoo.lm import DecoderLM
from attnzoo.zoo.registry import register_model

__all__ = ["HYBRID_PRESETS"]

SIZES = {"tiny": dict(dim=128, num_heads=4), "small": dict(dim=384, num_heads=6)}

# name -> (super-block pattern, repeats per size {tiny, small}, DecoderLM arguments (or a function
# of the size's {dim, num_heads, depth} returning them; a "pattern" among them replaces the
# super-block's), summary)
HYBRID_PRESETS: dict[str, tuple[str, dict[str, int], Any, str]] = {
    "jamba_lm": (
        "mamba,mamba,mamba,mamba,attn,mamba,mamba,mamba",
        {"tiny": 1, "small": 2},
        dict(
            num_kv_heads=2,
            mixer_options={
                "attention": dict(use_rope=False),
                "mamba": dict(inner_layernorms=True, state_dim=16, expand=2),
            },
        ),
        "Jamba-style (Lieber et al. 2024, arXiv:2403.19887): one attention layer (GQA, no positional "
        "encoding) per seven Mamba layers with RMSNorms on dt, B and C; dense MLPs instead of Jamba's MoE",
    ),
    "hymba_lm": (
        "hymba:global,hymba,hymba,hymba:global",
        {"tiny": 1, "small": 2},
        lambda size: dict(
            num_kv_heads=2,
            num_meta_tokens=size["dim"] // 8,
            # The sliding-window layers keep the meta tokens (positions < num_meta_tokens) in view.
            mixer_options={
                "hymba": dict(num_kv_heads=2, window=64, state_dim=16, num_sink_tokens="meta"),
                "hymba:global": dict(window=None, num_sink_tokens=0),
            },
        ),
        "Hymba-style (Dong et al. 2024, arXiv:2411.13676): every layer a hybrid head (attention and Mamba heads "
        "in parallel on one input), global attention in the outer layers of each group of four and a sliding "
        "window of 64 elsewhere that keeps the meta tokens in view, learned meta tokens (D/8 of them; Hymba uses "
        "128) prepended to every sequence",
    ),
    "kimi_linear_lm": (
        "kda,kda,kda,attn",
        {"tiny": 1, "small": 2},
        dict(num_kv_heads=2, mixer_options={"attention": dict(use_rope=False)}),
        "Kimi-Linear-style (Kimi Team 2025, arXiv:2510.26692): three Kimi Delta Attention layers per "
        "global attention layer without RoPE (GQA here for Kimi's MLA); dense MLPs instead of MoE",
    ),
    "minimax_lm": (
        "lightning,lightning,lightning,lightning,lightning,lightning,lightning,attn",
        {"tiny": 1, "small": 2},
        lambda size: _depth_labelled(
            "lightning,lightning,lightning,lightning,lightning,lightning,lightning,attn", size["depth"],
            lambda index: {"layer_idx": index, "num_layers": size["depth"]} if index % 8 != 7 else None,
            dict(num_kv_heads=2, mixer_options={"attention": dict(partial_rotary_factor=0.5)}),
        ),
        "MiniMax-style (MiniMax 2025, arXiv:2506.13585): seven lightning-attention layers per softmax "
        "attention layer (GQA, RoPE on half of each head); dense MLPs instead of MoE",
    ),
    "gdn_swa_lm": (
        "gated_deltanet,swa",
        {"tiny": 2, "small": 4},
        dict(sliding_window=64),
        "Gated DeltaNet + sliding window (Yang et al. 2025, arXiv:2412.06464, GatedDeltaNet-H1): "
        "Gated DeltaNet layers interleaved with sliding-window attention (window 64)",
    ),
    "sala_lm": (
        "swa,lightning,lightning,lightning",
        {"tiny": 1, "small": 2},
        dict(sliding_window=64),
        "SALA-style (MiniCPM-SALA): one local attention layer (sliding window 64, standing in for "
        "InfLLM-V2 sparse attention) per three lightning-attention layers",
    ),
}


def _depth_labelled(pattern: str, depth: int, options_of_layer, arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments whose pattern spells out all ``depth`` layers (``pattern`` repeated), layer ``l``'s
    token labelled ``name:l`` with mixer options ``options_of_layer(l)`` (None: unlabelled)."""
    tokens = pattern.split(",")
    arguments = dict(arguments, mixer_options=dict(arguments.get("mixer_options", {})))
    spelled = []
    for index in range(depth):
        token, options = tokens[index % len(tokens)], options_of_layer(index)
        if options is not None:
            token = f"{token}:{index}"
            arguments["mixer_options"][token] = options
        spelled.append(token)
    arguments["pattern"] = ",".join(spelled)
    return arguments


def _register(name: str, size: str):
    pattern, repeats, arguments, summary = HYBRID_PRESETS[name]
    model_name = f"{name}_{size}"
    depth = len(pattern.split(",")) * repeats[size]
    if callable(arguments):
        arguments = dict(arguments(dict(SIZES[size], depth=depth)))
    pattern = arguments.pop("pattern", pattern)
    preset = dict(vocab_size=256, pattern=pattern, depth=depth, **SIZES[size], **arguments)

    def factory(*, rngs: nnx.Rngs, **overrides) -> DecoderLM:
        return build_from_preset(DecoderLM, model_name, preset, overrides, rngs)

    factory.__name__ = factory.__qualname__ = model_name
    factory.__doc__ = (
        f"{summary}.\n\n    Decoder LM: D {SIZES[size]['dim']}, {depth} layers, {SIZES[size]['num_heads']} heads, "
        f"byte vocabulary, pattern {pattern!r}."
    )
    return register_model(model_name)(factory)


for _name in HYBRID_PRESETS:
    for _size in SIZES:
        _register(_name, _size)
