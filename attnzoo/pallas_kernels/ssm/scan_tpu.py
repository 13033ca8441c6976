"""Pallas kernels of Mamba-1's selective scan for TPU (Mosaic), and the per-token math they share
with the GPU kernels (:mod:`.scan_gpu`).

Arrays (prepared by :mod:`.scan_pallas`; ``R = B * G`` rows, one per batch row and group of
channels, ``Tp`` padded tokens, ``Dp`` padded channels of a group, ``N`` the state size):

* ``x`` (u), ``dt`` (the steps ``delta'``): ``[R, Tp, Dp]``; ``b``, ``c``: ``[R, Tp, N]``.
* ``at``: ``A`` transposed per group, ``[G, N, Dp]``: the state is ``[N, block_d]`` with the
  channels on the lane (last) axis.
* ``reset`` (only with ``segment_ids``): ``[B, Tp, 1]``, 1.0 where the state restarts at zero
  before the token.
* ``init``: ``[S * G, N, Dp]`` initial states; chunk ``n`` of row ``r`` uses slot
  ``sequence[n] * G + r`` (``sequence`` is 0 without packing, so the slot is the row; packed,
  ``B == 1`` and it is the sequence's group).

Forward kernel, grid ``(R, Dp / block_d, Tp / C)``, the chunk axis sequential ("arbitrary"):
the state ``[N, block_d]`` is carried in VMEM scratch; at a chunk that starts a sequence
(``starts``, scalar prefetch) it is loaded from ``init``. The ``C`` tokens of a chunk are walked
one by one (statically unrolled)::

    h <- 0 if reset_t;   h <- exp(dt_t A^T) * h + B_t^T (dt_t u_t);   y_t = sum_n C_t[n] h[n, :]

The state entering each chunk is written out (``states [R, Tp / C, N, Dp]``) for the backward
pass, and the state after every chunk to its slot of ``final`` (the last write wins).

Backward kernel, same grid with the chunks in reverse: ``dL/dh`` ``[N, block_d]`` is carried in
scratch; per chunk the states are recomputed from the saved chunk-entry state (kept in a
``[C, N, block_d]`` scratch), then walked backwards. It writes ``du, d(dt)`` per token, ``dB, dC``
per token and channel block (summed over blocks outside), ``dA`` accumulated per row and block
(summed over batch rows outside) and ``d init`` at the chunk that starts each sequence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call of the kernels.

    Attributes:
      chunk: tokens per chunk ``C`` (a power of two >= 8, divides Tp).
      block_d: channels per program on TPU (divides Dp; a multiple of 128 or Dp).
      gpu_block_d: channels per program on GPU (a power of two).
      groups: G. segments: a ``reset`` input is given.
    """

    chunk: int
    block_d: int
    gpu_block_d: int
    groups: int
    segments: bool


# ------------------------------------------------------------------------------ per-token math


def token_forward(h, dt, u, at, bcol, ccol, reset, *, keep: bool, row=lambda x: x, col=lambda x: x):
    """One token: ``(state before the token (after a reset), state after, y row)``.

    ``h, at [N, bd]``; ``dt, u`` rows (``row`` makes them ``[1, bd]``); ``bcol, ccol`` columns
    (``col`` makes them ``[N, 1]``); ``reset`` a value broadcastable to ``h`` or None. ``keep``:
    reductions keep their axis (TPU) or drop it (GPU, 1-D rows and columns).
    """
    if reset is not None:
        h = jnp.where(reset != 0, 0.0, h)
    hp = h
    a = jnp.exp(row(dt) * at)
    h = a * hp + col(bcol) * row(dt * u)
    y = jnp.sum(col(ccol) * h, axis=0, keepdims=keep)
    return hp, h, y


def token_backward(g, hp, dt, u, at, bcol, ccol, reset, dy, *, keep: bool, row=lambda x: x, col=lambda x: x):
    """The VJP of :func:`token_forward` given ``g = dL/dh`` after the token (from later tokens)
    and ``dy`` (a row). Returns ``(dL/dh before the token, d dt, du (rows), dB, dC (columns),
    dA^T contribution [N, bd])``."""
    a = jnp.exp(row(dt) * at)
    du_dt = dt * u
    h = a * hp + col(bcol) * row(du_dt)
    g = g + col(ccol) * row(dy)
    d_c = jnp.sum(h * row(dy), axis=1, keepdims=keep)
    gb = jnp.sum(g * col(bcol), axis=0, keepdims=keep)
    ga = g * hp * a
    d_dt = jnp.sum(ga * at, axis=0, keepdims=keep) + gb * u
    d_u = gb * dt
    d_b = jnp.sum(g * row(du_dt), axis=1, keepdims=keep)
    d_at = ga * row(dt)
    g = g * a
    if reset is not None:
        g = jnp.where(reset != 0, 0.0, g)
    return g, d_dt, d_u, d_b, d_c, d_at


def _eye(n: int):
    return jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _to_column(row, eye):
    """``[1, N]`` -> ``[N, 1]`` exactly (a masked lane reduction, no transpose op)."""
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _to_row(column, eye):
    """``[N, 1]`` -> ``[1, N]`` exactly."""
    return jnp.sum(jnp.where(eye, column, 0.0), axis=0, keepdims=True)


# ------------------------------------------------------------------------------ TPU kernels


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_kernel(sequence_ref, starts_ref, *refs, cfg: Config):
    x_ref, dt_ref, b_ref, c_ref, at_ref = refs[:5]
    refs = refs[5:]
    reset_ref = None
    if cfg.segments:
        reset_ref, refs = refs[0], refs[1:]
    init_ref, y_ref, states_ref, final_ref, carry = refs
    n = pl.program_id(2)

    @pl.when(starts_ref[n] != 0)
    def _start():
        carry[...] = init_ref[...].astype(carry.dtype)

    h = carry[...]
    states_ref[...] = h.astype(states_ref.dtype)
    at = at_ref[...]
    eye = _eye(at.shape[0])
    for t in range(cfg.chunk):
        token = slice(t, t + 1)
        reset = reset_ref[token, :] if reset_ref is not None else None
        bcol = _to_column(b_ref[token, :], eye)
        ccol = _to_column(c_ref[token, :], eye)
        _, h, y = token_forward(h, dt_ref[token, :], x_ref[token, :], at, bcol, ccol, reset, keep=True)
        y_ref[token, :] = y.astype(y_ref.dtype)
    carry[...] = h
    final_ref[...] = h.astype(final_ref.dtype)


def _specs(cfg: Config, chunks: int, reverse: bool):
    """Block specs over the grid ``(R, Dp / block_d, chunks)`` (chunks reversed for the backward)."""
    bd, size, groups = cfg.block_d, cfg.chunk, cfg.groups

    def chunk_of(n):
        return chunks - 1 - n if reverse else n

    def token_spec(width=None):
        if width is None:
            return pl.BlockSpec((None, size, bd), lambda r, j, n, *_: (r, chunk_of(n), j))
        return pl.BlockSpec((None, size, width), lambda r, j, n, *_: (r, chunk_of(n), 0))

    def slot_map(r, j, n, sequence_ref, *_):
        return (sequence_ref[chunk_of(n)] * groups + r, 0, j)

    return token_spec, slot_map, chunk_of


def forward(x, dt, b, c, at, init, reset, sequence, starts, cfg: Config, interpret):
    """Runs the forward kernel; returns ``(y [R,Tp,Dp], states [R,Tp/C,N,Dp], final [S*G,N,Dp])``."""
    rows, padded, width = x.shape
    state_dim = at.shape[1]
    chunks = padded // cfg.chunk
    bd, groups = cfg.block_d, cfg.groups
    dtype = x.dtype
    token_spec, slot_map, _ = _specs(cfg, chunks, reverse=False)
    at_spec = pl.BlockSpec((None, state_dim, bd), lambda r, j, n, *_: (jax.lax.rem(r, jnp.int32(groups)), 0, j))
    in_specs = [token_spec(), token_spec(), token_spec(state_dim), token_spec(state_dim), at_spec]
    operands = [x, dt, b, c, at]
    if cfg.segments:
        in_specs.append(pl.BlockSpec((None, cfg.chunk, 1),
                                     lambda r, j, n, *_: (jax.lax.div(r, jnp.int32(groups)), n, 0)))
        operands.append(reset)
    in_specs.append(pl.BlockSpec((None, state_dim, bd), slot_map))
    operands.append(init)
    out_specs = [
        token_spec(),
        pl.BlockSpec((None, None, state_dim, bd), lambda r, j, n, *_: (r, n, 0, j)),
        pl.BlockSpec((None, state_dim, bd), slot_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((rows, padded, width), dtype),
        jax.ShapeDtypeStruct((rows, chunks, state_dim, width), dtype),
        jax.ShapeDtypeStruct(init.shape, dtype),
    ]
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(rows, width // bd, chunks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((state_dim, bd), dtype)],
        ),
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="attnzoo_selective_scan_fwd",
    )(sequence, starts, *operands)


def _backward_kernel(sequence_ref, starts_ref, last_ref, *refs, cfg: Config, chunks: int):
    x_ref, dt_ref, b_ref, c_ref, at_ref = refs[:5]
    refs = refs[5:]
    reset_ref = None
    if cfg.segments:
        reset_ref, refs = refs[0], refs[1:]
    (states_ref, dy_ref, d_final_ref, dx_ref, d_dt_ref, d_b_ref, d_c_ref, d_at_ref, d_init_ref,
     grad, d_at_acc, saved) = refs
    step = pl.program_id(2)
    n = chunks - 1 - step

    @pl.when(step == 0)
    def _zero():
        grad[...] = jnp.zeros(grad.shape, grad.dtype)
        d_at_acc[...] = jnp.zeros(d_at_acc.shape, d_at_acc.dtype)

    @pl.when(last_ref[n] != 0)
    def _final():
        grad[...] = grad[...] + d_final_ref[...].astype(grad.dtype)

    at = at_ref[...]
    eye = _eye(at.shape[0])
    resets, bcols, ccols = [], [], []
    h = states_ref[...].astype(grad.dtype)
    for t in range(cfg.chunk):  # recompute the states inside the chunk
        token = slice(t, t + 1)
        resets.append(reset_ref[token, :] if reset_ref is not None else None)
        bcols.append(_to_column(b_ref[token, :], eye))
        ccols.append(_to_column(c_ref[token, :], eye))
        hp, h, _ = token_forward(h, dt_ref[token, :], x_ref[token, :], at, bcols[t], ccols[t], resets[t], keep=True)
        saved[t] = hp
    g = grad[...]
    d_at = jnp.zeros(at.shape, grad.dtype)
    for t in reversed(range(cfg.chunk)):
        token = slice(t, t + 1)
        g, d_dt, d_u, d_b, d_c, d_at_t = token_backward(
            g, saved[t], dt_ref[token, :], x_ref[token, :], at, bcols[t], ccols[t], resets[t], dy_ref[token, :],
            keep=True,
        )
        d_at = d_at + d_at_t
        dx_ref[token, :] = d_u.astype(dx_ref.dtype)
        d_dt_ref[token, :] = d_dt.astype(d_dt_ref.dtype)
        d_b_ref[token, :] = _to_row(d_b, eye).astype(d_b_ref.dtype)
        d_c_ref[token, :] = _to_row(d_c, eye).astype(d_c_ref.dtype)
    d_at_acc[...] = d_at_acc[...] + d_at
    d_at_ref[...] = d_at_acc[...].astype(d_at_ref.dtype)
    grad[...] = g

    @pl.when(starts_ref[n] != 0)
    def _start():
        d_init_ref[...] = grad[...].astype(d_init_ref.dtype)
        grad[...] = jnp.zeros(grad.shape, grad.dtype)


def backward(x, dt, b, c, at, reset, states, dy, d_final, sequence, starts, last, cfg: Config, interpret):
    """Runs the backward kernel; returns ``(du, d dt [R,Tp,Dp], dB, dC partials [R,Dp/bd,Tp,N],
    dA^T per row [R,N,Dp], d init [S*G,N,Dp])`` (d init is unwritten for sequences without a chunk)."""
    rows, padded, width = x.shape
    state_dim = at.shape[1]
    chunks = padded // cfg.chunk
    bd, groups = cfg.block_d, cfg.groups
    blocks = width // bd
    dtype = x.dtype
    token_spec, slot_map, chunk_of = _specs(cfg, chunks, reverse=True)
    at_spec = pl.BlockSpec((None, state_dim, bd), lambda r, j, n, *_: (jax.lax.rem(r, jnp.int32(groups)), 0, j))
    in_specs = [token_spec(), token_spec(), token_spec(state_dim), token_spec(state_dim), at_spec]
    operands = [x, dt, b, c, at]
    if cfg.segments:
        in_specs.append(pl.BlockSpec((None, cfg.chunk, 1),
                                     lambda r, j, n, *_: (jax.lax.div(r, jnp.int32(groups)), chunk_of(n), 0)))
        operands.append(reset)
    in_specs += [
        pl.BlockSpec((None, None, state_dim, bd), lambda r, j, n, *_: (r, chunk_of(n), 0, j)),
        token_spec(),
        pl.BlockSpec((None, state_dim, bd), slot_map),
    ]
    operands += [states, dy, d_final]
    partial_spec = pl.BlockSpec((None, None, cfg.chunk, state_dim), lambda r, j, n, *_: (r, j, chunk_of(n), 0))
    out_specs = [
        token_spec(), token_spec(), partial_spec, partial_spec,
        pl.BlockSpec((None, state_dim, bd), lambda r, j, n, *_: (r, 0, j)),
        pl.BlockSpec((None, state_dim, bd), slot_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((rows, padded, width), dtype),
        jax.ShapeDtypeStruct((rows, padded, width), dtype),
        jax.ShapeDtypeStruct((rows, blocks, padded, state_dim), dtype),
        jax.ShapeDtypeStruct((rows, blocks, padded, state_dim), dtype),
        jax.ShapeDtypeStruct((rows, state_dim, width), dtype),
        jax.ShapeDtypeStruct(d_final.shape, dtype),
    ]
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, chunks=chunks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(rows, blocks, chunks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((state_dim, bd), dtype),
                pltpu.VMEM((state_dim, bd), dtype),
                pltpu.VMEM((cfg.chunk, state_dim, bd), dtype),
            ],
        ),
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="attnzoo_selective_scan_bwd",
    )(sequence, starts, last, *operands)
