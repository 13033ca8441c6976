"""MEGA: moving-average equipped gated attention (causal, language-model setting).

>>> m = Mega(dim=256, num_heads=1, rngs=nnx.Rngs(0))      # z_dim 64, hidden_dim 512, ema_dim 16
>>> y = m(x)                                   # x [B,T,256] -> [B,T,256], causal
>>> y = m(x, segment_ids=ids)                  # packed documents: EMA state and attention restart
>>> cache = m.init_cache(batch=B, max_len=1024)
>>> y, cache = m(prompt, cache=cache, valid_lengths=lens)   # prefill (T > 1), right-padded rows
>>> y, cache = m(token, cache=cache)           # one decoding step (T == 1)

Ma et al. 2022, "Mega: Moving Average Equipped Gated Attention" (arXiv:2209.10655). The maths
follows the official code, facebookresearch/mega ``fairseq/modules/moving_average_gated_attention.py``
(``MovingAverageGatedAttention``), ``fairseq/modules/exponential_moving_average.py``
(``MultiHeadEMA``) and ``fairseq/modules/relative_positional_bias.py``
(``RotaryRelativePositionalBias``), read at commit aeaa4b4. With ``x [B,T,D]`` (the mixer's input,
i.e. the block's normalised activations), ``N = ema_dim``, ``Z = z_dim``, ``E = hidden_dim``::

    # multi-dimensional damped EMA, per channel d and EMA dim n (official parameter names)
    alpha_p = sigmoid(ema_delta)   # the paper's alpha      delta_p = sigmoid(ema_alpha)  # paper's delta
    q = 1 - alpha_p * delta_p      # decay in (0, 1)         eta = ema_gamma * sqrt(1 / N)
    h_t[d,n] = alpha_p[d,n] * ema_beta[d,n] * x_t[d] + q[d,n] * h_{t-1}[d,n]
    x'_t = silu(sum_n eta[d,n] h_t[d,n] + omega[d] * x_t[d])
         = silu((k * x)_t + omega x_t),   k_t[d] = sum_n eta alpha_p beta q^t  (causal convolution)

    # single-head gated attention
    v = silu(v_proj(x))                                    [B,T,E]
    u = sigmoid(u_proj(x'))   z = silu(z_proj(x'))   r = silu(r_proj(x'))   hx = hx_proj(x')
    q, k = z * qk_gamma[0] + qk_beta[0],  z * qk_gamma[1] + qk_beta[1]          [B,T,Z]
    s_ij = Z^-0.5 q_i . k_j + bias(i - j)      causal softmax over j (within a chunk if chunk_size)
    h = silu(hx + h_proj(r * softmax(s) v))
    y = u * h + (1 - u) * x                    (official: torch.addcmul(residual, u, h - residual))

The official fused ``mx_proj [D, D + Z + E + D]`` is stored per output (``u_proj``, ``z_proj``,
``r_proj``, ``hx_proj``), which is the same linear map. All three projections have biases, as in
the official code.

Residual: the gated residual ``u * h + (1 - u) * x`` is inside the layer, as in the official code,
but there ``x`` is the layer's *un-normalised* input (MEGA's block is norm -> MEGA -> residual mix),
whereas a mixer of this library receives the block's normalised input and the block adds its own
skip connection: in :class:`attnzoo.zoo.lm.DecoderLM` the layer computes
``x + u * h + (1 - u) * RMSNorm(x)``. With ``gated_residual=False`` the mixer returns ``u * h`` only.

Position scheme: the relative position bias is the official LM recipe's ``--rel-pos-bias rotary``
(``RotaryRelativePositionalBias``: ``bias(i, j) = rot_i(b_alpha) . rot_j(b_beta)``, rotate-half
RoPE with base 10000 of two learned ``[Z]`` vectors), which depends only on ``i - j``. It is
computed exactly by the library's attention op by appending the rotated vectors to the queries and
keys (``[Z^-0.5 q_i, rot_i(b_alpha)] . [k_j, rot_j(b_beta)]``, op scale 1), so the op needs no
additive-bias support. (The architecture default ``'simple'``, a learned bias per offset, needs an
additive bias that ``pk.attention`` does not take; it is not implemented.)

Heads: MEGA's attention is single-head by construction (its multi-dimensional EMA plays the role
of heads). ``num_heads`` is accepted for the uniform mixer interface (backbones pass one number to
every mixer), checked to be an int >= 1, and otherwise unused.

EMA algorithm: the causal EMA is a diagonal linear recurrence with a real decay ``q``; it runs in
chunks of ``ema_chunk_size`` tokens (float32 or wider): within a chunk a Toeplitz matmul with the
kernel ``k_0 .. k_{C-1}``, across chunks the ``[B, D, N]`` states by ``jax.lax.associative_scan``
(O(T C D + T D N) work, O(T D + (T / C) D N) memory; segment starts mask the Toeplitz matrix and
zero the carried state). The official code's FFT convolution and its ``truncation`` of the kernel
are not used (the kernel here is never truncated, so decoding is exact at any length). A one-token
decoding step is the recurrence itself.

Cache: :class:`MegaCache` ``(ema [B, D, N] float32, attention: KVCache)``; the KV cache stores the
augmented keys ``[B, S, 1, 2Z]`` (query-side scale applied to the queries) and values
``[B, S, 1, E]``, with :class:`attnzoo.layers.attention.KVCache`'s write and ``lengths`` semantics.
With ``chunk_size`` (MEGA-chunk) a token attends to the tokens of its own chunk of ``chunk_size``
positions (chunks counted from each document's start), in training and decoding alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import pallas_kernels as pk
from attnzoo.layers.attention import KVCache, _write_rows
from attnzoo.layers.common import (
    Dense,
    DType,
    MeshAxes,
    apply_rope,
    check_bool,
    check_choice,
    check_mixer_call,
    compute_dtype,
    partitioned,
    shard_map_batch_heads,
)
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels.common import check_int

__all__ = ["Mega", "MegaCache", "ema_chunked"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MegaCache:
    """Decoding cache of a :class:`Mega` layer.

    Attributes:
      ema: ``[B, D, N]`` float32 (float64 for float64 layers) EMA state after the tokens seen.
      attention: the single-head :class:`KVCache`: keys ``[B, S, 1, 2Z]``, values ``[B, S, 1, E]``,
        ``lengths [B]`` int32 (tokens held per row = position of the row's next token).
    """

    ema: jax.Array
    attention: KVCache

    @property
    def lengths(self) -> jax.Array:
        return self.attention.lengths


# ----------------------------------------------------------------------------------------------
# The causal multi-dimensional damped EMA, chunked
# ----------------------------------------------------------------------------------------------


def _chunk_states(u, powers, pb, resets):
    """Per chunk ``c``: the decay ``A_c [B,nc,D,N]`` of the state over the chunk and the state
    ``E_c`` the chunk's own tokens leave (from a zero state). u ``[B,nc,C,D]``, powers
    ``[C+1, D, N]`` (``q^e``), pb ``[D,N]``, resets ``[B,nc,C]`` bool or None."""
    batch, num_chunks, size, _ = u.shape
    tail = powers[size - 1 - jnp.arange(size)] * pb  # q^{C-1-j} alpha beta   [C, D, N]
    if resets is None:
        decay = jnp.broadcast_to(powers[size], (batch, num_chunks) + powers.shape[1:])
        own = jnp.einsum("bcjd,jdn->bcdn", u, tail)
        return decay, own
    local = jnp.cumsum(resets, axis=2)  # local segment index within the chunk
    last = (local == local[..., -1:]).astype(u.dtype)  # no segment start in (j, C-1]
    keeps = (local[..., -1] == 0).astype(u.dtype)  # no segment start in the whole chunk
    decay = powers[size][None, None] * keeps[..., None, None]
    own = jnp.einsum("bcjd,jdn->bcdn", u * last[..., None], tail)
    return decay, own


def _scan_chunks(decay, own, initial):
    """States after each chunk: ``H_c = decay_c * H_{c-1} + own_c`` with ``H_{-1} = initial``."""
    if initial is not None:
        own = own.at[:, 0].add(decay[:, 0] * initial)

    def combine(first, second):
        return first[0] * second[0], second[0] * first[1] + second[1]

    return jax.lax.associative_scan(combine, (decay, own), axis=1)[1]


def ema_chunked(u, pb, q, eta, *, chunk_size, resets=None, initial=None):
    """Causal multi-dimensional damped EMA read out: ``y_t[d] = sum_n eta h_t`` with
    ``h_t = pb * u_t + q * h_{t-1}`` per ``(d, n)``, ``h_{-1} = initial``; the state restarts at
    zero at tokens where ``resets`` is True.

    Args:
      u: ``[B, T, D]`` inputs (float32 or wider). pb, q, eta: ``[D, N]`` (``alpha beta``, the
        decay ``1 - alpha delta``, the read-out ``gamma / sqrt(N)``) in u's dtype.
      chunk_size: tokens per chunk (the last chunk is zero-padded).
      resets: ``[B, T]`` bool or None. initial: ``[B, D, N]`` or None (zeros).

    Returns ``(y [B, T, D], state [B, D, N] after the last token)`` in u's dtype.
    """
    batch, length, dim = u.shape
    size = min(chunk_size, length)
    padded = -(-length // size) * size
    num_chunks = padded // size
    u = jnp.pad(u, ((0, 0), (0, padded - length), (0, 0))).reshape(batch, num_chunks, size, dim)
    if resets is not None:
        resets = jnp.pad(resets, ((0, 0), (0, padded - length))).reshape(batch, num_chunks, size)
    tiny = jnp.finfo(u.dtype).tiny
    log_q = jnp.log(jnp.maximum(q, tiny))
    powers = jnp.exp(jnp.arange(size + 1, dtype=u.dtype)[:, None, None] * log_q)  # q^e  [C+1, D, N]
    kernel = jnp.einsum("edn,dn->ed", powers[:size], pb * eta)  # k_e   [C, D]
    lag = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
    toeplitz = jnp.where((lag >= 0)[..., None], kernel[jnp.clip(lag, 0)], 0)  # [C, C, D]
    decay, own = _chunk_states(u, powers, pb, resets)
    states = _scan_chunks(decay, own, initial)  # after each chunk  [B, nc, D, N]
    start = jnp.zeros_like(states[:, :1]) if initial is None else initial[:, None].astype(states.dtype)
    previous = jnp.concatenate([start, states[:, :-1]], axis=1)
    readout = powers[1:] * eta  # q^{i+1} eta   [C, D, N]
    carried = jnp.einsum("bcdn,idn->bcid", previous, readout)
    if resets is None:
        inner = jnp.einsum("ijd,bcjd->bcid", toeplitz, u)
    else:
        local = jnp.cumsum(resets, axis=2)
        same = (local[..., :, None] == local[..., None, :]).astype(u.dtype)  # [B, nc, C, C]
        inner = jnp.einsum("bcij,ijd,bcjd->bcid", same, toeplitz, u)
        carried = carried * (local == 0).astype(u.dtype)[..., None]
    y = (inner + carried).reshape(batch, padded, dim)[:, :length]
    # The state after the last real token: the last chunk holds ``real`` of them (then padding).
    real = length - (num_chunks - 1) * size
    index = jnp.arange(size)
    tail = jnp.where((index < real)[:, None, None], powers[jnp.clip(real - 1 - index, 0)], 0) * pb
    last_u = u[:, -1]
    keep = powers[real]
    if resets is not None:
        local = jnp.cumsum(resets[:, -1], axis=1)  # [B, C]
        last_u = last_u * (local == local[:, real - 1 : real]).astype(u.dtype)[..., None]
        keep = keep * (local[:, real - 1] == 0).astype(u.dtype)[:, None, None]
    final = keep * previous[:, -1] + jnp.einsum("bjd,jdn->bdn", last_u, tail)
    return y, final


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


def _normal(std: float, mean: float = 0.0):
    def init(key, shape, dtype=jnp.float32):
        return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def _ema_beta_init(key, shape, dtype=jnp.float32):
    """``N(0, 0.02) + [1, -1, 1, -1, ...]`` over the EMA dims (official ``MultiHeadEMA``)."""
    signs = np.where(np.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
    return (0.02 * jax.random.normal(key, shape, jnp.float32) + jnp.asarray(signs, jnp.float32)).astype(dtype)


@register_mixer("mega")
class Mega(nnx.Module):
    """MEGA's moving-average gated attention as a causal mixer (see the module docstring).

    Args:
      dim: model width ``D``.
      num_heads: accepted for the uniform interface (an int >= 1) and unused: MEGA is single-head.
      z_dim: ``Z``, the shared query/key representation (official ``zdim``); default
        ``2 * max(1, D // 8)`` (= D / 4 for the official LMs, 128 for D = 512). Must be even.
      hidden_dim: ``E``, the value / gate width (official ``hdim``); default ``2 * D``.
      ema_dim: ``N``, EMA dimensions per channel (official ``ndim``, 16 in the LM recipes).
      chunk_size: MEGA-chunk: attention within chunks of this many tokens, or None (full causal).
      ema_chunk_size: chunk length of the chunked EMA computation (32); does not change results.
      rel_pos_bias: "rotary" (the official LM recipes'); see the module docstring.
      gated_residual: return ``u * h + (1 - u) * x`` (True, official) or ``u * h``.
      impl / block_sizes: passed to ``pk.attention`` / ``pk.attention_decode``.
      mesh_axes: shard batch (heads: one) for Pallas calls under a mesh.
      dtype: compute dtype (default: promotion of input and params); EMA in float32 or wider,
        softmax statistics in float32. param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default: the library's Lecun normal; the
        official code uses N(0, 0.02)). rngs: ``nnx.Rngs`` with a ``params`` stream.

    Parameters (logical axes): ``v_proj [D, E]`` (embed, mlp), ``u_proj``/``hx_proj [D, D]``
    (embed, None), ``z_proj [D, Z]`` (embed, head_dim), ``r_proj [D, E]`` (embed, mlp),
    ``h_proj [E, D]`` (mlp, embed), each with a bias; ``qk_gamma``/``qk_beta [2, Z]`` (None,
    head_dim); ``bias_alpha``/``bias_beta [Z]`` (head_dim); ``ema_delta``, ``ema_alpha``,
    ``ema_beta``, ``ema_gamma [D, N]`` (embed, None); ``omega [D]`` (embed). Non-projection
    parameters use the official initialisation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        z_dim: int | None = None,
        hidden_dim: int | None = None,
        ema_dim: int = 16,
        chunk_size: int | None = None,
        ema_chunk_size: int = 32,
        rel_pos_bias: str = "rotary",
        gated_residual: bool = True,
        impl: str = "auto",
        block_sizes=None,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "Mega"
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        z_dim = 2 * max(1, self.dim // 8) if z_dim is None else z_dim
        self.z_dim = check_int(owner, "z_dim", z_dim)
        if self.z_dim % 2:
            raise ValueError(f"Mega: z_dim must be even (the rotary position bias rotates halves), got {self.z_dim}")
        self.hidden_dim = check_int(owner, "hidden_dim", 2 * self.dim if hidden_dim is None else hidden_dim)
        self.ema_dim = check_int(owner, "ema_dim", ema_dim)
        self.chunk_size = check_int(owner, "chunk_size", chunk_size, allow_none=True)
        self.ema_chunk_size = check_int(owner, "ema_chunk_size", ema_chunk_size)
        self.rel_pos_bias = check_choice(owner, "rel_pos_bias", rel_pos_bias, ("rotary",))
        self.gated_residual = check_bool(owner, "gated_residual", gated_residual)
        if impl not in pk_common.IMPLS:
            raise ValueError(f"{owner}: impl must be one of {pk_common.IMPLS}, got {impl!r}")
        self.impl = impl
        self.block_sizes = block_sizes
        if not isinstance(mesh_axes, MeshAxes):
            raise TypeError(f"{owner}: mesh_axes must be a MeshAxes, got {type(mesh_axes).__name__}")
        self.mesh_axes = mesh_axes
        self.dtype = dtype
        self.param_dtype = param_dtype

        d, z, e, n = self.dim, self.z_dim, self.hidden_dim, self.ema_dim
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.v_proj = Dense(d, e, logical_axes=("embed", "mlp"), **dense)
        self.u_proj = Dense(d, d, logical_axes=("embed", None), **dense)
        self.z_proj = Dense(d, z, logical_axes=("embed", "head_dim"), **dense)
        self.r_proj = Dense(d, e, logical_axes=("embed", "mlp"), **dense)
        self.hx_proj = Dense(d, d, logical_axes=("embed", None), **dense)
        self.h_proj = Dense(e, d, logical_axes=("mlp", "embed"), **dense)

        def param(init, shape, axes):
            return nnx.Param(partitioned(init, axes)(rngs.params(), shape, param_dtype))

        self.qk_gamma = param(_normal(0.02), (2, z), (None, "head_dim"))
        self.qk_beta = param(nnx.initializers.zeros, (2, z), (None, "head_dim"))
        self.bias_alpha = param(_normal(0.02), (z,), ("head_dim",))
        self.bias_beta = param(_normal(0.02), (z,), ("head_dim",))
        self.ema_delta = param(_normal(0.2), (d, n), ("embed", None))
        self.ema_alpha = param(_normal(0.2), (d, n), ("embed", None))
        self.ema_beta = param(_ema_beta_init, (d, n), ("embed", None))
        self.ema_gamma = param(_normal(1.0), (d, n), ("embed", None))
        self.omega = param(_normal(1.0), (d,), ("embed",))

    # ------------------------------------------------------------------------------------------
    # Cache and cost model
    # ------------------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> MegaCache:
        """An empty :class:`MegaCache` for ``batch`` rows of up to ``max_len`` tokens.

        ``dtype`` (default: compute dtype, else ``param_dtype``) is the KV cache's; the EMA state is
        float32 (float64 when ``dtype`` is float64).
        """
        owner = "Mega.init_cache"
        batch = check_int(owner, "batch", batch)
        max_len = check_int(owner, "max_len", max_len)
        dtype = jnp.dtype(dtype or self.dtype or self.param_dtype)
        shape = (batch, max_len, 1)
        attention = KVCache(
            jnp.zeros(shape + (2 * self.z_dim,), dtype), jnp.zeros(shape + (self.hidden_dim,), dtype),
            jnp.zeros((batch,), jnp.int32),
        )
        ema = jnp.zeros((batch, self.dim, self.ema_dim), jnp.promote_types(dtype, jnp.float32))
        return MegaCache(ema=ema, attention=attention)

    def visible_pairs(self, seq_len: int, kv_len: int | None = None) -> int:
        """(query, key) pairs the causal (chunked) mask lets through for one sequence: queries
        ``i < seq_len`` at positions ``kv_len - seq_len + i`` among ``kv_len`` keys, each seeing
        the keys ``j <= i`` of its own chunk (all earlier keys without ``chunk_size``)."""
        owner = "Mega.visible_pairs"
        seq_len = check_int(owner, "seq_len", seq_len)
        kv_len = seq_len if kv_len is None else check_int(owner, "kv_len", kv_len)
        position = np.arange(seq_len, dtype=np.int64) + max(kv_len - seq_len, 0)
        if self.chunk_size is None:
            return int(np.minimum(position + 1, kv_len).sum())
        return int((position % self.chunk_size + 1).sum())

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward FLOPs for one sequence, 2 per multiply-add, with ``T = seq_len``, ``P`` =
        :meth:`visible_pairs` ``(T, kv_len)``::

            projections:   2 T (D E + D D + D Z + D E + D D + E D)   (v, u, z, r, hx, h)
            scores:        2 P (2 Z)           (q . k plus the rotary bias features)
            weights @ v:   2 P E
            EMA:           4 T D N             (state update and read-out of the recurrence)

        Gates, activations, softmax and biases are not counted. Returns an int.
        """
        seq_len = check_int("Mega.flops", "seq_len", seq_len)
        pairs = self.visible_pairs(seq_len, kv_len)
        d, z, e, n = self.dim, self.z_dim, self.hidden_dim, self.ema_dim
        projections = 2 * seq_len * d * (2 * e + 2 * d + z + e)
        return int(projections + 2 * pairs * (2 * z + e) + 4 * seq_len * d * n)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def ema_coefficients(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(alpha * beta, q = 1 - alpha * delta, eta = gamma / sqrt(N))``, each ``[D, N]`` in ``dtype``."""
        p = jax.nn.sigmoid(self.ema_delta[...].astype(dtype))
        damping = jax.nn.sigmoid(self.ema_alpha[...].astype(dtype))
        pb = p * self.ema_beta[...].astype(dtype)
        q = 1.0 - p * damping
        eta = self.ema_gamma[...].astype(dtype) * math.sqrt(1.0 / self.ema_dim)
        return pb, q, eta

    def _check_call(self, x, segment_ids, cache, valid_lengths):
        return check_mixer_call("Mega", x, self.dim, segment_ids, cache, valid_lengths, self._check_cache)

    def _check_cache(self, cache, batch: int):
        if not isinstance(cache, MegaCache):
            raise TypeError(f"Mega: cache must be a MegaCache from init_cache, got {type(cache).__name__}")
        kv = cache.attention
        want_k = (batch, kv.max_len, 1, 2 * self.z_dim)
        want_v = (batch, kv.max_len, 1, self.hidden_dim)
        if (tuple(kv.k.shape) != want_k or tuple(kv.v.shape) != want_v or tuple(kv.lengths.shape) != (batch,)):
            raise ValueError(
                f"Mega: cache.attention must hold k {want_k}, v {want_v} [B,S,1,2Z|E] and lengths ({batch},), got "
                f"k {tuple(kv.k.shape)}, v {tuple(kv.v.shape)}, lengths {tuple(kv.lengths.shape)}"
            )
        want = (batch, self.dim, self.ema_dim)
        if tuple(cache.ema.shape) != want:
            raise ValueError(f"Mega: cache.ema must have shape {want} [B,D,N], got {tuple(cache.ema.shape)}")

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MegaCache | None = None,
        valid_lengths: jax.Array | None = None,
    ):
        """MEGA over a sequence, or a prefill / decoding step against a cache.

        Args:
          x: ``[B, T, D]``.
          segment_ids: ``[B, T]`` ints, packed documents: the EMA state restarts at zero and
            attention (and its chunks) restart at every change of id. Not combined with ``cache``.
          positions: ``[B, T]`` or ``[T]`` positions of the rotary position bias; default
            ``arange(T)`` (with a cache ``cache.lengths[b] + arange(T)``). The bias depends on
            position differences only.
          cache: a :class:`MegaCache` from :meth:`init_cache`; T > 1 is a prefill, T == 1 a step.
          valid_lengths: with a cache, ``[B]`` real tokens of x per row (right padding, default
            T): padding does not enter the EMA state and each row's length advances by its own
            count. Outputs at padding positions are unspecified.

        Returns ``y [B, T, D]`` in the compute dtype; with a cache ``(y, new_cache)``.
        """
        mask = self._check_call(x, segment_ids, cache, valid_lengths)
        batch, length, _ = x.shape
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        state_dtype = jnp.promote_types(dtype, jnp.float32)

        # -- the EMA ---------------------------------------------------------------------------
        pb, q, eta = self.ema_coefficients(state_dtype)
        u = x.astype(state_dtype)
        if mask is not None:
            u = jnp.where(mask[..., None], u, 0)
        new_ema = None
        if cache is not None and length == 1:
            h = pb * u[:, 0, :, None] + q * cache.ema.astype(state_dtype)
            ema_out = jnp.einsum("bdn,dn->bd", h, eta)[:, None]
            new_ema = h if mask is None else jnp.where(mask[:, :1, None], h, cache.ema)
        else:
            resets = None
            if segment_ids is not None:
                segment_ids = jnp.asarray(segment_ids)
                resets = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
            initial = None if cache is None else cache.ema.astype(state_dtype)
            ema_out, last = ema_chunked(u, pb, q, eta, chunk_size=self.ema_chunk_size, resets=resets, initial=initial)
            if cache is not None:
                new_ema = last if mask is None else self._final_state(u, mask, pb, q, initial)
        omega = self.omega[...].astype(state_dtype)
        mx = jax.nn.silu(ema_out + omega * x.astype(state_dtype)).astype(dtype)

        # -- gated attention -------------------------------------------------------------------
        v = jax.nn.silu(self.v_proj(x))
        gate = jax.nn.sigmoid(self.u_proj(mx))
        zq = jax.nn.silu(self.z_proj(mx))
        r = jax.nn.silu(self.r_proj(mx))
        hx = self.hx_proj(mx)
        gamma, beta = self.qk_gamma[...].astype(dtype), self.qk_beta[...].astype(dtype)
        query = zq * gamma[0] + beta[0]
        key = zq * gamma[1] + beta[1]
        if positions is None:
            start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.attention.lengths.astype(jnp.int32)
            positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.asarray(positions), (batch, length))
        query, key = self._augment(query, key, positions, dtype)
        value = v[:, :, None, :]
        if cache is None:
            out = self._attend(query, key, value, self._block_ids(segment_ids, batch, length))
            new_cache = None
        else:
            out, kv = self._attend_cached(query, key, value, cache.attention, valid_lengths)
            new_cache = MegaCache(ema=new_ema.astype(cache.ema.dtype), attention=kv)
        attended = out[:, :, 0, :].astype(dtype)
        h = jax.nn.silu(hx + self.h_proj(attended * r))
        stat = jnp.promote_types(dtype, jnp.float32)
        if self.gated_residual:
            y = (gate.astype(stat) * (h.astype(stat) - x.astype(stat)) + x.astype(stat)).astype(dtype)
        else:
            y = (gate * h).astype(dtype)
        return y if new_cache is None else (y, new_cache)

    def _final_state(self, u, mask, pb, q, initial):
        """EMA state after each row's last valid token (right padding): the row rolled so that
        token is last, run from zero, plus ``q^len`` times the initial state."""
        batch, length, _ = u.shape
        lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        rolled = jax.vmap(lambda row, shift: jnp.roll(row, shift, axis=0))(u, length - lengths)
        _, last = ema_chunked(rolled, pb, q, jnp.zeros_like(q), chunk_size=self.ema_chunk_size)
        decay = jnp.exp(lengths.astype(u.dtype)[:, None, None] * jnp.log(jnp.maximum(q, jnp.finfo(u.dtype).tiny)))
        return last + decay * initial

    def _augment(self, query, key, positions, dtype):
        """``[Z^-0.5 q, rot(b_alpha)]`` and ``[k, rot(b_beta)]`` as ``[B, T, 1, 2Z]``: their dot
        product is the scaled score plus the rotary relative position bias."""
        batch, length, z = query.shape
        rotate = lambda p: apply_rope(  # noqa: E731
            jnp.broadcast_to(p[...].astype(dtype), (batch, length, 1, z)), positions, theta=10000.0
        )
        query = jnp.concatenate([(query * z**-0.5)[:, :, None], rotate(self.bias_alpha)], axis=-1)
        key = jnp.concatenate([key[:, :, None], rotate(self.bias_beta)], axis=-1)
        return query, key

    def _block_ids(self, segment_ids, batch, length):
        """Attention segment ids of a forward pass: documents, split in chunks of ``chunk_size``
        positions counted from each document's start; None when neither applies."""
        if self.chunk_size is None:
            return None if segment_ids is None else jnp.asarray(segment_ids)
        index = jnp.arange(length, dtype=jnp.int32)[None, :]
        if segment_ids is None:
            return jnp.broadcast_to(index // self.chunk_size, (batch, length))
        starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
        first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
        offset = index - first
        new_block = starts | (offset % self.chunk_size == 0)
        return jnp.cumsum(new_block, axis=1, dtype=jnp.int32)

    def _options(self):
        options = dict(scale=1.0, impl=self.impl)
        return options

    def _uses_pallas(self) -> bool:
        return pk_common.resolve_impl(self.impl, "Mega") == "pallas"

    def _attend(self, q, k, v, ids, kv_ids=None):
        """``pk.attention`` (causal, bottom-right aligned) with segment ids ``ids`` (or
        ``(ids, kv_ids)``), shard-mapped over batch for Pallas under a mesh."""
        options = self._options()
        if self.block_sizes is not None:
            options["block_sizes"] = self.block_sizes
        if ids is None:
            def attend(q, k, v):
                return pk.attention(q, k, v, causal=True, **options)
            args, layouts = (q, k, v), ("BTHD", "BSHD", "BSHD")
        else:
            kv_ids = ids if kv_ids is None else kv_ids

            def attend(q, k, v, q_ids, kv_ids):
                return pk.attention(q, k, v, causal=True, segment_ids=(q_ids, kv_ids), **options)
            args, layouts = (q, k, v, ids, kv_ids), ("BTHD", "BSHD", "BSHD", "BT", "BS")
        if not self._uses_pallas():
            return attend(*args)
        return shard_map_batch_heads(attend, args, layouts, "BTHD", self.mesh_axes, owner="Mega")

    def _decode(self, q, k_cache, v_cache, lengths):
        def decode(q, k_cache, v_cache, lengths):
            return pk.attention_decode(q, k_cache, v_cache, lengths, **self._options())

        if not self._uses_pallas():
            return decode(q, k_cache, v_cache, lengths)
        return shard_map_batch_heads(
            decode, (q, k_cache, v_cache, lengths), ("BHD", "BSHD", "BSHD", "B"), "BHD", self.mesh_axes, owner="Mega"
        )

    def _attend_cached(self, q, k, v, cache: KVCache, valid_lengths):
        """Writes k/v at each row's position and attends over the cache (as :class:`Attention`):
        rows rolled so their newest token is last; unwritten slots, and with ``chunk_size`` slots
        of earlier chunks, hidden by segment ids."""
        batch, length = q.shape[:2]
        max_len = cache.max_len
        starts = cache.lengths.astype(jnp.int32)
        if not isinstance(starts, jax.core.Tracer) and int(jnp.max(starts)) + length > max_len:
            raise ValueError(
                f"Mega: cache overflow: a row holds {int(jnp.max(starts))} tokens, writing {length} "
                f"more exceeds max_len={max_len}"
            )
        if valid_lengths is None:
            advance = jnp.full((batch,), length, jnp.int32)
        else:
            advance = jnp.clip(jnp.asarray(valid_lengths).astype(jnp.int32), 0, length)
        k_all, v_all = _write_rows(cache.k, k, starts), _write_rows(cache.v, v, starts)
        ends = starts + length
        if length == 1 and self.chunk_size is None:
            out = self._decode(q[:, 0], k_all.astype(q.dtype), v_all.astype(q.dtype), ends)[:, None]
        else:
            shifts = max_len - ends
            roll = jax.vmap(lambda row, shift: jnp.roll(row, shift, axis=0))
            slots = jnp.arange(max_len, dtype=jnp.int32)[None, :]
            chunk = max_len if self.chunk_size is None else self.chunk_size
            kv_ids = jnp.where(slots < ends[:, None], slots // chunk, -1)
            kv_ids = roll(kv_ids, shifts)
            q_ids = (starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]) // chunk
            k_view, v_view = roll(k_all, shifts).astype(q.dtype), roll(v_all, shifts).astype(q.dtype)
            out = self._attend(q, k_view, v_view, q_ids, kv_ids)
        overflow = ends > max_len
        out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
        return out, KVCache(k_all, v_all, starts + advance)
