"""CrossFormer's pieces (Wang et al. 2021/2023, "CrossFormer: A Versatile Vision Transformer Hinging on
Cross-scale Attention"): the cross-scale embedding layer (CEL) and long short distance attention
(LSDA: SDA / LDA) with the dynamic position bias (DPB).

>>> cel = CrossScaleEmbedding(3, 64, kernel_sizes=(4, 8, 16, 32), stride=4, rngs=nnx.Rngs(0))
>>> tokens = cel(images)                       # [B,224,224,3] -> [B,56,56,64]
>>> sda = create_mixer("crossformer_lsda", dim=64, num_heads=2, group_size=7, mode="sda", rngs=nnx.Rngs(0))
>>> lda = create_mixer("crossformer_lsda", dim=64, num_heads=2, group_size=7, interval=8, mode="lda",
...                    rngs=nnx.Rngs(0))
>>> y = lda(sda(x))                            # x [B,56,56,64] -> [B,56,56,64]

Cross-scale embedding (:class:`CrossScaleEmbedding`, the official ``PatchEmbed`` / ``PatchMerging``):
``n`` convolutions with kernels ``k_0 < ... < k_{n-1}`` and one stride ``s``, each zero-padded by
``(k_i - s) // 2`` on every side, so every one gives ``floor(H / s) x floor(W / s)`` outputs centred on
the same pixels; their outputs are concatenated along channels in kernel order. Convolution ``i``
gets ``out // 2**(i+1)`` channels and the last one ``out // 2**(n-1)`` (official split: 4 kernels of
64 channels give 32, 16, 8, 8). LayerNorm after the concatenation (the stem, ``norm="after"``) or on
the input (the official downsampler ``PatchMerging`` normalises first, ``norm="before"``).

LSDA (:class:`CrossFormerAttention`, registered as ``crossformer_lsda``; the official ``Attention``
inside ``CrossFormerBlock``): multi-head softmax attention inside groups of ``G x G`` tokens.

* ``mode="sda"`` (short distance): the map is zero-padded at the bottom / right to multiples of ``G``
  and cut into contiguous ``G x G`` groups (:func:`attnzoo.layers.window.window_partition`).
* ``mode="lda"`` (long distance, interval ``I``): the map is zero-padded to multiples of ``G I``, cut
  into ``G I x G I`` regions, and each region into ``I x I`` groups of tokens ``I`` apart: group
  ``(a, b)`` of a region holds its tokens ``(i I + a, j I + b)`` as group coordinates ``(i, j)``
  (:func:`window_partition` by ``G I``, then :func:`grid_partition` by ``G``). At 224 px the
  paper's intervals 8, 4, 2, 1 make one region per map (MaxViT's grid with stride ``I = H / G``).
* Padded tokens are masked as keys (-1e6 added to their scores, as the official ``attn_mask``);
  padded queries are cropped.
* As the official block, a map with ``min(H, W) <= G`` is attended in SDA groups of side
  ``min(H, W)`` (``shrink_group``; one group for a square map), whatever the mode.

Dynamic position bias (:class:`DynamicPosBias`, the official ``DynamicPosBias``): the score of query
``(yq, xq)`` and key ``(yk, xk)`` (coordinates inside the group) in head ``h`` gets
``MLP(yq - yk, xq - xk)[h]``, an MLP from the float offset pair to ``Hd`` values::

    p = Dense(2 -> P)(d);  p = f1(p);  p = f2(p);  bias = f3(p)       (residual=False, official default)
    p = Dense(2 -> P)(d);  p = p + f1(p);  p = p + f2(p);  bias = f3(p) (residual=True)
    f_i(p) = Dense(ReLU(LayerNorm(p)))   (f1, f2: P -> P; f3: P -> Hd)

with ``P = dim // 16`` by default (the official ``Attention`` builds ``DynamicPosBias(dim // 4)``,
whose width is a quarter of that). The MLP runs once per call on the ``(2G - 1)^2`` offsets, so the
same parameters serve any group size.

Parameters (logical axes): ``qkv.kernel [D, 3, Hd, Dh]`` (embed, None, heads, head_dim) with q, k, v
along axis 1, ``qkv.bias [3, Hd, Dh]``, ``proj.kernel [Hd, Dh, D]``, ``proj.bias [D]``;
``pos.pos_proj.kernel [2, P]`` (None, None) with rows (dy, dx), ``pos.norm{1,2,3}`` (``[P]``),
``pos.fc1.kernel``, ``pos.fc2.kernel [P, P]``, ``pos.fc3.kernel [P, Hd]`` (None, heads), all with
biases. An official ``attn.qkv.weight [3D, D]`` is ``qkv.kernel`` transposed (rows q | k | v,
head-major); ``attn.pos.pos1.0`` / ``pos1.2`` are ``pos.norm1`` / ``pos.fc1`` (and so on).
CEL: ``projs[i].kernel [k_i, k_i, I, O_i]`` (HWIO), ``projs[i].bias [O_i]``, ``norm``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import (
    DType, Dense, LayerNorm, as_pair, check_bool, check_choice, check_heads, check_input, compute_dtype,
)
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.window import (
    grid_partition,
    grid_reverse,
    qk_scale_or_default,
    qkv_projections,
    window_partition,
    window_reverse,
)
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "CrossScaleEmbedding",
    "DynamicPosBias",
    "CrossFormerAttention",
    "cel_channels",
    "relative_offsets",
    "MASK_VALUE",
]

MASK_VALUE = -1e6  # the official NEG_INF added to the scores of padded keys


def cel_channels(out_features: int, num_kernels: int) -> tuple[int, ...]:
    """The official CEL channel split: kernel ``i < n - 1`` gets ``out // 2**(i+1)`` channels, the
    last ``out // 2**(n-1)``; ``out`` must divide by ``2**(n-1)`` (so the shares add up to it)."""
    owner = "cel_channels"
    out_features = check_int(owner, "out_features", out_features)
    num_kernels = check_int(owner, "num_kernels", num_kernels)
    if out_features % 2 ** (num_kernels - 1):
        raise ValueError(
            f"{owner}: out_features ({out_features}) must be divisible by 2**(num_kernels - 1) = "
            f"{2 ** (num_kernels - 1)} to split over {num_kernels} kernels"
        )
    shares = [out_features // 2 ** (i + 1) for i in range(num_kernels - 1)]
    return (*shares, out_features // 2 ** (num_kernels - 1))


class CrossScaleEmbedding(nnx.Module):
    """Cross-scale embedding layer: convolutions of several kernel sizes and one stride, concatenated
    along channels, with a LayerNorm before or after (see the module docstring).

    ``x [B, H, W, I] -> [B, floor(H / s), floor(W / s), O]`` in the compute dtype.

    Args:
      in_features / out_features: ``I`` / ``O`` (``O`` divisible by ``2**(n-1)`` for ``n`` kernels).
      kernel_sizes: increasing square kernel sizes, each ``>= stride`` with ``k - stride`` even (the
        official ``(k - s) // 2`` padding then centres every kernel on the same outputs).
        Official: stem ``(4, 8, 16, 32)``, downsamplers ``(2, 4)``.
      stride: the common stride ``s`` (official: 4 in the stem, 2 in the downsamplers).
      norm: ``"after"`` (LayerNorm ``[O]`` of the concatenation, the stem), ``"before"`` (LayerNorm
        ``[I]`` of the input, the downsamplers) or ``"none"``.
      norm_eps: LayerNorm epsilon (torch's default 1e-5).
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_sizes: Sequence[int] = (4, 8, 16, 32),
        stride: int = 4,
        norm: str = "after",
        norm_eps: float = 1e-5,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "CrossScaleEmbedding"
        self.in_features = check_int(owner, "in_features", in_features)
        self.out_features = check_int(owner, "out_features", out_features)
        self.stride = check_int(owner, "stride", stride)
        if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, (list, tuple)) or not kernel_sizes:
            raise ValueError(f"{owner}: kernel_sizes must be a non-empty sequence of ints, got {kernel_sizes!r}")
        kernels = tuple(check_int(owner, f"kernel_sizes[{i}]", k) for i, k in enumerate(kernel_sizes))
        for i, k in enumerate(kernels):
            if k < self.stride or (k - self.stride) % 2:
                raise ValueError(
                    f"{owner}: kernel_sizes[{i}] = {k} must be >= stride ({self.stride}) with k - stride even, "
                    "so that every kernel yields the same output size"
                )
        if list(kernels) != sorted(set(kernels)):
            raise ValueError(f"{owner}: kernel_sizes must be strictly increasing, got {kernels}")
        self.kernel_sizes = kernels
        self.norm_position = check_choice(owner, "norm", norm, ("after", "before", "none"))
        self.channels = cel_channels(self.out_features, len(kernels))
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.projs = nnx.List([
            Conv2d(self.in_features, channels, k, stride=self.stride, padding=(k - self.stride) // 2, use_bias=True,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for k, channels in zip(kernels, self.channels, strict=True)
        ])
        norm_features = {"after": self.out_features, "before": self.in_features}.get(self.norm_position)
        self.norm = (
            None if norm_features is None
            else LayerNorm(norm_features, epsilon=check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False),
                           dtype=dtype, param_dtype=param_dtype)
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(floor(H / s), floor(W / s))``."""
        return height // self.stride, width // self.stride

    def flops(self, height: int, width: int) -> int:
        """Forward convolution FLOPs (2 per multiply-add): ``sum_i 2 H' W' k_i^2 I O_i``."""
        return int(sum(conv.flops(height, width) for conv in self.projs))

    def _conv(self, conv: Conv2d, x: jax.Array) -> jax.Array:
        # One lax convolution per kernel, not Conv2d's sum of k^2 shifted matmuls (1024 for the 32 x 32
        # stem kernel): for these strided kernels the per-tap form is no faster on XLA:CPU (forward +
        # backward of the 56 -> 28 downsampler of CrossFormer-S, batch 8: 0.59 s vs 0.63 s) and
        # compiles 3x slower.
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), conv.kernel[...].astype(dtype), window_strides=conv.stride, padding=conv.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=accumulate,
        )
        return (y + conv.bias[...].astype(accumulate)).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, I]`` -> ``[B, floor(H / s), floor(W / s), O]``."""
        owner = "CrossScaleEmbedding"
        check_input(owner, x, ndim=4, last=self.in_features, layout="[B,H,W,C]")
        if min(x.shape[1], x.shape[2]) < self.stride:
            raise ValueError(f"{owner}: a {x.shape[1]} x {x.shape[2]} map is smaller than the stride {self.stride}")
        if self.norm_position == "before":
            x = self.norm(x)
        y = jnp.concatenate([self._conv(conv, x) for conv in self.projs], axis=-1)
        if self.norm_position == "after":
            y = self.norm(y)
        return y


def relative_offsets(group_size: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [(2 gh - 1) (2 gw - 1), 2] float32, index [N, N] int32)`` for a ``gh x gw`` group
    (``N = gh gw``): every ``(dy, dx)`` in ``[1 - gh, gh - 1] x [1 - gw, gw - 1]`` in row-major order,
    and for query token ``q`` and key token ``k`` (row-major in the group) the row of
    ``(yq - yk, xq - xk)``."""
    gh, gw = as_pair("relative_offsets", "group_size", group_size)
    dy, dx = np.meshgrid(np.arange(1 - gh, gh), np.arange(1 - gw, gw), indexing="ij")
    offsets = np.stack([dy.reshape(-1), dx.reshape(-1)], axis=-1).astype(np.float32)
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    index = (ys[:, None] - ys[None, :] + gh - 1) * (2 * gw - 1) + (xs[:, None] - xs[None, :] + gw - 1)
    return offsets, index.astype(np.int32)


class DynamicPosBias(nnx.Module):
    """CrossFormer's dynamic position bias: an MLP from a relative offset ``(dy, dx)`` to one bias per
    head (formula in the module docstring).

    ``offsets [..., 2] -> [..., num_heads]``, computed in float32 (or wider).

    Args:
      pos_dim: hidden width ``P``.
      num_heads: outputs ``Hd``.
      residual: the official ``residual`` option (residual connections around the two hidden layers).
      norm_eps: LayerNorm epsilon (torch's default 1e-5).
      param_dtype: parameter dtype. rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, pos_dim: int, num_heads: int, *, residual: bool = False, norm_eps: float = 1e-5,
                 param_dtype: DType = jnp.float32, kernel_init=None, rngs: nnx.Rngs):
        owner = "DynamicPosBias"
        self.pos_dim = check_int(owner, "pos_dim", pos_dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.residual = check_bool(owner, "residual", residual)
        eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        # No compute dtype: the offsets enter in float32 (or wider) and promotion keeps every step there.
        dense = dict(use_bias=True, dtype=None, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        norm = dict(epsilon=eps, dtype=None, param_dtype=param_dtype)
        p = self.pos_dim
        self.pos_proj = Dense(2, p, logical_axes=(None, None), **dense)
        self.norm1, self.fc1 = LayerNorm(p, **norm), Dense(p, p, logical_axes=(None, None), **dense)
        self.norm2, self.fc2 = LayerNorm(p, **norm), Dense(p, p, logical_axes=(None, None), **dense)
        self.norm3, self.fc3 = LayerNorm(p, **norm), Dense(p, self.num_heads, logical_axes=(None, "heads"), **dense)

    def __call__(self, offsets: jax.Array) -> jax.Array:
        """offsets ``[..., 2]`` (dy, dx) -> ``[..., num_heads]`` in float32 (or wider)."""
        if not hasattr(offsets, "shape") or offsets.ndim < 1 or offsets.shape[-1] != 2:
            raise ValueError(f"DynamicPosBias: offsets must have shape [..., 2], got {getattr(offsets, 'shape', None)}")
        p = self.pos_proj(jnp.asarray(offsets, jnp.promote_types(self.fc1.kernel[...].dtype, jnp.float32)))
        for norm, fc in ((self.norm1, self.fc1), (self.norm2, self.fc2)):
            hidden = fc(jax.nn.relu(norm(p)))
            p = p + hidden if self.residual else hidden
        return self.fc3(jax.nn.relu(self.norm3(p)))

    def flops(self, count: int) -> int:
        """Matmul FLOPs for ``count`` offsets: ``2 count (2P + 2P^2 + P Hd)``."""
        p = self.pos_dim
        return 2 * count * (2 * p + 2 * p * p + p * self.num_heads)


@register_mixer("crossformer_lsda")
class CrossFormerAttention(nnx.Module):
    """CrossFormer's long short distance attention (SDA or LDA, chosen by ``mode``) with the dynamic
    position bias; see the module docstring for the groups, padding and bias.

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype, for any static H, W.

    Args:
      dim: channels ``D`` (``num_heads`` must divide it; ``Dh = D / Hd``, the official layout).
      num_heads: heads ``Hd``.
      group_size: ``G``, the side of a group (``G x G`` tokens; paper: 7).
      interval: ``I``, the sampling interval of LDA (paper at 224 px: 8, 4, 2, 1 in stages 1-4).
      mode: ``"sda"`` (adjacent tokens) or ``"lda"`` (tokens ``interval`` apart). The paper
        alternates them, SDA first.
      shrink_group: as the official block, attend a map with ``min(H, W) <= G`` in SDA groups of
        side ``min(H, W)``. Without it the configured mode and group size are always used (padding).
      qkv_bias: bias of the fused qkv projection (the output projection always has one, as official).
      qk_scale: score scale; default ``Dh ** -0.5``.
      position_bias: add the dynamic position bias (official ``position_bias=True``).
      dpb_dim: DPB hidden width ``P``; default ``D // 16`` (official). dpb_residual: DPB ``residual``.
      norm_eps: epsilon of the DPB LayerNorms (1e-5).
      dtype: compute dtype (default: promotion of input and parameters); scores, softmax and the bias
        are float32 (or wider). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        group_size: int = 7,
        interval: int = 1,
        mode: str = "sda",
        shrink_group: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        position_bias: bool = True,
        dpb_dim: int | None = None,
        dpb_residual: bool = False,
        norm_eps: float = 1e-5,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim, self.num_heads = check_heads(owner, dim, num_heads)
        self.head_dim = self.dim // self.num_heads
        self.group_size = check_int(owner, "group_size", group_size)
        self.interval = check_int(owner, "interval", interval)
        self.mode = check_choice(owner, "mode", mode, ("sda", "lda"))
        self.shrink_group = check_bool(owner, "shrink_group", shrink_group)
        qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        dpb_residual = check_bool(owner, "dpb_residual", dpb_residual)
        self.position_bias = check_bool(owner, "position_bias", position_bias)
        self.scale = qk_scale_or_default(owner, qk_scale, self.head_dim)
        if dpb_dim is None:
            dpb_dim = self.dim // 16
            if dpb_dim < 1 and self.position_bias:
                raise ValueError(f"{owner}: the default dpb_dim = dim // 16 is 0 for dim {self.dim}; pass dpb_dim")
        dpb_dim = check_int(owner, "dpb_dim", dpb_dim) if self.position_bias else dpb_dim
        self.dtype = dtype
        self.param_dtype = param_dtype

        self.qkv, self.proj = qkv_projections(dim, self.num_heads, self.head_dim, qkv_bias=qkv_bias, out_bias=True,
                                              dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.pos = (
            DynamicPosBias(dpb_dim, self.num_heads, residual=dpb_residual,
                           norm_eps=norm_eps, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
            if self.position_bias
            else None
        )

    def layout(self, height: int, width: int) -> tuple[str, int, int, tuple[int, int]]:
        """``(mode, G, I, (Hp, Wp))`` used on an ``height x width`` map: the mode and group side after
        ``shrink_group``, the interval (1 for SDA) and the padded size (multiples of ``G`` for SDA,
        of ``G I`` for LDA)."""
        mode, group, interval = self.mode, self.group_size, self.interval
        if self.shrink_group and min(height, width) <= group:
            mode, group = "sda", min(height, width)
        if mode == "sda":
            interval = 1
        span = group * interval
        return mode, group, interval, (-(-height // span) * span, -(-width // span) * span)

    def _partition(self, x: jax.Array, mode: str, group: int, interval: int) -> jax.Array:
        """``[B, Hp, Wp, *F] -> [B, nG, G * G, *F]``."""
        if mode == "sda":
            return window_partition(x, group)
        span = group * interval
        regions = window_partition(x, span)  # [B, nR, span^2, *F]
        batch, count = regions.shape[:2]
        regions = regions.reshape(batch * count, span, span, *x.shape[3:])
        groups = grid_partition(regions, group)  # [B nR, I^2, G^2, *F]
        return groups.reshape(batch, count * interval * interval, group * group, *x.shape[3:])

    def _reverse(self, y: jax.Array, mode: str, group: int, interval: int, padded: tuple[int, int]) -> jax.Array:
        """Inverse of :meth:`_partition`: ``[B, nG, G * G, *F] -> [B, Hp, Wp, *F]``."""
        if mode == "sda":
            return window_reverse(y, group, padded)
        span = group * interval
        batch, features = y.shape[0], y.shape[3:]
        count = (padded[0] // span) * (padded[1] // span)
        regions = grid_reverse(y.reshape(batch * count, interval * interval, group * group, *features), group,
                               (span, span))
        return window_reverse(regions.reshape(batch, count, span * span, *features), span, padded)

    def position_bias_matrix(self, group: int) -> jax.Array:
        """``[Hd, N, N]`` float32 (or wider) DPB bias of every query/key pair of a ``G x G`` group."""
        offsets, index = relative_offsets(group)
        table = self.pos(jnp.asarray(offsets))  # [(2G-1)^2, Hd]
        return jnp.transpose(table[index], (2, 0, 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        owner = type(self).__name__
        check_input(owner, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        height, width = x.shape[1], x.shape[2]
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        mode, group, interval, padded = self.layout(height, width)
        pads = ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0))
        groups = self._partition(jnp.pad(x, pads), mode, group, interval)

        qkv = self.qkv(groups)  # [B, nG, N, 3, Hd, Dh]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        scores = jnp.einsum("bgqhd,bgkhd->bghqk", q, k, preferred_element_type=accumulate) * self.scale
        if self.pos is not None:
            scores = scores + self.position_bias_matrix(group).astype(accumulate)
        if padded != (height, width):
            valid = np.zeros((1, *padded, 1), bool)
            valid[:, :height, :width] = True
            valid = self._partition(jnp.asarray(valid), mode, group, interval)[0, :, :, 0]  # [nG, N], constant
            key_mask = jnp.where(valid, 0.0, MASK_VALUE).astype(accumulate)
            scores = scores + key_mask[None, :, None, None, :]
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bghqk,bgkhd->bgqhd", weights, v, preferred_element_type=accumulate).astype(dtype)
        y = self.proj(out)  # [B, nG, N, D]
        return self._reverse(y, mode, group, interval, padded)[:, :height, :width]

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), on the padded map
        of ``T = Hp Wp`` tokens and groups of ``N = G^2``: qkv ``2 T D 3D``, scores and weights @
        values ``2 * 2 T N D``, output projection ``2 T D D``, plus the DPB MLP once on the
        ``(2G - 1)^2`` offsets. (The official ``flops`` counts the DPB once per group.)"""
        _, group, _, padded = self.layout(height, width)
        tokens = padded[0] * padded[1]
        n = group * group
        total = 2 * tokens * self.dim * 3 * self.dim + 4 * tokens * n * self.dim + 2 * tokens * self.dim * self.dim
        if self.pos is not None:
            total += self.pos.flops((2 * group - 1) ** 2)
        return int(total)
