"""Linear-attention and delta-rule ops on one chunked engine (fla's signatures and layouts).

Every op is one recurrence over a matrix state ``S [K, V]`` per head and sequence:

    S_t = exp(g_t) * diag(exp(gk_t)) @ S_{t-1}                     (decay: scalar g, per-channel gk)
    u_t = beta_t * (v_t - S_t^T k_t)  with the delta rule, else  u_t = v_t
    S_t = S_t + k_t u_t^T
    o_t = scale * S_t^T q_t                                         (read after the update)

=====================  ==========================  =====================================
op                     decay                       write
=====================  ==========================  =====================================
``linear_attention``   none                        ``k v^T`` (optionally normalised)
``simple_gla``         scalar per head ``g``       ``k v^T``  (RetNet, Lightning)
``gla``                per channel ``g [..,K]``    ``k v^T``
``delta_rule``         none                        delta rule (DeltaNet)
``gated_delta_rule``   scalar per head ``g``       delta rule (Gated DeltaNet)
``kda``                per channel ``g [..,K]``    delta rule (Kimi Delta Attention)
=====================  ==========================  =====================================

Shapes: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H]`` (scalar ops) or
``[B, T, H, K]`` (gla, kda), ``beta [B, T, H]``; gates are log-decays and must be <= 0 (the
chunked forms rely on it to never overflow). Every op returns ``(o [B,T,H,V] in v's dtype,
final_state [N,H,K,V] float32 or None)`` and takes ``scale`` (default ``K ** -0.5``),
``initial_state [N,H,K,V]``, ``output_final_state``, ``cu_seqlens [N+1]`` (packed sequences along
T with B == 1; the state restarts at each), ``chunk_size`` and ``impl``:

* ``reference``: the token-by-token ``lax.scan`` (:mod:`reference`), the float64 oracle;
* ``xla``: the chunkwise-parallel engine (:mod:`chunk`, :mod:`xla`): intra-chunk matmuls, a
  sequential pass over chunk states in float32, a triangular inverse by matmuls;
* ``pallas``: the same chunked engine as fused Pallas kernels, forward and backward
  (:mod:`pallas`; Mosaic on TPU, Triton on GPU, the interpreter on CPU), tiled by
  :class:`RecurrentBlockSizes`;
* ``auto``: ``pallas`` on TPU and GPU, ``xla`` on CPU.

``segment_ids [B, T]`` (packed documents per row, not with ``cu_seqlens``) restart the state
wherever the id changes, on every implementation.

Each op has a one-token ``*_step`` form for decoding: inputs without the T axis and a state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels.linear_rnn import pallas as _pallas
from attnzoo.pallas_kernels.linear_rnn import reference as _reference
from attnzoo.pallas_kernels.linear_rnn import xla as _xla
from attnzoo.pallas_kernels.linear_rnn.pallas import RecurrentBlockSizes
from attnzoo.pallas_kernels.linear_rnn.reference import recurrence, recurrent_step

__all__ = [
    "linear_attention",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta_rule",
    "kda",
    "linear_attention_step",
    "simple_gla_step",
    "gla_step",
    "delta_rule_step",
    "gated_delta_rule_step",
    "kda_step",
    "recurrence",
    "recurrent_step",
    "RecurrentBlockSizes",
]

IMPLS = common.IMPLS
NORMALIZE_EPS = 1e-10


def _check_chunk_size(op: str, chunk_size) -> int:
    chunk_size = common.check_int(op, "chunk_size", chunk_size, minimum=16)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


@functools.partial(
    jax.jit, static_argnames=("impl", "scale", "output_final_state", "chunk_size", "block_sizes", "interpret")
)
def _run(q, k, v, g, gk, beta, initial_state, cu_seqlens, segment_ids, *, impl, scale, output_final_state,
         chunk_size, block_sizes, interpret):
    kwargs = dict(g=g, gk=gk, beta=beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids)
    if impl == "reference":
        return _reference.recurrence(q, k, v, **kwargs)
    if impl == "pallas":
        return _pallas.chunked_recurrence_pallas(
            q, k, v, chunk_size=chunk_size, block_sizes=block_sizes, interpret=interpret, **kwargs
        )
    return _xla.chunked_recurrence(q, k, v, chunk_size=chunk_size, **kwargs)


def _op(op, q, k, v, *, g=None, gk=None, beta=None, scale, initial_state, output_final_state, cu_seqlens,
        segment_ids, chunk_size, impl, block_sizes, interpret, normalize=False):
    _reference.check_inputs(op, q, k, v, g, gk, beta, initial_state, cu_seqlens, normalize=normalize,
                            segment_ids=segment_ids)
    scale = common.check_float(op, "scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not isinstance(output_final_state, bool):
        raise TypeError(f"{op}: output_final_state must be a bool, got {type(output_final_state).__name__}")
    chunk_size = _check_chunk_size(op, chunk_size)
    impl = common.resolve_impl(impl, op)
    interpret = common.check_interpret(interpret, op)
    if block_sizes is not None and not isinstance(block_sizes, RecurrentBlockSizes):
        raise TypeError(f"{op}: block_sizes must be a RecurrentBlockSizes, got {type(block_sizes).__name__}")
    if block_sizes is not None and impl != "pallas":
        raise ValueError(f"{op}: block_sizes tiles the pallas kernels; impl {impl!r} takes only chunk_size")
    if normalize:
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    out, final = _run(
        q, k, v, g, gk, beta, initial_state, cu_seqlens, segment_ids, impl=impl, scale=scale,
        output_final_state=output_final_state, chunk_size=chunk_size, block_sizes=block_sizes, interpret=interpret,
    )
    if normalize:
        out = _normalized(out)
    return out, final


def _normalized(out):
    """Numerator columns divided by the last (normaliser) column, fla's ``o / (q.z + 1e-10)``."""
    return (out[..., :-1] / (out[..., -1:] + NORMALIZE_EPS)).astype(out.dtype)


_SHARED_ARGS = """
      scale: readout scale, default ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` state before the first token (N = B, or the number of packed
        sequences), default zeros.
      output_final_state: also return the state after the last token of each sequence.
      cu_seqlens: ``[N+1]`` int offsets of sequences packed along T (B == 1), or None.
      segment_ids: ``[B, T]`` ints, or None (not with cu_seqlens): packed documents per row; the
        state restarts at zero where the id changes (the row's first token starts from
        initial_state) and the final state is the row's last segment's.
      chunk_size: tokens per chunk of the ``xla`` and ``pallas`` engines (a power of two >= 16;
        shrunk for short inputs). impl: "auto" | "reference" | "xla" | "pallas".
      block_sizes: :class:`RecurrentBlockSizes` of the pallas kernels (default tiling).
      interpret: Pallas interpret mode, see :mod:`attnzoo.pallas_kernels.common`.

    Returns ``(o [B,T,H,V] in v's dtype, final_state [N,H,K,V] float32 or None)``."""


def _document(summary: str, args: str):
    def decorate(fn):
        fn.__doc__ = f"{summary}\n\n    Args:\n{args.rstrip()}{_SHARED_ARGS}\n    "
        return fn

    return decorate


@_document(
    "Linear attention ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` (fla ``chunk_linear_attn``).",
    """      q, k: ``[B, T, H, K]`` (feature-mapped queries and keys). v: ``[B, T, H, V]``.
      normalize: divide each output by ``scale * q_t . z_t`` (+1e-10) with ``z_t`` the running sum of
        keys. The normaliser is carried as an extra last value column, so states are
        ``[N, H, K, V+1]`` (and ``initial_state`` must be too); decoding continues exactly.
""",
)
def linear_attention(q, k, v, *, normalize: bool = False, scale=None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, segment_ids=None, chunk_size: int = 64,
                     impl: str = "auto", block_sizes=None, interpret=None):
    if not isinstance(normalize, bool):
        raise TypeError(f"linear_attention: normalize must be a bool, got {type(normalize).__name__}")
    return _op("linear_attention", q, k, v, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size,
               impl=impl, block_sizes=block_sizes, interpret=interpret, normalize=normalize)


@_document(
    "Gated linear attention with one decay per head and token (RetNet retention, Lightning attention).",
    """      q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log-decay (<= 0): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``.
""",
)
def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state: bool = False,
               cu_seqlens=None, segment_ids=None, chunk_size: int = 64, impl: str = "auto",
        block_sizes=None, interpret=None):
    return _op("simple_gla", q, k, v, g=g, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
               block_sizes=block_sizes, interpret=interpret)


@_document(
    "Gated linear attention with a decay per key channel (GLA).",
    """      q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` log-decay (<= 0): ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``.
""",
)
def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state: bool = False,
        cu_seqlens=None, segment_ids=None, chunk_size: int = 64, impl: str = "auto",
        block_sizes=None, interpret=None):
    return _op("gla", q, k, v, gk=g, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
               block_sizes=block_sizes, interpret=interpret)


@_document(
    "The delta rule (DeltaNet): ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``.",
    """      q, k: ``[B, T, H, K]`` (keys usually L2-normalised). v: ``[B, T, H, V]``.
      beta: ``[B, T, H]`` write strength, usually in (0, 1).
""",
)
def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
               cu_seqlens=None, segment_ids=None, chunk_size: int = 64, impl: str = "auto",
        block_sizes=None, interpret=None):
    return _op("delta_rule", q, k, v, beta=beta, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
               block_sizes=block_sizes, interpret=interpret)


@_document(
    "The gated delta rule (Gated DeltaNet): the delta rule on a state first decayed by ``exp(g_t)``.",
    """      q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log-decay (<= 0). beta: ``[B, T, H]`` write strength.
""",
)
def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
                     cu_seqlens=None, segment_ids=None, chunk_size: int = 64, impl: str = "auto",
        block_sizes=None, interpret=None):
    return _op("gated_delta_rule", q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
               block_sizes=block_sizes, interpret=interpret)


@_document(
    "Kimi Delta Attention: the delta rule on a state first decayed per key channel by ``exp(g_t)``.",
    """      q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
      g: ``[B, T, H, K]`` log-decay (<= 0). beta: ``[B, T, H]`` write strength.
""",
)
def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
        cu_seqlens=None, segment_ids=None, chunk_size: int = 64, impl: str = "auto",
        block_sizes=None, interpret=None):
    return _op("kda", q, k, v, gk=g, beta=beta, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
               block_sizes=block_sizes, interpret=interpret)


# ------------------------------------------------------------------------------------------------
# One-token steps (decoding)
# ------------------------------------------------------------------------------------------------


def _step(op, q, k, v, state, *, g=None, gk=None, beta=None, scale=None, normalize=False):
    _reference.check_step_inputs(op, q, k, v, state, g, gk, beta, normalize=normalize)
    scale = common.check_float(op, "scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if normalize:
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    state_dtype = jnp.promote_types(state.dtype, jnp.float32)
    out, state = recurrent_step(q, k, v, state.astype(state_dtype), g=g, gk=gk, beta=beta, scale=scale)
    if normalize:
        out = _normalized(out)
    return out.astype(v.dtype), state


_STEP_DOC = """One token of :func:`{op}` for decoding.

    Args: the op's inputs without the T axis (``q, k [B, H, K]``, ``v [B, H, V]``{gates}) and
      ``state [B, H, K, V{extra}]``, the state after the previous token. scale as for the op.

    Returns ``(o [B, H, V] in v's dtype, new_state float32)``; feeding the new state to the next
    step reproduces :func:`{op}` token by token.
    """


def _step_doc(op: str, gates: str = "", extra: str = ""):
    def decorate(fn):
        fn.__doc__ = _STEP_DOC.format(op=op, gates=gates, extra=extra)
        return fn

    return decorate


@_step_doc("linear_attention", extra="(+1 with normalize)")
def linear_attention_step(q, k, v, state, *, normalize: bool = False, scale=None):
    if not isinstance(normalize, bool):
        raise TypeError(f"linear_attention_step: normalize must be a bool, got {type(normalize).__name__}")
    return _step("linear_attention_step", q, k, v, state, scale=scale, normalize=normalize)


@_step_doc("simple_gla", gates=", ``g [B, H]``")
def simple_gla_step(q, k, v, g, state, *, scale=None):
    return _step("simple_gla_step", q, k, v, state, g=g, scale=scale)


@_step_doc("gla", gates=", ``g [B, H, K]``")
def gla_step(q, k, v, g, state, *, scale=None):
    return _step("gla_step", q, k, v, state, gk=g, scale=scale)


@_step_doc("delta_rule", gates=", ``beta [B, H]``")
def delta_rule_step(q, k, v, beta, state, *, scale=None):
    return _step("delta_rule_step", q, k, v, state, beta=beta, scale=scale)


@_step_doc("gated_delta_rule", gates=", ``g, beta [B, H]``")
def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None):
    return _step("gated_delta_rule_step", q, k, v, state, g=g, beta=beta, scale=scale)


@_step_doc("kda", gates=", ``g [B, H, K]``, ``beta [B, H]``")
def kda_step(q, k, v, g, beta, state, *, scale=None):
    return _step("kda_step", q, k, v, state, gk=g, beta=beta, scale=scale)
