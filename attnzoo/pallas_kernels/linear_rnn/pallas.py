"""The ``pallas`` implementation of the chunked linear-RNN engine: fused kernels forward and backward.

:func:`chunked_recurrence_pallas` has the semantics of :func:`.xla.chunked_recurrence`. Padding,
packed-sequence layout (:func:`.xla.chunk_aligned_layout`) and chunking happen in plain JAX around
a ``jax.custom_vjp`` whose forward and backward are Pallas kernels (:mod:`.tpu` for TPU and the
interpreter, :mod:`.gpu` for Triton), picked per lowering platform by ``common.run_pallas``:

forward:  ``prepare`` (parallel per chunk) -> ``state`` (sequential over chunks, fused outputs)
backward: ``state`` backward (reverse, fused outputs backward) -> ``prepare`` backward (``jax.vjp``
          of the per-chunk math inside the kernel)

``segment_ids`` (packed documents per row) adds per-token reset flags ``[B, N, C]`` as an input
of the ``prepare`` kernels, which apply :mod:`.chunk`'s segment masks (restarting gates,
same-segment scores, a 0/1 chunk decay for the ungated ops); the state kernels are unchanged.

Computation is in float32 (float64 for float64 inputs); key and value dims are zero-padded to
powers of two >= 16 and the value dim to a multiple of the value block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.common import round_up
from attnzoo.pallas_kernels.linear_rnn import gpu as _gpu
from attnzoo.pallas_kernels.linear_rnn import tpu as _tpu
from attnzoo.pallas_kernels.linear_rnn.reference import segment_restarts
from attnzoo.pallas_kernels.linear_rnn.xla import chunk_aligned_layout, from_chunks, gather_to_layout, to_chunks

OP = "linear_rnn.chunked_recurrence_pallas"
MIN_DIM = 16  # Triton's smallest matmul dimension


def _is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class RecurrentBlockSizes:
    """Tiling of the chunked-recurrence kernels.

    Attributes:
      block_v: value columns of the state per program of the state pass (its grid is
        ``(B*H, V / block_v, chunks)``); a power of two >= 16. Shrunk to the padded value dim;
        on TPU a block smaller than the value dim is rounded up to a multiple of 128 (Mosaic
        tiling).
      subchunk: sub-chunk of the per-channel-gate scores (gla, kda); a power of two >= 2, at
        most the chunk (shrunk to it). Smaller sub-chunks mean more off-diagonal matmuls and
        fewer exact diagonal steps.
    """

    block_v: int = 128
    subchunk: int = 16

    def __post_init__(self):
        for name in ("block_v", "subchunk"):
            value = getattr(self, name)
            minimum = MIN_DIM if name == "block_v" else 2
            if not _is_pow2(value) or value < minimum:
                raise ValueError(
                    f"RecurrentBlockSizes: {name} must be a power of two >= {minimum}, got {value!r}"
                )


def _block_v(requested: int, value_dim: int, tpu: bool) -> int:
    bv = min(requested, value_dim)
    if tpu and bv < value_dim and bv % 128:
        bv = min(round_up(bv, 128), value_dim)
    return bv


# ------------------------------------------------------------------------------ custom_vjp core


def _gate_inputs(cfg, g, gk):
    if cfg.gate == "scalar":
        return {"g": g[..., None]}
    if cfg.gate == "channel":
        return {"gk": gk}
    return {}


def _forward(kernels, cfg, interpret, q, k, v, g, gk, beta, initial, sequence, starts, last, started, reset):
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    arrays = {"q": q, "k": k, "v": v, **_gate_inputs(cfg, g, gk)}
    if beta is not None:
        arrays["beta"] = beta[..., None]
    if cfg.segments:
        arrays["reset"] = reset[..., None]  # [B, N, C, 1]
    prepared = kernels.prepare_forward(arrays, cfg, key_dim, value_dim, interpret)
    state_arrays = {"qd": prepared.get("qd", q), "P": prepared["P"], "kend": prepared.get("kend", k),
                    "values": prepared.get("U", v)}
    if "decay" in prepared:
        state_arrays["decay"] = jnp.swapaxes(prepared["decay"], -1, -2)  # a column: scales state rows
    if cfg.delta:
        state_arrays["W"] = prepared["W"]
    out, states, writes, final = kernels.state_forward(state_arrays, initial, sequence, starts, cfg, interpret)
    writes = v if writes is None else writes
    residuals = (arrays, state_arrays, states, writes, sequence, starts, last, started)
    return (out, final), residuals


def _backward(kernels, cfg, interpret, residuals, cotangents):
    arrays, state_arrays, states, writes, sequence, starts, last, started = residuals
    d_out, d_final = cotangents
    partials, d_writes, d_initial = kernels.state_backward(
        state_arrays, d_out, states, writes, d_final, sequence, starts, last, cfg, interpret
    )
    summed = {name: jnp.sum(value, axis=1) for name, value in partials.items()}
    if "decay" in summed:
        summed["decay"] = jnp.swapaxes(summed["decay"], -1, -2)
    if cfg.delta:
        summed["U"] = d_writes
    grads = kernels.prepare_backward(arrays, summed, cfg, interpret)
    d_q, d_k = grads["q"], grads["k"]
    if not cfg.decays:  # Q e^G and K e^(G_C - G) are Q and K themselves
        d_q, d_k = d_q + summed["qd"], d_k + summed["kend"]
    d_v = grads["v"] if cfg.delta else d_writes
    d_g = d_gk = d_beta = None
    if cfg.gate == "scalar":
        d_g = grads["g"][..., 0]
    elif cfg.gate == "channel":
        d_gk = grads["gk"]
    if cfg.delta:
        d_beta = grads["beta"][..., 0]
    # Slots of sequences without a chunk are never written by the kernel.
    d_initial = jnp.where(started[:, None, None] != 0, d_initial, 0.0)
    return d_q, d_k, d_v, d_g, d_gk, d_beta, d_initial, None, None, None, None, None


def _make_core(kernels):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
    def core(cfg, interpret, *args):
        return _forward(kernels, cfg, interpret, *args)[0]

    def fwd(cfg, interpret, *args):
        return _forward(kernels, cfg, interpret, *args)

    def bwd(cfg, interpret, residuals, cotangents):
        return _backward(kernels, cfg, interpret, residuals, cotangents)

    core.defvjp(fwd, bwd)
    return core


tpu_core = _make_core(_tpu)
gpu_core = _make_core(_gpu)


def _run_tpu(*args, cfg, interpret):
    return tpu_core(cfg, interpret, *args)


def _run_gpu(*args, cfg, interpret):
    return gpu_core(cfg, interpret, *args)


# ------------------------------------------------------------------------------------- entry


def chunked_recurrence_pallas(
    q, k, v, *, g=None, gk=None, beta=None, scale: float, initial_state=None,
    output_final_state: bool = False, cu_seqlens=None, segment_ids=None, chunk_size: int = 64,
    block_sizes: RecurrentBlockSizes | None = None, interpret=None,
):
    """The recurrence of :mod:`.reference` by the chunked engine in Pallas kernels.

    Arguments and returns as :func:`.xla.chunked_recurrence` (already validated; ``chunk_size``
    a power of two >= 16, shrunk for short inputs), plus ``block_sizes``
    (:class:`RecurrentBlockSizes`) and ``interpret`` (see :mod:`attnzoo.pallas_kernels.common`).
    ``segment_ids [B, T]`` (not with ``cu_seqlens``) restarts the state at zero before every token
    whose id differs from the previous one's: the reset flags go into the ``prepare`` kernels,
    which mask as :func:`.chunk.prepare` does with segments.
    Differentiable in q, k, v, g, gk, beta and initial_state.
    """
    block_sizes = RecurrentBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, RecurrentBlockSizes):
        raise TypeError(f"{OP}: block_sizes must be a RecurrentBlockSizes, got {type(block_sizes).__name__}")
    interpret = common.check_interpret(interpret, OP)
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError(f"{OP}: pass either segment_ids or cu_seqlens, not both")
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    chunk = min(chunk_size, max(MIN_DIM, _pow2(length)))
    subchunk = min(block_sizes.subchunk, chunk)
    key_pad, value_pad = max(MIN_DIM, _pow2(key_dim)), max(MIN_DIM, _pow2(value_dim))
    tpu_bv = _block_v(block_sizes.block_v, value_pad, tpu=True)
    gpu_bv = _block_v(block_sizes.block_v, value_pad, tpu=False)
    value_pad = round_up(value_pad, tpu_bv)  # gpu_bv (a power of two <= tpu_bv) divides it too

    inputs = [x if x is None else x.astype(dtype) for x in (q, k, v, g, gk, beta)]
    layout = None
    if cu_seqlens is not None:
        layout = chunk_aligned_layout(cu_seqlens, length, chunk)
        inputs = gather_to_layout(inputs, layout)
        padded = layout.source.shape[0]
    else:
        padded = round_up(length, chunk)
        inputs = [x if x is None else common.pad_axis(x, 1, chunk) for x in inputs]
    # Zero key and value columns (and zero per-channel decay on padded key channels) leave the
    # recurrence on the real columns unchanged.
    inputs = [
        x if x is None or i in (3, 5) else common.pad_axis(x, 3, value_pad if i == 2 else key_pad)
        for i, x in enumerate(inputs)
    ]
    num_chunks = padded // chunk
    if segment_ids is None:
        reset = None
    else:  # [B, N, C]: 1.0 where the state restarts before the token (padded tokens continue)
        reset = common.pad_axis(segment_restarts(segment_ids).astype(dtype), 1, chunk)
        reset = reset.reshape(batch, num_chunks, chunk)

    def rows(x):  # [B, T', H, ...] -> [B*H, N, C, ...]
        if x is None:
            return None
        x = to_chunks(x, chunk)
        return x.reshape((batch * heads,) + x.shape[2:])

    q_c, k_c, v_c, g_c, gk_c, beta_c = [rows(x) for x in inputs]

    sequences = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        initial = jnp.zeros((sequences, heads, key_dim, value_dim), dtype)
    else:
        initial = initial_state.astype(dtype)
    initial_padded = jnp.pad(initial, [(0, 0), (0, 0), (0, key_pad - key_dim), (0, value_pad - value_dim)])
    initial_padded = initial_padded.reshape(sequences * heads, key_pad, value_pad)

    chunk_index = jnp.arange(num_chunks, dtype=jnp.int32)
    if layout is None:
        sequence = jnp.zeros((num_chunks,), jnp.int32)
        starts = (chunk_index == 0).astype(jnp.int32)
    else:
        sequence = layout.sequence.astype(jnp.int32)
        starts = layout.starts.astype(jnp.int32)
    following = jnp.concatenate([sequence[1:], jnp.full((1,), -1, jnp.int32)])
    last = (following != sequence).astype(jnp.int32)

    gate = "scalar" if g is not None else "channel" if gk is not None else "none"
    cfg = _tpu.Config(
        gate=gate, delta=beta is not None, scale=float(scale), chunk=chunk, subchunk=subchunk,
        block_v=tpu_bv, heads=heads, segments=segment_ids is not None,
    )
    # Row i = b * H + h of chunk n uses state slot sequence[n] * H + i: without packing sequence
    # is 0 and the slot is the row; packed (B == 1) it is the sequence's head h.
    if layout is None:
        started = jnp.ones((sequences * heads,), jnp.int32)
    else:
        started = jnp.repeat(layout.last_chunk >= 0, heads).astype(jnp.int32)
    args = (q_c, k_c, v_c, g_c, gk_c, beta_c, initial_padded, sequence, starts, last, started, reset)
    out, final = common.run_pallas(
        functools.partial(_run_tpu, cfg=cfg),
        functools.partial(_run_gpu, cfg=dataclasses.replace(cfg, block_v=gpu_bv)),
        interpret,
        *args,
    )
    out = out.reshape(batch, heads, num_chunks, chunk, value_pad)
    out = from_chunks(out)
    out = jnp.take(out, layout.slot, axis=1) if layout is not None else out[:, :length]
    out = out[..., :value_dim].astype(v.dtype)
    if not output_final_state:
        return out, None
    final = final.reshape(sequences, heads, key_pad, value_pad)[:, :, :key_dim, :value_dim]
    if layout is not None:
        final = jnp.where((layout.last_chunk >= 0)[:, None, None, None], final, initial)
    return out, final
