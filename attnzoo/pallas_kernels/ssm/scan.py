"""Mamba-1's selective scan: a diagonal state per channel, decays and inputs chosen per token.

Per channel ``d`` and state index ``n`` (mamba_ssm's ``selective_scan_ref``)::

    delta' = softplus?(delta + delta_bias)
    h_t[d, n] = exp(delta'_t[d] A[d, n]) h_{t-1}[d, n] + delta'_t[d] B_t[n] u_t[d]
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d];    y_t *= silu(z_t[d])   (with z)

Layouts (sequence-first): ``u, delta, z [B, T, D]``, ``A [D, N]``, ``B, C [B, T, N]`` or
``[B, T, G, N]`` (channel ``d`` reads group ``d // (D / G)``), ``D, delta_bias [D]``; states
``[N_seq, D, N]`` float32 (float64 for float64 inputs); outputs in u's dtype.

* ``reference``: the token-by-token ``lax.scan``, the float64 oracle.
* ``xla``: chunks of ``chunk_size`` tokens; a ``lax.scan`` over chunks carries the state, and each
  chunk is a token-by-token ``lax.scan`` that forms each token's decay and input ``[B, D, N]`` and
  its readout on the fly, recomputed chunk by chunk in the backward pass, so memory is
  ``O(T / chunk * D * N + chunk * D * N)`` rather than ``O(T * D * N)``, and no ``[B, T, D, N]``
  tensor is formed in the forward pass. Without ``cu_seqlens`` (``segment_ids`` or none) the
  backward pass is written out (:func:`_segment_scan_bwd`); with ``cu_seqlens`` the chunks are
  rematerialised (``jax.checkpoint``) and differentiated by JAX.
  (A ``lax.associative_scan`` per chunk was 20x slower forward and 4.7x slower forward + backward
  on XLA:CPU at B=64, T=64, D=128, N=16: its log-depth passes stream ``[B, chunk, D, N]`` tensors
  through memory where the sequential scan stays in cache.)
* ``pallas``: fused Pallas kernels, forward and backward (:mod:`.scan_pallas`; Mosaic on TPU,
  Triton on GPU, the interpreter on CPU): the channels tiled by ``block_sizes``
  (:class:`.scan_pallas.ScanBlockSizes`), the time axis walked in chunks of ``chunk_size`` tokens
  with the state carried on chip; ``interpret`` as in :mod:`attnzoo.pallas_kernels.common`.
* ``auto``: ``pallas`` on TPU and GPU, ``xla`` on CPU.

Packed sequences: ``cu_seqlens [N_seq + 1]`` (B == 1; each sequence starts from its own initial
state) or ``segment_ids [B, T]`` (the state restarts at zero where the id changes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.common import check_array, pad_axis
from attnzoo.pallas_kernels.ssm import scan_pallas as _pallas
from attnzoo.pallas_kernels.ssm.scan_pallas import ScanBlockSizes

__all__ = ["selective_scan", "selective_scan_step", "SCAN_IMPLS", "ScanBlockSizes"]

SCAN_IMPLS = ("auto", "reference", "xla", "pallas")


def _check(op, u, delta, A, B, C, D, z, delta_bias, *, time_axis: bool):
    lead = "B,T" if time_axis else "B"
    rank = 3 if time_axis else 2
    check_array(op, "u", u, ndim=rank, floating=True, expected=f"[{lead},D]")
    channels = u.shape[-1]
    check_array(op, "delta", delta, floating=True, shape=u.shape, expected=f"[{lead},D]")
    check_array(op, "A", A, ndim=2, floating=True, shape=(channels, None), expected="[D,N]")
    state_dim = A.shape[1]
    check_array(op, "B", B, ndim=(rank, rank + 1), floating=True, expected=f"[{lead},N] or [{lead},G,N]")
    groups = 1 if B.ndim == rank else B.shape[-2]
    want = u.shape[:-1] + ((state_dim,) if B.ndim == rank else (groups, state_dim))
    if tuple(B.shape) != want:
        raise ValueError(f"{op}: B must have shape {want} [{lead},(G,)N], got {tuple(B.shape)}")
    check_array(op, "C", C, floating=True, shape=B.shape, expected=f"[{lead},(G,)N] like B")
    if channels % groups:
        raise ValueError(f"{op}: the number of groups G = {groups} (B, C) must divide D = {channels}")
    if D is not None:
        check_array(op, "D", D, floating=True, shape=(channels,), expected="[D]")
    if z is not None:
        check_array(op, "z", z, floating=True, shape=u.shape, expected=f"[{lead},D]")
    if delta_bias is not None:
        check_array(op, "delta_bias", delta_bias, floating=True, shape=(channels,), expected="[D]")
    return channels, state_dim, groups


def _steps(delta, delta_bias, delta_softplus, dtype):
    delta = delta.astype(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(dtype)
    return jax.nn.softplus(delta) if delta_softplus else delta


def _grouped(x, groups):
    """``[..., D]`` -> ``[..., G, D/G]``."""
    return x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))


def _as_groups(B):
    """``[B,T,N]`` -> ``[B,T,1,N]``; ``[B,T,G,N]`` unchanged."""
    return B if B.ndim == 4 else B[:, :, None, :]


def _resets_and_starts(batch, length, sequences, cu_seqlens, segment_ids):
    """``(restart [B,T] bool: the state before the token is replaced, sequence [B,T] int32: whose
    initial state it takes (-1: zero), end [B,T] bool: a sequence's last token)``."""
    positions = jnp.arange(length, dtype=jnp.int32)
    if cu_seqlens is not None:
        offsets = cu_seqlens.astype(jnp.int32)
        sequence = jnp.clip(jnp.searchsorted(offsets, positions, side="right") - 1, 0, sequences - 1)
        starts = positions == offsets[sequence]
        ends = positions == offsets[sequence + 1] - 1
        return starts[None], jnp.where(starts, sequence, -1)[None], ends[None], sequence[None]
    first = jnp.broadcast_to(positions == 0, (batch, length))
    own = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, length))
    if segment_ids is None:
        restart = first
    else:
        restart = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0))) | first
    return restart, jnp.where(first, own, -1), jnp.broadcast_to(positions == length - 1, (batch, length)), own


def _pairs(u, steps, A, B, restart, source, init, groups):
    """The recurrence ``h_t = a_t h_{t-1} + b_t`` with resets folded in: ``a, b [B,T,G,Dg,N]``.

    At a restart the decay is zero and the (decayed) initial state of ``source`` (or zero) is added to
    the input, so the scan can start from a zero state."""
    dtype = steps.dtype
    log_decay = jnp.einsum("btgc,gcn->btgcn", _grouped(steps, groups), A.reshape(groups, -1, A.shape[-1]).astype(dtype))
    a = jnp.exp(log_decay)
    b = jnp.einsum("btgc,btgn->btgcn", _grouped(steps * u.astype(dtype), groups), _as_groups(B).astype(dtype))
    h0 = jnp.take(init, jnp.maximum(source, 0), axis=0).reshape(source.shape + (groups, -1, A.shape[-1]))
    h0 = jnp.where((source >= 0)[..., None, None, None], h0, 0)
    keep = restart[..., None, None, None]
    b = b + jnp.where(keep, a * h0, 0)
    a = jnp.where(keep, 0, a)
    return a, b


def _readout(h, C, groups):
    return jnp.einsum("btgcn,btgn->btgc", h, _as_groups(C).astype(h.dtype)).reshape(h.shape[:2] + (-1,))


def _reference(u, steps, A, B, C, restart, source, init, groups):
    """Token by token; returns ``(y [B,T,D], states [B,T,G,Dg,N])``."""
    a, b = _pairs(u, steps, A, B, restart, source, init, groups)

    def step(h, inputs):
        a_t, b_t = inputs
        h = a_t * h + b_t
        return h, h

    h0 = jnp.zeros(a.shape[:1] + a.shape[2:], a.dtype)
    _, states = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    states = jnp.moveaxis(states, 0, 1)
    return _readout(states, C, groups), states


def _token_decay(steps_t, rates, carry_t):
    """``exp(delta'_t[d] A[d, n])``, zero where the state restarts: ``[B, G, Dg]`` x ``[G, Dg, N]``,
    ``carry_t [B]`` (1: the state carries over, 0: it restarts from zero) -> ``[B, G, Dg, N]``."""
    return jnp.exp(steps_t[..., None] * rates) * carry_t[:, None, None, None]


def _token_input(u_t, steps_t, b_t):
    """``delta'_t[d] u_t[d] B_t[n]``: ``[B, G, Dg]``, ``[B, G, N]`` -> ``[B, G, Dg, N]``."""
    return (steps_t * u_t)[..., None] * b_t[:, :, None, :]


def _states_before(h, u, steps, B, carry, rates):
    """The state before each token of one chunk (time-major ``u, steps [L, B, G, Dg]``,
    ``B [L, B, G, N]``, ``carry [L, B]``) from ``h [B, G, Dg, N]``: ``[L, B, G, Dg, N]``."""

    def token(h, inputs):
        u_t, steps_t, b_t, carry_t = inputs
        return _token_decay(steps_t, rates, carry_t) * h + _token_input(u_t, steps_t, b_t), h

    return jax.lax.scan(token, h, (u, steps, B, carry))[1]


def _segment_forward(u, steps, B, C, carry, rates, init):
    """``(y [K, L, B, G, Dg], last state, chunk starts [K, B, G, Dg, N])`` for chunk-major inputs
    ``[K chunks, L tokens, B, ...]``; only one state per chunk is kept."""

    def token(h, inputs):
        u_t, steps_t, b_t, c_t, carry_t = inputs
        h = _token_decay(steps_t, rates, carry_t) * h + _token_input(u_t, steps_t, b_t)
        return h, jnp.einsum("bgcn,bgn->bgc", h, c_t)

    def chunk(h, inputs):
        last, y = jax.lax.scan(token, h, inputs)
        return last, (y, h)

    last, (y, starts) = jax.lax.scan(chunk, init, (u, steps, B, C, carry))
    return y, last, starts


@jax.custom_vjp
def _segment_scan(u, steps, B, C, carry, rates, init):
    """The recurrence from ``init [B, G, Dg, N]``, restarting from zero where ``carry`` is 0, on
    chunk-major inputs (see :func:`_segment_forward`): ``(y [K, L, B, G, Dg], last state)``, with
    the backward pass written out (:func:`_segment_scan_bwd`)."""
    y, last, _ = _segment_forward(u, steps, B, C, carry, rates, init)
    return y, last


def _segment_scan_fwd(u, steps, B, C, carry, rates, init):
    y, last, starts = _segment_forward(u, steps, B, C, carry, rates, init)
    return (y, last), (u, steps, B, C, carry, rates, starts)


def _segment_scan_bwd(residuals, cotangents):
    """Chunks in reverse: recompute the chunk's states from its start, then walk its tokens back.

    With ``a_t`` the decay (0 at a restart) and ``g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}``::

        dC_t[n] = sum_d dy_t[d] h_t[d, n]          dB_t[n] = sum_d g_t[d, n] delta'_t[d] u_t[d]
        w_t[d, n] = g_t[d, n] a_t[d, n] h_{t-1}[d, n]        (dL/d log a_t)
        du_t[d] = delta'_t[d] sum_n g_t[d, n] B_t[n]
        d delta'_t[d] = u_t[d] sum_n g_t[d, n] B_t[n] + sum_n w_t[d, n] A[d, n]
        dA[d, n] = sum_{b, t} w_t[d, n] delta'_t[d];      d init = a_0 g_0

    The states of a chunk are recomputed once, before the reverse walk (the state before each
    token; ``h_t`` is formed again from it). Every sum is an ``einsum``: as products summed by
    ``jnp.sum`` the backward pass was 1.5x slower on XLA:CPU (B=8, T=512, D=512 and B=64, T=64,
    D=256, N=16)."""
    u, steps, B, C, carry, rates, starts = residuals
    dy, d_last = cotangents

    def chunk(grad_carry, inputs):
        u_c, steps_c, b_c, c_c, carry_c, dy_c, h0 = inputs

        def token(grad_carry, inputs):
            g, d_rates = grad_carry
            u_t, steps_t, b_t, c_t, carry_t, dy_t, h_prev = inputs
            decay = _token_decay(steps_t, rates, carry_t)
            h_t = decay * h_prev + _token_input(u_t, steps_t, b_t)
            g = g + dy_t[..., None] * c_t[:, :, None, :]
            w = g * decay * h_prev
            g_b = jnp.einsum("bgcn,bgn->bgc", g, b_t)
            du = g_b * steps_t
            d_steps = g_b * u_t + jnp.einsum("bgcn,gcn->bgc", w, rates)
            d_b = jnp.einsum("bgc,bgcn->bgn", steps_t * u_t, g)
            d_c = jnp.einsum("bgc,bgcn->bgn", dy_t, h_t)
            return (g * decay, d_rates + jnp.einsum("bgcn,bgc->gcn", w, steps_t)), (du, d_steps, d_b, d_c)

        states = _states_before(h0, u_c, steps_c, b_c, carry_c, rates)
        return jax.lax.scan(token, grad_carry, (u_c, steps_c, b_c, c_c, carry_c, dy_c, states), reverse=True)

    (d_init, d_rates), (du, d_steps, d_b, d_c) = jax.lax.scan(
        chunk, (d_last, jnp.zeros_like(rates)), (u, steps, B, C, carry, dy, starts), reverse=True
    )
    return du, d_steps, d_b, d_c, jnp.zeros_like(carry), d_rates, d_init


_segment_scan.defvjp(_segment_scan_fwd, _segment_scan_bwd)


def _chunked(u, steps, A, B, C, restart, source, init, groups, chunk, ends, sequence, sequences, need_finals,
             cu_packed=True):
    """Chunked scan; returns ``(y [B,T,D], finals [N_seq,G,Dg,N])`` with the state at each
    sequence's last token (``ends``, ``sequence [B,T]``), or ``finals = None`` unless
    ``need_finals``.

    ``cu_packed=False`` (no ``cu_seqlens``: one sequence per batch row from token 0, which may
    restart from zero where ``segment_ids`` change) runs :func:`_segment_scan`: it starts from
    ``init``, zeroes the decay where ``restart`` (after token 0), keeps one state per chunk, and
    its backward pass is written out rather than differentiated through the loop, whose transposes
    XLA:CPU spends most of its time copying. The final state is the last carry (padding tokens
    leave it unchanged). Forward + backward (``jax.grad`` w.r.t. u, delta, A, B, C; N=16, chunk
    64), side by side in one process against the autodiff version of this path (2026-12-06, best
    of 6): 1.62x as fast at B=64, T=64, D=128; 1.82x at B=64, T=64, D=256; 1.49x at B=64, T=128,
    D=256; 1.31-1.44x at B=64, T=256, D=256; 1.04-1.29x at B=8, T=512, D=512 (two runs); 1.05x at
    B=1, T=4096, D=256. ``benchmarks/recurrent.py --ops selective_scan,selective_scan_cu_seqlens``
    compares it with the ``cu_seqlens`` path on the same batch packed into one row (1.5x at
    B=64, T=64 and 256, D=256: ``benchmarks/results/ssm.md``). The price is memory: each chunk's
    ``[chunk, B, G, Dg, N]`` states are held during its backward step (XLA's estimate at B=64, T=64,
    D=256: 111 MiB, against 46 MiB for the packed row).

    ``cu_packed=True`` (``cu_seqlens``: sequences restart from their own initial states and end
    anywhere): each token's ``[B, G, Dg, N]`` decay and input (:func:`_pairs`, resets folded in)
    are formed inside the token-by-token scan of a rematerialised chunk, so only ``[B, T, D]``
    inputs and one state per chunk are kept for the backward pass. The final states are a running
    segment sum of the end tokens' states (a scatter of ``[B, D, N]`` per token, only with
    ``need_finals``)."""
    batch, length = u.shape[:2]
    dtype = steps.dtype
    padded = -(-length // chunk) * chunk
    num = padded // chunk
    rates = A.reshape(groups, -1, A.shape[-1]).astype(dtype)  # [G, Dg, N]

    if not cu_packed:
        def chunk_major(x):  # [B, T, ...] -> [K, L, B, ...]; padding: step 0 and carry 1 (decay 1, input 0)
            x = pad_axis(x, 1, chunk, value=1 if x.ndim == 2 else 0)
            return jnp.moveaxis(x.reshape((batch, num, chunk) + x.shape[2:]), 0, 2)

        carry = (~restart).at[:, 0].set(True).astype(dtype)
        inputs = [chunk_major(_grouped(x, groups)) for x in (u.astype(dtype), steps)]
        inputs += [chunk_major(_as_groups(x).astype(dtype)) for x in (B, C)]
        y, last = _segment_scan(*inputs, chunk_major(carry), rates, init)
        y = jnp.moveaxis(y.reshape((padded, batch, -1)), 0, 1)[:, :length]
        return y, (last if need_finals else None)

    # The sequence whose last token this is, or ``sequences`` (dropped) for every other token.
    end_of = jnp.where(ends, sequence, sequences).astype(jnp.int32)
    # padding tokens: step 0 (decay 1, input 0), no restart, never an end
    per_token = [pad_axis(x, 1, chunk) for x in (u.astype(dtype), steps, _as_groups(B).astype(dtype),
                                                  _as_groups(C).astype(dtype))]
    per_token.append(pad_axis(end_of, 1, chunk, value=sequences))
    restart = pad_axis(restart, 1, chunk, value=False)
    source = pad_axis(source, 1, chunk, value=-1)

    def to_chunks(x):
        return jnp.moveaxis(x.reshape((batch, num, chunk) + x.shape[2:]), 1, 0)

    def token(carry, inputs):
        h, finals = carry
        u_t, steps_t, b_t, c_t, end_t, restart_t, source_t = (x[:, None] for x in inputs)  # [B, 1, ...]
        a, b = _pairs(u_t, steps_t, A, b_t, restart_t, source_t, init, groups)
        h = a[:, 0] * h + b[:, 0]
        y = jnp.einsum("bgcn,bgn->bgc", h, c_t[:, 0]).reshape(batch, -1)
        if need_finals:
            finals = finals + jax.ops.segment_sum(h, end_t[:, 0], num_segments=sequences + 1)[:sequences]
        return (h, finals), y

    @jax.checkpoint
    def body(carry, inputs):
        carry, y = jax.lax.scan(token, carry, tuple(jnp.moveaxis(x, 1, 0) for x in inputs))
        return carry, jnp.moveaxis(y, 0, 1)

    h0 = jnp.zeros((batch, groups, u.shape[-1] // groups, A.shape[-1]), dtype)
    finals0 = jnp.zeros((sequences,) + h0.shape[1:], dtype) if need_finals else None
    chunks = tuple(to_chunks(x) for x in per_token + [restart, source])
    (_, finals), y = jax.lax.scan(body, (h0, finals0), chunks)
    y = jnp.moveaxis(y, 0, 1).reshape((batch, padded, -1))[:, :length]
    return y, finals


@functools.partial(jax.jit, static_argnames=("impl", "delta_softplus", "return_last_state", "chunk_size", "sequences",
                                             "block_sizes", "interpret"))
def _run(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, segment_ids, *, impl, delta_softplus,
         return_last_state, chunk_size, sequences, block_sizes=None, interpret=None):
    batch, length, channels = u.shape
    state_dim = A.shape[1]
    groups = 1 if B.ndim == 3 else B.shape[2]
    dtype = jnp.promote_types(jnp.result_type(u, delta, A, B, C), jnp.float32)
    steps = _steps(delta, delta_bias, delta_softplus, dtype)
    init = (jnp.zeros((sequences, channels, state_dim), dtype) if initial_state is None
            else initial_state.astype(dtype))
    restart, source, ends, sequence = _resets_and_starts(batch, length, sequences, cu_seqlens, segment_ids)
    init_g = init.reshape(sequences, groups, channels // groups, state_dim)
    if impl == "reference":
        y, states = _reference(u, steps, A, B, C, restart, source, init_g, groups)
        select = (ends[..., None] & (sequence[..., None] == jnp.arange(sequences)[None, None, :])).astype(dtype)
        finals = jnp.einsum("bts,btgcn->sgcn", select, states)
    elif impl == "pallas":
        y, finals = _pallas.scan_pallas(u, steps, A, _as_groups(B), _as_groups(C), init, cu_seqlens=cu_seqlens,
                                        segment_ids=segment_ids, chunk_size=chunk_size, block_sizes=block_sizes,
                                        interpret=interpret)
    else:
        chunk = min(chunk_size, 1 << max(length - 1, 0).bit_length())
        y, finals = _chunked(u, steps, A, B, C, restart, source, init_g, groups, chunk, ends, sequence, sequences,
                             need_finals=return_last_state, cu_packed=cu_seqlens is not None)
    if D is not None:
        y = y + jnp.einsum("btd,d->btd", u.astype(dtype), D.astype(dtype))
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))
    if not return_last_state:
        return y.astype(u.dtype), None
    finals = finals.reshape(sequences, channels, state_dim)
    if cu_seqlens is not None:  # an empty sequence keeps its initial state
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        finals = jnp.where((lengths > 0)[:, None, None], finals, init)
    return y.astype(u.dtype), (finals if return_last_state else None)


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                   initial_state=None, return_last_state: bool = False, cu_seqlens=None, segment_ids=None,
                   chunk_size: int = 64, impl: str = "auto", block_sizes=None, interpret=None):
    """Mamba-1's selective scan (see the module docstring for the recurrence and layouts).

    Args:
      u, delta: ``[B, T, D]``. A: ``[D, N]`` (usually ``-exp(A_log)``). B, C: ``[B, T, N]`` or
        ``[B, T, G, N]``. D: ``[D]`` skip or None. z: ``[B, T, D]`` gate (``y * silu(z)``) or None.
      delta_bias: ``[D]`` or None. delta_softplus: softplus after the bias.
      initial_state: ``[N_seq, D, N]`` (N_seq = B, or the number of packed sequences), default zeros.
      return_last_state: also return the state after each sequence's last token.
      cu_seqlens: ``[N_seq + 1]`` int offsets of sequences packed along T (B == 1), or None.
      segment_ids: ``[B, T]`` ints (not with cu_seqlens): the state restarts at zero where the id
        changes (the first token starts from initial_state); the last state is the last segment's.
      chunk_size: tokens per chunk of the ``xla`` and ``pallas`` forms (a power of two >= 1; pallas
        uses at least 8).
      impl: "auto" (pallas on TPU/GPU, xla on CPU) | "reference" | "xla" | "pallas".
      block_sizes: :class:`ScanBlockSizes` of the pallas kernels (default tiling), or None.
      interpret: Pallas interpret mode, see :mod:`attnzoo.pallas_kernels.common`.

    Returns ``(y [B, T, D] in u's dtype, last_state [N_seq, D, N] float32 or None)``.
    """
    op = "selective_scan"
    channels, state_dim, _ = _check(op, u, delta, A, B, C, D, z, delta_bias, time_axis=True)
    batch, length = u.shape[:2]
    if not isinstance(delta_softplus, bool):
        raise TypeError(f"{op}: delta_softplus must be a bool, got {type(delta_softplus).__name__}")
    if not isinstance(return_last_state, bool):
        raise TypeError(f"{op}: return_last_state must be a bool, got {type(return_last_state).__name__}")
    if impl not in SCAN_IMPLS:
        raise ValueError(f"{op}: impl must be one of {SCAN_IMPLS}, got {impl!r}")
    impl = common.resolve_impl(impl, op)
    interpret = common.check_interpret(interpret, op)
    if block_sizes is not None and not isinstance(block_sizes, ScanBlockSizes):
        raise TypeError(f"{op}: block_sizes must be a ScanBlockSizes, got {type(block_sizes).__name__}")
    if block_sizes is not None and impl != "pallas":
        raise ValueError(f"{op}: block_sizes tiles the pallas kernels; impl {impl!r} takes only chunk_size")
    chunk_size = common.check_int(op, "chunk_size", chunk_size)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: chunk_size must be a power of two, got {chunk_size}")
    sequences = batch
    if cu_seqlens is not None:
        check_array(op, "cu_seqlens", cu_seqlens, ndim=1, integer=True, expected="[N_seq+1]")
        if segment_ids is not None:
            raise ValueError(f"{op}: pass either segment_ids or cu_seqlens, not both")
        if batch != 1:
            raise ValueError(f"{op}: cu_seqlens packs sequences along T and needs B == 1, got B = {batch}")
        sequences = cu_seqlens.shape[0] - 1
        if sequences < 1:
            raise ValueError(f"{op}: cu_seqlens needs at least 2 entries [0, ..., T], got {cu_seqlens.shape[0]}")
        if not isinstance(cu_seqlens, jax.core.Tracer):
            offsets = np.asarray(cu_seqlens)
            if offsets[0] != 0 or offsets[-1] != length or np.any(np.diff(offsets) < 0):
                raise ValueError(f"{op}: cu_seqlens must rise from 0 to T = {length} without decreasing, got {offsets.tolist()}")
    if segment_ids is not None:
        check_array(op, "segment_ids", segment_ids, integer=True, shape=(batch, length), expected="[B,T]")
    if initial_state is not None:
        check_array(op, "initial_state", initial_state, floating=True, shape=(sequences, channels, state_dim),
                    expected="[N_seq,D,N]")
    return _run(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, segment_ids, impl=impl,
                delta_softplus=delta_softplus, return_last_state=return_last_state, chunk_size=chunk_size,
                sequences=sequences, block_sizes=block_sizes, interpret=interpret)


def selective_scan_step(u, delta, A, B, C, state, *, D=None, z=None, delta_bias=None, delta_softplus: bool = False):
    """One token of :func:`selective_scan` for decoding.

    Args: ``u, delta [B, D]``, ``A [D, N]``, ``B, C [B, N]`` or ``[B, G, N]``, ``state [B, D, N]``
      (after the previous token), and the options of :func:`selective_scan`.

    Returns ``(y [B, D] in u's dtype, new_state float32)``.
    """
    op = "selective_scan_step"
    channels, state_dim, groups = _check(op, u, delta, A, B, C, D, z, delta_bias, time_axis=False)
    check_array(op, "state", state, floating=True, shape=(u.shape[0], channels, state_dim), expected="[B,D,N]")
    dtype = jnp.promote_types(jnp.result_type(u, delta, A, B, C, state), jnp.float32)
    steps = _steps(delta, delta_bias, delta_softplus, dtype)
    Bg = (B if B.ndim == 3 else B[:, None, :]).astype(dtype)
    Cg = (C if C.ndim == 3 else C[:, None, :]).astype(dtype)
    h = state.astype(dtype).reshape(u.shape[0], groups, channels // groups, state_dim)
    decay = jnp.exp(_grouped(steps, groups)[..., None] * A.reshape(groups, -1, state_dim).astype(dtype))
    h = decay * h + (_grouped(steps * u.astype(dtype), groups)[..., None] * Bg[:, :, None, :])
    y = jnp.einsum("bgcn,bgn->bgc", h, Cg).reshape(u.shape)
    if D is not None:
        y = y + u.astype(dtype) * D.astype(dtype)
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))
    return y.astype(u.dtype), h.reshape(state.shape)
