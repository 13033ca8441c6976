"""HAT's mixers (Chen et al., "Activating More Pixels in Image Super-Resolution Transformer"):
the hybrid attention of the HAB and the overlapping cross-attention of the OCAB.

>>> m = create_mixer("hat_hybrid", dim=180, num_heads=6, window_size=16, shift_size=8, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,H,W,180] -> [B,H,W,180]
>>> o = create_mixer("hat_overlapping_cross_attention", dim=180, num_heads=6, window_size=16,
...                  overlap_ratio=0.5, rngs=nnx.Rngs(0))   # 16x16 queries, 24x24 keys/values

Registered mixers:

=====================================  ==========================================================
``hat_hybrid``                         :class:`HybridAttention`: (shifted) window attention with
                                       Swin's relative position bias (:class:`WindowAttention`)
                                       plus ``conv_scale`` times the channel attention block
                                       (:class:`ChannelAttentionBlock`), both on the same input
``hat_overlapping_cross_attention``    :class:`OverlappingCrossAttention`: queries from ``M x M``
                                       windows, keys and values from the overlapping
                                       ``M_o x M_o`` windows around them
=====================================  ==========================================================

The HAB block of the network is ``x + mixer(norm1(x))`` followed by ``x + mlp(norm2(x))``
(official ``HAB.forward``: ``shortcut + attn_x + conv_scale * conv_x``, both branches on
``norm1(x)``); the OCAB block has the same structure with :class:`OverlappingCrossAttention`
(official ``OCAB.forward``: ``proj(attention) + shortcut``, then the MLP). See
:mod:`attnzoo.zoo.hat`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import DType, Dense, as_pair, check_heads, check_input, compute_dtype, gelu, partitioned
from attnzoo.layers.conv import Conv2d, SqueezeExcite
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.window import WindowAttention, window_partition, window_reverse
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "ChannelAttentionBlock",
    "HybridAttention",
    "OverlappingCrossAttention",
    "overlap_window_size",
    "overlap_relative_position_index",
    "overlapping_windows",
]


def overlap_window_size(window_size: Sequence[int], overlap_ratio: float, owner: str = "overlap_window_size"):
    """``M_o = M + int(overlap_ratio * M)`` per axis (the official ``overlap_win_size``); the
    overlap ``M_o - M`` must be even (the official ``nn.Unfold`` pads ``(M_o - M) // 2`` on each side
    and would give a different number of windows otherwise)."""
    sizes = tuple(int(m) + int(overlap_ratio * int(m)) for m in window_size)
    for m, mo in zip(window_size, sizes, strict=True):
        if (mo - m) % 2:
            raise ValueError(
                f"{owner}: the overlap int(overlap_ratio * window_size) = {mo - m} (overlap_ratio {overlap_ratio}, "
                f"window_size {tuple(window_size)}) must be even, so the overlapping windows are centred on the windows"
            )
    return sizes


def overlap_relative_position_index(window_size: Sequence[int], overlap_size: Sequence[int]) -> np.ndarray:
    """``[ph * pw, oh * ow]`` int32: row of OCAB's bias table for query ``(yq, xq)`` of an
    ``(ph, pw)`` window and key ``(yk, xk)`` of its ``(oh, ow)`` overlapping window (row-major
    coordinates inside each), the official ``calculate_rpi_oca``:
    ``((yk - yq + ph - oh + 1) * (pw + ow - 1) + (xk - xq + pw - ow + 1)) mod ((ph + oh - 1) * (pw + ow - 1))``.

    The official index is negative for some pairs and wraps around the table as a torch index does;
    it is a bijection from the ``(ph + oh - 1) * (pw + ow - 1)`` relative offsets onto the table."""
    ph, pw = window_size
    oh, ow = overlap_size
    yq, xq = (a.reshape(-1) for a in np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij"))
    yk, xk = (a.reshape(-1) for a in np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij"))
    dy = yk[None, :] - yq[:, None] + ph - oh + 1
    dx = xk[None, :] - xq[:, None] + pw - ow + 1
    size = (ph + oh - 1) * (pw + ow - 1)
    return np.mod(dy * (pw + ow - 1) + dx, size).astype(np.int32)


def overlapping_windows(x: jax.Array, window_size: Sequence[int], overlap_size: Sequence[int]) -> jax.Array:
    """The official ``nn.Unfold(kernel M_o, stride M, padding (M_o - M) // 2)`` in NHWC:
    ``x [B, H, W, *F] -> [B, (H/ph) * (W/pw), oh * ow, *F]`` (H, W multiples of the window).

    Window ``r * (W/pw) + c`` holds ``x[r*ph - (oh-ph)/2 + i, c*pw - (ow-pw)/2 + j]`` as token
    ``i * ow + j``, zero outside the map."""
    ph, pw = window_size
    oh, ow = overlap_size
    height, width = x.shape[1], x.shape[2]
    if height % ph or width % pw:
        raise ValueError(f"overlapping_windows: H x W = {height} x {width} must be divisible by window_size {(ph, pw)}")
    pad_h, pad_w = (oh - ph) // 2, (ow - pw) // 2
    x = jnp.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w)) + ((0, 0),) * (x.ndim - 3))
    rows = (np.arange(height // ph)[:, None] * ph + np.arange(oh)[None, :]).reshape(-1)  # [nr * oh]
    cols = (np.arange(width // pw)[:, None] * pw + np.arange(ow)[None, :]).reshape(-1)  # [nc * ow]
    x = jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)  # [B, nr*oh, nc*ow, *F]
    batch, features = x.shape[0], x.shape[3:]
    x = x.reshape(batch, height // ph, oh, width // pw, ow, *features)
    x = jnp.moveaxis(x, 2, 3)  # [B, nr, nc, oh, ow, *F]
    return x.reshape(batch, (height // ph) * (width // pw), oh * ow, *features)


def _check_cab_ratios(dim: int, compress_ratio, squeeze_factor) -> tuple[int, int]:
    owner = "ChannelAttentionBlock"
    compress_ratio = check_int(owner, "compress_ratio", compress_ratio)
    squeeze_factor = check_int(owner, "squeeze_factor", squeeze_factor)
    for name, value in (("compress_ratio", compress_ratio), ("squeeze_factor", squeeze_factor)):
        if value > dim:
            raise ValueError(f"{owner}: {name} ({value}) must be at most dim ({dim}): dim // {name} channels")
    return compress_ratio, squeeze_factor


class ChannelAttentionBlock(nnx.Module):
    """HAT's CAB: ``se(conv2(gelu(conv1(x))))`` with 3x3 convolutions ``C -> C // compress_ratio -> C``
    (zero padding 1, biases) and RCAN's channel attention ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``
    with ``C // squeeze_factor`` hidden channels and biases on both 1x1 convolutions
    (:class:`attnzoo.layers.conv.SqueezeExcite` with ``activation="relu"``). GELU is the exact (erf) one.

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype.

    Parameters: ``conv1.kernel [3, 3, C, C/r]`` (None, None, embed, mlp), ``conv1.bias``,
    ``conv2.kernel [3, 3, C/r, C]`` (None, None, mlp, embed), ``conv2.bias``,
    ``attention.fc1 [C, C/s]`` / ``attention.fc2 [C/s, C]`` with biases.
    """

    def __init__(
        self,
        dim: int,
        *,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = check_int("ChannelAttentionBlock", "dim", dim)
        self.compress_ratio, self.squeeze_factor = _check_cab_ratios(self.dim, compress_ratio, squeeze_factor)
        hidden = self.dim // self.compress_ratio
        conv = dict(padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(dim, hidden, 3, logical_axes=(None, None, "embed", "mlp"), **conv)
        self.conv2 = Conv2d(hidden, dim, 3, logical_axes=(None, None, "mlp", "embed"), **conv)
        self.attention = SqueezeExcite(
            dim, self.dim // self.squeeze_factor, activation="relu", channel_axis="embed", dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        check_input("ChannelAttentionBlock", x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        return self.attention(self.conv2(gelu(self.conv1(x))))

    def flops(self, height: int, width: int) -> int:
        """The two 3x3 convolutions and the channel attention's 1x1 convolutions (pooling and
        products not counted)."""
        return self.conv1.flops(height, width) + self.conv2.flops(height, width) + self.attention.flops(height, width)


@register_mixer("hat_hybrid")
class HybridAttention(nnx.Module):
    """HAT's hybrid attention (the mixing of the HAB): ``attn(x) + conv_scale * cab(x)``.

    ``attn`` is :class:`attnzoo.layers.window.WindowAttention` (Swin's W-MSA / SW-MSA with relative
    position bias, mask -100 between shifted regions), ``cab`` a :class:`ChannelAttentionBlock`.
    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype; sizes that do not divide by the window
    are zero-padded inside the window attention as :class:`WindowAttention` does (the HAT network
    reflect-pads its image to a multiple of the window, so its maps always divide).

    Args:
      dim: channels ``D``. num_heads: heads (must divide ``dim``).
      window_size: ``M`` or ``(ph, pw)``. shift_size: cyclic shift, ``0 <= s < M`` (HAT: ``M // 2``
        in odd blocks).
      compress_ratio, squeeze_factor: of the CAB (HAT: 3, 30; HAT-S: 24, 24).
      conv_scale: weight of the CAB branch (0.01).
      qkv_bias, qk_scale: of the window attention.
      dtype, param_dtype, kernel_init, rngs: as in :class:`WindowAttention`.

    Parameters: ``attn.*`` (see :class:`WindowAttention`) and ``conv_block.*`` (see :class:`ChannelAttentionBlock`).
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int | Sequence[int] = 16,
        shift_size: int | Sequence[int] = 0,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        conv_scale: float = 0.01,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.conv_scale = check_float(owner, "conv_scale", conv_scale, allow_none=False)
        _check_cab_ratios(self.dim, compress_ratio, squeeze_factor)  # before any parameter is initialised
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.attn = WindowAttention(
            dim, num_heads, window_size=window_size, shift_size=shift_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
            dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs,
        )
        self.num_heads = self.attn.num_heads
        self.window_size = self.attn.window_size
        self.shift_size = self.attn.shift_size
        self.conv_block = ChannelAttentionBlock(
            dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        conv = self.conv_block(x)
        return (self.attn(x) + jnp.asarray(self.conv_scale, conv.dtype) * conv).astype(dtype)

    def flops(self, height: int, width: int) -> int:
        """Window attention (on the padded map) plus the CAB."""
        return self.attn.flops(height, width) + self.conv_block.flops(height, width)


@register_mixer("hat_overlapping_cross_attention")
class OverlappingCrossAttention(nnx.Module):
    """HAT's overlapping cross-attention (the attention of the OCAB).

    ``q, k, v = qkv(x)`` per token; the queries of each ``M x M`` window (:func:`window_partition`)
    attend, by one softmax per query, to the keys and values of the ``M_o x M_o`` window centred on
    it (:func:`overlapping_windows`, ``M_o = M + int(overlap_ratio * M)``): the projected ``k`` and
    ``v`` maps are zero-padded by ``(M_o - M) / 2`` on every side, as the official ``nn.Unfold`` does,
    so a key outside the image is a zero vector (score 0 plus the bias). Scores get
    ``table[overlap_relative_position_index]``; then ``proj``.

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype. Sizes that do not divide by the window
    extend the same zero padding at the bottom and right (padded queries are dropped); the HAT network
    only passes multiples of the window.

    Args:
      dim: channels ``D``. num_heads: heads ``Hd`` (must divide ``dim``; head dim ``Dh = D / Hd``).
      window_size: ``M`` or ``(ph, pw)``. overlap_ratio: ``>= 0``; ``int(overlap_ratio * M)`` must be even.
      qkv_bias: bias of the fused qkv projection (the output projection always has one, as official).
      qk_scale: score scale, default ``Dh ** -0.5``.
      dtype: compute dtype (default: promotion); scores, softmax and bias in float32 (or wider).
      param_dtype, kernel_init, rngs: as in :class:`attnzoo.layers.Dense`.

    Parameters: ``qkv.kernel [D, 3, Hd, Dh]`` (embed, None, heads, head_dim), ``qkv.bias [3, Hd, Dh]``,
    ``proj.kernel [Hd, Dh, D]``, ``proj.bias [D]``, ``relative_position_bias_table
    [(ph + oh - 1) * (pw + ow - 1), Hd]`` (trunc-normal 0.02; the official layout as is).
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int | Sequence[int] = 16,
        overlap_ratio: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim, self.num_heads = check_heads(owner, dim, num_heads)
        self.head_dim = self.dim // self.num_heads
        self.window_size = as_pair(owner, "window_size", window_size)
        self.overlap_ratio = check_float(owner, "overlap_ratio", overlap_ratio, allow_none=False)
        if self.overlap_ratio < 0:
            raise ValueError(f"{owner}: overlap_ratio must be >= 0, got {overlap_ratio}")
        self.overlap_size = overlap_window_size(self.window_size, self.overlap_ratio, owner)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"{owner}: qkv_bias must be a bool, got {type(qkv_bias).__name__}")
        self.scale = check_float(owner, "qk_scale", qk_scale, positive=True)
        if self.scale is None:
            self.scale = self.head_dim**-0.5
        self.dtype = dtype
        self.param_dtype = param_dtype
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        heads, dh = self.num_heads, self.head_dim
        self.qkv = Dense(dim, (3, heads, dh), logical_axes=("embed", None, "heads", "head_dim"), use_bias=qkv_bias, **dense)
        self.proj = Dense((heads, dh), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=True, **dense)
        (ph, pw), (oh, ow) = self.window_size, self.overlap_size
        table_shape = ((ph + oh - 1) * (pw + ow - 1), heads)
        self.relative_position_bias_table = nnx.Param(
            partitioned(nnx.initializers.truncated_normal(stddev=0.02), (None, "heads"))(
                rngs.params(), table_shape, param_dtype
            )
        )

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Hp, Wp)``: ``(H, W)`` rounded up to multiples of ``window_size``."""
        (ph, pw) = self.window_size
        return -(-height // ph) * ph, -(-width // pw) * pw

    def relative_position_bias(self) -> jax.Array:
        """``[Hd, ph * pw, oh * ow]`` float32 (or wider) bias of every query/key pair of a window."""
        table = self.relative_position_bias_table[...]
        table = table.astype(jnp.promote_types(table.dtype, jnp.float32))
        index = overlap_relative_position_index(self.window_size, self.overlap_size)
        return jnp.transpose(table[index], (2, 0, 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        height, width = x.shape[1], x.shape[2]
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        qkv = self.qkv(x)  # [B, H, W, 3, Hd, Dh]
        padded = self.padded_size(height, width)
        qkv = jnp.pad(qkv, ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0), (0, 0), (0, 0)))
        q = window_partition(qkv[..., 0, :, :], self.window_size)  # [B, nW, N, Hd, Dh]
        k = overlapping_windows(qkv[..., 1, :, :], self.window_size, self.overlap_size)  # [B, nW, No, Hd, Dh]
        v = overlapping_windows(qkv[..., 2, :, :], self.window_size, self.overlap_size)
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=accumulate) * self.scale
        scores = scores + self.relative_position_bias().astype(accumulate)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v, preferred_element_type=accumulate).astype(dtype)
        out = window_reverse(out, self.window_size, padded)[:, :height, :width]
        return self.proj(out)

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), ``T = H W``,
        ``Tp = Hp Wp`` padded queries, ``No = oh ow`` keys per window: qkv ``2 T D 3D``, scores and
        weights @ values ``2 * 2 Tp No D``, output projection ``2 T D D``."""
        tokens = height * width
        padded = int(np.prod(self.padded_size(height, width)))
        keys = self.overlap_size[0] * self.overlap_size[1]
        return 2 * tokens * self.dim * 3 * self.dim + 4 * padded * keys * self.dim + 2 * tokens * self.dim * self.dim
