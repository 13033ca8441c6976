"""Twins' spatial attentions (Chu et al. 2021): locally-grouped (LSA) and global sub-sampled (GSA)
attention on 2-D feature maps, and the positional encoding generator (PEG) of the Twins backbones.

>>> lsa = create_mixer("twins_locally_grouped", dim=64, num_heads=2, window_size=7, rngs=nnx.Rngs(0))
>>> gsa = create_mixer("twins_global_subsampled", dim=64, num_heads=2, sr_ratio=8, rngs=nnx.Rngs(0))
>>> y = lsa(x)                                 # x [B,H,W,64] -> [B,H,W,64]

Registered mixers (both ``spatial_ndim = 2``, input and output ``[B, H, W, D]``):

===========================  =======================================================================
``twins_locally_grouped``    LSA: multi-head softmax attention inside non-overlapping ``ph x pw``
                             windows (timm ``LocallyGroupedAttn``), no position bias
``twins_global_subsampled``  GSA: queries from every token, keys and values from the map sub-sampled
                             by an ``sr x sr`` stride-``sr`` convolution and a LayerNorm (timm
                             ``GlobalSubSampleAttn``; PVT's spatial-reduction attention);
                             ``sr_ratio=1`` is plain global attention over all tokens
===========================  =======================================================================

LSA. The map is zero-padded at the bottom and right to multiples of the window (as timm), cut into
windows with :func:`attnzoo.layers.window.window_partition` and attended window by window:
``softmax(q k^T * scale) v`` per head with ``scale = Dh ** -0.5``. Padded positions take part as
keys (a zero input token has key ``qkv_bias``), exactly as timm's padding implementation. The
windows are put back with :func:`~attnzoo.layers.window.window_reverse`, cropped to ``H x W`` and
projected.

GSA. ``q = x W_q + b_q`` for all ``T = H W`` tokens; with ``sr = (rh, rw) > 1`` the keys and values
read ``x_r = LayerNorm(Conv_{rh x rw, stride (rh, rw)}(x))`` of ``floor(H / rh) x floor(W / rw)``
tokens (rows and columns past the last full stride are dropped, as torch's unpadded convolution);
``[k, v] = x_r W_kv + b_kv``; ``o = softmax(q k^T * scale) v``, then the output projection. The map
must be at least ``rh x rw``.

Scores, softmax and the accumulation of both products are float32 (or wider); projections run in
the compute dtype accumulated in float32.

Parameters (logical axes):
  LSA: ``qkv.kernel [D, 3, Hd, Dh]`` (embed, None, heads, head_dim) with q, k, v along axis 1 and
  ``qkv.bias [3, Hd, Dh]``, ``proj.kernel [Hd, Dh, D]``, ``proj.bias [D]``: timm's ``attn.qkv``
  (rows q | k | v, each head-major) and ``attn.proj`` are these, transposed and reshaped.
  GSA: ``q.kernel [D, Hd, Dh]``, ``kv.kernel [D, 2, Hd, Dh]`` (k, v along axis 1; timm's ``attn.q`` /
  ``attn.kv``), ``proj``; with ``sr > 1`` also ``sr.kernel [rh, rw, D, D]`` (HWIO, logical axes
  (None, None, None, embed)) + ``sr.bias [D]``: timm's ``attn.sr`` convolution, applied as one
  Dense over each non-overlapping patch (kernel == stride, so the same sums as the convolution, with
  one matmul instead of ``rh * rw``), and ``norm.scale`` / ``norm.bias`` (timm's ``attn.norm``,
  epsilon 1e-5).
  PEG: ``proj.kernel [k, k, 1, D]`` + ``proj.bias [D]`` (a depthwise Conv2d, timm's ``PosConv.proj.0``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import DType, Dense, LayerNorm, as_pair, check_bool, check_input, compute_dtype
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.window import qk_scale_or_default, qkv_projections, window_partition, window_reverse
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = ["LocallyGroupedAttention", "GlobalSubsampledAttention", "PositionalEncodingGenerator"]


# torch's default Conv2d initialisation: uniform in +-1/sqrt(fan_in) over the kernel's (kh, kw, in) axes.
_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3)


def _head_dim(owner: str, dim: int, num_heads: int, head_dim: int | None) -> int:
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"{owner}: num_heads ({num_heads}) must divide dim ({dim}) when head_dim is not given")
        head_dim = dim // num_heads
    return check_int(owner, "head_dim", head_dim)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, dtype) -> jax.Array:
    """``softmax(q k^T * scale) v`` over the second-to-last token axis: q ``[..., Tq, Hd, Dh]``,
    k, v ``[..., Tk, Hd, Dh]`` -> ``[..., Tq, Hd, Dh]`` in ``dtype`` (scores and softmax in float32
    or wider)."""
    accumulate = jnp.promote_types(dtype, jnp.float32)
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=accumulate) * scale
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v, preferred_element_type=accumulate).astype(dtype)


class _TwinsAttention(nnx.Module):
    """Argument handling shared by LSA and GSA."""

    spatial_ndim = 2

    def _setup(self, dim, num_heads, head_dim, qkv_bias, out_bias, qk_scale, dtype, param_dtype):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.head_dim = _head_dim(owner, self.dim, self.num_heads, head_dim)
        self.qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        self.out_bias = check_bool(owner, "out_bias", out_bias)
        self.scale = qk_scale_or_default(owner, qk_scale, self.head_dim)
        self.dtype = dtype
        self.param_dtype = param_dtype


@register_mixer("twins_locally_grouped")
class LocallyGroupedAttention(_TwinsAttention):
    """Twins' LSA: multi-head softmax attention inside non-overlapping ``ph x pw`` windows (no
    position bias); sizes that do not divide by the window are zero-padded as in timm (see the
    module docstring).

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype, for any static ``H, W >= 1``.

    Args:
      dim: channels ``D``.
      num_heads: heads ``Hd``.
      window_size: ``(ph, pw)`` or an int (Twins' ``ws``; 7 in every Twins-SVT stage).
      head_dim: features per head ``Dh``; default ``dim // num_heads`` (num_heads must divide dim).
      qkv_bias / out_bias: biases of the qkv and output projections (timm: both).
      qk_scale: score scale; default ``Dh ** -0.5``.
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int | Sequence[int] = 7,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_scale: float | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self._setup(dim, num_heads, head_dim, qkv_bias, out_bias, qk_scale, dtype, param_dtype)
        self.window_size = as_pair(owner, "window_size", window_size)
        self.qkv, self.proj = qkv_projections(dim, self.num_heads, self.head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                                              dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Hp, Wp)``: ``(H, W)`` rounded up to multiples of ``window_size``."""
        ph, pw = self.window_size
        return -(-height // ph) * ph, -(-width // pw) * pw

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        height, width = x.shape[1], x.shape[2]
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        padded = self.padded_size(height, width)
        x = jnp.pad(x, ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0)))
        qkv = self.qkv(window_partition(x, self.window_size))  # [B, nW, N, 3, Hd, Dh]
        out = _attend(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], self.scale, dtype)
        out = window_reverse(out, self.window_size, padded)[:, :height, :width]  # [B, H, W, Hd, Dh]
        return self.proj(out)

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), with
        ``Tp = Hp * Wp`` padded tokens, ``N = ph * pw`` and ``A = Hd * Dh``: qkv ``2 Tp D 3A``,
        scores and weights @ values ``2 * 2 Tp N A``, output projection ``2 H W A D``."""
        padded = int(np.prod(self.padded_size(height, width)))
        n = self.window_size[0] * self.window_size[1]
        a = self.num_heads * self.head_dim
        return 2 * padded * self.dim * 3 * a + 4 * padded * n * a + 2 * height * width * a * self.dim


@register_mixer("twins_global_subsampled")
class GlobalSubsampledAttention(_TwinsAttention):
    """Twins' GSA (PVT's spatial-reduction attention): every token queries keys and values of the
    map sub-sampled by an ``sr x sr`` stride-``sr`` convolution and a LayerNorm (see the module
    docstring); ``sr_ratio=1`` is global attention over all tokens.

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype; ``H >= rh`` and ``W >= rw``.

    Args:
      dim: channels ``D``.
      num_heads: heads ``Hd``.
      sr_ratio: sub-sampling ``(rh, rw)`` or an int (Twins / PVT: 8, 4, 2, 1 over the stages).
      head_dim: features per head ``Dh``; default ``dim // num_heads`` (num_heads must divide dim).
      qkv_bias: biases of the q and kv projections; out_bias: of the output projection (timm: all).
      qk_scale: score scale; default ``Dh ** -0.5``.
      sr_norm_eps: epsilon of the LayerNorm after the sub-sampling convolution (timm: 1e-5).
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal); the sub-sampling
        kernel keeps torch's convolution default (uniform in ``+-1/sqrt(rh rw D)``).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        sr_ratio: int | Sequence[int] = 1,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_scale: float | None = None,
        sr_norm_eps: float = 1e-5,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self._setup(dim, num_heads, head_dim, qkv_bias, out_bias, qk_scale, dtype, param_dtype)
        self.sr_ratio = as_pair(owner, "sr_ratio", sr_ratio)
        self.sr_norm_eps = check_float(owner, "sr_norm_eps", sr_norm_eps, positive=True, allow_none=False)
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        heads, dh = self.num_heads, self.head_dim
        self.q = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), use_bias=qkv_bias, **dense)
        self.kv = Dense(dim, (2, heads, dh), logical_axes=("embed", None, "heads", "head_dim"), use_bias=qkv_bias,
                        **dense)
        self.proj = Dense((heads, dh), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=out_bias, **dense)
        if self.sr_ratio != (1, 1):
            # The rh x rw stride-(rh, rw) convolution, as a Dense over each patch's (row, column, channel).
            self.sr = Dense((*self.sr_ratio, dim), dim, logical_axes=(None, None, None, "embed"), use_bias=True,
                            dtype=dtype, param_dtype=param_dtype, kernel_init=_conv_init, rngs=rngs)
            self.norm = LayerNorm(dim, epsilon=self.sr_norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.sr = self.norm = None

    def reduced_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H // rh, W // rw)``: the map that keys and values are read from."""
        return height // self.sr_ratio[0], width // self.sr_ratio[1]

    def _patches(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, D] -> [B, H // rh, W // rw, rh, rw, D]``: the non-overlapping patches the
        sub-sampling convolution reads (rows and columns past the last full patch dropped)."""
        (rh, rw), (height, width) = self.sr_ratio, self.reduced_size(x.shape[1], x.shape[2])
        x = x[:, : height * rh, : width * rw]
        x = x.reshape(x.shape[0], height, rh, width, rw, self.dim)
        return jnp.moveaxis(x, 2, 3)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        owner = type(self).__name__
        check_input(owner, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        batch, height, width, _ = x.shape
        if min(self.reduced_size(height, width)) < 1:
            raise ValueError(f"{owner}: a {height} x {width} map is smaller than sr_ratio {self.sr_ratio}")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        q = self.q(x).reshape(batch, height * width, self.num_heads, self.head_dim)
        source = x if self.sr is None else self.norm(self.sr(self._patches(x)))
        kv = self.kv(source.reshape(batch, -1, self.dim))  # [B, Tk, 2, Hd, Dh]
        out = _attend(q, kv[..., 0, :, :], kv[..., 1, :, :], self.scale, dtype)
        return self.proj(out).reshape(batch, height, width, self.dim)

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), with
        ``T = H W``, ``Tk = (H // rh)(W // rw)`` and ``A = Hd * Dh``: q ``2 T D A``, the sub-sampling
        convolution ``2 Tk rh rw D D`` (if any), kv ``2 Tk D 2A``, scores and weights @ values
        ``2 * 2 T Tk A``, output projection ``2 T A D``."""
        tokens = height * width
        keys = int(np.prod(self.reduced_size(height, width)))
        a = self.num_heads * self.head_dim
        conv = 0 if self.sr is None else 2 * keys * self.sr_ratio[0] * self.sr_ratio[1] * self.dim * self.dim
        return 2 * tokens * self.dim * a + conv + 2 * keys * self.dim * 2 * a + 4 * tokens * keys * a + \
            2 * tokens * a * self.dim


class PositionalEncodingGenerator(nnx.Module):
    """Twins' PEG (from CPVT; timm ``PosConv``): ``x + DepthwiseConv_{k x k}(x)`` (zero padding
    ``k // 2``, stride 1, bias).

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype.

    Args:
      dim: channels ``D``.
      kernel_size: odd ``k`` (Twins: 3).
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, dim: int, *, kernel_size: int = 3, dtype: DType | None = None,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.kernel_size = check_int(owner, "kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd (the map keeps its size), got {kernel_size}")
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.proj = Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_bias=True, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        return (self.proj(x) + x.astype(dtype)).astype(dtype)

    def flops(self, height: int, width: int) -> int:
        """Forward FLOPs of the depthwise convolution: ``2 H W k^2 D``."""
        return self.proj.flops(height, width)
