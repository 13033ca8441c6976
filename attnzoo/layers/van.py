"""Large kernel attention (LKA) of the Visual Attention Network (Guo et al. 2022) on 2-D maps.

>>> lka = create_mixer("van_lka", dim=64, num_heads=1, rngs=nnx.Rngs(0))
>>> y = lka(x)                                 # x [B,H,W,64] -> x * attn(x), [B,H,W,64]
>>> attn = create_mixer("van_attention", dim=64, num_heads=1, rngs=nnx.Rngs(0))   # VAN's block mixer

Registered mixers (``spatial_ndim = 2``, ``x [B, H, W, C] -> [B, H, W, C]``; ``num_heads`` is
accepted for the uniform mixer constructor and unused: LKA has no heads):

===================  ==========================================================================
``van_lka``          :class:`LargeKernelAttention`, the official ``AttentionModule``::

                         attn = conv1( conv_spatial( conv0(x) ) );   out = x * attn

                     ``conv0``: depthwise ``5 x 5``, zero padding 2; ``conv_spatial``: depthwise
                     ``7 x 7`` with dilation 3, zero padding 9 (a 19 x 19 footprint); ``conv1``: 1x1
                     ``C -> C``; all with biases. This is the paper's decomposition of a
                     ``21 x 21`` convolution with dilation ``d = 3`` into a ``(2d - 1)`` depthwise,
                     a ``ceil(21 / d)`` depthwise-dilated and a 1x1 convolution; one output reads a
                     ``5 + 3 * 6 = 23`` pixel square (:attr:`LargeKernelAttention.receptive_field`).
``van_attention``    :class:`VANAttention`, the official ``SpatialAttention``::

                         out = proj_2( LKA( GELU( proj_1(x) ) ) ) + x

                     (1x1 ``C -> C`` projections with biases, exact GELU; the shortcut is part
                     of the mixer, as in the official code, inside the block's own residual).
===================  ==========================================================================

Parameters (logical axes): ``conv0.kernel [5, 5, 1, C]`` / ``conv_spatial.kernel [7, 7, 1, C]``
(None, None, None, embed) + biases ``[C]``; ``conv1.kernel [C, C]`` (None, embed) + bias;
``proj_1`` / ``proj_2`` likewise, and the LKA under ``spatial_gating_unit``. The names are the
official module's, so an official ``conv.weight [O, I/groups, kh, kw]`` is ``kernel``
transposed to HWIO and a 1x1 ``weight [O, I, 1, 1]`` is ``weight[:, :, 0, 0].T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import DType, Dense, check_input, compute_dtype, gelu
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels.common import check_int

__all__ = ["LargeKernelAttention", "VANAttention"]


@register_mixer("van_lka")
class LargeKernelAttention(nnx.Module):
    """LKA: ``x * conv1(conv_spatial(conv0(x)))`` on ``x [B, H, W, C]`` (see the module docstring).

    Args:
      dim: channels ``C``.
      num_heads: unused (uniform mixer constructor).
      kernel_size: the local depthwise kernel (odd; paper 5), zero padding ``kernel_size // 2``.
      dilated_kernel_size: the dilated depthwise kernel (odd; paper 7).
      dilation: its dilation (paper 3); zero padding ``dilation * (dilated_kernel_size // 2)``, so
        the map keeps its size.
      dtype: compute dtype (default: promotion of input and parameters); convolutions accumulate
        in float32 (or wider). param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        kernel_size: int = 5,
        dilated_kernel_size: int = 7,
        dilation: int = 3,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.kernel_size = check_int(owner, "kernel_size", kernel_size)
        self.dilated_kernel_size = check_int(owner, "dilated_kernel_size", dilated_kernel_size)
        self.dilation = check_int(owner, "dilation", dilation)
        for name, value in (("kernel_size", self.kernel_size), ("dilated_kernel_size", self.dilated_kernel_size)):
            if value % 2 == 0:
                raise ValueError(f"{owner}: {name} must be odd (the map keeps its size), got {value}")
        self.dtype = dtype
        self.param_dtype = param_dtype
        # scan_taps: 25 + 49 unrolled taps (and their gradients) made VAN's compile time ~8x longer.
        depthwise = dict(groups=self.dim, use_bias=True, logical_axes=(None, None, None, "embed"), scan_taps=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv0 = Conv2d(self.dim, self.dim, self.kernel_size, padding=self.kernel_size // 2, **depthwise)
        self.conv_spatial = Conv2d(
            self.dim, self.dim, self.dilated_kernel_size, padding=self.dilation * (self.dilated_kernel_size // 2),
            dilation=self.dilation, **depthwise,
        )
        self.conv1 = Dense(self.dim, self.dim, logical_axes=(None, "embed"), use_bias=True, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    @property
    def receptive_field(self) -> int:
        """Side of the square of inputs one output depends on: ``k + d (k_d - 1)`` (23 for 5, 7, 3)."""
        return self.kernel_size + self.dilation * (self.dilated_kernel_size - 1)

    def attention(self, x: jax.Array) -> jax.Array:
        """The attention map ``conv1(conv_spatial(conv0(x)))`` ``[B, H, W, C]`` in the compute dtype."""
        return self.conv1(self.conv_spatial(self.conv0(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``x * attention(x)`` ``[B, H, W, C]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        return x.astype(dtype) * self.attention(x).astype(dtype)

    def flops(self, height: int, width: int) -> int:
        """Forward FLOPs (2 per multiply-add): the depthwise convolutions ``2 H W C (k^2 + k_d^2)``
        and the 1x1 ``2 H W C^2`` (biases and the product are not counted)."""
        taps = self.kernel_size**2 + self.dilated_kernel_size**2
        return 2 * height * width * self.dim * (taps + self.dim)


@register_mixer("van_attention")
class VANAttention(nnx.Module):
    """VAN's attention mixer (official ``SpatialAttention``): ``proj_2(LKA(GELU(proj_1(x)))) + x``.

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype. Args as :class:`LargeKernelAttention`
    (whose options ``kernel_size``, ``dilated_kernel_size`` and ``dilation`` it passes on).
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        kernel_size: int = 5,
        dilated_kernel_size: int = 7,
        dilation: int = 3,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.dtype = dtype
        self.param_dtype = param_dtype
        dense = dict(logical_axes=(None, "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_1 = Dense(self.dim, self.dim, **dense)
        self.spatial_gating_unit = LargeKernelAttention(
            self.dim, num_heads, kernel_size=kernel_size, dilated_kernel_size=dilated_kernel_size, dilation=dilation,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.proj_2 = Dense(self.dim, self.dim, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        y = self.proj_2(self.spatial_gating_unit(gelu(self.proj_1(x))))
        return y + x.astype(y.dtype)

    def flops(self, height: int, width: int) -> int:
        """The LKA's FLOPs plus the two projections' ``2 * 2 H W C^2``."""
        return self.spatial_gating_unit.flops(height, width) + 4 * height * width * self.dim**2
