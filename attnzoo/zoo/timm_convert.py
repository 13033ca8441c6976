"""timm checkpoints -> attnzoo vision models, from a plain ``dict[str, numpy.ndarray]``.

torch is never imported: a caller turns timm's ``state_dict`` into numpy arrays first, e.g.
``{k: v.detach().float().numpy() for k, v in timm_model.state_dict().items()}``.

>>> m = zoo.create_model("swin_tiny_patch4_window7_224", rngs=nnx.Rngs(0))
>>> unused = zoo.load_timm_weights(m, state_dict)

Each model family registers its converter with :func:`register_timm_converter`; the layouts
(torch ``Linear.weight [out, in]`` -> kernel ``[in, out]``, ``Conv2d.weight [O, I, kh, kw]``
(OIHW) -> ``[kh, kw, I, O]`` (HWIO), fused qkv rows split into q / k / v, relative position
tables re-indexed) are documented on each converter.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flax import nnx

from attnzoo.zoo.convert import StateDictReader, assign, linear_kernel

__all__ = ["load_timm_weights", "register_timm_converter", "conv_kernel", "load_dense", "load_layer_norm"]

TimmConverter = Callable[[nnx.Module, StateDictReader], None]
_CONVERTERS: dict[type, TimmConverter] = {}


def register_timm_converter(model_cls: type) -> Callable[[TimmConverter], TimmConverter]:
    """Decorator registering ``fn(model, read)`` as the converter of ``model_cls`` (and subclasses).

    ``read`` is a :class:`attnzoo.zoo.convert.StateDictReader`: ``read(name, shape)`` returns the
    array under ``name`` (checking the shape) and marks it used.
    """

    def decorate(fn: TimmConverter) -> TimmConverter:
        _CONVERTERS[model_cls] = fn
        return fn

    return decorate


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight [O, I/groups, kh, kw]`` (OIHW) -> ``[kh, kw, I/groups, O]`` (HWIO)."""
    if weight.ndim != 4:
        raise ValueError(f"conv_kernel: expected a 4-D OIHW conv weight, got shape {weight.shape}")
    return np.transpose(weight, (2, 3, 1, 0))


def load_dense(read: StateDictReader, dense, name: str, what: str | None = None) -> None:
    """torch ``Linear`` ``name.weight`` / ``name.bias`` -> an attnzoo ``Dense`` (kernel ``[in, out]``)."""
    what = what or name
    fan_in, fan_out = int(np.prod(dense.in_features)), int(np.prod(dense.out_features))
    weight = read(f"{name}.weight", (fan_out, fan_in))
    assign(dense.kernel, linear_kernel(weight, dense.in_features, dense.out_features), f"{what}.kernel", read.owner)
    if dense.bias is not None:
        assign(dense.bias, read(f"{name}.bias", (fan_out,)).reshape(dense.out_features), f"{what}.bias", read.owner)


def load_layer_norm(read: StateDictReader, norm, name: str, what: str | None = None) -> None:
    """torch ``LayerNorm`` ``name.weight`` / ``name.bias`` -> an attnzoo ``LayerNorm`` (scale, bias)."""
    what = what or name
    shape = tuple(norm.scale.get_value().shape)
    assign(norm.scale, read(f"{name}.weight", shape), f"{what}.scale", read.owner)
    if getattr(norm, "bias", None) is not None:
        assign(norm.bias, read(f"{name}.bias", shape), f"{what}.bias", read.owner)


def _converter_for(model: nnx.Module) -> TimmConverter:
    for cls in type(model).__mro__:
        if cls in _CONVERTERS:
            return _CONVERTERS[cls]
    known = ", ".join(sorted(cls.__name__ for cls in _CONVERTERS)) or "(none)"
    raise TypeError(f"load_timm_weights: no timm converter for {type(model).__name__}; models with one: {known}")


def load_timm_weights(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, strict: bool = True) -> list[str]:
    """Loads a timm ``state_dict`` (numpy arrays) into ``model`` in place.

    The model must have been created with the same architecture as the timm model (e.g. the same
    registered name, ``num_classes`` and image size). Every parameter of ``model`` is assigned;
    a missing key or a shape mismatch raises, naming the key and both shapes. Returns the keys of
    ``state_dict`` that were not used (non-parameter buffers such as timm's precomputed
    ``relative_position_index`` and ``attn_mask`` are not needed); ``strict=True`` raises if any
    parameter-like key (not a known buffer) was left unused.
    """
    import attnzoo.zoo  # noqa: F401  (imports every model module, registering its converter)

    convert = _converter_for(model)
    read = StateDictReader(state_dict, "", "load_timm_weights")
    convert(model, read)
    unused = read.unused()
    buffers = ("relative_position_index", "attn_mask", "num_batches_tracked", "height_lookup", "width_lookup")
    leftover = [key for key in unused if not key.endswith(buffers)]
    if strict and leftover:
        raise ValueError(f"load_timm_weights: state_dict keys not converted: {leftover}")
    return unused
