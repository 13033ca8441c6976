"""Pallas kernels of Mamba-1's selective scan for GPU (Triton backend).

Same arrays and per-token math as :mod:`.scan_tpu` (:func:`.scan_tpu.token_forward`,
:func:`.scan_tpu.token_backward`, here on 1-D rows and columns). Triton programs run in no
particular order, so one program per (row, channel block), grid ``(R, Dq / gpu_block_d)``,
walks the chunks itself in a ``fori_loop`` (forward in order, backward in reverse) with the state
``[N, gpu_block_d]`` carried in registers, loading token ``t`` of the whole-sequence blocks by
dynamic index. The kernels walk chunks of at most ``GPU_CHUNK`` tokens (the per-chunk flags and
saved states are refined from the caller's chunks), as the backward keeps a chunk of
``[N, gpu_block_d]`` states in registers. Triton wants power-of-two block shapes, so the token, state and slot axes are
padded here to powers of two, the channels to a multiple of the (power-of-two) block; results
are cut back to the caller's shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnzoo.pallas_kernels.common import pad_axis, round_up
from attnzoo.pallas_kernels.ssm.scan_tpu import Config, token_backward, token_forward


GPU_CHUNK = 16


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _params(num_warps: int = 4):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _pad_to(x, axis: int, size: int):
    return pad_axis(x, axis, size) if x.shape[axis] < size else x


def _row(x):
    return x[None, :]


def _col(x):
    return x[:, None]


def _whole(shape):
    return pl.BlockSpec(tuple(shape), lambda r, j: (0,) * len(shape))


class _Padded:
    """The padded sizes of one call."""

    def __init__(self, cfg: Config, x, at, slots: int):
        rows, padded, width = x.shape
        self.chunk = min(cfg.chunk, GPU_CHUNK)
        self.split = cfg.chunk // self.chunk
        self.chunks = padded // self.chunk
        self.tokens = _pow2(padded)
        self.chunks_q = _pow2(self.chunks)
        self.state = _pow2(at.shape[1])
        self.bd = min(cfg.gpu_block_d, _pow2(width))
        self.width = round_up(width, self.bd)
        self.slots = _pow2(slots)

    def tokens_(self, x, last: int):
        return _pad_to(_pad_to(x, 1, self.tokens), 2, last)


def _in_specs(cfg: Config, p: _Padded):
    bd, groups = p.bd, cfg.groups
    token = pl.BlockSpec((None, p.tokens, bd), lambda r, j: (r, 0, j))
    token_n = pl.BlockSpec((None, p.tokens, p.state), lambda r, j: (r, 0, 0))
    at = pl.BlockSpec((None, p.state, bd), lambda r, j: (jax.lax.rem(r, jnp.int32(groups)), 0, j))
    reset = pl.BlockSpec((None, p.tokens), lambda r, j: (jax.lax.div(r, jnp.int32(groups)), 0))
    slot = pl.BlockSpec((p.slots, p.state, bd), lambda r, j: (0, 0, j))
    states = pl.BlockSpec((None, p.chunks_q, p.state, bd), lambda r, j: (r, 0, 0, j))
    return token, token_n, at, reset, slot, states


def _prepare(cfg: Config, p: _Padded, x, dt, b, c, at, init, reset, flags):
    x, dt = p.tokens_(x, p.width), p.tokens_(dt, p.width)
    b, c = p.tokens_(b, p.state), p.tokens_(c, p.state)
    at = _pad_to(_pad_to(at, 1, p.state), 2, p.width)
    init = _pad_to(_pad_to(_pad_to(init, 0, p.slots), 1, p.state), 2, p.width)
    if reset is not None:
        reset = _pad_to(reset[..., 0], 1, p.tokens)
    # The caller's per-chunk flags for chunks of p.chunk tokens: (sequence, starts[, last]).
    part = jnp.arange(p.chunks, dtype=jnp.int32) % p.split
    flags = [jnp.repeat(f, p.split) for f in flags]
    flags[1] = jnp.where(part == 0, flags[1], 0)
    if len(flags) > 2:
        flags[2] = jnp.where(part == p.split - 1, flags[2], 0)
    flags = [_pad_to(f, 0, _pow2(f.shape[0])) for f in flags]
    return x, dt, b, c, at, init, reset, flags


def _forward_kernel(sequence_ref, starts_ref, *refs, cfg: Config, chunk: int, chunks: int):
    x_ref, dt_ref, b_ref, c_ref, at_ref = refs[:5]
    refs = refs[5:]
    reset_ref = None
    if cfg.segments:
        reset_ref, refs = refs[0], refs[1:]
    init_ref, y_ref, states_ref, final_ref = refs
    r = pl.program_id(0)
    at = at_ref[...]

    def body(n, h):
        slot = sequence_ref[n] * cfg.groups + r
        h = jnp.where(starts_ref[n] != 0, init_ref[slot].astype(h.dtype), h)
        states_ref[n] = h.astype(states_ref.dtype)
        for t in range(chunk):
            pos = n * chunk + t
            reset = reset_ref[pos] if reset_ref is not None else None
            _, h, y = token_forward(h, dt_ref[pos, :], x_ref[pos, :], at, b_ref[pos, :], c_ref[pos, :], reset,
                                    keep=False, row=_row, col=_col)
            y_ref[pos, :] = y.astype(y_ref.dtype)
        final_ref[slot] = h.astype(final_ref.dtype)
        return h

    jax.lax.fori_loop(0, chunks, body, jnp.zeros(at.shape, at.dtype))


def forward(x, dt, b, c, at, init, reset, sequence, starts, cfg: Config, interpret):
    """As :func:`.scan_tpu.forward` (``states`` per chunk of ``min(C, GPU_CHUNK)`` tokens)."""
    rows, padded, width = x.shape
    state_dim = at.shape[1]
    slots = init.shape[0]
    p = _Padded(cfg, x, at, slots)
    x, dt, b, c, at, init, reset, (sequence, starts) = _prepare(cfg, p, x, dt, b, c, at, init, reset,
                                                                [sequence, starts])
    token, token_n, at_spec, reset_spec, slot, states_spec = _in_specs(cfg, p)
    in_specs = [_whole(sequence.shape), _whole(starts.shape), token, token, token_n, token_n, at_spec]
    operands = [sequence, starts, x, dt, b, c, at]
    if cfg.segments:
        in_specs.append(reset_spec)
        operands.append(reset)
    in_specs.append(slot)
    operands.append(init)
    dtype = x.dtype
    y, states, final = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, chunk=p.chunk, chunks=p.chunks),
        grid=(rows, p.width // p.bd),
        in_specs=in_specs,
        out_specs=[token, states_spec, slot],
        out_shape=[
            jax.ShapeDtypeStruct((rows, p.tokens, p.width), dtype),
            jax.ShapeDtypeStruct((rows, p.chunks_q, p.state, p.width), dtype),
            jax.ShapeDtypeStruct(init.shape, dtype),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="attnzoo_selective_scan_fwd_gpu",
    )(*operands)
    return (y[:, :padded, :width], states[:, :p.chunks, :state_dim, :width],
            final[:slots, :state_dim, :width])


def _backward_kernel(sequence_ref, starts_ref, last_ref, *refs, cfg: Config, chunk: int, chunks: int):
    x_ref, dt_ref, b_ref, c_ref, at_ref = refs[:5]
    refs = refs[5:]
    reset_ref = None
    if cfg.segments:
        reset_ref, refs = refs[0], refs[1:]
    states_ref, dy_ref, d_final_ref, dx_ref, d_dt_ref, d_b_ref, d_c_ref, d_at_ref, d_init_ref = refs
    r = pl.program_id(0)
    at = at_ref[...]

    def body(step, carry):
        g, d_at = carry
        n = chunks - 1 - step
        slot = sequence_ref[n] * cfg.groups + r
        g = g + jnp.where(last_ref[n] != 0, d_final_ref[slot].astype(g.dtype), 0.0)
        h = states_ref[n].astype(g.dtype)
        saved, resets = [], []
        for t in range(chunk):  # recompute the states inside the chunk
            pos = n * chunk + t
            resets.append(reset_ref[pos] if reset_ref is not None else None)
            hp, h, _ = token_forward(h, dt_ref[pos, :], x_ref[pos, :], at, b_ref[pos, :], c_ref[pos, :], resets[t],
                                     keep=False, row=_row, col=_col)
            saved.append(hp)
        for t in reversed(range(chunk)):
            pos = n * chunk + t
            g, d_dt, d_u, d_b, d_c, d_at_t = token_backward(
                g, saved[t], dt_ref[pos, :], x_ref[pos, :], at, b_ref[pos, :], c_ref[pos, :], resets[t],
                dy_ref[pos, :], keep=False, row=_row, col=_col,
            )
            d_at = d_at + d_at_t
            dx_ref[pos, :] = d_u.astype(dx_ref.dtype)
            d_dt_ref[pos, :] = d_dt.astype(d_dt_ref.dtype)
            d_b_ref[pos, :] = d_b.astype(d_b_ref.dtype)
            d_c_ref[pos, :] = d_c.astype(d_c_ref.dtype)
        d_init_ref[slot] = g.astype(d_init_ref.dtype)  # the sequence's first chunk writes last
        g = jnp.where(starts_ref[n] != 0, 0.0, g)
        return g, d_at

    zeros = jnp.zeros(at.shape, at.dtype)
    _, d_at = jax.lax.fori_loop(0, chunks, body, (zeros, zeros))
    d_at_ref[...] = d_at.astype(d_at_ref.dtype)


def backward(x, dt, b, c, at, reset, states, dy, d_final, sequence, starts, last, cfg: Config, interpret):
    """As :func:`.scan_tpu.backward` (the dB, dC partials are per GPU channel block)."""
    rows, padded, width = x.shape
    state_dim = at.shape[1]
    slots = d_final.shape[0]
    p = _Padded(cfg, x, at, slots)
    x, dt, b, c, at, d_final, reset, (sequence, starts, last) = _prepare(
        cfg, p, x, dt, b, c, at, d_final, reset, [sequence, starts, last])
    states = _pad_to(_pad_to(_pad_to(states, 1, p.chunks_q), 2, p.state), 3, p.width)
    dy = p.tokens_(dy, p.width)
    token, token_n, at_spec, reset_spec, slot, states_spec = _in_specs(cfg, p)
    in_specs = [_whole(sequence.shape), _whole(starts.shape), _whole(last.shape), token, token, token_n, token_n,
                at_spec]
    operands = [sequence, starts, last, x, dt, b, c, at]
    if cfg.segments:
        in_specs.append(reset_spec)
        operands.append(reset)
    in_specs += [states_spec, token, slot]
    operands += [states, dy, d_final]
    blocks = p.width // p.bd
    dtype = x.dtype
    partial = pl.BlockSpec((None, None, p.tokens, p.state), lambda r, j: (r, j, 0, 0))
    dx, d_dt, d_b, d_c, d_at, d_init = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, chunk=p.chunk, chunks=p.chunks),
        grid=(rows, blocks),
        in_specs=in_specs,
        out_specs=[token, token, partial, partial, pl.BlockSpec((None, p.state, p.bd), lambda r, j: (r, 0, j)), slot],
        out_shape=[
            jax.ShapeDtypeStruct((rows, p.tokens, p.width), dtype),
            jax.ShapeDtypeStruct((rows, p.tokens, p.width), dtype),
            jax.ShapeDtypeStruct((rows, blocks, p.tokens, p.state), dtype),
            jax.ShapeDtypeStruct((rows, blocks, p.tokens, p.state), dtype),
            jax.ShapeDtypeStruct((rows, p.state, p.width), dtype),
            jax.ShapeDtypeStruct(d_final.shape, dtype),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="attnzoo_selective_scan_bwd_gpu",
    )(*operands)
    cut = (slice(None), slice(None), slice(0, padded), slice(0, state_dim))
    return (dx[:, :padded, :width], d_dt[:, :padded, :width], d_b[cut], d_c[cut], d_at[:, :state_dim, :width],
            d_init[:slots, :state_dim, :width])
