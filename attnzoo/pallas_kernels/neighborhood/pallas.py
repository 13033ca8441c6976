"""Neighbourhood attention on the block-sparse flash-attention engine (``pk.attention``).

Tokens are permuted so that each dilation group's positions are cut into spatial tiles (e.g. 8 x 16
in 2-D) stored as contiguous runs of the sequence: the permuted sequence is ordered by
``(dilation group, tile, position in tile)``, each row-major over the axes. A query tile's
neighbourhood then touches only the few key tiles around it, so with 128-token blocks most
(query block, key block) pairs are EMPTY and skipped, and blocks deep inside a window are FULL.
:class:`NeighborhoodMask` evaluates NATTEN's window on permuted indices (integer division by
constants, comparisons, min/max: ops that lower in Mosaic and Triton), both when the engine
classifies tiles (numpy) and inside the kernels (jax). The output is un-permuted afterwards.

The engine takes no additive bias, so ``rel_pos_bias`` is not supported here (the public op
routes it to the xla path).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels.attention import attention
from attnzoo.pallas_kernels.attention.masks import Mask, floor_div
from attnzoo.pallas_kernels.neighborhood.reference import AxisSpec

# Spatial tile per number of axes: 128 tokens, the engine's default block.
DEFAULT_TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


def _minimum(a, b):
    return jnp.minimum(a, b) if _is_jax(a) or _is_jax(b) else np.minimum(a, b)


def _maximum(a, b):
    return jnp.maximum(a, b) if _is_jax(a) or _is_jax(b) else np.maximum(a, b)


def _divmod(x, divisor: int):
    quotient = floor_div(x, divisor)
    return quotient, x - quotient * divisor


def _unflatten(flat, sizes):
    """Row-major coordinates of ``flat`` in a grid of ``sizes`` (non-negative ints)."""
    coords = []
    for size in reversed(sizes):
        flat, coord = _divmod(flat, size)
        coords.append(coord)
    return coords[::-1]


@dataclasses.dataclass(frozen=True)
class NeighborhoodMask(Mask):
    """NATTEN's neighbourhood mask on the permuted token order of :func:`permute`.

    Attributes:
      axes: one :class:`AxisSpec` per spatial axis (length, kernel, dilation, stride, causal).
      tile: spatial tile per axis, in group indices.

    A permuted index ``p`` decomposes as ``((group * num_tiles) + tile_id) * tile_volume + offset``
    with ``group``, ``tile_id`` and ``offset`` row-major over the axes; the group index of a
    position along axis ``a`` is ``tile_id_a * tile_a + offset_a``.
    """

    axes: tuple[AxisSpec, ...]
    tile: tuple[int, ...]

    def __post_init__(self):
        if len(self.tile) != len(self.axes) or any(not isinstance(t, int) or t < 1 for t in self.tile):
            raise ValueError(f"NeighborhoodMask: tile must be {len(self.axes)} positive ints, got {self.tile!r}")

    @property
    def tiles_per_axis(self) -> tuple[int, ...]:
        return tuple(-(-axis.max_group_length // t) for axis, t in zip(self.axes, self.tile))

    @property
    def length(self) -> int:
        """Length of the permuted sequence (padding included)."""
        return math.prod(a.dilation * n * t for a, n, t in zip(self.axes, self.tiles_per_axis, self.tile))

    def _decode(self, p):
        """Per axis ``(group, group index)`` of permuted indices ``p``."""
        rest, offset = _divmod(p, math.prod(self.tile))
        group, tile_id = _divmod(rest, math.prod(self.tiles_per_axis))
        groups = _unflatten(group, [axis.dilation for axis in self.axes])
        tile_ids = _unflatten(tile_id, list(self.tiles_per_axis))
        offsets = _unflatten(offset, list(self.tile))
        return [(g, j * t + o) for g, j, o, t in zip(groups, tile_ids, offsets, self.tile)]

    def __call__(self, q_idx, kv_idx):
        visible = None
        for axis, (gq, iq), (gk, ik) in zip(self.axes, self._decode(q_idx), self._decode(kv_idx)):
            kernel, stride = axis.kernel, axis.stride
            group_length = floor_div(axis.length - gq + axis.dilation - 1, axis.dilation)
            # Padding queries take the window of their group's last query (their output is dropped).
            iq = _minimum(iq, group_length - 1)
            first = floor_div(iq, stride) * stride
            if axis.causal:
                leader = _minimum(first + stride - 1, group_length - 1)
                along = (ik >= leader - kernel + 1) & (ik <= iq)
            else:
                leader = _minimum(first + stride // 2, group_length - 1)
                start = _maximum(_minimum(leader - kernel // 2, group_length - kernel), 0)
                along = (ik >= start) & (ik < start + kernel)
            along = along & (gq == gk)
            visible = along if visible is None else visible & along
        return visible


def default_tile(axes: tuple[AxisSpec, ...]) -> tuple[int, ...]:
    return tuple(min(t, axis.max_group_length) for t, axis in zip(DEFAULT_TILES[len(axes)], axes))


def permute(x, mask: NeighborhoodMask):
    """``[B, *spatial, ...]`` -> ``[B, L, ...]`` in the mask's token order (zero padding)."""
    r = len(mask.axes)
    pads = [(0, 0)] * x.ndim
    split = [x.shape[0]]
    for a, (axis, n, t) in enumerate(zip(mask.axes, mask.tiles_per_axis, mask.tile)):
        pads[1 + a] = (0, axis.dilation * n * t - axis.length)
        split += [n, t, axis.dilation]
    trailing = x.shape[1 + r :]
    x = jnp.pad(x, pads).reshape(*split, *trailing)
    groups = [3 + 3 * a for a in range(r)]
    tiles = [1 + 3 * a for a in range(r)]
    offsets = [2 + 3 * a for a in range(r)]
    order = [0, *groups, *tiles, *offsets, *range(1 + 3 * r, x.ndim)]
    return x.transpose(order).reshape(x.shape[0], mask.length, *trailing)


def unpermute(y, mask: NeighborhoodMask):
    """Inverse of :func:`permute`: ``[B, L, ...]`` -> ``[B, *spatial, ...]``."""
    r = len(mask.axes)
    trailing = y.shape[2:]
    dilations = [axis.dilation for axis in mask.axes]
    y = y.reshape(y.shape[0], *dilations, *mask.tiles_per_axis, *mask.tile, *trailing)
    # [B, g..., j..., o...] -> [B, (j_0, o_0, g_0), (j_1, o_1, g_1), ...]
    order = [0]
    for a in range(r):
        order += [1 + r + a, 1 + 2 * r + a, 1 + a]
    order += list(range(1 + 3 * r, y.ndim))
    y = y.transpose(order)
    padded = [d * n * t for d, n, t in zip(dilations, mask.tiles_per_axis, mask.tile)]
    y = y.reshape(y.shape[0], *padded, *trailing)
    return y[(slice(None), *(slice(0, axis.length) for axis in mask.axes))]


def neighborhood_attention(q, k, v, *, axes: tuple[AxisSpec, ...], scale: float, interpret, tile=None):
    """Permute -> ``pk.attention(impl="pallas", mask=NeighborhoodMask)`` -> un-permute.

    Shapes as :func:`reference.neighborhood_attention` (without a bias). ``tile`` overrides the
    spatial tile (group indices per axis).
    """
    tile = default_tile(axes) if tile is None else tuple(min(t, a.max_group_length) for t, a in zip(tile, axes))
    mask = NeighborhoodMask(axes, tile)
    out = attention(
        permute(q, mask), permute(k, mask), permute(v, mask),
        mask=mask, scale=scale, impl="pallas", interpret=interpret,
    )
    return unpermute(out, mask)
