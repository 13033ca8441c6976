"""Delta-rule token mixers: DeltaNet, Gated DeltaNet and Kimi Delta Attention (KDA).

>>> m = GatedDeltaNet(dim=256, num_heads=4, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,T,256] -> [B,T,256], causal
>>> y = m(x, segment_ids=ids)                  # packed documents: the state restarts per document
>>> cache = m.init_cache(batch=B, max_len=1024)
>>> y, cache = m(prompt, cache=cache)          # prefill (T > 1), chunked op from the cached state
>>> y, cache = m(token, cache=cache)           # one decoding step (T == 1), one-token op

All three follow the layers of flash-linear-attention (fla, ``fla/layers/delta_net.py``,
``fla/layers/gated_deltanet.py``, ``fla/layers/kda.py``, read at commit ``bc3b101``):

1. ``q, k, v`` projections, each followed by a causal depthwise short convolution (kernel 4) and
   SiLU (:class:`attnzoo.layers.common.ShortConvolution`);
2. ``q`` and ``k`` L2-normalised per head (``x / sqrt(sum x^2 + 1e-6)``, fla's ``l2norm``; the op
   does not normalise), ``beta = sigmoid(b_proj x)`` (times 2 with ``allow_neg_eigval``, Grazzi et
   al. 2024, arXiv:2411.12537), and for the gated variants a log-decay ``g <= 0``;
3. the recurrence per head (``S [K, V]``, read after the write, scale ``K ** -0.5``)::

       S_t = decay_t(S_{t-1});  S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T;  o_t = K^-1/2 S_t^T q_t

   with no decay (DeltaNet: ``pk.delta_rule``), ``exp(g_t)`` per head (Gated DeltaNet:
   ``pk.gated_delta_rule``) or ``diag(exp(g_t))`` per key channel (KDA: ``pk.kda``);
4. a per-head RMSNorm of ``o`` (eps 1e-5), gated by ``silu(g_proj x)`` (DeltaNet with ``use_gate``,
   Gated DeltaNet) or ``sigmoid(g_b_proj g_a_proj x)`` (KDA), then ``o_proj``.

Padding and caches: with ``valid_lengths`` (right padding) the keys, values and log-decays of
padding tokens are zeroed after the short convolutions, which leaves the recurrent state unchanged
(``k = 0`` writes nothing, ``g = 0`` decays nothing); the short convolutions return their state after
each row's last real token. The cache is :class:`attnzoo.layers.common.RecurrentCache`:
``state [B, Hv, K, V]`` float32 (float64 for float64 parameters), ``conv = (q, k, v)`` states
``[B, conv_size - 1, C]`` (empty without short convolutions), ``lengths [B]`` int32.

Parameters carry the logical axis names of :mod:`attnzoo.layers.common`; a low-rank bottleneck axis
(KDA's ``f_a_proj`` / ``g_a_proj`` outputs) is unnamed (None, replicated). ``A_log`` and ``dt_bias``
are excluded from weight decay in fla (``_no_weight_decay``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import (
    Dense,
    DType,
    GatedRMSNorm,
    MeshAxes,
    RecurrentCache,
    RecurrentMixer,
    RMSNorm,
    ShortConvolution,
    check_bool,
    check_choice,
    compute_dtype,
    dt_bias_init,
    log_uniform_a_init,
    partitioned,
)
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "DeltaNet",
    "GatedDeltaNet",
    "KimiDeltaAttention",
    "l2_normalize",
    "delta_rule_chunk_flops",
]

L2_NORM_EPS = 1e-6  # fla's l2norm default (use_qk_l2norm_in_kernel)


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = L2_NORM_EPS) -> jax.Array:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last axis; statistics in float32 (or wider),
    result in x's dtype. A zero vector stays zero."""
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(stat_dtype)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _sum_normalize(x: jax.Array) -> jax.Array:
    """fla's ``sum_norm``: ``x / sum(x, -1)`` (DeltaNet's ``qk_norm="sum"``)."""
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(stat_dtype)
    return (xf / jnp.sum(xf, axis=-1, keepdims=True)).astype(x.dtype)


def _elu_plus_one(x: jax.Array) -> jax.Array:
    return jax.nn.elu(x) + 1.0


_QK_ACTIVATIONS = {"silu": None, "relu": jax.nn.relu, "elu": _elu_plus_one, "identity": lambda x: x}


def delta_rule_chunk_flops(seq_len: int, heads: int, key_dim: int, value_dim: int, chunk_size: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of the chunkwise delta rule (WY form) over one sequence.

    The sequence is cut into chunks of ``chunk_size`` tokens (the last one shorter). For a chunk of
    ``c`` tokens and one head, with ``K = key_dim``, ``V = value_dim`` and the chunk-start state
    ``S [K, V]``::

        scores Q K^T, interactions (beta K) K^T:      2 * 2 c^2 K
        (I + A)^-1 by forward substitution:            (c^3 - c) / 3
        W = (I + A)^-1 (beta K), U' = (..)(beta V):    2 c^2 K + 2 c^2 V
        U = U' - W S, output Q S, state K^T U:         3 * 2 c K V
        intra-chunk output P U:                        2 c^2 V

    i.e. ``6 c^2 K + 4 c^2 V + 6 c K V + (c^3 - c) / 3`` per chunk and head; decays (gated
    variants) are elementwise and not counted. In-chunk products are counted whole (not halved
    by causality), as the chunked algorithm computes them.
    """
    total = 0
    full, rest = divmod(seq_len, chunk_size)
    for size, count in ((chunk_size, full), (rest, 1 if rest else 0)):
        c = size
        per_chunk = 6 * c * c * key_dim + 4 * c * c * value_dim + 6 * c * key_dim * value_dim + (c**3 - c) // 3
        total += count * per_chunk
    return int(total * heads)


def _integer_width(owner: str, name: str, base: int, factor, what: str) -> int:
    """``base * factor`` as an int, or ValueError when it is not a positive integer."""
    factor = check_float(owner, name, factor, positive=True, allow_none=False)
    width = base * factor
    if not math.isclose(width, round(width), rel_tol=1e-5) or round(width) < 1:
        raise ValueError(
            f"{owner}: {name}={factor} times {what} ({base}) must be a positive integer, got {width}"
        )
    return int(round(width))


# ----------------------------------------------------------------------------------------------
# The shared layer skeleton
# ----------------------------------------------------------------------------------------------


class _DeltaRuleMixer(RecurrentMixer):
    """Projections, short convolutions and the forward shared by the three delta-rule mixers.

    Subclasses set ``_op`` and the sizes (``num_heads``, ``num_v_heads``, ``head_k_dim``,
    ``head_v_dim``), build their gate and output parameters and define ``_beta_and_gate(x,
    stat_dtype) -> (beta [B,T,Hv], g or None)``, ``_readout(o, x) -> y`` and
    ``_projection_flops(seq_len)``; ``_qk_features`` (L2 normalisation) may be overridden.
    """

    def _build_qkv(self, *, use_short_conv, conv_size, conv_bias, qk_conv_activation, dense, rngs):
        """q/k ``[D, H, K]``, v ``[D, Hv, V]`` projections and their short convolutions."""
        owner = type(self).__name__
        self.use_short_conv = check_bool(owner, "use_short_conv", use_short_conv)
        self.conv_size = check_int(owner, "conv_size", conv_size)
        conv_bias = check_bool(owner, "conv_bias", conv_bias)
        self.qk_conv_activation = qk_conv_activation
        h, hv, dk, dv = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        self.q_proj = Dense(self.dim, (h, dk), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.k_proj = Dense(self.dim, (h, dk), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.v_proj = Dense(self.dim, (hv, dv), logical_axes=("embed", "heads", "head_dim"), **dense)
        if self.use_short_conv:
            conv = dict(
                use_bias=conv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                logical_axes=("conv_kernel", "heads"), rngs=rngs,
            )
            self.q_conv1d = ShortConvolution(h * dk, self.conv_size, activation=qk_conv_activation, **conv)
            self.k_conv1d = ShortConvolution(h * dk, self.conv_size, activation=qk_conv_activation, **conv)
            self.v_conv1d = ShortConvolution(hv * dv, self.conv_size, activation="silu", **conv)
        else:
            self.q_conv1d = self.k_conv1d = self.v_conv1d = None

    def _conv_modules(self):
        return (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.use_short_conv else ()

    def _state_shape(self, batch):
        return (batch, self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add).

        ``projections(T)`` (see the class docstring) plus
        :func:`delta_rule_chunk_flops` ``(T, Hv, K, V, chunk_size)`` for the chunked op. ``kv_len``
        (tokens already in a cache) does not change the cost of a recurrent layer: it is checked
        and ignored. Short convolutions, norms, gates and activations are not counted.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        op = delta_rule_chunk_flops(seq_len, self.num_v_heads, self.head_k_dim, self.head_v_dim, self.chunk_size)
        return int(self._projection_flops(seq_len) + op)

    def _qk_features(self, q: jax.Array, k: jax.Array):
        """Activation (when not in the convolution) and normalisation of ``q, k [B,T,H,K]``."""
        return l2_normalize(q), l2_normalize(k)

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RecurrentCache | None = None,
        valid_lengths: jax.Array | None = None,
    ):
        """The mixer over a sequence, or a prefill / decoding step from a cache.

        Args:
          x: ``[B, T, D]`` floating.
          segment_ids: ``[B, T]`` ints, packed documents: the recurrent state and the short
            convolutions restart where the id changes. Not combined with ``cache``.
          positions: accepted for the uniform mixer interface and unused (no position encoding).
          cache: a :class:`RecurrentCache` from :meth:`init_cache`. T == 1 is one decoding step
            (one-token op and ``ShortConvolution.step``), T > 1 a prefill (chunked op from
            ``cache.state``).
          valid_lengths: with a cache, ``[B]`` ints, real (non-padding) tokens of x per row (right
            padding; default T): each row's state ends after its own last real token. Outputs at
            padding positions are unspecified.

        Returns ``y [B, T, D]`` in the compute dtype; with a cache ``(y, new_cache)``.
        """
        del positions
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        stat_dtype = jnp.promote_types(dtype, jnp.float32)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        convs: list = []
        if self.use_short_conv:
            kw = dict(segment_ids=segment_ids, cache=cache, mask=mask, new_convs=convs)
            q, k, v = self._convolve(0, q, **kw), self._convolve(1, k, **kw), self._convolve(2, v, **kw)
        else:
            if self.qk_conv_activation == "silu":
                q, k = jax.nn.silu(q), jax.nn.silu(k)
            v = jax.nn.silu(v)
        q, k = self._qk_features(q, k)
        beta, g = self._beta_and_gate(x, stat_dtype)
        groups = self.num_v_heads // self.num_heads
        if groups > 1:  # grouped value attention: value head i reads query/key head i // groups
            q, k = jnp.repeat(q, groups, axis=2), jnp.repeat(k, groups, axis=2)
        o, state = self._recur(q, k, v, g, beta, segment_ids=segment_ids, cache=cache, mask=mask)
        y = self._readout(o.astype(dtype), x)
        return self._finish(y, cache, state, convs, mask, x.shape[1])


def _sigmoid_beta(b_proj: Dense, x: jax.Array, stat_dtype, allow_neg_eigval: bool) -> jax.Array:
    beta = jax.nn.sigmoid(b_proj(x).astype(stat_dtype))
    return beta * 2.0 if allow_neg_eigval else beta


# ----------------------------------------------------------------------------------------------
# DeltaNet
# ----------------------------------------------------------------------------------------------


@register_mixer("deltanet")
class DeltaNet(_DeltaRuleMixer):
    """DeltaNet: linear attention with the delta-rule update (``pk.delta_rule``).

    Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
    (arXiv:2406.06484); Schlag et al. 2021 (arXiv:2102.11174). Layer of fla
    ``fla/layers/delta_net.py``::

        q, k = act(conv(q_proj x)), v = silu(conv(v_proj x))    act: silu inside the conv, or
                                                                 relu / elu+1 / identity after it
        q, k = l2norm(q), l2norm(k)   (or x / sum(x) with qk_norm="sum")
        beta = sigmoid(b_proj x)  (ones without use_beta; times 2 with allow_neg_eigval)
        o = delta_rule(q, k, v, beta);  y = o_proj(RMSNorm(o))  or  o_proj(RMSNorm(o) * silu(g_proj x))

    Args:
      dim: model width ``D``. num_heads: heads ``H``.
      expand_k / expand_v: key / value widths ``D * expand`` (each divisible by ``H``; per head
        ``K``, ``V``), fla's defaults 1.0.
      use_beta: learn ``b_proj [D, H]`` (else beta = 1). use_gate: output gate ``g_proj [D, H, V]``
        with a SiLU-gated RMSNorm. allow_neg_eigval: beta in (0, 2).
      use_short_conv / conv_size / conv_bias: the short convolutions (fla: True, 4, False).
      qk_activation: "silu" | "relu" | "elu" | "identity". qk_norm: "l2" | "sum". norm_eps: of the
        output RMSNorm (1e-5).
      impl: the op's "auto" | "reference" | "xla" | "pallas". chunk_size: the op's chunk (power of
        two >= 16). mesh_axes: :class:`MeshAxes` sharding batch and heads of the Pallas op under
        an active mesh (see :mod:`attnzoo.layers.common`).
      dtype: compute dtype (default: promotion of input and params); states are float32.
      param_dtype: parameter dtype. kernel_init: initializer of the projection kernels (default
        Lecun normal). rngs: ``nnx.Rngs`` with a ``params`` stream.

    Parameters: ``q_proj``/``k_proj.kernel [D, H, K]``, ``v_proj.kernel [D, H, V]`` (embed, heads,
    head_dim); ``b_proj.kernel [D, H]`` (embed, heads); ``q_conv1d``/``k_conv1d.weight [4, H*K]``,
    ``v_conv1d.weight [4, H*V]`` (conv_kernel, heads); ``g_proj.kernel [D, H, V]``;
    ``o_norm.scale [V]`` or ``o_norm.norm.scale [V]`` (norm); ``o_proj.kernel [H, V, D]``.

    FLOPs: projections ``2 T D (2 H K + H V + H [use_beta] + H V [use_gate]) + 2 T H V D``.
    """

    _op = "delta_rule"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_beta: bool = True,
        use_gate: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        qk_activation: str = "silu",
        qk_norm: str = "l2",
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        key_dim = _integer_width(owner, "expand_k", self.dim, expand_k, "dim")
        value_dim = _integer_width(owner, "expand_v", self.dim, expand_v, "dim")
        for name, width in (("expand_k", key_dim), ("expand_v", value_dim)):
            if width % self.num_heads:
                raise ValueError(
                    f"{owner}: num_heads ({self.num_heads}) must divide dim * {name} ({width})"
                )
        self.num_v_heads = self.num_heads
        self.head_k_dim = key_dim // self.num_heads
        self.head_v_dim = value_dim // self.num_heads
        self.use_beta = check_bool(owner, "use_beta", use_beta)
        self.use_gate = check_bool(owner, "use_gate", use_gate)
        self.allow_neg_eigval = check_bool(owner, "allow_neg_eigval", allow_neg_eigval)
        self.qk_activation = check_choice(owner, "qk_activation", qk_activation, tuple(_QK_ACTIVATIONS))
        self.qk_norm = check_choice(owner, "qk_norm", qk_norm, ("l2", "sum"))
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)

        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self._build_qkv(
            use_short_conv=use_short_conv, conv_size=conv_size, conv_bias=conv_bias,
            qk_conv_activation="silu" if qk_activation == "silu" else None, dense=dense, rngs=rngs,
        )
        h, dv = self.num_heads, self.head_v_dim
        self.b_proj = Dense(self.dim, h, logical_axes=("embed", "heads"), **dense) if self.use_beta else None
        norm = dict(epsilon=self.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if self.use_gate:
            self.g_proj = Dense(self.dim, (h, dv), logical_axes=("embed", "heads", "head_dim"), **dense)
            self.o_norm = GatedRMSNorm(dv, activation="silu", **norm)
        else:
            self.g_proj = None
            self.o_norm = RMSNorm(dv, **norm)
        self.o_proj = Dense((h, dv), self.dim, logical_axes=("heads", "head_dim", "embed"), **dense)

    def _projection_flops(self, seq_len: int) -> int:
        d, h, dk, dv = self.dim, self.num_heads, self.head_k_dim, self.head_v_dim
        outputs = 2 * h * dk + h * dv + (h if self.use_beta else 0) + (h * dv if self.use_gate else 0)
        return 2 * seq_len * d * outputs + 2 * seq_len * h * dv * d

    def _qk_features(self, q, k):
        activation = _QK_ACTIVATIONS[self.qk_activation]
        if activation is not None:
            q, k = activation(q), activation(k)
        if self.qk_norm == "sum":
            return _sum_normalize(q), _sum_normalize(k)
        return l2_normalize(q), l2_normalize(k)

    def _beta_and_gate(self, x, stat_dtype):
        if self.b_proj is None:
            beta = jnp.ones(x.shape[:2] + (self.num_heads,), stat_dtype)
            return (beta * 2.0 if self.allow_neg_eigval else beta), None
        return _sigmoid_beta(self.b_proj, x, stat_dtype, self.allow_neg_eigval), None

    def _readout(self, o, x):
        o = self.o_norm(o, self.g_proj(x)) if self.use_gate else self.o_norm(o)
        return self.o_proj(o)


# ----------------------------------------------------------------------------------------------
# Gated DeltaNet
# ----------------------------------------------------------------------------------------------


def _head_sizes(owner: str, dim: int, num_heads: int, num_v_heads, head_dim, expand_v):
    """(num_v_heads, head_k_dim, head_v_dim) as in fla's GatedDeltaNet / KDA constructors."""
    num_v_heads = num_heads if num_v_heads is None else check_int(owner, "num_v_heads", num_v_heads)
    if num_v_heads % num_heads:
        raise ValueError(f"{owner}: num_v_heads ({num_v_heads}) must be a multiple of num_heads ({num_heads})")
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"{owner}: num_heads ({num_heads}) must divide dim ({dim}) when head_dim is not given")
        head_dim = dim // num_heads
    head_dim = check_int(owner, "head_dim", head_dim)
    head_v_dim = _integer_width(owner, "expand_v", head_dim, expand_v, "head_dim")
    return num_v_heads, head_dim, head_v_dim


@register_mixer("gated_deltanet")
class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet: the delta rule on a state decayed per head (``pk.gated_delta_rule``).

    Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
    (arXiv:2412.06464; NVlabs/GatedDeltaNet ``lit_gpt/gated_delta_net.py``). Layer of fla
    ``fla/layers/gated_deltanet.py`` (gate: ``fla/ops/gated_delta_rule/gate.py``)::

        q, k, v = silu(conv(q_proj x)), silu(conv(k_proj x)), silu(conv(v_proj x))
        q, k = l2norm(q), l2norm(k);  beta = sigmoid(b_proj x)  (times 2 with allow_neg_eigval)
        g = -exp(A_log) * softplus(a_proj x + dt_bias)            log-decay per value head, <= 0
        o = gated_delta_rule(q, k, v, g, beta)
        y = o_proj(RMSNorm(o) * silu(g_proj x))    (o_proj(RMSNorm(o)) without use_gate)

    Initialisation (fla, Mamba-2): ``A = exp(A_log) ~ U[0, 16]``; ``dt_bias = softplus^-1(dt)``,
    ``dt`` log-uniform in ``[0.001, 0.1]`` floored at ``1e-4``.

    Args:
      dim: model width ``D``. num_heads: query/key heads ``H``.
      head_dim: key dim per head ``K``; default ``D / H`` (fla's default is a fixed 256).
      expand_v: value dim per head ``V = K * expand_v`` (fla default 2).
      num_v_heads: value heads ``Hv`` (a multiple of ``H``; default ``H``): grouped value attention,
        value head ``i`` reads query/key head ``i // (Hv / H)``; the op runs ``Hv`` heads.
      use_gate: the SiLU output gate ``g_proj`` (fla default True). allow_neg_eigval: beta in (0, 2).
      use_short_conv / conv_size / conv_bias: the short convolutions (True, 4, False).
      norm_eps: of the output RMSNorm (1e-5).
      impl, chunk_size, mesh_axes, dtype, param_dtype, kernel_init, rngs: as in :class:`DeltaNet`.

    Parameters: ``q_proj``/``k_proj.kernel [D, H, K]``, ``v_proj``/``g_proj.kernel [D, Hv, V]``
    (embed, heads, head_dim); ``a_proj``/``b_proj.kernel [D, Hv]`` (embed, heads); ``A_log``,
    ``dt_bias [Hv]`` (heads); conv weights ``[4, H*K]``, ``[4, Hv*V]`` (conv_kernel, heads);
    ``o_norm.norm.scale`` / ``o_norm.scale [V]`` (norm); ``o_proj.kernel [Hv, V, D]``.

    FLOPs: projections ``2 T D (2 H K + Hv V + 2 Hv + Hv V [use_gate]) + 2 T Hv V D``.
    """

    _op = "gated_delta_rule"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        num_v_heads: int | None = None,
        use_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self.num_v_heads, self.head_k_dim, self.head_v_dim = _head_sizes(
            owner, self.dim, self.num_heads, num_v_heads, head_dim, expand_v
        )
        self.use_gate = check_bool(owner, "use_gate", use_gate)
        self.allow_neg_eigval = check_bool(owner, "allow_neg_eigval", allow_neg_eigval)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)

        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self._build_qkv(
            use_short_conv=use_short_conv, conv_size=conv_size, conv_bias=conv_bias,
            qk_conv_activation="silu", dense=dense, rngs=rngs,
        )
        hv, dv = self.num_v_heads, self.head_v_dim
        self.a_proj = Dense(self.dim, hv, logical_axes=("embed", "heads"), **dense)
        self.b_proj = Dense(self.dim, hv, logical_axes=("embed", "heads"), **dense)
        a_init = log_uniform_a_init(0.0, 16.0)
        self.A_log = nnx.Param(partitioned(a_init, ("heads",))(rngs.params(), (hv,), param_dtype))
        self.dt_bias = nnx.Param(partitioned(dt_bias_init(), ("heads",))(rngs.params(), (hv,), param_dtype))
        norm = dict(epsilon=self.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if self.use_gate:
            self.g_proj = Dense(self.dim, (hv, dv), logical_axes=("embed", "heads", "head_dim"), **dense)
            self.o_norm = GatedRMSNorm(dv, activation="silu", **norm)
        else:
            self.g_proj = None
            self.o_norm = RMSNorm(dv, **norm)
        self.o_proj = Dense((hv, dv), self.dim, logical_axes=("heads", "head_dim", "embed"), **dense)

    def _projection_flops(self, seq_len: int) -> int:
        d, h, hv, dk, dv = self.dim, self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        outputs = 2 * h * dk + hv * dv + 2 * hv + (hv * dv if self.use_gate else 0)
        return 2 * seq_len * d * outputs + 2 * seq_len * hv * dv * d

    def _beta_and_gate(self, x, stat_dtype):
        beta = _sigmoid_beta(self.b_proj, x, stat_dtype, self.allow_neg_eigval)
        a = self.a_proj(x).astype(stat_dtype) + self.dt_bias[...].astype(stat_dtype)
        g = -jnp.exp(self.A_log[...].astype(stat_dtype)) * jax.nn.softplus(a)
        return beta, g

    def _readout(self, o, x):
        o = self.o_norm(o, self.g_proj(x)) if self.use_gate else self.o_norm(o)
        return self.o_proj(o)


# ----------------------------------------------------------------------------------------------
# Kimi Delta Attention
# ----------------------------------------------------------------------------------------------


@register_mixer("kda")
class KimiDeltaAttention(_DeltaRuleMixer):
    """Kimi Delta Attention: the delta rule on a state decayed per key channel (``pk.kda``).

    Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture"
    (arXiv:2510.26692; MoonshotAI/Kimi-Linear). Layer of fla ``fla/layers/kda.py`` (gate:
    ``fla/ops/kda/gate.py``)::

        q, k, v = silu(conv(q_proj x)), silu(conv(k_proj x)), silu(conv(v_proj x))
        q, k = l2norm(q), l2norm(k);  beta = sigmoid(b_proj x)  (times 2 with allow_neg_eigval)
        f = f_b_proj(f_a_proj x)                                   low rank: D -> V -> Hv*K
        g = -exp(A_log[h]) * softplus(f + dt_bias[h, :])           log-decay per head and key channel
            (with lower_bound lb: g = lb * sigmoid(exp(A_log[h]) * (f + dt_bias[h, :])))
        o = kda(q, k, v, g, beta)
        y = o_proj(RMSNorm(o) * sigmoid(g_b_proj(g_a_proj x)))     low rank: D -> V -> Hv*V

    Initialisation (fla): ``exp(A_log) ~ U[1, 16]`` (zeros with ``safe_gate``); ``dt_bias [Hv, K]``
    as in :class:`GatedDeltaNet` (fla stores it flat, ``[Hv*K]``).

    Args:
      dim: model width ``D``. num_heads: query/key heads ``H``.
      head_dim: key dim per head ``K``; default ``D / H`` (fla's default is a fixed 128).
      expand_v: value dim per head ``V = K * expand_v`` (fla default 1); also the rank of the
        low-rank gate projections.
      num_v_heads: value heads ``Hv`` (a multiple of ``H``), grouped value attention as in
        :class:`GatedDeltaNet`.
      allow_neg_eigval: beta in (0, 2). lower_bound: None or a negative float (fla's suggestion
        -5): the bounded gate above. safe_gate: fla's kernel flag that assumes the bounded gate
        (needs ``lower_bound``); here it only initialises ``A_log`` to zeros as fla does.
      output_gate_bias: bias of ``g_b_proj`` (fla True; the released Kimi-Linear checkpoints
        have none).
      use_short_conv / conv_size / conv_bias, norm_eps, impl, chunk_size, dtype, param_dtype,
      kernel_init, rngs: as in :class:`GatedDeltaNet`.

    Parameters: ``q_proj``/``k_proj.kernel [D, H, K]``, ``v_proj.kernel [D, Hv, V]`` (embed,
    heads, head_dim); ``b_proj.kernel [D, Hv]`` (embed, heads); ``f_a_proj``/``g_a_proj.kernel
    [D, V]`` (embed, None); ``f_b_proj.kernel [V, Hv, K]``, ``g_b_proj.kernel [V, Hv, V]`` (None,
    heads, head_dim) and ``g_b_proj.bias [Hv, V]``; ``A_log [Hv]`` (heads); ``dt_bias [Hv, K]``
    (heads, head_dim); conv weights (conv_kernel, heads); ``o_norm.norm.scale [V]`` (norm);
    ``o_proj.kernel [Hv, V, D]``.

    FLOPs: projections ``2 T D (2 H K + Hv V + Hv + 2 V) + 2 T V (Hv K + Hv V) + 2 T Hv V D``.
    """

    _op = "kda"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        num_v_heads: int | None = None,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        lower_bound: float | None = None,
        safe_gate: bool = False,
        output_gate_bias: bool = True,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self.num_v_heads, self.head_k_dim, self.head_v_dim = _head_sizes(
            owner, self.dim, self.num_heads, num_v_heads, head_dim, expand_v
        )
        self.allow_neg_eigval = check_bool(owner, "allow_neg_eigval", allow_neg_eigval)
        self.lower_bound = check_float(owner, "lower_bound", lower_bound)
        if self.lower_bound is not None and self.lower_bound >= 0:
            raise ValueError(f"{owner}: lower_bound must be a negative float or None, got {self.lower_bound}")
        self.safe_gate = check_bool(owner, "safe_gate", safe_gate)
        if self.safe_gate and self.lower_bound is None:
            raise ValueError(f"{owner}: safe_gate=True needs lower_bound (e.g. -5.0), got None")
        output_gate_bias = check_bool(owner, "output_gate_bias", output_gate_bias)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)

        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self._build_qkv(
            use_short_conv=use_short_conv, conv_size=conv_size, conv_bias=conv_bias,
            qk_conv_activation="silu", dense=dense, rngs=rngs,
        )
        hv, dk, dv = self.num_v_heads, self.head_k_dim, self.head_v_dim
        self.f_a_proj = Dense(self.dim, dv, logical_axes=("embed", None), **dense)
        self.f_b_proj = Dense(dv, (hv, dk), logical_axes=(None, "heads", "head_dim"), **dense)
        self.b_proj = Dense(self.dim, hv, logical_axes=("embed", "heads"), **dense)
        a_init = nnx.initializers.zeros if self.safe_gate else log_uniform_a_init(1.0, 16.0)
        self.A_log = nnx.Param(partitioned(a_init, ("heads",))(rngs.params(), (hv,), param_dtype))
        dt_init = partitioned(dt_bias_init(), ("heads", "head_dim"))
        self.dt_bias = nnx.Param(dt_init(rngs.params(), (hv, dk), param_dtype))
        self.g_a_proj = Dense(self.dim, dv, logical_axes=("embed", None), **dense)
        self.g_b_proj = Dense(
            dv, (hv, dv), logical_axes=(None, "heads", "head_dim"), use_bias=output_gate_bias, **dense
        )
        self.o_norm = GatedRMSNorm(
            dv, activation="sigmoid", epsilon=self.norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.o_proj = Dense((hv, dv), self.dim, logical_axes=("heads", "head_dim", "embed"), **dense)

    def _projection_flops(self, seq_len: int) -> int:
        d, h, hv, dk, dv = self.dim, self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        from_input = 2 * h * dk + hv * dv + hv + 2 * dv  # q, k, v, b, f_a, g_a
        low_rank = dv * (hv * dk + hv * dv)  # f_b, g_b
        return 2 * seq_len * (d * from_input + low_rank) + 2 * seq_len * hv * dv * d

    def _beta_and_gate(self, x, stat_dtype):
        beta = _sigmoid_beta(self.b_proj, x, stat_dtype, self.allow_neg_eigval)
        f = self.f_b_proj(self.f_a_proj(x)).astype(stat_dtype) + self.dt_bias[...].astype(stat_dtype)
        rate = jnp.exp(self.A_log[...].astype(stat_dtype))[:, None]  # [Hv, 1]
        if self.lower_bound is None:
            g = -rate * jax.nn.softplus(f)
        else:
            g = self.lower_bound * jax.nn.sigmoid(rate * f)
        return beta, g

    def _readout(self, o, x):
        return self.o_proj(self.o_norm(o, self.g_b_proj(self.g_a_proj(x))))
