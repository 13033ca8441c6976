"""DaViT's dual attention (Ding et al. 2022): channel group attention and spatial window attention,
plus DaViT's convolutional position encoding.

>>> m = ChannelGroupAttention(dim=96, num_heads=3, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,H,W,96] -> [B,H,W,96]
>>> w = create_mixer("davit_window", dim=96, num_heads=3, window_size=7, rngs=nnx.Rngs(0))

Registered mixers (both 2-D, ``x [B, H, W, C] -> [B, H, W, C]``):

==================  ==============================================================================
``davit_channel``   :class:`ChannelGroupAttention`: the heads split the channels into ``Hd`` groups
                    of ``Cg = C / Hd``; each group attends over its channels with a ``Cg x Cg``
                    attention matrix computed from the transposed tokens.
``davit_window``    :class:`DaViTWindowAttention`: :class:`attnzoo.layers.window.WindowAttention`
                    with DaViT's defaults: contiguous ``7 x 7`` windows, no shift, no relative
                    position bias; maps that do not divide by the window are zero-padded at the
                    bottom / right and cropped after (timm's ``SpatialBlock``).
==================  ==============================================================================

Channel group attention, as the official code (dingmyu/davit ``ChannelAttention``, timm's
``davit.ChannelAttention``) computes it. With ``T = H * W`` tokens and, per group ``g``, the three
slices ``A_g, B_g, V'_g in R^{T x Cg}`` of the fused projection (in that order along
``qkv.kernel``'s axis 1; timm calls them q, k, v)::

    S_g   = softmax_rows((scale * B_g)^T @ V'_g)       # [Cg, Cg], softmax over the last axis
    out_g = (S_g @ A_g^T)^T = A_g @ S_g^T             # [T, Cg]
    y     = concat_g(out_g) @ proj.kernel + proj.bias

``scale = Cg ** -0.5`` (the official ``head_dim ** -0.5``; ``qk_scale`` overrides it). The paper
writes ``softmax(Q^T K / sqrt(Cg)) V^T``: the same map with its ``Q, K, V`` being slices
``1, 2, 0``; the parameter layout here is timm's, so its checkpoints load unchanged. Scores,
softmax and the sums over tokens are float32 (or wider), whatever the compute dtype.

Parameters (logical axes; the same layout as ``WindowAttention``): ``qkv.kernel [C, 3, Hd, Cg]``
(embed, None, heads, head_dim), ``qkv.bias [3, Hd, Cg]``, ``proj.kernel [Hd, Cg, C]`` (heads,
head_dim, embed), ``proj.bias [C]``. A torch ``Linear(C, 3C)`` weight ``[3C, C]`` whose rows are
``(slice, head, channel)`` maps to ``qkv.kernel`` by a transpose and a reshape.

:class:`ConvPosEnc` (timm's ``ConvPosEnc``): ``x + act(depthwise3x3(x))`` with a bias, ``act`` the
identity (DaViT's default) or exact GELU; DaViT applies it before each attention and before each MLP.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import DType, check_bool, check_input, compute_dtype, gelu
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.window import WindowAttention, qk_scale_or_default, qkv_projections
from attnzoo.pallas_kernels.common import check_int

__all__ = ["ChannelGroupAttention", "DaViTWindowAttention", "ConvPosEnc"]


@register_mixer("davit_channel")
class ChannelGroupAttention(nnx.Module):
    """DaViT channel group attention: softmax attention among the channels of each of ``num_heads``
    groups, every token contributing to the ``Cg x Cg`` scores (see the module docstring).

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype. The scores sum over all ``H * W``
    tokens, so permuting the tokens permutes the output the same way (no positional information).

    Args:
      dim: channels ``C``.
      num_heads: channel groups ``Hd``; must divide ``dim`` (``Cg = C / Hd``).
      qkv_bias / out_bias: biases of the fused projection and of the output projection (DaViT:
        both True).
      qk_scale: score scale; default ``Cg ** -0.5``.
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameters.
      kernel_init: initializer of the two projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_scale: float | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        if self.dim % self.num_heads:
            raise ValueError(f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) into channel groups")
        self.head_dim = self.dim // self.num_heads
        check_bool(owner, "qkv_bias", qkv_bias)
        check_bool(owner, "out_bias", out_bias)
        self.scale = qk_scale_or_default(owner, qk_scale, self.head_dim)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.qkv, self.proj = qkv_projections(dim, self.num_heads, self.head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                                              dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        batch, height, width, _ = x.shape
        qkv = self.qkv(x.reshape(batch, height * width, self.dim))  # [B, T, 3, Hd, Cg]
        values, rows, cols = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bthi,bthj->bhij", rows, cols, preferred_element_type=accumulate) * self.scale
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, Hd, Cg, Cg]
        out = jnp.einsum("bhij,bthj->bthi", weights, values, preferred_element_type=accumulate).astype(dtype)
        return self.proj(out).reshape(batch, height, width, self.dim)

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), ``T = H W``:
        fused projection ``2 T C 3C``, scores and weights @ values ``2 * 2 T Hd Cg^2``, output
        projection ``2 T C C``."""
        tokens = height * width
        groups = 2 * tokens * self.num_heads * self.head_dim**2
        return 2 * tokens * self.dim * 3 * self.dim + 2 * groups + 2 * tokens * self.dim * self.dim


@register_mixer("davit_window")
class DaViTWindowAttention(WindowAttention):
    """:class:`attnzoo.layers.window.WindowAttention` with DaViT's spatial-attention defaults:
    ``window_size=7``, ``partition="window"``, no shift, ``rel_pos_bias=False``, ``head_dim = dim //
    num_heads`` (timm ``davit.WindowAttention`` inside ``SpatialBlock``, including its zero padding
    of maps that do not divide by the window). Any other ``WindowAttention`` option may be given."""

    def __init__(self, dim: int, num_heads: int, *, window_size: int | Sequence[int] = 7, rel_pos_bias: bool = False,
                 **options):
        super().__init__(dim, num_heads, window_size=window_size, rel_pos_bias=rel_pos_bias, **options)


class ConvPosEnc(nnx.Module):
    """DaViT's convolutional position encoding ``x + act(depthwise_kxk(x) + bias)`` (timm
    ``ConvPosEnc``): zero padding ``k // 2``, stride 1, one ``k x k`` filter per channel.

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype.

    Args:
      dim: channels ``C``. kernel_size: odd ``k`` (DaViT: 3).
      act: apply exact GELU to the convolution (timm's ``cpe_act``; DaViT: False).
      dtype, param_dtype, rngs: as in :class:`attnzoo.layers.conv.Conv2d`.

    Parameters: ``proj.kernel [k, k, 1, C]`` (None, None, None, embed), ``proj.bias [C]``; a torch
    depthwise ``weight [C, 1, k, k]`` is ``kernel.transpose(3, 2, 0, 1)``.
    """

    def __init__(self, dim: int, kernel_size: int = 3, *, act: bool = False, dtype: DType | None = None,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        owner = "ConvPosEnc"
        self.dim = check_int(owner, "dim", dim)
        kernel_size = check_int(owner, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd (the map keeps its size), got {kernel_size}")
        self.kernel_size = kernel_size
        self.act = check_bool(owner, "act", act)
        self.proj = Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_bias=True, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def flops(self, height: int, width: int) -> int:
        """``2 H W k^2 C`` (the depthwise convolution)."""
        return self.proj.flops(height, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        check_input("ConvPosEnc", x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        feature = self.proj(x)
        if self.act:
            feature = gelu(feature)
        return x.astype(feature.dtype) + feature
