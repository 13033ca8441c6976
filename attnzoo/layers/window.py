"""Window attention on 2-D feature maps: Swin's (shifted) windows and MaxViT's block and grid partitions.

>>> m = WindowAttention(dim=96, num_heads=3, window_size=7, shift_size=3, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,H,W,96] -> [B,H,W,96]
>>> g = create_mixer("maxvit_grid", dim=64, num_heads=2, window_size=7, rngs=nnx.Rngs(0))  # head_dim 32

Registered mixers (one class, different defaults):

==================  ==============================================================================
``swin_window``     ``partition="window"``, ``head_dim = dim // num_heads``; the backbone passes
                    ``shift_size`` per block (Swin's W-MSA / SW-MSA)
``maxvit_block``    ``partition="window"``, ``head_dim=32`` (MaxViT's block attention)
``maxvit_grid``     ``partition="grid"``, ``head_dim=32`` (MaxViT's grid attention)
==================  ==============================================================================

Partitions (all are reshapes and transposes; ``P = (ph, pw)`` is ``window_size``):

* ``"window"``: contiguous ``ph x pw`` blocks. Window ``(r, c)`` holds the tokens
  ``x[r * ph + i, c * pw + j]``; windows and the tokens inside them are numbered row-major
  (``r * (W / pw) + c`` and ``i * pw + j``), as in timm's ``window_partition``.
* ``"grid"``: a fixed ``ph x pw`` grid of strided tokens. With strides ``(sh, sw) = (H / ph, W / pw)``
  window ``(a, b)`` holds the tokens ``x[i * sh + a, j * sw + b]``, token ``(i, j)`` numbered
  ``i * pw + j``, window ``a * sw + b`` (timm maxxvit's ``grid_partition``). The relative position
  bias is indexed by the grid coordinates ``(i, j)``.

Sizes that do not divide by the partition are zero-padded at the bottom and right and cropped
after, as timm's Swin block does; padded positions take part as keys (a zero input token has key
``qkv_bias``), exactly as in timm.

Shifted windows (``shift_size = (sh, sw) > 0``, window partition only), in timm 1.0.31's order:
the map is rolled by ``(-sh, -sw)`` (``jnp.roll``), then padded to ``(Hp, Wp)``, partitioned,
attended with Swin's mask, reversed, cropped and rolled back by ``(sh, sw)``. The mask labels every
padded position by its region along each shifted axis, ``[0, Hp - ph)``, ``[Hp - ph, Hp - sh)``,
``[Hp - sh, Hp)`` (one region along an axis with shift 0), and adds -100 to the score of every
query/key pair of different labels (:func:`shifted_window_mask`).

Parameters (logical axes):
  ``qkv.kernel [D, 3, Hd, Dh]`` (embed, None, heads, head_dim) with q, k, v along axis 1 and
  ``qkv.bias [3, Hd, Dh]``; ``proj.kernel [Hd, Dh, D]`` (heads, head_dim, embed), ``proj.bias [D]``;
  ``relative_position_bias_table [(2 ph - 1) * (2 pw - 1), Hd]`` (None, heads), Swin's layout:
  the score of query ``(yq, xq)`` and key ``(yk, xk)`` of one window (coordinates inside the
  window, or grid coordinates) in head ``h`` gets
  ``table[(yq - yk + ph - 1) * (2 pw - 1) + (xq - xk + pw - 1), h]``.
  A timm Swin ``attn.relative_position_bias_table`` is this table as is.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import DType, Dense, as_pair, check_choice, check_input, compute_dtype, partitioned
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "WindowAttention",
    "MaxViTBlockAttention",
    "MaxViTGridAttention",
    "window_partition",
    "window_reverse",
    "grid_partition",
    "grid_reverse",
    "relative_position_index",
    "shifted_window_mask",
    "qk_scale_or_default",
    "qkv_projections",
    "as_pair",
]

MASK_VALUE = -100.0  # Swin's additive score for query/key pairs from different regions of a shifted window


def _check_map(owner: str, x, size: tuple[int, int], what: str) -> tuple[int, int]:
    if not hasattr(x, "shape") or x.ndim < 3:
        raise ValueError(f"{owner}: x must have shape [B, H, W, ...], got {getattr(x, 'shape', type(x).__name__)}")
    height, width = x.shape[1], x.shape[2]
    if height % size[0] or width % size[1]:
        raise ValueError(f"{owner}: H x W = {height} x {width} must be divisible by the {what} {size}")
    return height // size[0], width // size[1]


def window_partition(x: jax.Array, window_size: int | Sequence[int]) -> jax.Array:
    """Contiguous windows: ``x [B, H, W, *F] -> [B, (H/ph) * (W/pw), ph * pw, *F]``.

    Window ``r * (W/pw) + c`` holds ``x[:, r*ph + i, c*pw + j]`` as token ``i * pw + j``.
    H and W must divide by ``window_size = (ph, pw)`` (an int means a square window).
    """
    ph, pw = as_pair("window_partition", "window_size", window_size)
    rows, cols = _check_map("window_partition", x, (ph, pw), "window_size")
    batch, features = x.shape[0], x.shape[3:]
    x = x.reshape(batch, rows, ph, cols, pw, *features)
    x = jnp.moveaxis(x, 2, 3)  # [B, rows, cols, ph, pw, *F]
    return x.reshape(batch, rows * cols, ph * pw, *features)


def window_reverse(windows: jax.Array, window_size: int | Sequence[int], size: Sequence[int]) -> jax.Array:
    """Inverse of :func:`window_partition`: ``[B, nW, ph * pw, *F] -> [B, H, W, *F]`` with ``size = (H, W)``."""
    owner = "window_reverse"
    ph, pw = as_pair(owner, "window_size", window_size)
    height, width = as_pair(owner, "size", size)
    if height % ph or width % pw:
        raise ValueError(f"{owner}: size {(height, width)} must be divisible by window_size {(ph, pw)}")
    rows, cols = height // ph, width // pw
    if not hasattr(windows, "shape") or windows.ndim < 3 or tuple(windows.shape[1:3]) != (rows * cols, ph * pw):
        raise ValueError(
            f"{owner}: windows must have shape [B, {rows * cols}, {ph * pw}, ...] for size {(height, width)} and "
            f"window_size {(ph, pw)}, got {getattr(windows, 'shape', type(windows).__name__)}"
        )
    batch, features = windows.shape[0], windows.shape[3:]
    x = windows.reshape(batch, rows, cols, ph, pw, *features)
    x = jnp.moveaxis(x, 3, 2)  # [B, rows, ph, cols, pw, *F]
    return x.reshape(batch, height, width, *features)


def grid_partition(x: jax.Array, grid_size: int | Sequence[int]) -> jax.Array:
    """Strided grid windows: ``x [B, H, W, *F] -> [B, (H/gh) * (W/gw), gh * gw, *F]``.

    With strides ``sh = H / gh``, ``sw = W / gw``, window ``a * sw + b`` holds
    ``x[:, i*sh + a, j*sw + b]`` as token ``i * gw + j``. H and W must divide by ``grid_size``.
    """
    gh, gw = as_pair("grid_partition", "grid_size", grid_size)
    sh, sw = _check_map("grid_partition", x, (gh, gw), "grid_size")
    batch, features = x.shape[0], x.shape[3:]
    x = x.reshape(batch, gh, sh, gw, sw, *features)
    x = jnp.moveaxis(x, (2, 4), (1, 2))  # [B, sh, sw, gh, gw, *F]
    return x.reshape(batch, sh * sw, gh * gw, *features)


def grid_reverse(windows: jax.Array, grid_size: int | Sequence[int], size: Sequence[int]) -> jax.Array:
    """Inverse of :func:`grid_partition`: ``[B, nW, gh * gw, *F] -> [B, H, W, *F]`` with ``size = (H, W)``."""
    owner = "grid_reverse"
    gh, gw = as_pair(owner, "grid_size", grid_size)
    height, width = as_pair(owner, "size", size)
    if height % gh or width % gw:
        raise ValueError(f"{owner}: size {(height, width)} must be divisible by grid_size {(gh, gw)}")
    sh, sw = height // gh, width // gw
    if not hasattr(windows, "shape") or windows.ndim < 3 or tuple(windows.shape[1:3]) != (sh * sw, gh * gw):
        raise ValueError(
            f"{owner}: windows must have shape [B, {sh * sw}, {gh * gw}, ...] for size {(height, width)} and "
            f"grid_size {(gh, gw)}, got {getattr(windows, 'shape', type(windows).__name__)}"
        )
    batch, features = windows.shape[0], windows.shape[3:]
    x = windows.reshape(batch, sh, sw, gh, gw, *features)
    x = jnp.moveaxis(x, (1, 2), (2, 4))  # [B, gh, sh, gw, sw, *F]
    return x.reshape(batch, height, width, *features)


def relative_position_index(window_size: int | Sequence[int]) -> np.ndarray:
    """``[N, N]`` int32 (``N = ph * pw``): row of the bias table for query token ``q`` and key token
    ``k`` (row-major coordinates in the window), ``(yq - yk + ph - 1) * (2 pw - 1) + (xq - xk + pw - 1)``."""
    ph, pw = as_pair("relative_position_index", "window_size", window_size)
    ys, xs = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + ph - 1
    dx = xs[:, None] - xs[None, :] + pw - 1
    return (dy * (2 * pw - 1) + dx).astype(np.int32)


def _region_labels(length: int, window: int, shift: int) -> np.ndarray:
    """Swin's region of each position along one padded axis (0, 1, 2; all 0 without a shift)."""
    labels = np.zeros(length, np.int32)
    if shift:
        labels[length - window : length - shift] = 1
        labels[length - shift :] = 2
    return labels


def shifted_window_mask(
    padded_size: Sequence[int], window_size: int | Sequence[int], shift_size: int | Sequence[int]
) -> np.ndarray:
    """Swin's shifted-window attention mask ``[nW, N, N]`` float32 (0 or -100) for a padded map of
    ``padded_size = (Hp, Wp)`` (multiples of the window), windows numbered as in :func:`window_partition`."""
    owner = "shifted_window_mask"
    height, width = as_pair(owner, "padded_size", padded_size)
    ph, pw = as_pair(owner, "window_size", window_size)
    sh, sw = as_pair(owner, "shift_size", shift_size, minimum=0)
    if height % ph or width % pw:
        raise ValueError(f"{owner}: padded_size {(height, width)} must be divisible by window_size {(ph, pw)}")
    labels = _region_labels(height, ph, sh)[:, None] * 3 + _region_labels(width, pw, sw)[None, :]
    rows, cols = height // ph, width // pw
    windows = labels.reshape(rows, ph, cols, pw).transpose(0, 2, 1, 3).reshape(rows * cols, ph * pw)
    different = windows[:, :, None] != windows[:, None, :]
    return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


def qk_scale_or_default(owner: str, qk_scale: float | None, head_dim: int) -> float:
    """The score scale: ``qk_scale`` (a finite positive float) or, when None, ``head_dim ** -0.5``."""
    scale = check_float(owner, "qk_scale", qk_scale, positive=True)
    return head_dim**-0.5 if scale is None else scale


def qkv_projections(
    dim: int,
    num_heads: int,
    head_dim: int,
    *,
    qkv_bias: bool,
    out_bias: bool,
    dtype: DType | None,
    param_dtype: DType,
    kernel_init,
    rngs: nnx.Rngs,
) -> tuple[Dense, Dense]:
    """``(qkv, proj)``: the fused input projection ``[..., D] -> [..., 3, Hd, Dh]`` (kernel
    ``[D, 3, Hd, Dh]``, logical axes ``(embed, None, heads, head_dim)``; q, k, v along axis -3) and
    the output projection ``[..., Hd, Dh] -> [..., D]`` (kernel ``[Hd, Dh, D]``, ``(heads, head_dim,
    embed)``), created in that order from ``rngs``. ``kernel_init`` None: Lecun normal."""
    dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
    qkv = Dense(dim, (3, num_heads, head_dim), logical_axes=("embed", None, "heads", "head_dim"), use_bias=qkv_bias,
                **dense)
    proj = Dense((num_heads, head_dim), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=out_bias, **dense)
    return qkv, proj


@register_mixer("swin_window")
class WindowAttention(nnx.Module):
    """Multi-head softmax attention inside non-overlapping 2-D windows (Swin W-MSA / SW-MSA, MaxViT
    block and grid attention), with a learned relative position bias.

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype, for any static H, W (padded to the
    partition, see the module docstring).

    Args:
      dim: channels ``D``.
      num_heads: heads ``Hd``.
      window_size: ``(ph, pw)`` or an int: the window (``partition="window"``) or the grid
        (``partition="grid"``) size; each window holds ``N = ph * pw`` tokens.
      shift_size: Swin's cyclic shift ``(sh, sw)`` or an int, ``0 <= s < window``; window partition only.
      partition: ``"window"`` (contiguous blocks) or ``"grid"`` (strided tokens).
      head_dim: features per head ``Dh``; default ``dim // num_heads`` (num_heads must divide dim).
        The attention width ``Hd * Dh`` may differ from ``D``.
      qkv_bias / out_bias: biases of the fused qkv and of the output projections.
      rel_pos_bias: learn the relative position bias table (trunc-normal, std 0.02).
      qk_scale: score scale; default ``Dh ** -0.5``.
      dtype: compute dtype (default: promotion of input and parameters); scores, softmax and the
        bias are float32 (or wider). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int | Sequence[int] = 7,
        shift_size: int | Sequence[int] = 0,
        partition: str = "window",
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        rel_pos_bias: bool = True,
        qk_scale: float | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        if head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) when head_dim is not given")
            head_dim = self.dim // self.num_heads
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.window_size = as_pair(owner, "window_size", window_size)
        self.shift_size = as_pair(owner, "shift_size", shift_size, minimum=0)
        self.partition = check_choice(owner, "partition", partition, ("window", "grid"))
        if any(s >= w for s, w in zip(self.shift_size, self.window_size, strict=True)):
            raise ValueError(f"{owner}: shift_size {self.shift_size} must be smaller than window_size {self.window_size}")
        if partition == "grid" and any(self.shift_size):
            raise ValueError(f"{owner}: shift_size {self.shift_size} needs partition='window' (a grid is not shifted)")
        for name, flag in (("qkv_bias", qkv_bias), ("out_bias", out_bias), ("rel_pos_bias", rel_pos_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(flag).__name__}")
        self.scale = qk_scale_or_default(owner, qk_scale, self.head_dim)
        self.dtype = dtype
        self.param_dtype = param_dtype

        self.qkv, self.proj = qkv_projections(dim, self.num_heads, self.head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                                              dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        ph, pw = self.window_size
        table_shape = ((2 * ph - 1) * (2 * pw - 1), self.num_heads)
        self.relative_position_bias_table = (
            nnx.Param(
                partitioned(nnx.initializers.truncated_normal(stddev=0.02), (None, "heads"))(
                    rngs.params(), table_shape, param_dtype
                )
            )
            if rel_pos_bias
            else None
        )

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Hp, Wp)``: ``(H, W)`` rounded up to multiples of ``window_size``."""
        (ph, pw) = self.window_size
        return -(-height // ph) * ph, -(-width // pw) * pw

    def relative_position_bias(self) -> jax.Array:
        """``[Hd, N, N]`` float32 (or wider) bias of every query/key pair of a window (zeros without a table)."""
        n = self.window_size[0] * self.window_size[1]
        if self.relative_position_bias_table is None:
            return jnp.zeros((self.num_heads, n, n), jnp.float32)
        table = self.relative_position_bias_table[...]
        table = table.astype(jnp.promote_types(table.dtype, jnp.float32))
        return jnp.transpose(table[relative_position_index(self.window_size)], (2, 0, 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        owner = type(self).__name__
        check_input(owner, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        height, width = x.shape[1], x.shape[2]
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        shift = self.shift_size
        if any(shift):
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        padded = self.padded_size(height, width)
        x = jnp.pad(x, ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0)))
        if self.partition == "window":
            windows = window_partition(x, self.window_size)
        else:
            windows = grid_partition(x, self.window_size)

        qkv = self.qkv(windows)  # [B, nW, N, 3, Hd, Dh]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        accumulate = jnp.promote_types(dtype, jnp.float32)
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=accumulate) * self.scale
        scores = scores + self.relative_position_bias().astype(accumulate)
        if any(shift):
            mask = shifted_window_mask(padded, self.window_size, shift)  # [nW, N, N]
            scores = scores + jnp.asarray(mask, accumulate)[None, :, None]
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v, preferred_element_type=accumulate).astype(dtype)
        y = self.proj(out)  # [B, nW, N, D]

        if self.partition == "window":
            y = window_reverse(y, self.window_size, padded)
        else:
            y = grid_reverse(y, self.window_size, padded)
        y = y[:, :height, :width]
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        return y

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), on the padded map
        of ``T = Hp * Wp`` tokens with ``A = Hd * Dh``: qkv ``2 T D 3A``, scores and weights @ values
        ``2 * 2 T N A``, output projection ``2 T A D``."""
        tokens = int(np.prod(self.padded_size(height, width)))
        n = self.window_size[0] * self.window_size[1]
        width_attn = self.num_heads * self.head_dim
        return 2 * tokens * self.dim * 3 * width_attn + 4 * tokens * n * width_attn + 2 * tokens * width_attn * self.dim


@register_mixer("maxvit_block")
class MaxViTBlockAttention(WindowAttention):
    """:class:`WindowAttention` with MaxViT's block-attention defaults: ``partition="window"``,
    ``head_dim=32`` (timm maxxvit ``PartitionAttentionCl(partition_type="block")``)."""

    def __init__(self, dim: int, num_heads: int, *, partition: str = "window", head_dim: int | None = 32, **options):
        super().__init__(dim, num_heads, partition=partition, head_dim=head_dim, **options)


@register_mixer("maxvit_grid")
class MaxViTGridAttention(WindowAttention):
    """:class:`WindowAttention` with MaxViT's grid-attention defaults: ``partition="grid"``,
    ``head_dim=32`` (timm maxxvit ``PartitionAttentionCl(partition_type="grid")``); ``window_size``
    is the grid size."""

    def __init__(self, dim: int, num_heads: int, *, partition: str = "grid", head_dim: int | None = 32, **options):
        super().__init__(dim, num_heads, partition=partition, head_dim=head_dim, **options)
