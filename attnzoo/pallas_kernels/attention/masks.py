"""Composable attention masks and their compilation to per-block metadata.

A mask is a boolean function of absolute query and key positions, ``mask(q_idx, kv_idx) -> bool``,
written with array operators only (``<=``, ``&``, ``//``, ...) so that the same object is evaluated
with numpy when the block metadata is built and with ``jax.numpy`` inside kernels. Masks compose
with ``&``, ``|`` and ``~``; a plain function ``mask_mod(q_idx, kv_idx)`` becomes a mask with
:class:`FunctionMask` (or implicitly when passed to :func:`attnzoo.pallas_kernels.attention`).

Before a kernel runs, the mask is classified per (query block, key block) tile as EMPTY (skipped:
no load, no compute), FULL (computed without the element mask) or PARTIAL (computed with it); the
idea of JAX's splash attention and PyTorch's FlexAttention. Masks whose rows are intervals of keys
(causal, local, chunked, prefix-LM and their intersections) are classified analytically in
O(T x num_kv_blocks); anything else is evaluated densely in numpy, row block by row block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def floor_div(x, divisor: int):
    """``x // divisor`` for numpy and JAX int arrays; on JAX, exact for ``x >= 0``.

    ``jnp.floor_divide`` needs ``sign``, which Mosaic lowers only on a TPU host; ``lax.div``
    (truncation) lowers everywhere and equals floor division for non-negative ``x``.
    """
    if isinstance(x, jax.Array):
        return jax.lax.div(x, jax.numpy.asarray(divisor, x.dtype))
    return np.floor_divide(x, divisor)


class Mask:
    """Base class: subclasses define ``__call__(q_idx, kv_idx)`` on broadcastable int arrays."""

    def __call__(self, q_idx, kv_idx):
        raise TypeError(f"{type(self).__name__} does not define a mask function")

    def row_interval(self, q_idx: np.ndarray, kv_len: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Inclusive ``(lo, hi)`` visible key range per query row, or None if rows are not intervals."""
        return None

    def __and__(self, other) -> Mask:
        return AndMask(self, as_mask(other, "mask"))

    def __rand__(self, other) -> Mask:
        return AndMask(as_mask(other, "mask"), self)

    def __or__(self, other) -> Mask:
        return OrMask(self, as_mask(other, "mask"))

    def __ror__(self, other) -> Mask:
        return OrMask(as_mask(other, "mask"), self)

    def __invert__(self) -> Mask:
        return NotMask(self)


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
    """Every query sees every key."""

    def __call__(self, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    def row_interval(self, q_idx, kv_len):
        return np.zeros_like(q_idx), np.full_like(q_idx, kv_len - 1)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
    """``kv_idx <= q_idx + offset``; ``offset = S - T`` aligns the last query with the last key."""

    offset: int = 0

    def __call__(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def row_interval(self, q_idx, kv_len):
        return np.zeros_like(q_idx), q_idx + self.offset


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
    """Sliding window: ``q_idx + offset - left <= kv_idx <= q_idx + offset + right``.

    ``left`` or ``right`` None means unbounded on that side.
    """

    left: int | None
    right: int | None
    offset: int = 0

    def __call__(self, q_idx, kv_idx):
        centre = q_idx + self.offset
        visible = (kv_idx >= 0) & (q_idx >= 0)
        if self.left is not None:
            visible = visible & (kv_idx >= centre - self.left)
        if self.right is not None:
            visible = visible & (kv_idx <= centre + self.right)
        return visible

    def row_interval(self, q_idx, kv_len):
        centre = q_idx + self.offset
        lo = np.zeros_like(q_idx) if self.left is None else centre - self.left
        hi = np.full_like(q_idx, kv_len - 1) if self.right is None else centre + self.right
        return lo, hi


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(Mask):
    """Causal attention inside fixed chunks of ``chunk_size`` positions (Llama-4 style)."""

    chunk_size: int
    offset: int = 0

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")

    def __call__(self, q_idx, kv_idx):
        pos = q_idx + self.offset
        # Rows with pos < 0 see nothing through the first term, so truncation there is harmless.
        same_chunk = floor_div(kv_idx, self.chunk_size) == floor_div(pos, self.chunk_size)
        return (kv_idx <= pos) & same_chunk

    def row_interval(self, q_idx, kv_len):
        pos = q_idx + self.offset
        return (pos // self.chunk_size) * self.chunk_size, pos


@dataclasses.dataclass(frozen=True)
class PrefixLMMask(Mask):
    """Bidirectional over the first ``prefix_len`` keys, causal after them."""

    prefix_len: int
    offset: int = 0

    def __post_init__(self):
        if not isinstance(self.prefix_len, int) or self.prefix_len < 0:
            raise ValueError(f"prefix_len must be a non-negative int, got {self.prefix_len!r}")

    def __call__(self, q_idx, kv_idx):
        return (kv_idx < self.prefix_len) | (kv_idx <= q_idx + self.offset)

    def row_interval(self, q_idx, kv_len):
        return np.zeros_like(q_idx), np.maximum(q_idx + self.offset, self.prefix_len - 1)


@dataclasses.dataclass(frozen=True)
class KeyRangeMask(Mask):
    """Keys ``lo <= kv_idx < hi`` visible to every query (attention sinks, regions of a key view)."""

    lo: int
    hi: int

    def __post_init__(self):
        if not isinstance(self.lo, int) or not isinstance(self.hi, int) or not 0 <= self.lo <= self.hi:
            raise ValueError(f"KeyRangeMask: need ints 0 <= lo <= hi, got lo={self.lo!r}, hi={self.hi!r}")

    def __call__(self, q_idx, kv_idx):
        return (kv_idx >= self.lo) & (kv_idx < self.hi) & (q_idx >= 0)

    def row_interval(self, q_idx, kv_len):
        return np.full_like(q_idx, self.lo), np.full_like(q_idx, self.hi - 1)


@dataclasses.dataclass(frozen=True)
class FunctionMask(Mask):
    """Wraps ``mask_mod(q_idx, kv_idx) -> bool`` written with elementwise array operations.

    Equality and hashing follow the function's (its identity), so compiled programs and block
    metadata are reused for the same function; define it once rather than as a fresh lambda
    per call.
    """

    mask_mod: Callable

    def __call__(self, q_idx, kv_idx):
        return self.mask_mod(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class AndMask(Mask):
    left: Mask
    right: Mask

    def __call__(self, q_idx, kv_idx):
        return self.left(q_idx, kv_idx) & self.right(q_idx, kv_idx)

    def row_interval(self, q_idx, kv_len):
        a = self.left.row_interval(q_idx, kv_len)
        b = self.right.row_interval(q_idx, kv_len)
        if a is None or b is None:
            return None
        return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])


@dataclasses.dataclass(frozen=True)
class OrMask(Mask):
    left: Mask
    right: Mask

    def __call__(self, q_idx, kv_idx):
        return self.left(q_idx, kv_idx) | self.right(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class NotMask(Mask):
    inner: Mask

    def __call__(self, q_idx, kv_idx):
        return ~self.inner(q_idx, kv_idx)


def as_mask(mask, argname: str = "mask") -> Mask:
    """Returns ``mask`` as a :class:`Mask`; plain callables become :class:`FunctionMask`."""
    if isinstance(mask, Mask):
        return mask
    if callable(mask):
        return FunctionMask(mask)
    raise TypeError(
        f"{argname} must be an attnzoo Mask or a callable mask_mod(q_idx, kv_idx) -> bool, "
        f"got {type(mask).__name__}"
    )


def build_mask(*, causal: bool, window, mask, q_len: int, kv_len: int) -> Mask:
    """Combines the keyword arguments of ``attention`` into one mask (queries aligned to the end)."""
    offset = kv_len - q_len
    parts: list[Mask] = []
    if causal:
        parts.append(CausalMask(offset))
    if window is not None:
        parts.append(LocalMask(window[0], window[1], offset))
    if mask is not None:
        parts.append(as_mask(mask))
    if not parts:
        return FullMask()
    combined = parts[0]
    for part in parts[1:]:
        combined = combined & part
    return combined


def _dense_rows(mask: Mask, rows: np.ndarray, kv_len_padded: int) -> np.ndarray:
    q_idx = rows.astype(np.int32)[:, None]
    kv_idx = np.arange(kv_len_padded, dtype=np.int32)[None, :]
    values = np.asarray(mask(q_idx, kv_idx), dtype=bool)
    return np.broadcast_to(values, (rows.size, kv_len_padded))


@functools.lru_cache(maxsize=256)
def block_kinds(
    mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int
) -> np.ndarray:
    """Classifies every tile of the padded score matrix as EMPTY, PARTIAL or FULL.

    Keys at or beyond ``kv_len`` (padding) are invisible. Padded query rows are classified like
    real ones, which is conservative: their outputs are discarded.

    Returns: int8 array ``[ceil(q_len/block_q), ceil(kv_len/block_kv)]``.
    """
    nq = -(-q_len // block_q)
    nk = -(-kv_len // block_kv)
    q_idx = np.arange(nq * block_q, dtype=np.int64)
    interval = mask.row_interval(q_idx, kv_len)
    if interval is not None:
        lo = np.maximum(interval[0], 0).reshape(nq, block_q, 1)
        hi = np.minimum(interval[1], kv_len - 1).reshape(nq, block_q, 1)
        starts = (np.arange(nk) * block_kv)[None, None, :]
        ends = np.minimum(starts + block_kv, kv_len) - 1
        row_has = lo <= hi
        full = np.all(row_has & (lo <= starts) & (hi >= starts + block_kv - 1), axis=1)
        empty = np.all(~row_has | (hi < starts) | (lo > ends), axis=1)
    else:
        kv_valid = np.arange(nk * block_kv) < kv_len
        rows_per_chunk = max(block_q, (1 << 24) // max(nk * block_kv, 1) // block_q * block_q)
        full = np.zeros((nq, nk), bool)
        empty = np.zeros((nq, nk), bool)
        for start in range(0, nq * block_q, rows_per_chunk):
            rows = q_idx[start : start + rows_per_chunk]
            visible = _dense_rows(mask, rows, nk * block_kv) & kv_valid[None, :]
            tiles = visible.reshape(rows.size // block_q, block_q, nk, block_kv)
            any_visible = tiles.any(axis=(1, 3))
            all_visible = tiles.all(axis=(1, 3))
            first = start // block_q
            full[first : first + tiles.shape[0]] = all_visible
            empty[first : first + tiles.shape[0]] = ~any_visible
    kinds = np.full((nq, nk), PARTIAL, np.int8)
    kinds[full] = FULL
    kinds[empty] = EMPTY
    return kinds


@dataclasses.dataclass(frozen=True)
class BlockMetadata:
    """Which tiles a kernel visits, in the two orders the forward and backward passes need.

    Row-major (per query block, for the forward and dq passes):
      ``kv_index[i, s]``: key block visited at step ``s`` of query block ``i`` (padded steps repeat
      the last real index so no new copy is issued); ``kv_kind[i, s]``: EMPTY for padded steps.
    Column-major (per key block, for the dk/dv pass): ``q_index``, ``q_kind`` likewise.
    Flat lists for the blockwise XLA path: ``full_pairs`` and ``partial_pairs``, ``[P, 2]`` of
    (query block, key block).
    """

    kinds: np.ndarray
    kv_index: np.ndarray
    kv_kind: np.ndarray
    q_index: np.ndarray
    q_kind: np.ndarray
    full_pairs: np.ndarray
    partial_pairs: np.ndarray

    @property
    def num_visible_tiles(self) -> int:
        return int(np.count_nonzero(self.kinds))


def _compress(kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = kinds.shape
    steps = max(1, int(np.count_nonzero(kinds, axis=1).max(initial=0)))
    index = np.zeros((rows, steps), np.int32)
    kind = np.zeros((rows, steps), np.int32)
    for r in range(rows):
        visible = np.flatnonzero(kinds[r])
        n = visible.size
        if n:
            index[r, :n] = visible
            index[r, n:] = visible[-1]
            kind[r, :n] = kinds[r, visible]
    return index, kind


@functools.lru_cache(maxsize=256)
def block_metadata(
    mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int, dense: bool = False
) -> BlockMetadata:
    """Compiles ``mask`` to the tile lists of :class:`BlockMetadata`.

    ``dense=True`` marks every visible tile PARTIAL (used when a dynamic mask such as segment ids
    must be applied to every element).
    """
    kinds = block_kinds(mask, q_len, kv_len, block_q, block_kv).copy()
    if dense:
        kinds[kinds == FULL] = PARTIAL
    kv_index, kv_kind = _compress(kinds)
    q_index, q_kind = _compress(kinds.T)
    full_pairs = np.argwhere(kinds == FULL).astype(np.int32).reshape(-1, 2)
    partial_pairs = np.argwhere(kinds == PARTIAL).astype(np.int32).reshape(-1, 2)
    return BlockMetadata(kinds, kv_index, kv_kind, q_index, q_kind, full_pairs, partial_pairs)
