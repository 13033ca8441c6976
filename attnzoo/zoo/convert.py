"""Weight converters from PyTorch checkpoints given as plain ``dict[str, numpy.ndarray]``.

torch is never imported: a caller turns a ``state_dict`` into numpy arrays first, e.g.
``{k: v.detach().float().numpy() for k, v in torch_module.state_dict().items()}``.

>>> m = layers.create_mixer("mamba2", dim=768, num_heads=24, state_dim=128, rngs=nnx.Rngs(0))
>>> load_hf_mamba2_mixer(m, state_dict, prefix="backbone.layers.0.mixer.")

Layouts: a torch ``Linear.weight [out, in]`` becomes a kernel ``[in, *out]`` (transposed, then the
output axis split into heads), a depthwise ``Conv1d.weight [C, 1, K]`` becomes ``[K, C]`` (the same
taps: ``weight[K-1]`` multiplies the current token in both). Every assignment checks the source
key exists and the shape matches, naming the key, the parameter and both shapes otherwise; keys
under ``prefix`` that no converter consumed are reported (``strict=True`` raises).
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["StateDictReader", "load_hf_mamba2_mixer", "load_hf_mamba_mixer", "load_hf_kimi_delta_attention",
           "load_hf_olmo_hybrid_gated_deltanet", "load_hf_minimax_lightning_attention", "load_hf_zamba2"]


class StateDictReader:
    """Reads arrays from a state dict under a prefix and remembers which keys were used."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str = "", owner: str = "convert"):
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: state_dict must be a mapping of names to numpy arrays, got {type(state_dict).__name__}")
        self.state_dict = state_dict
        self.prefix = prefix
        self.owner = owner
        self.used: set[str] = set()

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        key = self.prefix + name
        if key not in self.state_dict:
            nearby = sorted(k for k in self.state_dict if k.startswith(self.prefix))[:12]
            raise KeyError(f"{self.owner}: state_dict has no {key!r}; keys under {self.prefix!r}: {nearby}")
        value = np.asarray(self.state_dict[key])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.owner}: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return value

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state_dict

    def unused(self) -> list[str]:
        return sorted(k for k in self.state_dict if k.startswith(self.prefix) and k not in self.used)

    def finish(self, strict: bool) -> list[str]:
        unused = self.unused()
        if strict and unused:
            raise ValueError(f"{self.owner}: state_dict keys not converted: {unused}")
        return unused


def assign(param: nnx.Param, value: np.ndarray, what: str, owner: str = "convert") -> None:
    """Sets ``param`` to ``value`` (cast to the parameter's dtype), checking the shape."""
    current = param.get_value()
    if tuple(current.shape) != tuple(value.shape):
        raise ValueError(f"{owner}: {what} has shape {tuple(current.shape)}, the converted value {tuple(value.shape)}")
    param.set_value(jnp.asarray(value, current.dtype))


def linear_kernel(weight: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """torch ``Linear.weight [out, in]`` -> kernel ``[*in_shape, *out_shape]``."""
    return weight.T.reshape(tuple(in_shape) + tuple(out_shape))


def depthwise_conv(weight: np.ndarray) -> np.ndarray:
    """torch depthwise ``Conv1d.weight [C, 1, K]`` -> ``ShortConvolution.weight [K, C]``."""
    return weight[:, 0, :].T


def _load_dense(read, dense, name: str, rows: slice | None, owner: str, what: str) -> None:
    weight = read(f"{name}.weight")
    weight = weight if rows is None else weight[rows]
    assign(dense.kernel, linear_kernel(weight, dense.in_features, dense.out_features), f"{what}.kernel", owner)
    if dense.bias is not None:
        bias = read(f"{name}.bias")
        bias = bias if rows is None else bias[rows]
        assign(dense.bias, bias.reshape(dense.out_features), f"{what}.bias", owner)


def _load_conv(read, conv, channels: slice, owner: str, what: str) -> None:
    assign(conv.weight, depthwise_conv(read("conv1d.weight")[channels]), f"{what}.weight", owner)
    if conv.bias is not None:
        assign(conv.bias, read("conv1d.bias")[channels], f"{what}.bias", owner)


def load_hf_mamba2_mixer(module, state_dict: Mapping[str, np.ndarray], prefix: str = "", *, strict: bool = True):
    """Loads a Hugging Face ``Mamba2Mixer`` (also Zamba2's, Bamba's) into :class:`attnzoo.layers.ssm.Mamba2`.

    Source keys (under ``prefix``): ``in_proj.weight [2 d_inner + 2 G N + H, D]`` (rows: gate z,
    x, B, C, dt) and ``in_proj.bias`` if present, ``conv1d.weight [d_inner + 2 G N, 1, K]`` /
    ``conv1d.bias`` (channels: x, B, C), ``dt_bias``, ``A_log``, ``D [H]``, ``norm.weight
    [d_inner]``, ``out_proj.weight [D, d_inner]`` / ``.bias``. Returns the unused keys under the
    prefix (``strict`` raises instead).
    """
    owner = "load_hf_mamba2_mixer"
    read = StateDictReader(state_dict, prefix, owner)
    inner, gn, h = module.d_inner, module.num_groups * module.state_dim, module.num_heads
    bounds = np.cumsum([0, inner, inner, gn, gn, h])
    rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    read("in_proj.weight", (int(bounds[-1]), module.dim))
    read("conv1d.weight", (inner + 2 * gn, 1, module.conv_size))
    for dense, row, what in zip(
        (module.z_proj, module.x_proj, module.B_proj, module.C_proj, module.dt_proj), rows,
        ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj"),
    ):
        _load_dense(read, dense, "in_proj", row, owner, what)
    channels = [slice(0, inner), slice(inner, inner + gn), slice(inner + gn, inner + 2 * gn)]
    for conv, channel, what in zip((module.x_conv1d, module.B_conv1d, module.C_conv1d), channels,
                                   ("x_conv1d", "B_conv1d", "C_conv1d")):
        _load_conv(read, conv, channel, owner, what)
    assign(module.dt_bias, read("dt_bias", (h,)), "dt_bias", owner)
    assign(module.A_log, read("A_log", (h,)), "A_log", owner)
    D = read("D")
    assign(module.D, D.reshape(module.D.get_value().shape), "D", owner)
    assign(module.norm.norm.scale, read("norm.weight", (inner,)), "norm.norm.scale", owner)
    read("out_proj.weight", (module.dim, inner))
    _load_dense(read, module.out_proj, "out_proj", None, owner, "out_proj")
    return read.finish(strict)


def load_hf_mamba_mixer(module, state_dict: Mapping[str, np.ndarray], prefix: str = "", *, strict: bool = True):
    """Loads a Hugging Face ``MambaMixer`` (Mamba-1) or ``JambaMambaMixer`` (with its RMSNorms on dt,
    B, C: build the module with ``inner_layernorms=True``) into :class:`attnzoo.layers.ssm.Mamba`.

    Source keys: ``in_proj.weight [2 d_inner, D]`` (rows: x, z), ``conv1d.weight [d_inner, 1, K]``
    / ``.bias``, ``x_proj.weight [R + 2 N, d_inner]`` (rows: dt low rank R, B, C),
    ``dt_proj.weight [d_inner, R]`` / ``.bias`` (the dt bias), ``A_log [d_inner, N]``,
    ``D [d_inner]``, ``out_proj.weight [D, d_inner]``; biases of in/out projections if present.
    """
    owner = "load_hf_mamba_mixer"
    read = StateDictReader(state_dict, prefix, owner)
    inner, rank, n = module.d_inner, module.dt_rank, module.state_dim
    read("in_proj.weight", (2 * inner, module.dim))
    read("conv1d.weight", (inner, 1, module.conv_size))
    _load_dense(read, module.x_in_proj, "in_proj", slice(0, inner), owner, "x_in_proj")
    _load_dense(read, module.z_proj, "in_proj", slice(inner, 2 * inner), owner, "z_proj")
    _load_conv(read, module.conv1d, slice(0, inner), owner, "conv1d")
    x_proj = read("x_proj.weight", (rank + 2 * n, inner))
    for dense, rows, what in (
        (module.dt_in_proj, slice(0, rank), "dt_in_proj"),
        (module.B_proj, slice(rank, rank + n), "B_proj"),
        (module.C_proj, slice(rank + n, rank + 2 * n), "C_proj"),
    ):
        assign(dense.kernel, linear_kernel(x_proj[rows], dense.in_features, dense.out_features), f"{what}.kernel", owner)
    assign(module.dt_proj.kernel, linear_kernel(read("dt_proj.weight", (inner, rank)), (rank,), (inner,)),
           "dt_proj.kernel", owner)
    assign(module.dt_bias, read("dt_proj.bias", (inner,)), "dt_bias", owner)
    assign(module.A_log, read("A_log", (inner, n)), "A_log", owner)
    assign(module.D, read("D", (inner,)), "D", owner)
    if module.dt_layernorm is not None:  # Jamba's (and Hymba's) RMSNorms on dt, B, C
        assign(module.dt_layernorm.scale, read("dt_layernorm.weight", (rank,)), "dt_layernorm.scale", owner)
        assign(module.B_layernorm.scale, read("b_layernorm.weight", (n,)), "B_layernorm.scale", owner)
        assign(module.C_layernorm.scale, read("c_layernorm.weight", (n,)), "C_layernorm.scale", owner)
    read("out_proj.weight", (module.dim, inner))
    _load_dense(read, module.out_proj, "out_proj", None, owner, "out_proj")
    return read.finish(strict)


def load_hf_kimi_delta_attention(module, state_dict: Mapping[str, np.ndarray], prefix: str = "", *,
                                 strict: bool = True):
    """Loads a Hugging Face ``KimiLinearDeltaAttention`` into :class:`attnzoo.layers.delta.KimiDeltaAttention`
    (built with ``output_gate_bias=False``, ``expand_v=1``, as Kimi Linear).

    Source keys: ``q_proj``/``k_proj``/``v_proj.weight [H K, D]``, ``conv1d.weight [3 H K, 1, W]``
    (channels q, k, v), ``forget_gate.f_a_proj.weight [K, D]``, ``forget_gate.f_b_proj.weight
    [H K, K]``, ``forget_gate.dt_bias [H K]``, ``forget_gate.A_log [1, 1, H, 1]``, ``b_proj.weight
    [H, D]``, ``g_a_proj.weight [K, D]``, ``g_b_proj.weight [H K, K]``, ``o_norm.weight [K]``,
    ``o_proj.weight [D, H K]``.
    """
    owner = "load_hf_kimi_delta_attention"
    read = StateDictReader(state_dict, prefix, owner)
    h, k = module.num_v_heads, module.head_k_dim
    if module.num_heads != h or module.head_v_dim != k:
        raise ValueError(f"{owner}: the module needs num_v_heads == num_heads and expand_v == 1 (Kimi Linear), got "
                         f"H={module.num_heads}, Hv={h}, K={k}, V={module.head_v_dim}")
    if module.g_b_proj.bias is not None:
        raise ValueError(f"{owner}: Kimi Linear's output gate has no bias; build the module with output_gate_bias=False")
    width = h * k
    for name in ("q_proj", "k_proj", "v_proj", "b_proj", "o_proj"):
        _load_dense(read, getattr(module, name), name, None, owner, name)
    if module.use_short_conv:
        read("conv1d.weight", (3 * width, 1, module.conv_size))
        for index, conv in enumerate((module.q_conv1d, module.k_conv1d, module.v_conv1d)):
            _load_conv(read, conv, slice(index * width, (index + 1) * width), owner, f"conv{index}")
    _load_dense(read, module.f_a_proj, "forget_gate.f_a_proj", None, owner, "f_a_proj")
    _load_dense(read, module.f_b_proj, "forget_gate.f_b_proj", None, owner, "f_b_proj")
    assign(module.dt_bias, read("forget_gate.dt_bias", (width,)).reshape(h, k), "dt_bias", owner)
    assign(module.A_log, read("forget_gate.A_log", (1, 1, h, 1)).reshape(h), "A_log", owner)
    _load_dense(read, module.g_a_proj, "g_a_proj", None, owner, "g_a_proj")
    _load_dense(read, module.g_b_proj, "g_b_proj", None, owner, "g_b_proj")
    assign(module.o_norm.norm.scale, read("o_norm.weight", (k,)), "o_norm.norm.scale", owner)
    return read.finish(strict)


def load_hf_olmo_hybrid_gated_deltanet(module, state_dict: Mapping[str, np.ndarray], prefix: str = "", *,
                                      strict: bool = True):
    """Loads a Hugging Face ``OlmoHybridGatedDeltaNet`` (``transformers/models/olmo_hybrid/modeling_olmo_hybrid.py``)
    into :class:`attnzoo.layers.delta.GatedDeltaNet`.

    The module needs the layer's sizes: ``num_heads = linear_num_key_heads`` (H), ``num_v_heads =
    linear_num_value_heads`` (Hv), ``head_dim = linear_key_head_dim`` (K), ``expand_v =
    linear_value_head_dim / linear_key_head_dim`` (V), ``use_gate=True``, ``use_short_conv=True``,
    ``conv_size = linear_conv_kernel_dim``, ``allow_neg_eigval = linear_allow_neg_eigval`` (not stored in
    the weights) and ``norm_eps=1e-5`` (the layer's fixed ``o_norm`` eps, not ``rms_norm_eps``).

    Source keys: ``q_proj``/``k_proj.weight [H K, D]``, ``v_proj``/``g_proj.weight [Hv V, D]``,
    ``a_proj``/``b_proj.weight [Hv, D]``, ``conv1d.weight [2 H K + Hv V, 1, W]`` (channels q, k, v;
    one depthwise convolution, split into ``q_conv1d``/``k_conv1d``/``v_conv1d``), ``A_log``,
    ``dt_bias [Hv]``, ``o_norm.weight [V]`` (-> ``o_norm.norm.scale``), ``o_proj.weight [D, Hv V]``.
    Grouped value heads agree: value head ``i`` reads key head ``i // (Hv / H)`` on both sides
    (``repeat_interleave``). Returns the unused keys under the prefix (``strict`` raises instead).
    """
    owner = "load_hf_olmo_hybrid_gated_deltanet"
    read = StateDictReader(state_dict, prefix, owner)
    if not module.use_gate or not module.use_short_conv:
        raise ValueError(f"{owner}: OlmoHybridGatedDeltaNet has an output gate and a short convolution; build the "
                         f"module with use_gate=True and use_short_conv=True, got use_gate={module.use_gate}, "
                         f"use_short_conv={module.use_short_conv}")
    d, h, hv, dk, dv = module.dim, module.num_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
    shapes = dict(q_proj=(h * dk, d), k_proj=(h * dk, d), v_proj=(hv * dv, d), g_proj=(hv * dv, d),
                  a_proj=(hv, d), b_proj=(hv, d), o_proj=(d, hv * dv))
    for name, shape in shapes.items():
        read(f"{name}.weight", shape)
        _load_dense(read, getattr(module, name), name, None, owner, name)
    read("conv1d.weight", (2 * h * dk + hv * dv, 1, module.conv_size))
    bounds = (0, h * dk, 2 * h * dk, 2 * h * dk + hv * dv)
    for index, (conv, what) in enumerate(zip((module.q_conv1d, module.k_conv1d, module.v_conv1d),
                                             ("q_conv1d", "k_conv1d", "v_conv1d"))):
        _load_conv(read, conv, slice(bounds[index], bounds[index + 1]), owner, what)
    assign(module.A_log, read("A_log", (hv,)), "A_log", owner)
    assign(module.dt_bias, read("dt_bias", (hv,)), "dt_bias", owner)
    assign(module.o_norm.norm.scale, read("o_norm.weight", (dv,)), "o_norm.norm.scale", owner)
    return read.finish(strict)


def load_hf_minimax_lightning_attention(module, state_dict: Mapping[str, np.ndarray], prefix: str = "", *,
                                        strict: bool = True):
    """Loads a Hugging Face ``MiniMaxLightningAttention`` into :class:`attnzoo.layers.linear.LightningAttention`
    (build it with the same ``layer_idx`` / ``num_layers``: the decay slopes are constants, not weights).

    Source keys: ``qkv_proj.weight [3 H Dh, D]`` (rows per head: q, k, v of that head),
    ``output_gate.weight [H Dh, D]``, ``norm.weight [H Dh]``, ``out_proj.weight [D, H Dh]``; the
    buffers ``slope_rate``, ``query_decay``, ``key_decay``, ``diagonal_decay`` are derived and skipped.
    """
    owner = "load_hf_minimax_lightning_attention"
    read = StateDictReader(state_dict, prefix, owner)
    h, dh, d = module.num_heads, module.head_dim, module.dim
    qkv = read("qkv_proj.weight", (3 * h * dh, d)).reshape(h, 3, dh, d)
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        kernel = np.transpose(qkv[:, index], (2, 0, 1))  # [D, H, Dh]
        assign(getattr(module, name).kernel, kernel, f"{name}.kernel", owner)
    if module.gate_proj is None:
        raise ValueError(f"{owner}: MiniMax's output gate is full rank; build the module with gate_low_rank_dim=None")
    _load_dense(read, module.gate_proj, "output_gate", None, owner, "gate_proj")
    assign(module.norm.scale, read("norm.weight", (h * dh,)), "norm.scale", owner)
    _load_dense(read, module.o_proj, "out_proj", None, owner, "o_proj")
    for buffer in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"):
        if read.has(buffer):
            read.used.add(prefix + buffer)
    return read.finish(strict)


def load_stacked(stack, load_repeat) -> None:
    """Calls ``load_repeat(k, layer)`` on a standalone copy of each repeat ``k`` of a
    :class:`attnzoo.zoo.common.LayerStack` and writes the loaded parameters back into the stack."""
    loaded = []
    for k in range(stack.num_layers):
        layer = stack.layer(k)
        load_repeat(k, layer)
        loaded.append(nnx.state(layer, nnx.Param))
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *loaded)
    target = nnx.state(stack.layers, nnx.Param)
    jax.tree.map(lambda variable, value: variable.set_value(value.astype(variable.get_value().dtype)),
                 target, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(stack.layers, target)


def _same_as(read, name: str, value: np.ndarray, owner: str) -> None:
    """A tied copy of an already converted array: must be present under ``name`` and equal."""
    if read.has(name):
        if not np.array_equal(read(name), value):
            raise ValueError(f"{owner}: {read.prefix + name!r} should be tied to an already converted array but differs")


def load_hf_zamba2(model, state_dict: Mapping[str, np.ndarray], prefix: str = "", *, strict: bool = True):
    """Loads a Hugging Face ``Zamba2ForCausalLM`` (``prefix=""``) or ``Zamba2Model``
    (``prefix`` so that keys read ``model.layers...`` after it) into :class:`attnzoo.zoo.zamba.ZambaLM`.

    The model must have the checkpoint's layout: ``mixer="mamba2"``, ``hybrid_layer_ids`` at
    ``shared_offset`` of every ``shared_every`` layers, ``num_shared_blocks = num_mem_blocks``, the
    same adapter rank and ``attention_adapters = use_shared_attention_adapter``. Keys: per layer
    ``l`` the Mamba-2 mixer (``model.layers.l.mamba.*`` or ``.mamba_decoder.mamba.*``, see
    :func:`load_hf_mamba2_mixer`) and its ``input_layernorm``; at shared layers ``linear.weight`` and
    ``shared_transformer.*`` (``self_attn.{q,k,v,o}_proj``, the adapters ``linear_{q,k,v}_adapter_list.i``
    and ``feed_forward.gate_up_proj_adapter_list.i`` of the ``i``-th shared layer, ``input_layernorm``,
    ``pre_ff_layernorm``, ``feed_forward.{gate_up,down}_proj``); ``model.embed_tokens.weight``,
    ``model.final_layernorm.weight`` and a tied ``lm_head.weight``. Tied copies of a shared block
    must equal the first one.
    """
    owner = "load_hf_zamba2"
    read = StateDictReader(state_dict, prefix, owner)
    d, every, offset, shared = model.dim, model.shared_every, model.shared_offset, model.num_shared_blocks
    group_size = every * shared
    embedding = read("model.embed_tokens.weight", (model.vocab_size, d))
    assign(model.embedding, embedding, "embedding", owner)
    assign(model.norm.scale, read("model.final_layernorm.weight", (d,)), "norm.scale", owner)
    if model.head is None:
        _same_as(read, "lm_head.weight", embedding, owner)
    else:
        _load_dense(read, model.head, "lm_head", None, owner, "head")

    first_use: dict[int, str] = {}

    def load_block(block, key: str):
        attention = block.attention
        for name in ("q_proj", "k_proj", "v_proj"):
            _load_dense(read, getattr(attention, name), f"{key}self_attn.{name}", None, owner, f"shared {name}")
        _load_dense(read, block.o_proj, f"{key}self_attn.o_proj", None, owner, "shared o_proj")
        assign(block.input_norm.scale, read(f"{key}input_layernorm.weight", (2 * d,)), "shared input_norm", owner)
        assign(block.mlp_norm.scale, read(f"{key}pre_ff_layernorm.weight", (d,)), "shared mlp_norm", owner)
        _load_dense(read, block.gate_up_proj, f"{key}feed_forward.gate_up_proj", None, owner, "shared gate_up_proj")
        _load_dense(read, block.down_proj, f"{key}feed_forward.down_proj", None, owner, "shared down_proj")

    def check_tied(key: str, first: str):
        for name in list(read.state_dict):
            if name.startswith(read.prefix + first) and "adapter_list" not in name:
                _same_as(read, key + name[len(read.prefix + first):], np.asarray(read.state_dict[name]), owner)

    def load_repeat(k: int, superblock) -> None:
        for local in range(group_size):
            layer_index = k * group_size + local
            group, position = divmod(local, every)
            key = f"model.layers.{layer_index}."
            layer = superblock.layers[local]
            if position == offset:
                invocation = k * shared + group
                block_key = f"{key}shared_transformer."
                if group not in first_use:
                    first_use[group] = block_key
                    load_block(model.shared[group], block_key)
                else:
                    check_tied(block_key, first_use[group])
                _load_dense(read, superblock.shared_proj[group], f"{key}linear", None, owner, f"shared_proj[{group}]")
                adapters = superblock.adapters[group]
                if adapters.q_down is not None:
                    for name in "qkv":
                        base = f"{block_key}self_attn.linear_{name}_adapter_list.{invocation}"
                        _load_dense(read, getattr(adapters, f"{name}_down"), f"{base}.0", None, owner, f"{name}_down")
                        _load_dense(read, getattr(adapters, f"{name}_up"), f"{base}.1", None, owner, f"{name}_up")
                base = f"{block_key}feed_forward.gate_up_proj_adapter_list.{invocation}"
                _load_dense(read, adapters.gate_up_down, f"{base}.0", None, owner, "gate_up_down")
                _load_dense(read, adapters.gate_up_up, f"{base}.1", None, owner, "gate_up_up")
                key = f"{key}mamba_decoder."
            assign(layer.norm.scale, read(f"{key}input_layernorm.weight", (d,)), f"layers[{layer_index}].norm", owner)
            mixer_read = StateDictReader(state_dict, read.prefix + f"{key}mamba.", owner)
            load_hf_mamba2_mixer(layer.mixer, state_dict, read.prefix + f"{key}mamba.", strict=False)
            read.used.update(k2 for k2 in state_dict if k2.startswith(mixer_read.prefix))

    load_stacked(model.blocks, load_repeat)
    # A shared block's adapter lists hold every one of its calls' adapters, so each adapter also
    # appears under the other layers that share the block: those copies must equal the converted one.
    pattern = re.compile(r"model\.layers\.(\d+)\.shared_transformer\.(.*_adapter_list)\.(\d+)\.(.*)")
    for name in read.unused():
        match = pattern.fullmatch(name[len(read.prefix):])
        if match is None:
            continue
        invocation = int(match.group(3))
        home = (invocation // shared) * group_size + (invocation % shared) * every + offset
        canonical = f"model.layers.{home}.shared_transformer.{match.group(2)}.{invocation}.{match.group(4)}"
        if read.prefix + canonical in read.used:
            _same_as(read, name[len(read.prefix):], np.asarray(state_dict[read.prefix + canonical]), owner)
    return read.finish(strict)
