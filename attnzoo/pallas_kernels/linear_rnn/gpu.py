"""Pallas kernels of the chunked linear-RNN engine for GPU (Triton backend).

The per-chunk math and the ``prepare`` kernel bodies are those of :mod:`.tpu` (2-D tiles, every
matmul dimension >= 16, full-precision matmuls so float32 is IEEE, not TF32). What differs is the
state pass: Triton programs run in no particular order, so one program per (batch*head row,
value block) walks the chunks itself in a ``fori_loop`` (forward in order, backward in reverse),
the state carried in registers, loading chunk ``n`` of the whole-sequence blocks by dynamic index.
Triton wants power-of-two shapes: the caller pads the key and value dims to powers of two >= 16;
arrays indexed by chunk or state slot are padded here to a power-of-two length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnzoo.pallas_kernels.common import pad_axis
from attnzoo.pallas_kernels.linear_rnn import tpu as _tpu
from attnzoo.pallas_kernels.linear_rnn.tpu import (
    Config,
    _unpack,
    state_backward_step,
    state_inputs,
    state_step,
)


def _params(num_warps: int = 4):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prepare_forward(arrays: dict, cfg: Config, key_dim: int, value_dim: int, interpret):
    """:func:`.tpu.prepare_forward` under Triton (the per-chunk kernel is the same)."""
    return _tpu.prepare_forward(arrays, cfg, key_dim, value_dim, interpret, compiler_params=_params(),
                                name="attnzoo_linear_rnn_prepare_gpu")


def prepare_backward(arrays: dict, cotangents: dict, cfg: Config, interpret):
    """:func:`.tpu.prepare_backward` under Triton."""
    return _tpu.prepare_backward(arrays, cotangents, cfg, interpret, compiler_params=_params(),
                                 name="attnzoo_linear_rnn_prepare_bwd_gpu")


def _flags(*arrays):
    """Pads ``[N]`` int arrays to a power-of-two length (Triton block shapes)."""
    return [pad_axis(a, 0, _pow2(a.shape[0])) for a in arrays]


def _load(ref, n):
    return None if ref is None else ref[n]


def _state_forward_kernel(sequence_ref, starts_ref, *refs, cfg: Config, chunks: int):
    qd, scores, kend, decay, w, refs = _unpack(cfg, refs)
    values, initial, out_ref, states_ref = refs[:4]
    refs = refs[4:]
    writes_ref = refs.pop(0) if cfg.delta else None
    (final_ref,) = refs
    row = pl.program_id(0)

    def body(n, state):
        slot = sequence_ref[n] * cfg.heads + row
        state = jnp.where(starts_ref[n] != 0, initial[slot].astype(state.dtype), state)
        states_ref[n] = state.astype(states_ref.dtype)
        out, writes, new_state = state_step(
            state, qd[n], scores[n], kend[n], _load(decay, n), _load(w, n), values[n], cfg
        )
        out_ref[n] = out.astype(out_ref.dtype)
        if writes_ref is not None:
            writes_ref[n] = writes.astype(writes_ref.dtype)
        final_ref[slot] = new_state.astype(final_ref.dtype)
        return new_state

    jax.lax.fori_loop(0, chunks, body, jnp.zeros(initial.shape[1:], initial.dtype))


def _whole(shape):
    """A block over the whole (small) array for every program."""
    return pl.BlockSpec(tuple(shape), lambda i, j: (0,) * len(shape))


def state_forward(arrays: dict, initial, sequence, starts, cfg: Config, interpret):
    """As :func:`.tpu.state_forward`."""
    names = state_inputs(cfg)
    rows, chunks, size, key_dim = arrays["qd"].shape
    value_dim = arrays["values"].shape[-1]
    bv = cfg.block_v
    dtype = arrays["qd"].dtype
    slots = initial.shape[0]
    initial = pad_axis(initial, 0, _pow2(slots))
    sequence, starts = _flags(sequence, starts)

    def row_spec(shape):
        return pl.BlockSpec((None,) + tuple(shape), lambda i, j: (i, 0, 0, 0))

    def value_spec(first):
        return pl.BlockSpec((None, chunks, first, bv), lambda i, j: (i, 0, 0, j))

    slot_spec = pl.BlockSpec((initial.shape[0], key_dim, bv), lambda i, j: (0, 0, j))
    in_specs = [_whole(sequence.shape), _whole(starts.shape)]
    in_specs += [row_spec(arrays[name].shape[1:]) for name in names]
    in_specs += [value_spec(size), slot_spec]
    out_specs = [value_spec(size), value_spec(key_dim)]
    out_shape = [
        jax.ShapeDtypeStruct((rows, chunks, size, value_dim), dtype),
        jax.ShapeDtypeStruct((rows, chunks, key_dim, value_dim), dtype),
    ]
    if cfg.delta:
        out_specs.append(value_spec(size))
        out_shape.append(jax.ShapeDtypeStruct((rows, chunks, size, value_dim), dtype))
    out_specs.append(slot_spec)
    out_shape.append(jax.ShapeDtypeStruct(initial.shape, dtype))
    results = pl.pallas_call(
        functools.partial(_state_forward_kernel, cfg=cfg, chunks=chunks),
        grid=(rows, value_dim // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="attnzoo_linear_rnn_state_gpu",
    )(sequence, starts, *[arrays[name] for name in names], arrays["values"], initial)
    if cfg.delta:
        out, states, writes, final = results
    else:
        (out, states, final), writes = results, None
    return out, states, writes, final[:slots]


def _state_backward_kernel(sequence_ref, starts_ref, last_ref, *refs, cfg: Config, chunks: int):
    qd, scores, kend, decay, w, refs = _unpack(cfg, refs)
    d_out, states, writes, d_final = refs[:4]
    refs = refs[4:]
    d_qd_ref, d_scores_ref, d_kend_ref = refs[:3]
    refs = refs[3:]
    d_decay_ref = refs.pop(0) if cfg.decays else None
    d_w_ref = refs.pop(0) if cfg.delta else None
    d_writes_ref, d_initial_ref = refs
    row = pl.program_id(0)

    def body(step, carry):
        n = chunks - 1 - step
        slot = sequence_ref[n] * cfg.heads + row
        grad_state = carry + jnp.where(last_ref[n] != 0, d_final[slot].astype(carry.dtype), 0.0)
        grad_before, d_writes, partials = state_backward_step(
            grad_state, d_out[n], states[n], qd[n], scores[n], kend[n], _load(decay, n), _load(w, n),
            writes[n], cfg,
        )
        for ref, value in zip((d_qd_ref, d_scores_ref, d_kend_ref, d_decay_ref, d_w_ref), partials):
            if ref is not None:
                ref[n] = value.astype(ref.dtype)
        d_writes_ref[n] = d_writes.astype(d_writes_ref.dtype)
        d_initial_ref[slot] = grad_before.astype(d_initial_ref.dtype)
        return jnp.where(starts_ref[n] != 0, 0.0, grad_before)

    jax.lax.fori_loop(0, chunks, body, jnp.zeros(d_final.shape[1:], d_final.dtype))


def state_backward(arrays: dict, d_out, states, writes, d_final, sequence, starts, last, cfg: Config,
                   interpret):
    """As :func:`.tpu.state_backward`."""
    names = state_inputs(cfg)
    rows, chunks, size, key_dim = arrays["qd"].shape
    value_dim = d_out.shape[-1]
    bv = cfg.block_v
    blocks = value_dim // bv
    dtype = arrays["qd"].dtype
    slots = d_final.shape[0]
    d_final = pad_axis(d_final, 0, _pow2(slots))
    sequence, starts, last = _flags(sequence, starts, last)

    def row_spec(shape):
        return pl.BlockSpec((None,) + tuple(shape), lambda i, j: (i, 0, 0, 0))

    def value_spec(first):
        return pl.BlockSpec((None, chunks, first, bv), lambda i, j: (i, 0, 0, j))

    def partial_spec(shape):
        return pl.BlockSpec((None, None, chunks) + tuple(shape), lambda i, j: (i, j, 0, 0, 0))

    slot_spec = pl.BlockSpec((d_final.shape[0], key_dim, bv), lambda i, j: (0, 0, j))
    in_specs = [_whole(sequence.shape), _whole(starts.shape), _whole(last.shape)]
    in_specs += [row_spec(arrays[name].shape[1:]) for name in names]
    in_specs += [value_spec(size), value_spec(key_dim), value_spec(size), slot_spec]
    partial_names = [name for name in ("qd", "P", "kend", "decay", "W") if name in names]
    partial_shapes = {name: arrays[name].shape[2:] for name in partial_names}
    out_specs = [partial_spec(partial_shapes[name]) for name in partial_names]
    out_shape = [jax.ShapeDtypeStruct((rows, blocks, chunks) + tuple(partial_shapes[name]), dtype)
                 for name in partial_names]
    out_specs += [value_spec(size), slot_spec]
    out_shape += [jax.ShapeDtypeStruct((rows, chunks, size, value_dim), dtype),
                  jax.ShapeDtypeStruct(d_final.shape, dtype)]
    results = pl.pallas_call(
        functools.partial(_state_backward_kernel, cfg=cfg, chunks=chunks),
        grid=(rows, blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name="attnzoo_linear_rnn_state_bwd_gpu",
    )(sequence, starts, last, *[arrays[name] for name in names], d_out, states, writes, d_final)
    partials = dict(zip(partial_names, results[: len(partial_names)]))
    d_writes, d_initial = results[len(partial_names):]
    return partials, d_writes, d_initial[:slots]
