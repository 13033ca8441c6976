"""Neighbourhood attention on 2-D feature maps: NAT's and DiNAT's ``NeighborhoodAttention2D``.

>>> m = NeighborhoodAttention2D(dim=64, num_heads=2, kernel_size=7, rngs=nnx.Rngs(0))   # NAT
>>> d = create_mixer("neighborhood_attention", dim=64, num_heads=2, dilation=4, rngs=nnx.Rngs(0))  # DiNAT
>>> y = m(x)                                   # x [B,H,W,64] -> [B,H,W,64]

Every query attends to the ``kernel_size`` (per axis) nearest keys of its dilation group, windows
shifted inward at the borders (:func:`attnzoo.pallas_kernels.neighborhood_attention`, NATTEN's
semantics), with NAT's relative position bias added to the logits. DiNAT is this mixer with
``dilation > 1`` (its backbone alternates dilations per block).

Small maps: where ``H`` or ``W`` is smaller than ``kernel_size * dilation`` the map is zero-padded at
the bottom / right to that size before the qkv projection and cropped after the attention, as the
NATTEN module (<= 0.15) that NAT/DiNAT were trained with and Hugging Face's ``Dinat`` do (the
official ``dinat.py`` leaves the dilation as configured). Padded positions take part as keys (a
zero input token has key ``qkv.bias``), exactly as there.

Parameters (logical axes), laid out so a NATTEN / NAT checkpoint maps by reshapes:
  ``qkv.kernel [C, 3, Hd, Dh]`` (embed, None, heads, head_dim) = ``qkv.weight.T.reshape(C, 3, Hd, Dh)``
  (torch rows are q | k | v, each head-major), ``qkv.bias [3, Hd, Dh]``;
  ``rpb [Hd, 2 k_h - 1, 2 k_w - 1]`` (heads, None, None) = NATTEN's ``rpb`` as is;
  ``proj.kernel [Hd, Dh, C]`` (heads, head_dim, embed) = ``proj.weight.T.reshape(Hd, Dh, C)``,
  ``proj.bias [C]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo import pallas_kernels as pk
from attnzoo.layers.common import (
    DType,
    Dense,
    MeshAxes,
    as_pair,
    check_bool,
    check_heads,
    check_input,
    partitioned,
    shard_map_batch_heads,
)
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels.common import check_float

__all__ = ["NeighborhoodAttention2D"]

_OWNER = "NeighborhoodAttention2D"


@register_mixer("neighborhood_attention")
class NeighborhoodAttention2D(nnx.Module):
    """NAT / DiNAT neighbourhood attention mixer, ``[B, H, W, C] -> [B, H, W, C]``.

    Args:
      dim: channels ``C``. num_heads: heads ``Hd`` (must divide ``dim``).
      kernel_size: neighbourhood size, an int or ``(k_h, k_w)``.
      dilation: an int or ``(d_h, d_w)`` (DiNAT); maps smaller than ``kernel_size * dilation`` are
        padded (see the module docstring).
      stride: query stride, an int or pair, ``<= kernel_size`` (NATTEN's generalised NA;
        ``stride == kernel_size`` is blocked window attention).
      is_causal: a bool or ``(causal_h, causal_w)``.
      rel_pos_bias: learn NAT's relative position bias ``[Hd, 2 k_h - 1, 2 k_w - 1]``
        (truncated normal, std 0.02). With a bias the op runs its xla path (the Pallas engine takes
        no additive bias; ``impl="pallas"`` with a bias raises).
      qkv_bias: bias on the fused qkv projection. qk_scale: logit scale, default ``Dh ** -0.5``.
      impl: the op's implementation, "auto" | "xla" | "pallas" | "reference".
      mesh_axes: mesh axes sharding batch and heads when a Pallas call is wrapped in
        ``jax.shard_map`` under an active mesh.
      dtype: compute dtype (default: promotion of input and params); softmax in float32.
      param_dtype: parameter dtype. rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel_size=7,
        dilation=1,
        stride=1,
        is_causal=False,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        impl: str = "auto",
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim, self.num_heads = check_heads(_OWNER, dim, num_heads)
        self.head_dim = self.dim // self.num_heads
        pair = dict(single="a single value")
        self.kernel_size = as_pair(_OWNER, "kernel_size", kernel_size, **pair)
        self.dilation = as_pair(_OWNER, "dilation", dilation, **pair)
        self.stride = as_pair(_OWNER, "stride", stride, **pair)
        self.is_causal = as_pair(_OWNER, "is_causal", is_causal, check=check_bool, **pair)
        for axis in range(2):
            if self.stride[axis] > self.kernel_size[axis]:
                raise ValueError(
                    f"{_OWNER}: stride must be <= kernel_size, got stride {self.stride} and kernel_size {self.kernel_size}"
                )
        check_bool(_OWNER, "rel_pos_bias", rel_pos_bias)
        check_bool(_OWNER, "qkv_bias", qkv_bias)
        qk_scale = check_float(_OWNER, "qk_scale", qk_scale, positive=True)
        self.scale = self.head_dim**-0.5 if qk_scale is None else qk_scale
        if impl not in pk_common.IMPLS:
            raise ValueError(f"{_OWNER}: impl must be one of {pk_common.IMPLS}, got {impl!r}")
        if impl == "pallas" and rel_pos_bias:
            raise ValueError(
                f"{_OWNER}: impl='pallas' cannot apply the relative position bias (the flash-attention "
                "engine takes no additive bias); use rel_pos_bias=False, or impl='auto' / 'xla'"
            )
        self.impl = impl
        if not isinstance(mesh_axes, MeshAxes):
            raise TypeError(f"{_OWNER}: mesh_axes must be a MeshAxes, got {type(mesh_axes).__name__}")
        self.mesh_axes = mesh_axes
        self.dtype = dtype
        self.param_dtype = param_dtype

        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads, head_dim = self.num_heads, self.head_dim
        self.qkv = Dense(dim, (3, heads, head_dim), logical_axes=("embed", None, "heads", "head_dim"), use_bias=qkv_bias, **dense)
        self.proj = Dense((heads, head_dim), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=True, **dense)
        if rel_pos_bias:
            # NAT: trunc_normal_(std=0.02, a=-2, b=2); the bounds are absolute, i.e. +-100 std.
            init = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
            shape = (heads, 2 * self.kernel_size[0] - 1, 2 * self.kernel_size[1] - 1)
            self.rpb = nnx.Param(partitioned(init, ("heads", None, None))(rngs.params(), shape, param_dtype))
        else:
            self.rpb = None

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The map size attention runs on: at least ``kernel_size * dilation`` per axis."""
        return tuple(max(n, k * d) for n, k, d in zip((height, width), self.kernel_size, self.dilation))

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs of the attention's math for one ``height x width`` map (2 per
        multiply-add), with ``T = H' W'`` tokens of the padded map, ``A = Hd * Dh`` and ``K = kh * kw``
        keys per query: qkv ``2 T C 3A``, scores and weights @ values ``2 * 2 T K A`` (an upper bound
        with causal axes, whose first queries see fewer keys), output projection ``2 H W A C``.
        The ``xla`` path computes scores over tiles of queries and their key spans, more than
        ``T K``; this counts the math, not that path's work."""
        padded_h, padded_w = self.padded_size(height, width)
        tokens, attn_width = padded_h * padded_w, self.num_heads * self.head_dim
        keys = self.kernel_size[0] * self.kernel_size[1]
        return (2 * tokens * self.dim * 3 * attn_width + 4 * tokens * keys * attn_width
                + 2 * height * width * attn_width * self.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype."""
        check_input(_OWNER, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        _, height, width, _ = x.shape
        padded_h, padded_w = self.padded_size(height, width)
        if (padded_h, padded_w) != (height, width):
            x = jnp.pad(x, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))
        qkv = self.qkv(x)  # [B, H', W', 3, Hd, Dh]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        out = self._attend(q, k, v)[:, :height, :width]
        return self.proj(out)

    def _attend(self, q, k, v):
        options = dict(
            kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride,
            is_causal=self.is_causal, scale=self.scale, impl=self.impl,
        )
        if self.rpb is not None:
            return pk.neighborhood_attention(q, k, v, rel_pos_bias=self.rpb[...], **options)

        def attend(q, k, v):
            return pk.neighborhood_attention(q, k, v, **options)

        if pk_common.resolve_impl(self.impl, _OWNER) != "pallas":
            return attend(q, k, v)
        return shard_map_batch_heads(attend, (q, k, v), ("BYXHD",) * 3, "BYXHD", self.mesh_axes, owner=_OWNER)
