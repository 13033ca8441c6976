"""Mamba-2's state-space duality (SSD) on the chunked linear-RNN engine.

Per head ``h`` with scalar ``A_h <= 0``, step ``dt_t > 0`` and state ``S [N, P]``::

    S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T          (B_t [N], x_t [P])
    y_t = S_t^T C_t + D_h x_t

This is gated linear attention with one decay per head and token (:func:`simple_gla`) with
``q = C``, ``k = dt * B``, ``v = x``, log-decay ``g = dt * A`` and readout scale 1, which is the
SSD paper's four-step chunked algorithm (intra-chunk "attention", chunk states, the state pass
across chunks, state-to-output): so ``ssd`` runs on the same engine, the ``xla`` chunked form and
the fused ``pallas`` kernels (forward and backward) of :mod:`attnzoo.pallas_kernels.linear_rnn`.

Layouts (mamba_ssm's, sequence-first): ``x [B, T, H, P]``, ``dt [B, T, H]``, ``A [H]``,
``B, C [B, T, G, N]`` with ``G`` groups dividing ``H`` (head ``h`` reads group ``h // (H / G)``,
as mamba_ssm repeats groups), ``D [H]`` or ``[H, P]``. States are ``[N_seq, H, N, P]`` float32
(the key-by-value layout of every recurrent op here; mamba_ssm's is the transpose ``[.., P, N]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels import common
from attnzoo.pallas_kernels import linear_rnn as _linear_rnn
from attnzoo.pallas_kernels.common import check_array

__all__ = ["ssd", "ssd_step", "ssd_inputs", "skip_connection"]


def _check_dt_options(op, dt_softplus, dt_limit):
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"{op}: dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    if dt_limit is None:
        return None
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise ValueError(f"{op}: dt_limit must be a (low, high) pair of floats or None, got {dt_limit!r}")
    low = float(dt_limit[0])
    high = float(dt_limit[1])
    if not low < high or low < 0:
        raise ValueError(f"{op}: dt_limit must satisfy 0 <= low < high, got {dt_limit!r}")
    return (low, high)


def _check_common(op, x, dt, A, B, C, D, dt_bias, *, time_axis: bool):
    """Validates the SSD inputs; returns ``(heads, groups, state_dim, head_dim)``."""
    lead = "B,T" if time_axis else "B"
    rank = 4 if time_axis else 3
    check_array(op, "x", x, ndim=rank, floating=True, expected=f"[{lead},H,P]")
    heads, head_dim = x.shape[-2:]
    check_array(op, "dt", dt, floating=True, shape=x.shape[:-1], expected=f"[{lead},H]")
    check_array(op, "A", A, floating=True, shape=(heads,), expected="[H]")
    check_array(op, "B", B, ndim=rank, floating=True, shape=x.shape[:-2] + (None, None), expected=f"[{lead},G,N]")
    groups, state_dim = B.shape[-2:]
    check_array(op, "C", C, floating=True, shape=B.shape, expected=f"[{lead},G,N]")
    if heads % groups:
        raise ValueError(f"{op}: the number of groups G = {groups} (B, C [{lead},G,N]) must divide H = {heads}")
    if D is not None:
        check_array(op, "D", D, ndim=(1, 2), floating=True, expected="[H] or [H,P]")
        if tuple(D.shape) not in ((heads,), (heads, head_dim)):
            raise ValueError(f"{op}: D must have shape ({heads},) [H] or ({heads}, {head_dim}) [H,P], got {tuple(D.shape)}")
    if dt_bias is not None:
        check_array(op, "dt_bias", dt_bias, floating=True, shape=(heads,), expected="[H]")
    if not isinstance(A, jax.core.Tracer) and np.any(np.asarray(A) > 0):
        raise ValueError(f"{op}: A must be <= 0 (a decay rate, e.g. -exp(A_log)), got a maximum of {float(np.max(A))}")
    return heads, groups, state_dim, head_dim


def ssd_inputs(x, dt, A, B, C, *, dt_bias=None, dt_softplus=False, dt_limit=None):
    """The linear-RNN inputs of SSD: ``(q, k, v, g)`` with ``q = C``, ``k = dt' B``, ``v = x``,
    ``g = dt' A`` per head (groups repeated to heads), where ``dt' = clip(softplus?(dt + dt_bias))``.

    Works with or without the time axis (``x [B, T, H, P]`` or ``[B, H, P]``). ``k`` and ``g`` are
    float32 (float64 for float64 inputs); ``q``, ``v`` keep their dtypes. The products are einsums,
    so that their gradients (``dB``, ``ddt``, ``dA``: sums of products) are matrix products, which
    XLA:CPU runs far faster than the fused multiply-reduce of a broadcast product's gradient.
    """
    heads = x.shape[-2]
    groups, state_dim = B.shape[-2:]
    compute = jnp.promote_types(jnp.result_type(dt, A, B), jnp.float32)
    step = dt.astype(compute)
    if dt_bias is not None:
        step = step + dt_bias.astype(compute)
    if dt_softplus:
        step = jax.nn.softplus(step)
    if dt_limit is not None:
        step = jnp.clip(step, dt_limit[0], dt_limit[1])
    repeats = heads // groups
    lead = x.shape[:-2]
    # head h = group * repeats + r reads group h // repeats
    step_grouped = step.reshape(lead + (groups, repeats))
    k = jnp.einsum("...gn,...gr->...grn", B.astype(compute), step_grouped).reshape(lead + (heads, state_dim))
    q = C
    if repeats > 1:
        q = jnp.broadcast_to(C[..., None, :], lead + (groups, repeats, state_dim)).reshape(lead + (heads, state_dim))
    g = jnp.einsum("...h,h->...h", step, A.astype(compute))
    return q, k, x, g


def skip_connection(y, x, D):
    """``y + D * x`` per head (``D [H]``) or channel (``D [H, P]``) for ``x, y [..., H, P]``, in
    y's dtype (sums in float32 or wider); ``y`` unchanged when D is None. An einsum, so that ``dD``
    is a matrix product."""
    if D is None:
        return y
    D = D.astype(jnp.promote_types(D.dtype, jnp.float32))
    x = x.astype(D.dtype)
    skip = jnp.einsum("...hp,h->...hp", x, D) if D.ndim == 1 else jnp.einsum("...hp,hp->...hp", x, D)
    return (y.astype(D.dtype) + skip).astype(y.dtype)


def ssd(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus: bool = False, dt_limit=None, initial_state=None,
        output_final_state: bool = False, cu_seqlens=None, segment_ids=None, chunk_size: int = 64,
        impl: str = "auto", block_sizes=None, interpret=None):
    """Mamba-2's selective state-space layer core (SSD), chunked.

    Args:
      x: ``[B, T, H, P]`` inputs (heads of ``P`` channels).
      dt: ``[B, T, H]`` step sizes (before ``dt_bias`` / softplus / ``dt_limit``).
      A: ``[H]`` decay rates ``<= 0`` (``-exp(A_log)``).
      B, C: ``[B, T, G, N]`` input and output projections of the state (``G`` divides ``H``).
      D: ``[H]`` or ``[H, P]`` skip connection, or None.
      dt_bias: ``[H]`` added to dt, or None. dt_softplus: apply softplus after the bias.
      dt_limit: ``(low, high)`` clamp of the processed dt (mamba_ssm's ``dt_limit``), or None.
      initial_state: ``[N_seq, H, N, P]`` state before the first token (N_seq = B, or the number
        of packed sequences), default zeros.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: ``[N_seq+1]`` int offsets of sequences packed along T (B == 1), or None.
      segment_ids: ``[B, T]`` ints (not with cu_seqlens): the state restarts at zero where the id
        changes.
      chunk_size: tokens per chunk (a power of two >= 16). impl: "auto" | "reference" | "xla" |
        "pallas". block_sizes: ``pk.RecurrentBlockSizes`` of the pallas kernels. interpret: see
        :mod:`attnzoo.pallas_kernels.common`.

    Returns ``(y [B, T, H, P] in x's dtype, final_state [N_seq, H, N, P] float32 or None)``.
    Gradients flow to every floating input.
    """
    op = "ssd"
    _check_common(op, x, dt, A, B, C, D, dt_bias, time_axis=True)
    dt_limit = _check_dt_options(op, dt_softplus, dt_limit)
    common.resolve_impl(impl, op)
    q, k, v, g = ssd_inputs(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    try:
        y, final = _linear_rnn.simple_gla(
            q, k, v, g, scale=1.0, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
            block_sizes=block_sizes, interpret=interpret,
        )
    except (TypeError, ValueError) as error:
        raise type(error)(_rename(str(error))) from None
    return skip_connection(y, x, D), final


def _rename(message: str) -> str:
    """simple_gla's error about an argument ssd passes through, in ssd's terms."""
    message = message.replace("simple_gla:", "ssd:", 1)
    return message.replace("[N,H,K,V]", "[N_seq,H,N,P]")


def ssd_step(x, dt, A, B, C, state, *, D=None, dt_bias=None, dt_softplus: bool = False, dt_limit=None):
    """One token of :func:`ssd` for decoding.

    Args: ``x [B, H, P]``, ``dt [B, H]``, ``A [H]``, ``B, C [B, G, N]``, ``state [B, H, N, P]``
      (the state after the previous token), and the options of :func:`ssd`.

    Returns ``(y [B, H, P] in x's dtype, new_state float32)``.
    """
    op = "ssd_step"
    heads, _, state_dim, head_dim = _check_common(op, x, dt, A, B, C, D, dt_bias, time_axis=False)
    dt_limit = _check_dt_options(op, dt_softplus, dt_limit)
    check_array(op, "state", state, floating=True, shape=(x.shape[0], heads, state_dim, head_dim),
                expected="[B,H,N,P]")
    q, k, v, g = ssd_inputs(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    y, state = _linear_rnn.simple_gla_step(q, k, v, g, state, scale=1.0)
    return skip_connection(y, x, D), state
