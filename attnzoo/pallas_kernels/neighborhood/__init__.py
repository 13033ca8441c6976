"""Neighbourhood attention (NATTEN's semantics) over 1-3 spatial axes: reference / xla / pallas.

>>> o = neighborhood_attention(q, k, v, kernel_size=7)                       # NAT, q [B,H,W,h,D]
>>> o = neighborhood_attention(q, k, v, (7, 7), dilation=(4, 2))            # DiNAT
>>> o = neighborhood_attention(q, k, v, 8, stride=8)                        # blocked (window) attention
>>> o = neighborhood_attention(q, k, v, (4, 7, 7), is_causal=(True, False, False))  # video

See :mod:`attnzoo.pallas_kernels.neighborhood.reference` for the exact definition of windows,
dilation groups, strides, causal windows and the relative position bias.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.neighborhood import reference as _reference
from attnzoo.pallas_kernels.neighborhood import xla as _xla
from attnzoo.pallas_kernels.neighborhood.pallas import NeighborhoodMask
from attnzoo.pallas_kernels.neighborhood.reference import AxisSpec

__all__ = ["neighborhood_attention", "NeighborhoodMask", "AxisSpec", "axis_specs"]

_OP = "neighborhood_attention"


def _per_axis_ints(name: str, value, ndim: int, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(
                f"{_OP}: {name} must be an int or a tuple of {ndim} ints (one per spatial axis), got {value!r}"
            )
        return tuple(common.check_int(_OP, f"{name}[{i}]", x, minimum=minimum) for i, x in enumerate(value))
    return (common.check_int(_OP, name, value, minimum=minimum),) * ndim


def _per_axis_bools(name: str, value, ndim: int) -> tuple[bool, ...]:
    def check(label, x):
        if not isinstance(x, (bool, np.bool_)):
            raise TypeError(f"{_OP}: {label} must be a bool, got {type(x).__name__}")
        return bool(x)

    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(
                f"{_OP}: {name} must be a bool or a tuple of {ndim} bools (one per spatial axis), got {value!r}"
            )
        return tuple(check(f"{name}[{i}]", x) for i, x in enumerate(value))
    return (check(name, value),) * ndim


def axis_specs(spatial, kernel_size, *, dilation=1, stride=1, is_causal=False) -> tuple[AxisSpec, ...]:
    """Validates the window options against the spatial shape; one :class:`AxisSpec` per axis.

    Rules (NATTEN's): ``1 <= kernel_size``, ``kernel_size * dilation <= length`` and
    ``stride <= kernel_size`` on every axis.
    """
    ndim = len(spatial)
    kernel = _per_axis_ints("kernel_size", kernel_size, ndim)
    dilation = _per_axis_ints("dilation", dilation, ndim)
    stride = _per_axis_ints("stride", stride, ndim)
    causal = _per_axis_bools("is_causal", is_causal, ndim)
    for a in range(ndim):
        if kernel[a] * dilation[a] > spatial[a]:
            raise ValueError(
                f"{_OP}: kernel_size * dilation must be <= the spatial length on every axis; axis {a} "
                f"has length {spatial[a]} but kernel_size {kernel[a]} * dilation {dilation[a]} = "
                f"{kernel[a] * dilation[a]}"
            )
        if stride[a] > kernel[a]:
            raise ValueError(
                f"{_OP}: stride must be <= kernel_size on every axis; axis {a} has stride {stride[a]} "
                f"> kernel_size {kernel[a]}"
            )
    return tuple(AxisSpec(int(n), k, d, s, c) for n, k, d, s, c in zip(spatial, kernel, dilation, stride, causal))


def _check_qkv(q, k, v):
    common.check_array(_OP, "q", q, ndim=(4, 5, 6), floating=True, expected="[B, *spatial, Hq, D] (1-3 spatial axes)")
    ndim = q.ndim
    batch, *spatial, _, head_dim = q.shape
    common.check_array(_OP, "k", k, ndim=ndim, floating=True, shape=(batch, *spatial, None, head_dim),
                       expected="[B, *spatial, Hkv, D] with q's B, spatial shape and D")
    kv_heads = k.shape[-2]
    common.check_array(_OP, "v", v, ndim=ndim, floating=True, shape=(batch, *spatial, kv_heads, None),
                       expected="[B, *spatial, Hkv, Dv] with k's B, spatial shape and Hkv")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{_OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_heads == 0 or q.shape[-2] % kv_heads:
        raise ValueError(
            f"{_OP}: the number of query heads ({q.shape[-2]}) must be a multiple of the number of "
            f"key/value heads ({kv_heads})"
        )
    if 0 in q.shape or v.shape[-1] == 0:
        raise ValueError(f"{_OP}: empty axis in q {tuple(q.shape)} or v {tuple(v.shape)}")


def neighborhood_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kernel_size,
    *,
    dilation=1,
    stride=1,
    is_causal=False,
    scale: float | None = None,
    rel_pos_bias: jax.Array | None = None,
    impl: str = "auto",
    interpret=None,
):
    """Neighbourhood attention (NATTEN's ``na1d``/``na2d``/``na3d``) with NAT's relative position bias.

    Args:
      q: ``[B, *spatial, Hq, D]`` with 1 to 3 spatial axes; k: ``[B, *spatial, Hkv, D]``;
        v: ``[B, *spatial, Hkv, Dv]``; ``Hq % Hkv == 0`` (GQA/MQA); one floating dtype.
      kernel_size: window size per axis (an int for every axis, or a tuple); ``>= 1``.
      dilation: per-axis dilation; ``kernel_size * dilation <= length`` on every axis.
      stride: per-axis query stride (queries of a stride group share one window);
        ``stride <= kernel_size``; ``stride == kernel_size`` is blocked (window) attention.
      is_causal: a bool or one per axis: causal axes see only the window ending at the query.
      scale: logit scale, default ``D ** -0.5``.
      rel_pos_bias: ``[Hq, 2*K_0 - 1, ..., 2*K_{r-1} - 1]`` NAT's relative position bias table,
        added to the logits at the (dilated) relative offset of key and query; or None. Supported
        by "reference" and "xla"; the Pallas path (the block-sparse flash-attention engine) takes
        no additive bias, so "pallas" with a bias raises and "auto" picks "xla".
      impl: "auto" | "reference" | "xla" | "pallas". "auto": pallas on TPU/GPU, xla on CPU.
      interpret: Pallas interpret mode (see :mod:`attnzoo.pallas_kernels.common`).

    Returns:
      ``[B, *spatial, Hq, Dv]`` in q's dtype. Softmax statistics are computed in float32 or wider.
    """
    _check_qkv(q, k, v)
    spatial = tuple(q.shape[1:-2])
    axes = axis_specs(spatial, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal)
    scale = common.check_float(_OP, "scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if rel_pos_bias is not None:
        want = (q.shape[-2], *(2 * axis.kernel - 1 for axis in axes))
        common.check_array(_OP, "rel_pos_bias", rel_pos_bias, floating=True, shape=want,
                           expected="[Hq, 2*K_0-1, ...] (one axis per spatial axis)")
    interpret = common.check_interpret(interpret, _OP)
    requested = impl
    impl = common.resolve_impl(impl, _OP)
    if impl == "pallas" and rel_pos_bias is not None:
        if requested == "auto":
            impl = "xla"
        else:
            raise ValueError(
                f"{_OP}: impl='pallas' does not support rel_pos_bias (the flash-attention engine takes "
                "no additive bias); use impl='xla' or 'auto' (which picks xla when a bias is given)"
            )
    run = functools.partial(_neighborhood_jit, impl=impl, axes=axes, scale=scale, interpret=interpret)
    explicit = common.explicit_mesh_axes()
    if explicit:
        # As pk.attention: run with the mesh axes treated as Auto and return q's sharding.
        spec = tuple(jax.typeof(q).sharding.spec) + (None,) * q.ndim
        out_spec = jax.sharding.PartitionSpec(*spec[: q.ndim - 1], None)
        run = jax.sharding.auto_axes(run, axes=explicit, out_sharding=out_spec)
    return run(q, k, v, rel_pos_bias)


@functools.partial(jax.jit, static_argnames=("impl", "axes", "scale", "interpret"))
def _neighborhood_jit(q, k, v, rel_pos_bias, *, impl, axes, scale, interpret):
    if impl == "reference":
        return _reference.neighborhood_attention(q, k, v, axes=axes, scale=scale, rel_pos_bias=rel_pos_bias)
    if impl == "xla":
        return _xla.neighborhood_attention(q, k, v, axes=axes, scale=scale, rel_pos_bias=rel_pos_bias)
    from attnzoo.pallas_kernels.neighborhood import pallas as _pallas

    return _pallas.neighborhood_attention(q, k, v, axes=axes, scale=scale, interpret=interpret)
