"""The ``xla`` implementation: the chunked engine of :mod:`chunk` in plain JAX, autodiff backward.

Packed sequences (``cu_seqlens``) are moved so that every sequence starts on a chunk boundary
(:func:`chunk_aligned_layout`); the gap tokens have ``k = v = 0`` and no decay, so they leave
the state alone and a chunk never mixes two sequences. Memory is linear in T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnzoo.pallas_kernels.common import pad_axis, round_up
from attnzoo.pallas_kernels.linear_rnn import chunk as _chunk
from attnzoo.pallas_kernels.linear_rnn.reference import segment_restarts


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Where packed tokens go when every sequence is padded to whole chunks.

    Attributes:
      source: ``[T']`` int32, the packed token each slot holds. valid: ``[T']`` bool, False in gaps.
      slot: ``[T]`` int32, the slot of each packed token.
      sequence: ``[N]`` int32 sequence of each chunk. starts: ``[N]`` bool, chunk begins its sequence.
      last_chunk: ``[S]`` int32, each sequence's last chunk (-1 for an empty sequence).
    """

    source: jax.Array
    valid: jax.Array
    slot: jax.Array
    sequence: jax.Array
    starts: jax.Array
    last_chunk: jax.Array


def chunk_aligned_layout(cu_seqlens: jax.Array, length: int, chunk: int) -> ChunkLayout:
    """Layout of ``S = len(cu_seqlens) - 1`` packed sequences with each starting a chunk.

    The padded length ``T' = round_up(T + S * (chunk - 1), chunk)`` is static, so offsets may be
    traced.
    """
    offsets = cu_seqlens.astype(jnp.int32)
    sequences = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    chunks_per_sequence = (lengths + chunk - 1) // chunk
    first_chunk = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(chunks_per_sequence)])
    padded_length = round_up(length + sequences * (chunk - 1), chunk)
    num_chunks = padded_length // chunk

    chunk_index = jnp.arange(num_chunks, dtype=jnp.int32)
    sequence = jnp.clip(jnp.searchsorted(first_chunk, chunk_index, side="right") - 1, 0, sequences - 1)
    sequence = sequence.astype(jnp.int32)
    starts = (chunk_index == first_chunk[sequence]) & (chunks_per_sequence[sequence] > 0)

    slots = jnp.arange(padded_length, dtype=jnp.int32)
    slot_sequence = sequence[slots // chunk]
    local = slots - first_chunk[slot_sequence] * chunk
    valid = (local >= 0) & (local < lengths[slot_sequence])
    source = jnp.where(valid, offsets[slot_sequence] + local, 0)

    positions = jnp.arange(length, dtype=jnp.int32)
    token_sequence = jnp.clip(jnp.searchsorted(offsets, positions, side="right") - 1, 0, sequences - 1)
    slot = first_chunk[token_sequence] * chunk + positions - offsets[token_sequence]
    last_chunk = jnp.where(chunks_per_sequence > 0, first_chunk[1:] - 1, -1)
    return ChunkLayout(source, valid, slot.astype(jnp.int32), sequence, starts, last_chunk.astype(jnp.int32))


def gather_to_layout(arrays, layout: ChunkLayout):
    """Moves packed ``[1, T, ...]`` arrays (None passes through) into the layout's slots, zero in gaps."""

    def gather(x):
        if x is None:
            return None
        picked = jnp.take(x, layout.source, axis=1)
        return jnp.where(layout.valid.reshape((1, -1) + (1,) * (x.ndim - 2)), picked, 0)

    return [gather(x) for x in arrays]


def to_chunks(x, chunk: int):
    """``[B, T, H, ...]`` (T a multiple of chunk) -> ``[B, H, N, C, ...]``."""
    batch, length, heads = x.shape[:3]
    x = x.reshape(batch, length // chunk, chunk, heads, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def from_chunks(x):
    """``[B, H, N, C, ...]`` -> ``[B, N*C, H, ...]``."""
    batch, heads, num, chunk = x.shape[:4]
    return jnp.moveaxis(x, 1, 3).reshape(batch, num * chunk, heads, *x.shape[4:])


def chunked_recurrence(
    q, k, v, *, g=None, gk=None, beta=None, scale: float, initial_state=None,
    output_final_state: bool = False, cu_seqlens=None, segment_ids=None, chunk_size: int = 64,
):
    """The recurrence of :mod:`attnzoo.pallas_kernels.linear_rnn.reference`, computed by chunks.

    Arguments as in ``reference.recurrence`` (already validated; ``segment_ids`` restarts the
    state inside chunks by masks, see :class:`chunk.Segments`), plus ``chunk_size`` (a power
    of two; the chunk shrinks to the next power of two of a shorter T). Returns
    ``(o [B,T,H,V] in v's dtype, final state [N,H,K,V] or None)``.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    out_dtype = v.dtype
    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    chunk = min(chunk_size, 1 << max(length - 1, 0).bit_length())
    inputs = [x if x is None else x.astype(dtype) for x in (q, k, v, g, gk, beta)]

    layout = None
    resets = None
    if segment_ids is not None:
        resets = segment_restarts(segment_ids)[:, :, None]  # [B, T, 1]: one head axis to chunk
    if cu_seqlens is not None:
        layout = chunk_aligned_layout(cu_seqlens, length, chunk)
        inputs = gather_to_layout(inputs, layout)
    else:
        inputs = [x if x is None else pad_axis(x, 1, chunk) for x in inputs]
        resets = None if resets is None else pad_axis(resets, 1, chunk)
    q, k, v, g, gk, beta = [x if x is None else to_chunks(x, chunk) for x in inputs]
    gates = _chunk.Gates(
        scalar=None if g is None else jnp.cumsum(g, axis=-1),
        channel=None if gk is None else jnp.cumsum(gk, axis=-2),
    )
    segments = None
    if resets is not None:
        resets = to_chunks(resets, chunk)  # [B, 1, N, C]
        gates = _chunk.restart_gates(gates, resets)
        segments = _chunk.segments_from_resets(resets)
    prepared = _chunk.prepare(q, k, v, gates, beta, segments=segments)

    sequences = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    initial = (
        jnp.zeros((sequences, heads, key_dim, value_dim), dtype)
        if initial_state is None
        else initial_state.astype(dtype)
    )
    resets = None if layout is None else (layout.sequence, layout.starts)
    states, writes, final = _chunk.state_pass(prepared, initial, resets)
    out = from_chunks(_chunk.outputs(prepared, states, writes, scale))
    if layout is not None:
        out = jnp.take(out, layout.slot, axis=1)
    else:
        out = out[:, :length]
    out = out.astype(out_dtype)
    if not output_final_state:
        return out, None
    if layout is not None:
        ends = _chunk.chunk_end_states(prepared, states, writes)[0]  # [H, N, K, V]
        last = jnp.maximum(layout.last_chunk, 0)
        final = jnp.where(
            (layout.last_chunk >= 0)[:, None, None, None], jnp.moveaxis(ends[:, last], 1, 0), initial
        )
    return out, final
