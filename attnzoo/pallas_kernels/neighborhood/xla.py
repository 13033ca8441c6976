"""Neighbourhood attention in pure XLA: tiles of queries against the halo of keys they can see.

Per axis, dilation groups are taken apart (group ``g`` holds positions ``g, g + d, ...``), and each
group's positions are cut into query tiles of ``T`` consecutive indices. Every window of a tile
lies inside one span of ``U`` consecutive key indices (its halo, ``U <= T + K + s - 2``), so a
tile's scores are a dense ``[T, U]`` block per axis and the N-D problem is the outer product of
the axes' blocks. Queries and keys are gathered into tiles with static index maps computed in
numpy (the windows never depend on data), scores are masked by per-axis tables, and the output is
gathered back to the input layout. Memory and compute are ``O(tokens x prod(U))``, about
``2^ndim`` times the kernel volume, never ``tokens^2``; gradients are JAX's (scatter-adds of the
gathers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels.neighborhood.reference import AxisSpec, group_windows

# Smallest query tile per axis (by number of spatial axes): tiny tiles make many tiny matmuls.
_MIN_TILE = {1: 32, 2: 4, 3: 2}


@dataclasses.dataclass(frozen=True)
class AxisTiles:
    """Static index maps of one axis; ``G`` dilation groups, ``J`` tiles per group, ``T`` queries
    per tile, ``U`` halo keys per tile.

    Attributes:
      query_index: ``[G, J, T]`` input position of each tile query (padding repeats the group's
        last query, whose output is dropped).
      key_index: ``[G, J, U]`` input position of each halo key (clamped where past the group).
      visible: ``[G, J, T, U]`` bool, the axis's window.
      rel: ``[G, J, T, U]`` relative-position-bias index ``j - i + K - 1`` (clipped).
      inverse: ``[n]`` flat ``(g, j, t)`` slot of each input position.
    """

    query_index: np.ndarray
    key_index: np.ndarray
    visible: np.ndarray
    rel: np.ndarray
    inverse: np.ndarray


def default_query_tile(axis: AxisSpec, ndim: int) -> int:
    """A multiple of the stride near the kernel size (then a halo is about twice a window)."""
    wanted = max(axis.kernel, _MIN_TILE[ndim])
    return min(axis.max_group_length, axis.stride * -(-wanted // axis.stride))


@functools.lru_cache(maxsize=256)
def axis_tiles(axis: AxisSpec, tile: int) -> AxisTiles:
    """The index maps of ``axis`` with query tiles of ``tile`` group indices."""
    d, m = axis.dilation, axis.max_group_length
    tile = min(tile, m)
    num_tiles = -(-m // tile)
    group = np.arange(d)[:, None, None]
    index = (np.arange(num_tiles)[:, None] * tile + np.arange(tile)[None, :])[None]  # [1, J, T]
    group_length = axis.group_length(group)  # [G, 1, 1]
    query = np.minimum(index, group_length - 1)
    start, end = group_windows(query, group_length, axis)  # [G, J, T]
    first = start.min(axis=2)
    halo = min(int((end.max(axis=2) - first).max()), m)
    halo_start = np.maximum(np.minimum(first, group_length[:, :, 0] - halo), 0)  # [G, J]
    key = halo_start[:, :, None] + np.arange(halo)  # [G, J, U]
    key_clamped = np.minimum(key, group_length - 1)
    visible = (start[..., None] <= key[:, :, None, :]) & (key[:, :, None, :] < end[..., None])
    rel = np.clip(key[:, :, None, :] - query[..., None] + axis.kernel - 1, 0, 2 * axis.kernel - 2)
    x = np.arange(axis.length)
    g, i = x % d, x // d
    inverse = (g * num_tiles + i // tile) * tile + i % tile
    return AxisTiles(
        query_index=(query * d + group).astype(np.int32),
        key_index=(key_clamped * d + group).astype(np.int32),
        visible=visible,
        rel=rel.astype(np.int32),
        inverse=inverse.astype(np.int32),
    )


def _gather_tiles(x, tiles_index, num_axes):
    """``x [B, n_0, ..., n_{r-1}, ...]`` -> ``[B, G_0, J_0, W_0, ..., G_{r-1}, J_{r-1}, W_{r-1}, ...]``."""
    for a in range(num_axes):
        x = jnp.take(x, jnp.asarray(tiles_index[a]), axis=1 + 3 * a)
    return x


def neighborhood_attention(q, k, v, *, axes: tuple[AxisSpec, ...], scale: float, rel_pos_bias=None, query_tile=None):
    """Tiled neighbourhood attention; shapes as :func:`reference.neighborhood_attention`.

    ``query_tile`` (an int or per-axis tuple of group indices) overrides the default tiles.
    """
    r = len(axes)
    if query_tile is None:
        query_tile = tuple(default_query_tile(axis, r) for axis in axes)
    elif isinstance(query_tile, int):
        query_tile = (query_tile,) * r
    tiles = [axis_tiles(axis, tile) for axis, tile in zip(axes, query_tile)]
    batch, *spatial, q_heads, head_dim = q.shape
    kv_heads, dv = k.shape[-2], v.shape[-1]
    group = q_heads // kv_heads
    acc = jnp.promote_types(q.dtype, jnp.float32)

    qt = _gather_tiles(q.reshape(batch, *spatial, kv_heads, group, head_dim), [t.query_index for t in tiles], r)
    kt = _gather_tiles(k, [t.key_index for t in tiles], r)
    vt = _gather_tiles(v, [t.key_index for t in tiles], r)

    # Einsum letters: b batch, h kv head, r query head in group, d / e features; per axis g (group),
    # j (tile), t (query in tile), u (halo key).
    letters = iter(c for c in string.ascii_letters if c not in "bhrde")
    g_, j_, t_, u_ = ([next(letters) for _ in range(r)] for _ in range(4))
    tile_ids = "".join(g + j for g, j in zip(g_, j_))
    q_sub = "b" + "".join(g + j + t for g, j, t in zip(g_, j_, t_)) + "hrd"
    k_sub = "b" + "".join(g + j + u for g, j, u in zip(g_, j_, u_)) + "hd"
    v_sub = "b" + "".join(g + j + u for g, j, u in zip(g_, j_, u_)) + "he"
    s_sub = "bhr" + tile_ids + "".join(t_) + "".join(u_)
    o_sub = "b" + "".join(g + j + t for g, j, t in zip(g_, j_, t_)) + "hre"

    scores = jnp.einsum(f"{q_sub},{k_sub}->{s_sub}", qt, kt, preferred_element_type=acc) * scale

    # Per-axis tables broadcast to the score layout [G0, J0, G1, J1, ..., T0, T1, ..., U0, U1, ...].
    def axis_view(table, a):
        shape = [1] * (4 * r)
        shape[2 * a], shape[2 * a + 1] = table.shape[0], table.shape[1]
        shape[2 * r + a], shape[3 * r + a] = table.shape[2], table.shape[3]
        return table.reshape(shape)

    visible = functools.reduce(jnp.logical_and, [jnp.asarray(axis_view(t.visible, a)) for a, t in enumerate(tiles)])
    if rel_pos_bias is not None:
        rels = [jnp.asarray(axis_view(t.rel, a)) for a, t in enumerate(tiles)]
        bias = rel_pos_bias.astype(acc)[(slice(None), *rels)]  # [Hq, G0, J0, ..., U_{r-1}]
        scores = scores + bias.reshape(kv_heads, group, *bias.shape[1:])
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=tuple(range(scores.ndim - r, scores.ndim)))
    out = jnp.einsum(f"{s_sub},{v_sub}->{o_sub}", weights.astype(v.dtype), vt, preferred_element_type=acc)

    flat = [batch]
    for t in tiles:
        flat.append(math.prod(t.query_index.shape))
    out = out.reshape(*flat, q_heads, dv)
    for a, t in enumerate(tiles):
        out = jnp.take(out, jnp.asarray(t.inverse), axis=1 + a)
    return out.astype(q.dtype)
