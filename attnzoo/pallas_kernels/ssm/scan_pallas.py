"""The ``pallas`` implementation of :func:`attnzoo.pallas_kernels.ssm.scan.selective_scan`.

The scan core ``y_t = sum_n C_t[n] h_t[:, n]`` with ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``
runs in fused Pallas kernels, forward and backward (a ``jax.custom_vjp``): Mosaic on TPU
(:mod:`.scan_tpu`), Triton on GPU (:mod:`.scan_gpu`), the TPU kernels in the interpreter on CPU,
picked per lowering platform by ``common.run_pallas``. The elementwise parts (``delta_bias``,
softplus, the ``D`` skip and the ``z`` gate) stay in the caller as plain JAX, differentiated by
autodiff.

Packing: ``cu_seqlens`` moves every sequence to start on a chunk boundary
(:func:`..linear_rnn.xla.chunk_aligned_layout`; gap tokens have ``dt = u = B = C = 0``, which
leave the state alone), so a chunk never mixes sequences and the kernels load a sequence's
initial state when a chunk starts it. ``segment_ids`` become per-token reset flags
(the state is zeroed before a token whose id differs from the previous one's).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.common import pad_axis, round_up
from attnzoo.pallas_kernels.linear_rnn.reference import segment_restarts
from attnzoo.pallas_kernels.linear_rnn.xla import chunk_aligned_layout, gather_to_layout
from attnzoo.pallas_kernels.ssm import scan_gpu as _gpu
from attnzoo.pallas_kernels.ssm import scan_tpu as _tpu

OP = "selective_scan"
MIN_CHUNK = 8  # TPU sublanes


def _is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ScanBlockSizes:
    """Tiling of the selective-scan kernels (the time chunk is the op's ``chunk_size``).

    Attributes:
      block_d: channels per TPU program (the grid is ``(B * G, D_group / block_d, chunks)``); a
        power of two >= 8. A group narrower than it runs as one block; otherwise a block is
        rounded up to a multiple of 128 (Mosaic lanes) and the channels padded to whole blocks.
      gpu_block_d: channels per Triton program (grid ``(B * G, D_group / gpu_block_d)``); a power
        of two >= 8, shrunk to the channels rounded up to a power of two. Smaller than on TPU:
        the backward keeps a chunk of ``[N, gpu_block_d]`` states in registers.
    """

    block_d: int = 128
    gpu_block_d: int = 32

    def __post_init__(self):
        for name in ("block_d", "gpu_block_d"):
            value = getattr(self, name)
            if not _is_pow2(value) or value < 8:
                raise ValueError(f"ScanBlockSizes: {name} must be a power of two >= 8, got {value!r}")


# ------------------------------------------------------------------------------ custom_vjp core


def _make_core(kernels):
    def fwd(cfg, interpret, x, dt, b, c, at, init, reset, sequence, starts, last):
        y, states, final = kernels.forward(x, dt, b, c, at, init, reset, sequence, starts, cfg, interpret)
        return (y, final), (x, dt, b, c, at, reset, states, sequence, starts, last)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
    def core(cfg, interpret, *args):
        return fwd(cfg, interpret, *args)[0]

    def bwd(cfg, interpret, residuals, cotangents):
        x, dt, b, c, at, reset, states, sequence, starts, last = residuals
        dy, d_final = cotangents
        dx, d_dt, d_b, d_c, d_at, d_init = kernels.backward(
            x, dt, b, c, at, reset, states, dy, d_final, sequence, starts, last, cfg, interpret)
        rows = x.shape[0]
        d_at = jnp.sum(d_at.reshape((rows // cfg.groups, cfg.groups) + d_at.shape[1:]), axis=0)
        return dx, d_dt, jnp.sum(d_b, axis=1), jnp.sum(d_c, axis=1), d_at, d_init, None, None, None, None

    core.defvjp(fwd, bwd)
    return core


tpu_core = _make_core(_tpu)
gpu_core = _make_core(_gpu)


def _run_tpu(*args, cfg, interpret):
    return tpu_core(cfg, interpret, *args)


def _run_gpu(*args, cfg, interpret):
    return gpu_core(cfg, interpret, *args)


# ------------------------------------------------------------------------------------- entry


def scan_pallas(u, steps, A, B, C, init, *, cu_seqlens=None, segment_ids=None, chunk_size: int = 64,
                block_sizes: ScanBlockSizes | None = None, interpret=None):
    """The scan core in Pallas kernels (arguments already validated by ``selective_scan``).

    Args:
      u, steps: ``[B, T, D]`` (steps: ``delta'`` after bias and softplus), in the compute dtype
        (float32, or float64 in tests). A: ``[D, N]``. B, C: ``[B, T, G, N]``.
      init: ``[S, D, N]`` initial states (``S = B``, or the number of packed sequences).
      cu_seqlens: ``[S + 1]`` int offsets (B == 1) or None. segment_ids: ``[B, T]`` ints or None.
      chunk_size: tokens per kernel chunk (a power of two; at least 8, shrunk for short inputs).
      block_sizes: :class:`ScanBlockSizes`. interpret: see :mod:`attnzoo.pallas_kernels.common`.

    Returns ``(y [B, T, D], final [S, D, N])`` in the compute dtype (``y`` without the ``D`` skip
    and ``z`` gate; ``final`` is the state after each sequence's last token, the initial state
    for an empty sequence). Differentiable in u, steps, A, B, C and init.
    """
    block_sizes = ScanBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, ScanBlockSizes):
        raise TypeError(f"{OP}: block_sizes must be a ScanBlockSizes, got {type(block_sizes).__name__}")
    interpret = common.check_interpret(interpret, OP)
    batch, length, channels = u.shape
    groups, state_dim = B.shape[2], B.shape[3]
    width = channels // groups
    dtype = steps.dtype
    sequences = init.shape[0]
    chunk = max(MIN_CHUNK, min(chunk_size, _pow2(length)))
    if width <= block_sizes.block_d:
        block_d, padded_width = width, width
    else:
        block_d = round_up(block_sizes.block_d, 128)
        padded_width = round_up(width, block_d)

    arrays = [u.astype(dtype), steps, B.astype(dtype), C.astype(dtype)]
    layout = None
    if cu_seqlens is not None:
        layout = chunk_aligned_layout(cu_seqlens, length, chunk)
        arrays = gather_to_layout(arrays, layout)
    else:
        arrays = [pad_axis(x, 1, chunk) for x in arrays]
    padded = arrays[0].shape[1]
    num_chunks = padded // chunk

    def by_group(x):  # [B, Tp, D] -> [B*G, Tp, Dp]
        x = x.reshape(batch, padded, groups, width)
        x = jnp.moveaxis(x, 2, 1).reshape(batch * groups, padded, width)
        return pad_axis(x, 2, padded_width)

    def state_by_group(s):  # [S, D, N] -> [S*G, N, Dp]
        s = jnp.swapaxes(s.reshape(s.shape[0] * groups, width, state_dim), 1, 2)
        return pad_axis(s, 2, padded_width)

    x, dt = by_group(arrays[0]), by_group(arrays[1])
    b, c = [y.reshape(batch, padded, groups, state_dim).swapaxes(1, 2).reshape(batch * groups, padded, state_dim)
            for y in arrays[2:]]
    at = state_by_group(A.astype(dtype)[None])
    init_g = state_by_group(init.astype(dtype))
    if layout is not None:  # slots of empty sequences are never read nor written by the kernels
        started = jnp.repeat(layout.last_chunk >= 0, groups)
        init_g = jnp.where(started[:, None, None], init_g, 0.0)
    reset = None
    if segment_ids is not None:
        reset = pad_axis(segment_restarts(segment_ids).astype(dtype), 1, chunk)[..., None]

    chunk_index = jnp.arange(num_chunks, dtype=jnp.int32)
    if layout is None:
        sequence = jnp.zeros((num_chunks,), jnp.int32)
        starts = (chunk_index == 0).astype(jnp.int32)
    else:
        sequence = layout.sequence.astype(jnp.int32)
        starts = layout.starts.astype(jnp.int32)
    following = jnp.concatenate([sequence[1:], jnp.full((1,), -1, jnp.int32)])
    last = (following != sequence).astype(jnp.int32)

    cfg = _tpu.Config(chunk=chunk, block_d=block_d, gpu_block_d=block_sizes.gpu_block_d, groups=groups,
                      segments=reset is not None)
    y, final = common.run_pallas(
        functools.partial(_run_tpu, cfg=cfg),
        functools.partial(_run_gpu, cfg=cfg),
        interpret,
        x, dt, b, c, at, init_g, reset, sequence, starts, last,
    )
    y = y[:, :, :width].reshape(batch, groups, padded, width)
    y = jnp.moveaxis(y, 1, 2).reshape(batch, padded, channels)
    y = jnp.take(y, layout.slot, axis=1) if layout is not None else y[:, :length]
    final = jnp.swapaxes(final[:, :, :width], 1, 2).reshape(sequences, channels, state_dim)
    if layout is not None:  # slots of sequences without a chunk are never written
        final = jnp.where((layout.last_chunk >= 0)[:, None, None], final, init.astype(dtype))
    return y, final
