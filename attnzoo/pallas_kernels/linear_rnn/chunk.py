"""The chunkwise-parallel form of the recurrence, shared by every op and implementation.

The sequence is cut into chunks of ``C`` tokens. Inside a chunk, with the chunk-start state
``S0 [K, V]`` and cumulative log-decays ``G_i = sum_{s <= i} gk_s`` (a vector over K; a scalar
gate is the same on every channel), every token's write ``u_i`` and output ``o_i`` follow from
matmuls:

    delta rule:  (I + A) U = beta * (V - (K * e^G) S0),  A_ij = beta_i sum_c k_ic k_jc e^(G_ic - G_jc)  (j < i)
                 so  U = U' - W S0  with  W = (I + A)^-1 (beta * K * e^G),  U' = (I + A)^-1 (beta * V)
    otherwise:   U = V,  W = 0
    outputs:     O = scale * ((Q * e^G) S0 + P U),   P_ij = sum_c q_ic k_jc e^(G_ic - G_jc)       (j <= i)
    next state:  S1 = e^(G_C) * S0 + (K * e^(G_C - G))^T U

Only the last two lines and ``U = U' - W S0`` involve the state, so a chunk splits into three
stages (as in fla): :func:`prepare` (per chunk, parallel), :func:`state_pass` (sequential over
chunks) and :func:`outputs` (parallel). Every exponent above is <= 0 when the log-decays are <= 0,
so nothing overflows: a per-channel ``P``/``A`` is built by recursive halving, each block's
lower-left quarter a matmul of factors rescaled to the block's middle (see :func:`chunk_scores`).

Arrays here are chunk-major and head-major: ``[B, H, N, C, ...]`` (``N`` chunks). Computation is
in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Gates:
    """Cumulative in-chunk log-decays: ``scalar [B,H,N,C]`` or ``channel [B,H,N,C,K]`` (or neither)."""

    scalar: jax.Array | None = None
    channel: jax.Array | None = None

    @property
    def empty(self) -> bool:
        return self.scalar is None and self.channel is None

    def decayed(self, x):
        """``x * e^G`` (each token decayed back to the chunk start), ``x [B,H,N,C,K]``."""
        if self.scalar is not None:
            return scale_rows(x, jnp.exp(self.scalar))
        if self.channel is not None:
            return x * jnp.exp(self.channel)
        return x

    def decayed_to_end(self, x):
        """``x * e^(G_C - G)`` (each token decayed to the chunk's end), ``x [B,H,N,C,K]``."""
        if self.scalar is not None:
            return scale_rows(x, jnp.exp(self.scalar[..., -1:] - self.scalar))
        if self.channel is not None:
            return x * jnp.exp(self.channel[..., -1:, :] - self.channel)
        return x

    def last(self):
        """``G_C``, the whole chunk's log-decay: ``[B,H,N]`` or ``[B,H,N,K]``, or None."""
        if self.scalar is not None:
            return self.scalar[..., -1]
        if self.channel is not None:
            return self.channel[..., -1, :]
        return None


def _iota2(rows: int, cols: int):
    """Row and column indices of a ``[rows, cols]`` grid (iota, so usable inside kernels)."""
    shape = (rows, cols)
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0), jax.lax.broadcasted_iota(jnp.int32, shape, 1)


# XLA:CPU runs a reduction fused with the elementwise product feeding it (``sum(x * y, -1)``, what
# autodiff makes of a broadcast multiply) about 40x slower than the same contraction as a
# dot_general, so the two products whose gradients are such reductions have einsum backwards.


@jax.custom_vjp
def scale_rows(x: jax.Array, s: jax.Array) -> jax.Array:
    """``x * s[..., None]``: row ``r`` of ``x [..., R, K]`` scaled by ``s [..., R]``."""
    return x * s[..., None]


def _scale_rows_forward(x, s):
    return x * s[..., None], (x, s)


def _scale_rows_backward(residuals, d_out):
    x, s = residuals
    return d_out * s[..., None], jnp.einsum("...rk,...rk->...r", d_out, x)


scale_rows.defvjp(_scale_rows_forward, _scale_rows_backward)


@jax.custom_vjp
def pair_decays(gates: jax.Array, keep: jax.Array) -> jax.Array:
    """``D_ij = e^(G_i - G_j)`` where ``keep`` (bool, broadcastable to ``[..., C, C]``), else 1.

    ``gates [..., C]`` cumulative log-decays; the pairs not kept get no gradient.
    """
    return jnp.exp(jnp.where(keep, gates[..., :, None] - gates[..., None, :], 0.0))


def _pair_decays_forward(gates, keep):
    decays = pair_decays(gates, keep)
    return decays, (decays, keep)


def _pair_decays_backward(residuals, d_decays):
    decays, keep = residuals
    kept = jnp.where(keep, d_decays, 0.0)
    d_gates = jnp.einsum("...ij,...ij->...i", kept, decays) - jnp.einsum("...ij,...ij->...j", kept, decays)
    return d_gates, None


pair_decays.defvjp(_pair_decays_forward, _pair_decays_backward)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + A)^-1`` for strictly lower-triangular ``A [..., C, C]`` (C a power of two), by matmuls.

    Block doubling: if ``D`` is the inverse of the block diagonal of ``I + A`` with blocks of
    size ``b``, the inverse with blocks of ``2b`` is ``D - D E D``, ``E`` being ``A``'s entries that
    join the two halves of each ``2b`` block (``E D E = 0``). ``log2(C)`` rounds of two matmuls,
    which map onto matrix units, unlike a triangular solve.
    """
    size = a.shape[-1]
    if size & (size - 1):
        raise ValueError(f"unit_lower_inverse: the chunk size must be a power of two, got {size}")
    rows, cols = _iota2(size, size)
    inverse = jnp.broadcast_to(jnp.where(rows == cols, 1.0, 0.0).astype(a.dtype), a.shape)
    block = 1
    while block < size:
        joins = (jax.lax.div(rows, jnp.int32(2 * block)) == jax.lax.div(cols, jnp.int32(2 * block))) & (
            jax.lax.div(rows, jnp.int32(block)) != jax.lax.div(cols, jnp.int32(block))
        )
        joined = jnp.where(joins, a, 0)
        inverse = inverse - inverse @ joined @ inverse
        block *= 2
    return inverse


def blocked_unit_lower_inverse(a: jax.Array) -> jax.Array:
    """:func:`unit_lower_inverse` by recursive halving: only the diagonal blocks are multiplied.

    ``[[A11, 0], [A21, A22]]^-1 = [[X1, 0], [-X2 A21 X1, X2]]`` with ``Xi = (I + Aii)^-1``, the two
    halves of every block batched together down to 1 x 1 blocks: about ``C^3 / 3`` multiply-adds
    instead of ``12 C^3`` (the masked full-size products of :func:`unit_lower_inverse`, which suit
    a kernel holding one 2-D chunk). Same result; the ``xla`` engine uses this one.
    """
    size = a.shape[-1]
    if size & (size - 1):
        raise ValueError(f"blocked_unit_lower_inverse: the chunk size must be a power of two, got {size}")
    lead = a.shape[:-2]
    blocks = a[..., None, :, :]  # [..., m, s, s]: the diagonal blocks still to invert
    off_diagonal = []
    while blocks.shape[-1] > 1:
        half = blocks.shape[-1] // 2
        off_diagonal.append(blocks[..., half:, :half])
        halves = jnp.stack([blocks[..., :half, :half], blocks[..., half:, half:]], axis=-3)
        blocks = halves.reshape(*lead, -1, half, half)
    inverse = jnp.ones(blocks.shape, a.dtype)
    for lower in reversed(off_diagonal):
        pairs, half = lower.shape[-3], lower.shape[-1]
        both = inverse.reshape(*lead, pairs, 2, half, half)
        first, second = both[..., 0, :, :], both[..., 1, :, :]
        top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
        bottom = jnp.concatenate([-(second @ lower @ first), second], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
    return inverse[..., 0, :, :]


@jax.custom_vjp
def solve_unit_lower(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """``X = (I + A)^-1 R`` for strictly lower-triangular ``A [..., C, C]`` and ``R [..., C, M]``.

    The inverse comes from :func:`blocked_unit_lower_inverse`; the backward reuses it instead of
    differentiating through the recursion: ``dR = (I + A)^-T dX``, ``dA = strict_lower(-dR X^T)``.
    """
    return blocked_unit_lower_inverse(a) @ rhs


def _solve_unit_lower_forward(a, rhs):
    inverse = blocked_unit_lower_inverse(a)
    solution = inverse @ rhs
    return solution, (inverse, solution)


def _solve_unit_lower_backward(residuals, d_solution):
    inverse, solution = residuals
    d_rhs = jnp.swapaxes(inverse, -1, -2) @ d_solution
    rows, cols = _iota2(inverse.shape[-1], inverse.shape[-1])
    d_a = jnp.where(rows > cols, -(d_rhs @ jnp.swapaxes(solution, -1, -2)), 0.0)
    return d_a, d_rhs


solve_unit_lower.defvjp(_solve_unit_lower_forward, _solve_unit_lower_backward)


def chunk_scores(lefts, b, gates: Gates, *, stricts, same_segment=None):
    """``P_ij = sum_c a_ic b_jc e^(G_ic - G_jc)`` for ``j <= i`` (``j < i`` if strict), else 0.

    Args:
      lefts: a tuple of ``a`` arrays ``[B,H,N,C,K]`` scored against the same ``b [B,H,N,C,K]``
        (queries and keys share the decay factors). gates: cumulative log-decays of the chunk.
      stricts: one bool per ``a``: exclude the diagonal.
      same_segment: ``[B,1,N,C,C]`` bool or None; pairs in different segments are 0. Gates then
        restart at segment starts, so exponents across a start may be positive: scalar gates
        skip those pairs' exponents, per-channel rescalings are clamped to 0 (both only touch
        pairs the mask removes).

    Returns a tuple of ``[B,H,N,C,C]``, one per ``a``.

    Per-channel gates, by recursive halving: in a block of ``s`` tokens the pairs (second half,
    first half) form one matmul of ``a_i e^(G_i - G_r)`` and ``b_j e^(G_r - G_j)``, ``r`` the
    block's middle, both factors at most 1; the two halves recurse, down to the diagonal. All
    blocks of one size are batched, ``log2(C)`` rounds in all.
    """
    size = b.shape[-2]
    rows, cols = _iota2(size, size)
    visibles = [rows > cols if strict else rows >= cols for strict in stricts]
    if same_segment is not None:
        visibles = [visible & same_segment for visible in visibles]
    if gates.channel is None:
        decay = None
        if gates.scalar is not None:
            decay = pair_decays(gates.scalar, rows >= cols if same_segment is None else (rows >= cols) & same_segment)
        outs = []
        for a, visible in zip(lefts, visibles):
            scores = jnp.einsum("...ik,...jk->...ij", a, b)
            outs.append(jnp.where(visible, scores if decay is None else scores * decay, 0.0))
        return tuple(outs)

    clamp = (lambda x: jnp.minimum(x, 0.0)) if same_segment is not None else (lambda x: x)  # noqa: E731
    gamma = gates.channel
    lead, key_dim = b.shape[:-2], b.shape[-1]
    results = [
        (jnp.zeros_like(a[..., 0]) if strict else jnp.sum(a * b, axis=-1))[..., None, None]
        for a, strict in zip(lefts, stricts)
    ]  # [..., C, 1, 1]: the 1 x 1 diagonal blocks
    block = 2
    while block <= size:
        count, half = size // block, block // 2
        split = lambda x: x.reshape(*lead, count, block, key_dim)  # noqa: E731, B023
        gamma_blocks, b_blocks = split(gamma), split(b)
        middle = gamma_blocks[..., half - 1 : half, :]
        to_middle = jnp.exp(clamp(gamma_blocks[..., half:, :] - middle))
        b_from_middle = b_blocks[..., :half, :] * jnp.exp(clamp(middle - gamma_blocks[..., :half, :]))
        for index, a in enumerate(lefts):
            lower = jnp.einsum("...ik,...jk->...ij", split(a)[..., half:, :] * to_middle, b_from_middle)
            both = results[index].reshape(*lead, count, 2, half, half)
            first, second = both[..., 0, :, :], both[..., 1, :, :]
            top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
            results[index] = jnp.concatenate([top, jnp.concatenate([lower, second], axis=-1)], axis=-2)
        block *= 2
    outs = tuple(result[..., 0, :, :] for result in results)
    if same_segment is None:
        return outs
    return tuple(jnp.where(visible, out, 0.0) for out, visible in zip(outs, visibles))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Per-chunk quantities of :func:`prepare` (``[B,H,N,...]``), inputs of the two later stages.

    Attributes:
      q_decayed: ``Q * e^G`` ``[..., C, K]``; scores: ``P`` ``[..., C, C]`` (see module docstring).
      k_to_end: ``K * e^(G_C - G)`` ``[..., C, K]``; chunk_decay: ``e^(G_C)`` ``[...]``, ``[..., K]``
        or None.
      w: ``W`` ``[..., C, K]`` (delta rule) or None; values: ``U'`` (delta rule) or ``V``, ``[..., C, V]``.
    """

    q_decayed: jax.Array
    scores: jax.Array
    k_to_end: jax.Array
    chunk_decay: jax.Array | None
    w: jax.Array | None
    values: jax.Array


@dataclasses.dataclass(frozen=True)
class Segments:
    """Where the state restarts at zero inside chunks (packed documents), as masks.

    Attributes:
      same: ``[B,1,N,C,C]`` tokens i and j belong to the same segment.
      continues: ``[B,1,N,C]`` no restart at or before the token in its chunk (it sees the chunk's
        incoming state). reaches_end: ``[B,1,N,C]`` no restart after the token in its chunk (it
        is part of the outgoing state).
    """

    same: jax.Array
    continues: jax.Array
    reaches_end: jax.Array


def segments_from_resets(resets) -> Segments:
    """``resets [B,1,N,C]`` bool (the state is zeroed before the token) -> :class:`Segments`."""
    index = jnp.cumsum(resets.astype(jnp.int32), axis=-1)  # segment number within the chunk
    return Segments(
        same=index[..., :, None] == index[..., None, :],
        continues=index == 0,
        reaches_end=index == index[..., -1:],
    )


def restart_gates(gates: Gates, resets) -> Gates:
    """Cumulative gates that restart at every reset: ``G'_i = G_i - G_(s-1)``, ``s`` i's segment start."""
    if gates.empty:
        return gates
    position = jax.lax.broadcasted_iota(jnp.int32, resets.shape, resets.ndim - 1)
    start = jax.lax.cummax(jnp.where(resets, position, 0), axis=resets.ndim - 1)  # [B,1,N,C]
    before = jnp.maximum(start - 1, 0)
    has_base = start > 0
    if gates.scalar is not None:
        index = jnp.broadcast_to(before, gates.scalar.shape)
        base = jnp.take_along_axis(gates.scalar, index, axis=-1)
        return Gates(scalar=gates.scalar - jnp.where(has_base, base, 0.0))
    index = jnp.broadcast_to(before[..., None], gates.channel.shape[:-1] + (1,))
    index = jnp.broadcast_to(index, gates.channel.shape)
    base = jnp.take_along_axis(gates.channel, index, axis=-2)
    return Gates(channel=gates.channel - jnp.where(has_base[..., None], base, 0.0))


def prepare(q, k, v, gates: Gates, beta, *, segments: Segments | None = None) -> Prepared:
    """Stage 1, independently per chunk. q, k ``[B,H,N,C,K]``, v ``[B,H,N,C,V]``, beta ``[B,H,N,C]``.

    With ``segments`` the gates must restart at each segment (:func:`restart_gates`).
    """
    last = gates.last()
    q_decayed = gates.decayed(q)
    k_to_end = gates.decayed_to_end(k)
    same = None if segments is None else segments.same
    if beta is None:
        (scores,) = chunk_scores((q,), k, gates, stricts=(False,), same_segment=same)
    else:
        scores, interactions = chunk_scores((q, k), k, gates, stricts=(False, True), same_segment=same)
    chunk_decay = None if last is None else jnp.exp(last)
    k_seen = gates.decayed(k)  # keys decayed back to the chunk start: read S0
    if segments is not None:
        q_decayed = jnp.where(segments.continues[..., None], q_decayed, 0.0)
        k_to_end = jnp.where(segments.reaches_end[..., None], k_to_end, 0.0)
        k_seen = jnp.where(segments.continues[..., None], k_seen, 0.0)
        survives = segments.continues[..., -1]  # no restart in the chunk: S0 reaches its end
        if chunk_decay is None:
            chunk_decay = jnp.broadcast_to(survives, q.shape[:-2]).astype(q.dtype)
        elif chunk_decay.ndim == survives.ndim:
            chunk_decay = jnp.where(survives, chunk_decay, 0.0)
        else:
            chunk_decay = jnp.where(survives[..., None], chunk_decay, 0.0)
    if beta is None:
        return Prepared(q_decayed, scores, k_to_end, chunk_decay, None, v)
    key_dim = k.shape[-1]
    rhs = scale_rows(jnp.concatenate([k_seen, v], axis=-1), beta)
    solved = solve_unit_lower(scale_rows(interactions, beta), rhs)
    w, values = solved[..., :key_dim], solved[..., key_dim:]
    return Prepared(q_decayed, scores, k_to_end, chunk_decay, w, values)


def _decayed(state, chunk_decay):
    """``e^(G_C) * S`` for a state ``[..., K, V]`` and a decay ``[...]``, ``[..., K]`` or None."""
    if chunk_decay is None:
        return state
    if chunk_decay.ndim == state.ndim - 2:
        return state * chunk_decay[..., None, None]
    return state * chunk_decay[..., None]


def state_pass(prepared: Prepared, initial, resets=None):
    """Stage 2: the state entering every chunk, sequentially over chunks.

    Args:
      prepared: from :func:`prepare`.
      initial: ``[B,H,K,V]`` state before the first chunk, or with ``resets`` the per-sequence
        initial states ``[S,H,K,V]`` (B == 1).
      resets: None, or ``(sequence [N] int32, starts [N] bool)``: chunk ``n`` belongs to packed
        sequence ``sequence[n]`` and, where ``starts[n]``, begins it with that sequence's state.

    Returns ``(states [B,H,N,K,V] entering each chunk, writes U [B,H,N,C,V], final [B,H,K,V])``.

    Differentiable in every array of ``prepared`` and ``initial`` by a hand-written reverse pass
    (:func:`_state_pass_backward`): only the two products that carry the state gradient from
    chunk to chunk run inside the reverse loop; the weight gradients are batched matmuls after it.
    """
    sequence, starts = (None, None) if resets is None else resets
    states, writes, final = _state_pass(
        prepared.k_to_end, prepared.chunk_decay, prepared.w, prepared.values, initial, sequence, starts
    )
    return states, (prepared.values if writes is None else writes), final


def _time_major(x):
    return None if x is None else jnp.moveaxis(x, 2, 0)


def _state_pass_forward(k_to_end, chunk_decay, w, values, initial, sequence, starts):
    delta = w is not None

    def step(state, inputs):
        k_end, decay, w_n, values_n, index, start = inputs
        if index is not None:
            state = jnp.where(start, initial[index][None], state)
        writes = values_n - w_n @ state if delta else values_n
        new_state = _decayed(state, decay) + jnp.swapaxes(k_end, -1, -2) @ writes
        return new_state, (state, writes if delta else None)

    xs = tuple(_time_major(x) for x in (k_to_end, chunk_decay, w, values)) + (sequence, starts)
    first = initial if sequence is None else initial[:1]
    final, (states, writes) = jax.lax.scan(step, first, xs)
    states = jnp.moveaxis(states, 0, 2)
    writes = None if writes is None else jnp.moveaxis(writes, 0, 2)
    return (states, writes, final), (k_to_end, chunk_decay, w, values, initial, sequence, starts, states, writes)


def _state_pass_backward(residuals, cotangents):
    k_to_end, chunk_decay, w, values, initial, sequence, starts, states, writes = residuals
    d_states, d_writes, d_final = cotangents
    delta = w is not None
    packed = sequence is not None

    def step(d_next, inputs):  # d_next: gradient of the state leaving the chunk
        k_end, decay, w_n, d_state_n, d_writes_n, start = inputs
        d_u = k_end @ d_next if d_writes_n is None else d_writes_n + k_end @ d_next
        d_state = d_state_n + _decayed(d_next, decay)
        if delta:
            d_state = d_state - jnp.swapaxes(w_n, -1, -2) @ d_u
        if not packed:
            return d_state, (d_next, d_u, None)
        return jnp.where(start, 0.0, d_state), (d_next, d_u, jnp.where(start, d_state, 0.0))

    xs = tuple(_time_major(x) for x in (k_to_end, chunk_decay, w, d_states, d_writes if delta else None))
    d_first, (d_next, d_u, d_restarts) = jax.lax.scan(step, d_final, xs + (starts,), reverse=True)
    d_next, d_u = jnp.moveaxis(d_next, 0, 2), jnp.moveaxis(d_u, 0, 2)  # [B,H,N,K,V], [B,H,N,C,V]
    written = writes if delta else values
    d_k_to_end = written @ jnp.swapaxes(d_next, -1, -2)
    d_w = -(d_u @ jnp.swapaxes(states, -1, -2)) if delta else None
    d_decay = None
    if chunk_decay is not None:
        scalar = chunk_decay.ndim == states.ndim - 2
        d_decay = jnp.einsum("...kv,...kv->..." if scalar else "...kv,...kv->...k", states, d_next)
    if packed:
        d_initial = jax.ops.segment_sum(d_restarts[:, 0], sequence, num_segments=initial.shape[0])
        d_initial = d_initial.at[0].add(d_first[0])
    else:
        d_initial = d_first
    return d_k_to_end, d_decay, d_w, d_u, d_initial, None, None


@jax.custom_vjp
def _state_pass(k_to_end, chunk_decay, w, values, initial, sequence, starts):
    return _state_pass_forward(k_to_end, chunk_decay, w, values, initial, sequence, starts)[0]


_state_pass.defvjp(_state_pass_forward, _state_pass_backward)


def outputs(prepared: Prepared, states, writes, scale: float):
    """Stage 3: ``O = scale * ((Q e^G) S0 + P U)`` per chunk, ``[B,H,N,C,V]``."""
    return scale * (prepared.q_decayed @ states + prepared.scores @ writes)


def chunk_end_states(prepared: Prepared, states, writes):
    """The state after each chunk, ``[B,H,N,K,V]`` (recomputed from the state entering it)."""
    return _decayed(states, prepared.chunk_decay) + jnp.swapaxes(prepared.k_to_end, -1, -2) @ writes
