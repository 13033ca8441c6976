"""Neighbourhood attention semantics (NATTEN's) and the dense reference implementation.

Per spatial axis of length ``n`` with kernel ``K``, dilation ``d``, stride ``s``:

* Dilation splits the axis into ``d`` interleaved groups: position ``x`` is in group ``g = x % d``
  at index ``i = x // d``; group ``g`` holds ``n_g = ceil((n - g) / d)`` positions (the first
  ``n % d`` groups are one longer when ``d`` does not divide ``n``). Queries attend only within
  their group; windows below are in group indices.
* Stride groups consecutive queries ``[s * (i // s), s * (i // s) + s)``, which share the window
  of a "leader" query.
* Not causal: the leader is ``min(s * (i // s) + s // 2, n_g - 1)`` (the centre of the stride
  group, its right-hand centre for even ``s``); the window is the ``K`` indices
  ``[start, start + K)`` with ``start = clip(leader - K // 2, 0, n_g - K)``: centred on the leader
  (``K // 2`` to the left, ``K // 2 - 1`` to the right for even ``K``) and shifted inward at the
  borders, so every query sees exactly ``K`` keys.
* Causal: the leader is ``min(s * (i // s) + s - 1, n_g - 1)`` (the last query of the stride
  group); the window is ``[max(leader - K + 1, 0), i]``, ending at the query (fewer keys near the
  start).

A query sees a key iff every axis admits it. The relative position bias (NAT) adds
``rpb[h, j_0 - i_0 + K_0 - 1, j_1 - i_1 + K_1 - 1, ...]`` with ``i``, ``j`` the query's and key's
group indices: the offset in the dilated grid, not centred at the borders (NATTEN <= 0.17's
``get_pb_start``).

This file is NATTEN's reference and flex backends' mask restated (``natten/backends/flex.py``,
``csrc/include/natten/cuda/reference/mask.hpp``) and checked against them by hand in the tests.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisSpec:
    """Validated options of one spatial axis: ``length`` n, ``kernel`` K, ``dilation`` d,
    ``stride`` s, ``causal``."""

    length: int
    kernel: int
    dilation: int
    stride: int
    causal: bool

    def group_length(self, group):
        """``n_g``: positions in dilation group ``group`` (numpy or int)."""
        return (self.length - group + self.dilation - 1) // self.dilation

    @property
    def max_group_length(self) -> int:
        return -(-self.length // self.dilation)


def group_windows(index: np.ndarray, group_length, axis: AxisSpec) -> tuple[np.ndarray, np.ndarray]:
    """Window ``[start, end)`` (group indices) of queries at group ``index`` in groups of
    ``group_length`` positions. Numpy int arrays, broadcast together."""
    index = np.asarray(index, np.int64)
    group_length = np.asarray(group_length, np.int64)
    kernel, stride = axis.kernel, axis.stride
    first_in_stride_group = (index // stride) * stride
    if axis.causal:
        leader = np.minimum(first_in_stride_group + stride - 1, group_length - 1)
        return np.maximum(leader - kernel + 1, 0), index + 1
    leader = np.minimum(first_in_stride_group + stride // 2, group_length - 1)
    start = np.clip(leader - kernel // 2, 0, group_length - kernel)
    return start, start + kernel


def axis_visibility(axis: AxisSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(visible [n, n] bool, rel [n, n] int)`` for one axis: query position -> key position.

    ``rel`` is the relative-position-bias index ``j - i + K - 1`` of group indices (meaningful
    where visible).
    """
    x = np.arange(axis.length)
    group, index = x % axis.dilation, x // axis.dilation
    start, end = group_windows(index, axis.group_length(group), axis)
    same_group = group[:, None] == group[None, :]
    visible = same_group & (start[:, None] <= index[None, :]) & (index[None, :] < end[:, None])
    rel = index[None, :] - index[:, None] + axis.kernel - 1
    return visible, rel


def dense_visibility(axes: tuple[AxisSpec, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``[N, N]`` visibility over flattened (row-major) positions, and per axis the ``rel``
    index ``[N, N]``."""
    shape = tuple(axis.length for axis in axes)
    coords = np.unravel_index(np.arange(math.prod(shape)), shape)
    visible = np.ones((1, 1), bool)
    rels = []
    for axis, coord in zip(axes, coords):
        vis, rel = axis_visibility(axis)
        visible = visible & vis[coord[:, None], coord[None, :]]
        rels.append(rel[coord[:, None], coord[None, :]])
    return visible, rels


def neighborhood_attention(q, k, v, *, axes: tuple[AxisSpec, ...], scale: float, rel_pos_bias=None):
    """Dense neighbourhood attention: every score materialised, masked by index arithmetic.

    Args:
      q: ``[B, *spatial, Hq, D]``; k: ``[B, *spatial, Hkv, D]``; v: ``[B, *spatial, Hkv, Dv]``.
      axes: one :class:`AxisSpec` per spatial axis. scale: logit scale.
      rel_pos_bias: ``[Hq, 2K_0 - 1, ...]`` or None.

    Returns ``[B, *spatial, Hq, Dv]`` in q's dtype (computed in float32 or wider).
    """
    batch, *spatial, q_heads, head_dim = q.shape
    kv_heads, dv = k.shape[-2], v.shape[-1]
    group = q_heads // kv_heads
    tokens = math.prod(spatial)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qf = q.astype(acc).reshape(batch, tokens, kv_heads, group, head_dim)
    kf = k.astype(acc).reshape(batch, tokens, kv_heads, head_dim)
    vf = v.astype(acc).reshape(batch, tokens, kv_heads, dv)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf) * scale
    visible, rels = dense_visibility(axes)
    if rel_pos_bias is not None:
        clipped = [np.clip(rel, 0, 2 * axis.kernel - 2) for rel, axis in zip(rels, axes)]
        bias = rel_pos_bias.astype(acc)[(slice(None), *clipped)]  # [Hq, N, N]
        scores = scores + bias.reshape(kv_heads, group, tokens, tokens)
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, vf)
    return out.reshape(batch, *spatial, q_heads, dv).astype(q.dtype)
