"""Pallas kernels of the chunked linear-RNN engine for TPU (Mosaic), and the per-chunk math they share.

The math of :mod:`.chunk` rewritten for kernel bodies: one chunk at a time on 2-D tiles, with
masks from ``broadcasted_iota``, elementwise ops, reductions and 2-D matmuls only (no cumsum,
no reshapes, no slicing, no triangular solve), every matmul dimension >= 16 (Triton's minimum).
:func:`prepare_math` is traced both forward (the ``prepare`` kernel) and through ``jax.vjp``
inside the ``prepare`` backward kernel.

Kernels (arrays are ``[BH, N, ...]``: batch*head rows, ``N`` chunks of ``C`` tokens):

* ``prepare``, grid ``(BH, N)``, parallel: cumulative gates (a matmul with a lower-triangular
  ones matrix), ``Q e^G``, ``K e^(G_C - G)``, ``e^(G_C)``, scores ``P`` and, for the delta rule,
  ``W`` and ``U'`` through the block-doubling inverse. With ``segment_ids`` it also takes the
  per-token reset flags ``[B, N, C, 1]`` and applies :mod:`.chunk`'s segment masks (gates
  restarting at resets, same-segment scores, a 0/1 chunk decay without gates); the state
  kernels are unchanged.
* ``state`` (the state pass fused with the outputs), grid ``(BH, V/block_v, N)`` with the chunk
  axis sequential: the state ``[K, block_v]`` is carried in scratch; per chunk
  ``U = U' - W S``, ``O = scale (Q e^G S + P U)``, ``S <- e^(G_C) S + (K e^(G_C-G))^T U``.
  Packed sequences: per-chunk ``sequence`` and ``starts`` (scalar prefetch) reload the carry from
  that sequence's initial state, and the state after every chunk is written to its sequence's
  final-state slot (the last write wins).
* ``state`` backward, same grid, chunks in reverse, ``dL/dS`` carried in scratch; it also does
  the outputs' backward. Quantities that sum over the value dim are written per value block and
  summed outside.
* ``prepare`` backward, grid ``(BH, N)``: ``jax.vjp`` of :func:`prepare_math` inside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call of the kernels.

    Attributes:
      gate: "none", "scalar" (one log-decay per token) or "channel" (one per key channel).
      delta: the delta rule (``beta`` given). scale: readout scale.
      chunk: tokens per chunk ``C``; subchunk: sub-chunk of the per-channel scores (divides C).
      block_v: value columns per state block (divides the padded value dim).
      heads: H (sequence ``s`` and head ``h`` use state slot ``s * H + h``).
      segments: per-token reset flags (``segment_ids``) are a ``prepare`` input: the state restarts
        at zero before flagged tokens, by masks (see :func:`prepare_math`).
    """

    gate: str
    delta: bool
    scale: float
    chunk: int
    subchunk: int
    block_v: int
    heads: int
    segments: bool = False

    @property
    def decays(self) -> bool:
        """The chunk has a decay ``e^(G_C)`` (gates), or a 0/1 one (segments without gates)."""
        return self.gate != "none" or self.segments


# ------------------------------------------------------------------------------- chunk math


def _dot(a, b, dims=NN):
    return jax.lax.dot_general(
        a, b, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=a.dtype
    )


def _iota2(rows: int, cols: int):
    shape = (rows, cols)
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0), jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _row(x, index: int):
    """Row ``index`` of ``x [R, D]`` as ``[1, D]`` (a masked reduction: exact, no slicing)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0, keepdims=True)


def _dot_vjp_friendly(dims):
    """``_dot`` with a VJP made of the three 2-D matmul forms only (no transposes).

    ``jax.vjp`` of a plain ``dot_general`` transposes some results; these rules contract the
    other operand's dimension instead, so the backward kernel holds no 2-D transposes.
    """

    @jax.custom_vjp
    def dot(a, b):
        return _dot(a, b, dims)

    def fwd(a, b):
        return _dot(a, b, dims), (a, b)

    def bwd(residuals, ct):
        a, b = residuals
        if dims == NN:  # out = a b
            return _dot(ct, b, NT), _dot(a, ct, TN)
        if dims == NT:  # out = a b^T
            return _dot(ct, b, NN), _dot(ct, a, TN)
        return _dot(b, ct, NT), _dot(a, ct, NN)  # TN: out = a^T b

    dot.defvjp(fwd, bwd)
    return dot


_FRIENDLY = {dims: _dot_vjp_friendly(dims) for dims in (NN, NT, TN)}


def _dot_for_vjp(a, b, dims=NN):
    return _FRIENDLY[dims](a, b)


def _transposed(column, rows, cols):
    """``column [C, 1]`` as a row ``[1, C]``, exactly (a masked reduction, no transpose op)."""
    return jnp.sum(jnp.where(rows == cols, column, 0.0), axis=0, keepdims=True)


def unit_lower_inverse(a, dot=_dot):
    """``(I + A)^-1`` for strictly lower-triangular ``A [C, C]`` by block doubling (matmuls only).

    As :func:`.chunk.unit_lower_inverse`, with full-precision matmuls.
    """
    size = a.shape[-1]
    rows, cols = _iota2(size, size)
    inverse = jnp.where(rows == cols, 1.0, 0.0).astype(a.dtype)
    block = 1
    while block < size:
        joins = (jax.lax.div(rows, jnp.int32(2 * block)) == jax.lax.div(cols, jnp.int32(2 * block))) & (
            jax.lax.div(rows, jnp.int32(block)) != jax.lax.div(cols, jnp.int32(block))
        )
        joined = jnp.where(joins, a, 0.0)
        inverse = inverse - dot(dot(inverse, joined), inverse)
        block *= 2
    return inverse


def channel_scores(lefts, b, gamma, stricts, *, subchunk: int, dot=_dot, same=None):
    """``P_ij = sum_c a_ic b_jc e^(G_ic - G_jc)`` for ``j <= i`` (``j < i`` if strict), else 0,
    for each ``a`` of ``lefts`` (with its ``strict`` of ``stricts``), sharing the work on ``b``.

    ``a, b, gamma [C, K]`` (``gamma`` cumulative, non-increasing). No exponent is positive where
    it matters: off-diagonal sub-chunk blocks rescale both factors to ``G`` at the end of the
    previous sub-chunk (one matmul per sub-chunk, exponents clamped at 0 in the rows and columns
    the block mask drops); diagonal blocks are exact, one key offset ``t`` at a time, the key of
    each row gathered by a one-hot matmul.

    ``same [C, C]`` (bool, or None): only pairs in the same segment are scored. ``gamma`` then
    restarts at segment starts; a same-segment pair never straddles a start, so its rescaling is
    exact, and the clamps keep every other pair finite before the mask drops it.
    """
    size = b.shape[0]
    rows, cols = _iota2(size, size)
    sub_rows = jax.lax.div(rows, jnp.int32(subchunk))
    sub_cols = jax.lax.div(cols, jnp.int32(subchunk))
    scores = [jnp.zeros((size, size), b.dtype) for _ in lefts]
    for block in range(1, size // subchunk):
        reference = _row(gamma, block * subchunk - 1)  # [1, K]
        b_scaled = b * jnp.exp(jnp.minimum(reference - gamma, 0.0))
        row_scale = jnp.exp(jnp.minimum(gamma - reference, 0.0))
        in_block = (sub_rows == block) & (sub_cols < block)
        if same is not None:
            in_block = in_block & same
        for i, a in enumerate(lefts):
            scores[i] = scores[i] + jnp.where(in_block, dot(a * row_scale, b_scaled, NT), 0.0)
    for offset in range(subchunk):
        picks = cols == sub_rows * subchunk + offset  # row i picks key j = start of its sub-chunk + offset
        select = jnp.where(picks, 1.0, 0.0).astype(b.dtype)
        gamma_j = dot(select, gamma)
        b_j = dot(select, b) * jnp.exp(jnp.minimum(gamma - gamma_j, 0.0))
        for i, (a, strict) in enumerate(zip(lefts, stricts)):
            visible = rows > cols if strict else rows >= cols
            if same is not None:
                visible = visible & same
            column = jnp.sum(a * b_j, axis=1, keepdims=True)
            scores[i] = scores[i] + jnp.where(picks & visible, column, 0.0)
    return scores


def segment_masks(reset, rows, cols):
    """``reset [C, 1]`` (1.0 where the state restarts before the token) -> masks of :class:`.chunk.Segments`:
    ``(same [C, C], continues [C, 1], reaches_end [C, 1], survives [1, 1])`` (bool)."""
    size = reset.shape[0]
    index = jnp.sum(jnp.where(rows >= cols, _transposed(reset, rows, cols), 0.0), axis=1, keepdims=True)
    last = _row(index, size - 1)  # [1, 1]: the chunk's last segment number
    same = index == _transposed(index, rows, cols)  # small integers: exact in any float dtype
    return same, index == 0.0, index == last, last == 0.0


def prepare_math(x: dict, cfg: Config, dot=_dot, reset=None) -> dict:
    """Stage 1 of :mod:`.chunk` for one chunk, on 2-D tiles.

    Args:
      x: ``q, k [C, K]``; ``v [C, V]`` (delta rule); gates ``g [C, 1]`` (scalar log-decays) or
        ``gk [C, K]``; ``beta [C, 1]``.
      dot: the matmul (the backward kernel passes one with a transpose-free VJP).
      reset: ``[C, 1]`` 0/1 (with ``cfg.segments``): the state restarts at zero before the token.
        As :func:`.chunk.prepare` with ``segments``: the cumulative gates restart at each reset,
        ``P`` and the delta-rule interactions keep same-segment pairs only, ``Q e^G`` and the keys
        reading the incoming state are zero after a reset, ``K e^(G_C - G)`` is zero before the
        last one and the chunk decay is zero (a 0/1 decay without gates) if the chunk has one.

    Returns a dict: ``qd = Q e^G``, ``kend = K e^(G_C - G)`` ``[C, K]`` and ``decay = e^(G_C)``
    (``[1, K]`` or ``[1, 1]``) when gated (or with segments); ``P [C, C]``; ``W [C, K]`` and
    ``U = U' [C, V]`` with the delta rule.
    """
    q, k = x["q"], x["k"]
    size = q.shape[0]
    rows, cols = _iota2(size, size)
    out = {}
    lefts, stricts = ([q, k], [False, True]) if cfg.delta else ([q], [False])
    same = None
    if cfg.segments:
        same, continues, reaches_end, survives = segment_masks(reset, rows, cols)
    causal = rows >= cols if same is None else (rows >= cols) & same  # gates sum within the segment
    if cfg.gate == "scalar":
        g_row = _transposed(x["g"], rows, cols)  # [1, C]
        gamma = jnp.sum(jnp.where(causal, g_row, 0.0), axis=1, keepdims=True)  # [C, 1]
        gamma_row = _transposed(gamma, rows, cols)  # the same values: G_i - G_i is exactly 0
        last = _row(gamma, size - 1)  # [1, 1]
        gap = gamma - gamma_row
        scores = []
        for a, strict in zip(lefts, stricts):
            visible = rows > cols if strict else rows >= cols
            if same is not None:
                visible = visible & same
            raw = dot(a, k, NT) * jnp.exp(jnp.where(visible, gap, 0.0))
            scores.append(jnp.where(visible, raw, 0.0))
    elif cfg.gate == "channel":
        gamma = dot(jnp.where(causal, 1.0, 0.0).astype(q.dtype), x["gk"])  # [C, K]
        last = _row(gamma, size - 1)  # [1, K]
        scores = channel_scores(lefts, k, gamma, stricts, subchunk=cfg.subchunk, dot=dot, same=same)
    else:
        scores = []
        for a, strict in zip(lefts, stricts):
            visible = rows > cols if strict else rows >= cols
            if same is not None:
                visible = visible & same
            scores.append(jnp.where(visible, dot(a, k, NT), 0.0))

    k_seen = k
    if cfg.gate != "none":
        decay = jnp.exp(gamma)
        out["qd"] = q * decay
        to_end = last - gamma
        if same is not None:  # positive before the last reset: zeroed there before the exp
            to_end = jnp.where(reaches_end, to_end, 0.0)
        out["kend"] = k * jnp.exp(to_end)
        out["decay"] = jnp.exp(last)
        k_seen = k * decay
    elif same is not None:
        out["qd"], out["kend"] = q, k
        out["decay"] = jnp.ones((1, 1), q.dtype)
    if same is not None:
        out["qd"] = jnp.where(continues, out["qd"], 0.0)
        out["kend"] = jnp.where(reaches_end, out["kend"], 0.0)
        out["decay"] = jnp.where(survives, out["decay"], 0.0)
        k_seen = jnp.where(continues, k_seen, 0.0)
    out["P"] = scores[0]
    if cfg.delta:
        beta = x["beta"]
        inverse = unit_lower_inverse(beta * scores[1], dot=dot)
        out["W"] = dot(inverse, beta * k_seen)
        out["U"] = dot(inverse, beta * x["v"])
    return out


def prepare_inputs(cfg: Config) -> tuple[str, ...]:
    """Names of :func:`prepare_math`'s inputs, in kernel order."""
    names = ["q", "k"]
    if cfg.delta:
        names.append("v")
    names += {"none": [], "scalar": ["g"], "channel": ["gk"]}[cfg.gate]
    if cfg.delta:
        names.append("beta")
    return tuple(names)


def prepare_outputs(cfg: Config) -> tuple[str, ...]:
    """Names of :func:`prepare_math`'s outputs, in kernel order."""
    names = ["qd", "kend", "decay"] if cfg.decays else []  # Q e^G, K e^(G_C-G) differ from Q, K
    names.append("P")
    if cfg.delta:
        names += ["W", "U"]
    return tuple(names)


def prepare_extras(cfg: Config) -> tuple[str, ...]:
    """Non-differentiable ``prepare`` inputs after :func:`prepare_inputs`: ``reset [C, 1]`` with segments."""
    return ("reset",) if cfg.segments else ()


def output_shape(name: str, cfg: Config, key_dim: int, value_dim: int) -> tuple[int, int]:
    size = cfg.chunk
    if name == "decay":
        return (1, key_dim) if cfg.gate == "channel" else (1, 1)
    return {"qd": (size, key_dim), "kend": (size, key_dim), "P": (size, size), "W": (size, key_dim),
            "U": (size, value_dim)}[name]


def prepare_kernel(*refs, cfg: Config):
    """Forward ``prepare`` body: refs are the inputs, the extras, then the outputs, in the orders above."""
    inputs, outputs = prepare_inputs(cfg), prepare_outputs(cfg)
    n_in = len(inputs) + len(prepare_extras(cfg))
    x = {name: ref[...] for name, ref in zip(inputs, refs)}
    reset = refs[len(inputs)][...] if cfg.segments else None
    out = prepare_math(x, cfg, reset=reset)
    for name, ref in zip(outputs, refs[n_in:]):
        ref[...] = out[name].astype(ref.dtype)


def prepare_backward_kernel(*refs, cfg: Config):
    """``prepare`` backward body: refs are the inputs, the extras, the outputs' cotangents, then the
    inputs' cotangents. ``jax.vjp`` of :func:`prepare_math` runs inside the kernel."""
    inputs, outputs = prepare_inputs(cfg), prepare_outputs(cfg)
    n_x, n_out = len(inputs), len(outputs)
    n_in = n_x + len(prepare_extras(cfg))
    x = [ref[...] for ref in refs[:n_x]]
    reset = refs[n_x][...] if cfg.segments else None
    cotangents = tuple(ref[...] for ref in refs[n_in:n_in + n_out])

    def forward(*values):
        out = prepare_math(dict(zip(inputs, values)), cfg, dot=_dot_for_vjp, reset=reset)
        return tuple(out[name] for name in outputs)

    _, vjp = jax.vjp(forward, *x)
    for ref, grad in zip(refs[n_in + n_out:], vjp(cotangents)):
        ref[...] = grad.astype(ref.dtype)


# --------------------------------------------------------------------- state pass (shared math)


def _decayed(state, decay):
    return state if decay is None else state * decay


def state_step(state, qd, scores, kend, decay, w, values, cfg: Config):
    """One chunk of the state pass: ``(out [C, bv], U [C, bv], next state [K, bv])``."""
    writes = values - _dot(w, state) if cfg.delta else values
    out = cfg.scale * (_dot(qd, state) + _dot(scores, writes))
    new_state = _decayed(state, decay) + _dot(kend, writes, TN)
    return out, writes, new_state


def state_backward_step(grad_state, d_out, state, qd, scores, kend, decay, w, writes, cfg: Config):
    """One chunk of the reverse state pass.

    ``grad_state`` is ``dL/dS`` after the chunk. Returns ``(dL/dS before the chunk, dU, partials)``
    with partials ``dqd, dP, dkend, ddecay, dW`` (value-dim sums of this value block; ddecay
    ``[K, 1]`` or ``[1, 1]``, None without a chunk decay; dW None without the delta rule).
    """
    d_writes = cfg.scale * _dot(scores, d_out, TN) + _dot(kend, grad_state)
    grad_before = _decayed(grad_state, decay) + cfg.scale * _dot(qd, d_out, TN)
    if cfg.delta:
        grad_before = grad_before - _dot(w, d_writes, TN)
    d_qd = cfg.scale * _dot(d_out, state, NT)
    d_scores = cfg.scale * _dot(d_out, writes, NT)
    d_kend = _dot(writes, grad_state, NT)
    d_decay = None
    if cfg.decays:
        d_decay = jnp.sum(state * grad_state, axis=1, keepdims=True)  # [K, 1]
        if cfg.gate != "channel":
            d_decay = jnp.sum(d_decay, axis=0, keepdims=True)  # [1, 1]
    d_w = -_dot(d_writes, state, NT) if cfg.delta else None
    return grad_before, d_writes, (d_qd, d_scores, d_kend, d_decay, d_w)


def state_inputs(cfg: Config) -> tuple[str, ...]:
    """Per-chunk inputs of the state kernels: ``qd, P, kend, [decay (column)], [W], values``."""
    names = ["qd", "P", "kend"]
    if cfg.decays:
        names.append("decay")
    if cfg.delta:
        names.append("W")
    return tuple(names)


# ------------------------------------------------------------------------------ TPU kernels


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _chunk_spec(shape):
    """``[BH, N, a, b]`` arrays, one chunk per step of a ``(BH, N)`` grid."""
    return pl.BlockSpec((None, None) + tuple(shape), lambda i, n: (i, n, 0, 0))


def prepare_in_specs(arrays: dict, cfg: Config, chunk_spec):
    """Block specs of the ``prepare`` inputs and extras (``reset`` is ``[B, N, C, 1]``, per batch row)."""
    specs = [chunk_spec(arrays[name].shape[2:]) for name in prepare_inputs(cfg)]
    if cfg.segments:
        reset_shape = arrays["reset"].shape[2:]
        batch_row = lambda i, n: (jax.lax.div(i, jnp.int32(cfg.heads)), n, 0, 0)  # noqa: E731  (not //: Mosaic)
        specs.append(pl.BlockSpec((None, None) + tuple(reset_shape), batch_row))
    return specs


def prepare_operands(arrays: dict, cfg: Config):
    return [arrays[name] for name in prepare_inputs(cfg) + prepare_extras(cfg)]


def prepare_forward(arrays: dict, cfg: Config, key_dim: int, value_dim: int, interpret, *,
                    compiler_params=None, name: str = "attnzoo_linear_rnn_prepare"):
    """Runs ``prepare`` on ``[BH, N, a, b]`` arrays (``reset`` ``[B, N, C, 1]``); returns a dict of
    ``[BH, N, a, b]`` arrays. ``compiler_params`` (default: Mosaic's, both grid axes parallel) and
    ``name`` let the GPU backend run the same call under Triton."""
    outputs = prepare_outputs(cfg)
    rows, chunks = arrays["q"].shape[:2]
    dtype = arrays["q"].dtype
    out_shapes = [output_shape(name, cfg, key_dim, value_dim) for name in outputs]
    results = pl.pallas_call(
        functools.partial(prepare_kernel, cfg=cfg),
        grid=(rows, chunks),
        in_specs=prepare_in_specs(arrays, cfg, _chunk_spec),
        out_specs=[_chunk_spec(shape) for shape in out_shapes],
        out_shape=[jax.ShapeDtypeStruct((rows, chunks) + shape, dtype) for shape in out_shapes],
        compiler_params=_params(("parallel", "parallel")) if compiler_params is None else compiler_params,
        interpret=interpret,
        name=name,
    )(*prepare_operands(arrays, cfg))
    return dict(zip(outputs, results))


def prepare_backward(arrays: dict, cotangents: dict, cfg: Config, interpret, *,
                     compiler_params=None, name: str = "attnzoo_linear_rnn_prepare_bwd"):
    """``prepare``'s VJP; returns a dict of the inputs' cotangents (same names as the inputs).
    ``compiler_params`` and ``name`` as in :func:`prepare_forward`."""
    inputs, outputs = prepare_inputs(cfg), prepare_outputs(cfg)
    rows, chunks = arrays["q"].shape[:2]
    results = pl.pallas_call(
        functools.partial(prepare_backward_kernel, cfg=cfg),
        grid=(rows, chunks),
        in_specs=prepare_in_specs(arrays, cfg, _chunk_spec)
        + [_chunk_spec(cotangents[name].shape[2:]) for name in outputs],
        out_specs=[_chunk_spec(arrays[name].shape[2:]) for name in inputs],
        out_shape=[jax.ShapeDtypeStruct(arrays[name].shape, arrays[name].dtype) for name in inputs],
        compiler_params=_params(("parallel", "parallel")) if compiler_params is None else compiler_params,
        interpret=interpret,
        name=name,
    )(*prepare_operands(arrays, cfg), *[cotangents[name] for name in outputs])
    return dict(zip(inputs, results))


def _unpack(cfg: Config, refs):
    """Splits the per-chunk state inputs into ``(qd, P, kend, decay, W, rest)``."""
    refs = list(refs)
    qd, scores, kend = refs[:3]
    del refs[:3]
    decay = refs.pop(0) if cfg.decays else None
    w = refs.pop(0) if cfg.delta else None
    return qd, scores, kend, decay, w, refs


def _load(ref):
    return None if ref is None else ref[...]


def _state_forward_kernel(sequence_ref, starts_ref, *refs, cfg: Config):
    qd, scores, kend, decay, w, refs = _unpack(cfg, refs)
    values, initial, out_ref, states_ref = refs[:4]
    refs = refs[4:]
    writes_ref = refs.pop(0) if cfg.delta else None
    final_ref, carry = refs
    n = pl.program_id(2)

    @pl.when(starts_ref[n] != 0)
    def _start():
        carry[...] = initial[...].astype(carry.dtype)

    state = carry[...]
    states_ref[...] = state.astype(states_ref.dtype)
    out, writes, new_state = state_step(
        state, qd[...], scores[...], kend[...], _load(decay), _load(w), values[...], cfg
    )
    out_ref[...] = out.astype(out_ref.dtype)
    if writes_ref is not None:
        writes_ref[...] = writes.astype(writes_ref.dtype)
    carry[...] = new_state
    final_ref[...] = new_state.astype(final_ref.dtype)


def state_forward(arrays: dict, initial, sequence, starts, cfg: Config, interpret):
    """The state pass and outputs on TPU.

    Args:
      arrays: ``qd, P, kend [BH, N, ...]``, ``decay [BH, N, K, 1]`` (or ``[.., 1, 1]``), ``W``
        and ``values`` (``U'`` or ``V``) ``[BH, N, C, V]``.
      initial: ``[slots, K, V]`` initial states; chunk ``n`` of row ``i`` uses slot
        ``sequence[n] * H + i``. sequence, starts: ``[N]`` int32.

    Returns ``(out [BH,N,C,V], states entering each chunk [BH,N,K,V], U [BH,N,C,V] or None,
    final [slots,K,V])``.
    """
    names = state_inputs(cfg)
    rows, chunks, size, key_dim = arrays["qd"].shape
    value_dim = arrays["values"].shape[-1]
    bv = cfg.block_v
    dtype = arrays["qd"].dtype
    heads = cfg.heads

    def chunk_spec(shape):
        return pl.BlockSpec((None, None) + tuple(shape), lambda i, j, n, *_: (i, n, 0, 0))

    def value_spec(first):
        return pl.BlockSpec((None, None, first, bv), lambda i, j, n, *_: (i, n, 0, j))

    def slot_map(i, j, n, sequence_ref, starts_ref):
        return (sequence_ref[n] * heads + i, 0, j)

    in_specs = [chunk_spec(arrays[name].shape[2:]) for name in names]
    in_specs += [value_spec(size), pl.BlockSpec((None, key_dim, bv), slot_map)]
    out_specs = [value_spec(size), value_spec(key_dim)]
    out_shape = [
        jax.ShapeDtypeStruct((rows, chunks, size, value_dim), dtype),
        jax.ShapeDtypeStruct((rows, chunks, key_dim, value_dim), dtype),
    ]
    if cfg.delta:
        out_specs.append(value_spec(size))
        out_shape.append(jax.ShapeDtypeStruct((rows, chunks, size, value_dim), dtype))
    out_specs.append(pl.BlockSpec((None, key_dim, bv), slot_map))
    out_shape.append(jax.ShapeDtypeStruct(initial.shape, dtype))
    results = pl.pallas_call(
        functools.partial(_state_forward_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(rows, value_dim // bv, chunks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((key_dim, bv), dtype)],
        ),
        out_shape=out_shape,
        compiler_params=_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="attnzoo_linear_rnn_state",
    )(sequence, starts, *[arrays[name] for name in names], arrays["values"], initial)
    if cfg.delta:
        out, states, writes, final = results
    else:
        (out, states, final), writes = results, None
    return out, states, writes, final


def _state_backward_kernel(sequence_ref, starts_ref, last_ref, *refs, cfg: Config):
    qd, scores, kend, decay, w, refs = _unpack(cfg, refs)
    d_out, states, writes, d_final = refs[:4]
    refs = refs[4:]
    d_qd_ref, d_scores_ref, d_kend_ref = refs[:3]
    refs = refs[3:]
    d_decay_ref = refs.pop(0) if cfg.decays else None
    d_w_ref = refs.pop(0) if cfg.delta else None
    d_writes_ref, d_initial_ref, carry = refs
    step = pl.program_id(2)
    n = pl.num_programs(2) - 1 - step

    @pl.when(step == 0)
    def _init():
        carry[...] = jnp.zeros(carry.shape, carry.dtype)

    @pl.when(last_ref[n] != 0)
    def _add_final():
        carry[...] = carry[...] + d_final[...].astype(carry.dtype)

    grad_state = carry[...]
    grad_before, d_writes, partials = state_backward_step(
        grad_state, d_out[...], states[...], qd[...], scores[...], kend[...], _load(decay), _load(w),
        writes[...], cfg,
    )
    for ref, value in zip((d_qd_ref, d_scores_ref, d_kend_ref, d_decay_ref, d_w_ref), partials):
        if ref is not None:
            ref[...] = value.astype(ref.dtype)
    d_writes_ref[...] = d_writes.astype(d_writes_ref.dtype)
    d_initial_ref[...] = grad_before.astype(d_initial_ref.dtype)
    carry[...] = grad_before

    @pl.when(starts_ref[n] != 0)
    def _restart():  # the state entering a sequence's first chunk is its initial state
        carry[...] = jnp.zeros(carry.shape, carry.dtype)


def state_backward(arrays: dict, d_out, states, writes, d_final, sequence, starts, last, cfg: Config,
                   interpret):
    """Reverse state pass with the outputs' backward.

    Returns ``(partials, dU [BH,N,C,V], d_initial [slots,K,V])``: partials is a dict of
    ``qd, P, kend, decay, W`` cotangents with a value-block axis ``[BH, V/bv, N, ...]`` to sum;
    ``d_initial`` holds garbage in slots no chunk starts (the caller masks them).
    """
    names = state_inputs(cfg)
    rows, chunks, size, key_dim = arrays["qd"].shape
    value_dim = d_out.shape[-1]
    bv = cfg.block_v
    blocks = value_dim // bv
    dtype = arrays["qd"].dtype
    heads = cfg.heads

    def rev(n):
        return chunks - 1 - n

    def chunk_spec(shape):
        return pl.BlockSpec((None, None) + tuple(shape), lambda i, j, n, *_: (i, rev(n), 0, 0))

    def value_spec(first):
        return pl.BlockSpec((None, None, first, bv), lambda i, j, n, *_: (i, rev(n), 0, j))

    def partial_spec(shape):
        return pl.BlockSpec((None, None, None) + tuple(shape), lambda i, j, n, *_: (i, j, rev(n), 0, 0))

    def slot_map(i, j, n, sequence_ref, *_):
        return (sequence_ref[rev(n)] * heads + i, 0, j)

    in_specs = [chunk_spec(arrays[name].shape[2:]) for name in names]
    in_specs += [value_spec(size), value_spec(key_dim), value_spec(size),
                 pl.BlockSpec((None, key_dim, bv), slot_map)]
    partial_names = [name for name in ("qd", "P", "kend", "decay", "W") if name in names]
    partial_shapes = {name: arrays[name].shape[2:] for name in partial_names}
    out_specs = [partial_spec(partial_shapes[name]) for name in partial_names]
    out_shape = [jax.ShapeDtypeStruct((rows, blocks, chunks) + tuple(partial_shapes[name]), dtype)
                 for name in partial_names]
    out_specs += [value_spec(size), pl.BlockSpec((None, key_dim, bv), slot_map)]
    out_shape += [jax.ShapeDtypeStruct((rows, chunks, size, value_dim), dtype),
                  jax.ShapeDtypeStruct(d_final.shape, dtype)]
    results = pl.pallas_call(
        functools.partial(_state_backward_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(rows, blocks, chunks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((key_dim, bv), dtype)],
        ),
        out_shape=out_shape,
        compiler_params=_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="attnzoo_linear_rnn_state_bwd",
    )(sequence, starts, last, *[arrays[name] for name in names], d_out, states, writes, d_final)
    partials = dict(zip(partial_names, results[: len(partial_names)]))
    d_writes, d_initial = results[len(partial_names):]
    return partials, d_writes, d_initial
