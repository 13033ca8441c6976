"""The machinery every recurrent token mixer shares: checks, caches, short convolutions, the op call.

The linear-attention mixers (:mod:`attnzoo.layers.linear`) and the delta-rule mixers
(:mod:`attnzoo.layers.delta`) subclass :class:`RecurrentMixer`; each builds its own projections,
features and read-out and hands ``q, k, v`` (and gates / beta) to :meth:`RecurrentMixer._recur`,
which runs the chunked op of :mod:`attnzoo.pallas_kernels.linear_rnn` (or its one-token ``*_step``
form when decoding) and returns the new recurrent state.

Under an active mesh (``jax.set_mesh``) and ``impl`` resolving to ``pallas``, the op runs per shard
of batch and heads inside ``jax.shard_map`` (:func:`attnzoo.layers.common.shard_map_batch_heads`,
axes from the mixer's :class:`attnzoo.layers.common.MeshAxes`): the SPMD partitioner does not
split Pallas kernels. The ``xla`` and ``reference`` paths are left to the partitioner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import pallas_kernels as pk
from attnzoo.layers.common import (
    DType,
    MeshAxes,
    RecurrentCache,
    ShortConvolution,
    check_input,
    padding_mask,
    shard_map_batch_heads,
)
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels import linear_rnn as pk_linear_rnn
from attnzoo.pallas_kernels.common import check_int

__all__ = ["RecurrentMixer", "check_bool", "check_choice"]

# The ops a recurrent mixer can run, and which gate / beta inputs each takes.
_OP_INPUTS = {
    "linear_attention": (False, False),
    "simple_gla": (True, False),
    "gla": (True, False),
    "delta_rule": (False, True),
    "gated_delta_rule": (True, True),
    "kda": (True, True),
}


def check_bool(owner: str, name: str, value) -> bool:
    """``value`` as a bool, or TypeError naming ``owner`` and ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_choice(owner: str, name: str, value, choices):
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _flat_conv(conv: ShortConvolution, x: jax.Array, **kwargs):
    """A short convolution over the flattened trailing axes of ``x [B, T, ...]``."""
    batch, length = x.shape[:2]
    out = conv(x.reshape(batch, length, -1), **kwargs)
    if isinstance(out, tuple):
        return out[0].reshape(x.shape), out[1]
    return out.reshape(x.shape)


class RecurrentMixer(nnx.Module):
    """Base of the recurrent mixers: argument checks, the decoding cache, short convolutions and
    the dispatch to the linear-RNN op.

    A subclass

    * sets ``_op``, the op it runs (``"linear_attention"``, ``"simple_gla"``, ``"gla"``,
      ``"delta_rule"``, ``"gated_delta_rule"`` or ``"kda"``), and may set ``_normalize``
      (normalised linear attention) and ``scale`` (None: the op's ``K ** -0.5``);
    * calls :meth:`_setup` first in its constructor;
    * defines ``_state_shape(batch) -> (B, H, K, V)``, the recurrent state of :meth:`init_cache`;
    * overrides ``_conv_modules()`` when it has short convolutions: their order is the order of
      ``cache.conv`` and of the ``index`` of :meth:`_convolve`;
    * in ``__call__``: ``mask = self._begin(x, ...)``, builds q, k, v (short convolutions through
      :meth:`_convolve`), ``out, state = self._recur(...)``, and returns :meth:`_finish`.
    """

    _op = "linear_attention"
    _normalize = False
    scale: float | None = None

    def _setup(self, owner: str, dim: int, num_heads: int, *, impl: str, chunk_size: int,
               dtype: DType | None, param_dtype: DType, mesh_axes: MeshAxes):
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.impl = check_choice(owner, "impl", impl, pk_linear_rnn.IMPLS)
        chunk_size = check_int(owner, "chunk_size", chunk_size, minimum=16)
        if chunk_size & (chunk_size - 1):
            raise ValueError(f"{owner}: chunk_size must be a power of two >= 16, got {chunk_size}")
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        if not isinstance(mesh_axes, MeshAxes):
            raise TypeError(f"{owner}: mesh_axes must be a MeshAxes, got {type(mesh_axes).__name__}")
        self.mesh_axes = mesh_axes

    # -- cache ---------------------------------------------------------------------------------

    def _conv_modules(self) -> tuple[ShortConvolution, ...]:
        return ()

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> RecurrentCache:
        """An empty :class:`RecurrentCache` for ``batch`` rows.

        ``max_len`` is accepted for the uniform mixer interface: a recurrent state does not grow.
        ``dtype`` (default: compute dtype, else ``param_dtype``) is the short-convolution states'
        dtype; the recurrent state is float32 (float64 when ``dtype`` is float64).
        """
        owner = f"{type(self).__name__}.init_cache"
        batch = check_int(owner, "batch", batch)
        check_int(owner, "max_len", max_len)
        dtype = jnp.dtype(dtype or self.dtype or self.param_dtype)
        state = jnp.zeros(self._state_shape(batch), jnp.promote_types(dtype, jnp.float32))
        convs = tuple(conv.init_state(batch, dtype) for conv in self._conv_modules())
        return RecurrentCache(state=state, conv=convs, lengths=jnp.zeros((batch,), jnp.int32))

    def _check_cache(self, cache, batch: int):
        owner = type(self).__name__
        if not isinstance(cache, RecurrentCache):
            raise TypeError(f"{owner}: cache must be a RecurrentCache from init_cache, got {type(cache).__name__}")
        want = self._state_shape(batch)
        if tuple(cache.state.shape) != want:
            raise ValueError(f"{owner}: cache.state must have shape {want} [B,H,K,V], got {tuple(cache.state.shape)}")
        convs = self._conv_modules()
        if len(cache.conv) != len(convs):
            raise ValueError(
                f"{owner}: cache.conv must hold {len(convs)} short-convolution states, got {len(cache.conv)}"
            )
        for index, (conv, state) in enumerate(zip(convs, cache.conv)):
            shape = (batch, conv.kernel_size - 1, conv.channels)
            if tuple(state.shape) != shape:
                raise ValueError(
                    f"{owner}: cache.conv[{index}] must have shape {shape} [B,K-1,C], got {tuple(state.shape)}"
                )
        if cache.lengths is None or tuple(cache.lengths.shape) != (batch,):
            got = None if cache.lengths is None else tuple(cache.lengths.shape)
            raise ValueError(f"{owner}: cache.lengths must have shape ({batch},), got {got}")

    # -- forward pieces ------------------------------------------------------------------------

    def _begin(self, x, segment_ids, cache, valid_lengths):
        """Validates the call; returns the padding mask ``[B, T]`` bool, or None (every token real)."""
        owner = type(self).__name__
        check_input(owner, x, ndim=3, last=self.dim, layout="[B,T,D]")
        batch, length, _ = x.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError(f"{owner}: segment_ids cannot be combined with a cache; decode one sequence per row")
            if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
                raise TypeError(f"{owner}: segment_ids must be an int array [B,T], got {type(segment_ids).__name__}")
            if tuple(segment_ids.shape) != (batch, length) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(
                    f"{owner}: segment_ids must be an int array of shape {(batch, length)} [B,T], "
                    f"got {segment_ids.dtype}{tuple(segment_ids.shape)}"
                )
        if cache is None:
            if valid_lengths is not None:
                raise ValueError(f"{owner}: valid_lengths needs a cache (use segment_ids for packing)")
            return None
        self._check_cache(cache, batch)
        try:
            return padding_mask(valid_lengths, batch, length)
        except ValueError as error:
            raise ValueError(f"{owner}: {error}") from None

    def _convolve(self, index: int, x, *, segment_ids, cache, mask, new_convs: list):
        """Short convolution ``index`` of :meth:`_conv_modules` over ``x [B,T,...]`` (trailing axes
        flattened). With a cache it starts from ``cache.conv[index]`` and appends its new state to
        ``new_convs``; a padding step (``mask`` False) leaves that row's state alone."""
        conv = self._conv_modules()[index]
        if cache is None:
            return _flat_conv(conv, x, segment_ids=segment_ids)
        state = cache.conv[index]
        batch, length = x.shape[:2]
        if length == 1:
            y, new_state = conv.step(x.reshape(batch, -1), state)
            if mask is not None:
                new_state = jnp.where(mask[:, :1, None], new_state, state)
            y = y.reshape(x.shape)
        else:
            lengths = None if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
            y, new_state = _flat_conv(conv, x, state=state, return_state=True, lengths=lengths)
        new_convs.append(new_state.astype(state.dtype))
        return y

    def _op_options(self) -> dict:
        options = dict(scale=self.scale)
        if self._op == "linear_attention":
            options["normalize"] = self._normalize
        return options

    def _recur(self, q, k, v, g=None, beta=None, *, segment_ids, cache, mask):
        """The recurrence: q, k ``[B,T,H,K]``, v ``[B,T,H,V]``, g ``[B,T,H]`` or ``[B,T,H,K]`` (gated
        ops), beta ``[B,T,H]`` (delta-rule ops).

        Keys, values and log-decays at padding (``mask`` False) are zeroed first: the state passes
        those tokens unchanged. Returns ``(o [B,T,H,V] in v's dtype, new state or None)``.
        """
        takes_gate, takes_beta = _OP_INPUTS[self._op]
        if mask is not None:
            k = jnp.where(mask[:, :, None, None], k, 0)
            v = jnp.where(mask[:, :, None, None], v, 0)
            if g is not None:
                g = jnp.where(mask.reshape(mask.shape + (1,) * (g.ndim - 2)), g, 0)
        extra = ((g,) if takes_gate else ()) + ((beta,) if takes_beta else ())
        options = self._op_options()
        if cache is not None and q.shape[1] == 1:
            step = getattr(pk, f"{self._op}_step")
            out, state = step(q[:, 0], k[:, 0], v[:, 0], *(x[:, 0] for x in extra), cache.state, **options)
            return out[:, None], state.astype(cache.state.dtype)
        options.update(chunk_size=self.chunk_size, impl=self.impl)
        initial = None if cache is None else cache.state
        out, final = self._chunked(q, k, v, extra, segment_ids, initial, options)
        return out, (None if final is None else final.astype(cache.state.dtype))

    def _chunked(self, q, k, v, extra, segment_ids, initial, options):
        """The chunked op, shard-mapped over batch and heads for Pallas under a mesh."""
        op = getattr(pk, self._op)
        named = {"q": q, "k": k, "v": v}
        named.update({f"extra{i}": x for i, x in enumerate(extra)})
        if segment_ids is not None:
            named["segment_ids"] = segment_ids
        if initial is not None:
            named["initial_state"] = initial
        names = tuple(named)

        def run(*arrays):
            got = dict(zip(names, arrays))
            result = op(
                got["q"], got["k"], got["v"], *(got[f"extra{i}"] for i in range(len(extra))),
                segment_ids=got.get("segment_ids"), initial_state=got.get("initial_state"),
                output_final_state=initial is not None, **options,
            )
            return result if initial is not None else result[0]

        if pk_common.resolve_impl(self.impl, type(self).__name__) != "pallas":
            result = run(*named.values())
        else:
            layouts = {"q": "BTHD", "k": "BTHD", "v": "BTHD", "segment_ids": "BT", "initial_state": "BHKV"}
            layouts.update({f"extra{i}": "BTH" + "D" * (x.ndim - 3) for i, x in enumerate(extra)})
            out_layout = ("BTHD", "BHKV") if initial is not None else "BTHD"
            result = shard_map_batch_heads(
                run, tuple(named.values()), tuple(layouts[name] for name in names), out_layout, self.mesh_axes,
                owner=type(self).__name__,
            )
        return result if initial is not None else (result, None)

    @staticmethod
    def _finish(y, cache, state, convs, mask, length):
        """``y`` alone, or ``(y, new cache)`` with lengths advanced by each row's valid tokens."""
        if cache is None:
            return y
        advance = length if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
        return y, RecurrentCache(
            state=state, conv=tuple(convs), lengths=cache.lengths + advance, extra=cache.extra
        )

    def _flops_seq_len(self, seq_len, kv_len) -> int:
        """Checks ``flops``' arguments; ``kv_len`` (a cache's length) does not change the cost."""
        owner = f"{type(self).__name__}.flops"
        seq_len = check_int(owner, "seq_len", seq_len)
        check_int(owner, "kv_len", kv_len, allow_none=True)
        return seq_len
