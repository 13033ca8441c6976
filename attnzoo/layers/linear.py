"""Linear-attention token mixers: linear attention, Based (+ BaseConv), RetNet, Lightning, GLA.

>>> m = GatedLinearAttention(dim=256, num_heads=4, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,T,256] -> [B,T,256], causal
>>> y = m(x, segment_ids=ids)                  # packed documents: the state restarts per segment
>>> cache = m.init_cache(batch=B, max_len=1024)
>>> y, cache = m(prompt, cache=cache, valid_lengths=lens)   # prefill (T > 1), right-padded rows
>>> y, cache = m(token, cache=cache)           # one decoding step (T == 1)

Every mixer here is a causal recurrence over a matrix state per head, computed by the ops of
:mod:`attnzoo.pallas_kernels.linear_rnn` (``pk.linear_attention``, ``pk.simple_gla``, ``pk.gla``
and their ``*_step`` forms):

==================== ============================= =============================================
registered name      class                         recurrence (per head, ``S [K, V]``)
==================== ============================= =============================================
``linear_attention`` :class:`LinearAttention`      ``S_t = S_{t-1} + phi(k_t) v_t^T`` (fla)
``based``            :class:`Based`                same, Taylor features, normalised (Based)
``base_conv``        :class:`BaseConv`             no state: gated short convolution (Based)
``retnet``           :class:`MultiScaleRetention`  ``S_t = gamma_h S_{t-1} + k_t v_t^T`` (RetNet)
``lightning``        :class:`LightningAttention`   ``S_t = e^(-s_h) S_{t-1} + k_t v_t^T`` (TNL)
``gla``              :class:`GatedLinearAttention` ``S_t = diag(e^(g_t)) S_{t-1} + k_t v_t^T``
==================== ============================= =============================================

and the output is read after the update, ``o_t = scale * S_t^T q_t``. The parameterisations follow
the official code, read at these commits: fla-org/flash-linear-attention ``bc3b101``
(``fla/layers/{linear_attn,based,multiscale_retention,gla}.py``, ``fla/modules/feature_map.py``,
``fla/ops/retention``), HazyResearch/based ``32c1bd4`` (``based/models/mixers/{linear_attention,
convolution}.py``, ``train/configs/experiment/reference/based-*.yaml``),
OpenNLPLab/lightning-attention ``d15c385`` (``examples/module/tnl_attn.py``,
``lightning_attn/utils/utils.py``) and MiniMax-AI/MiniMax-M1 ``2abb4f4``
(``modeling_minimax_m1.py``, ``config.json``).

Shared contract (see DESIGN.md section 3): ``m(x, *, segment_ids=None, positions=None,
cache=None, valid_lengths=None)`` maps ``x [B, T, D]`` to ``y [B, T, D]`` in the compute dtype.
With a cache (:class:`attnzoo.layers.common.RecurrentCache` from :meth:`init_cache`) it returns
``(y, new_cache)``: ``T == 1`` runs the one-token ``*_step`` op, ``T > 1`` the chunked op from
``cache.state``. ``valid_lengths [B]`` marks right padding: keys, values and log-decays are zeroed
there, which leaves the state unchanged, and short convolutions keep the inputs before each row's
end, so every row's cache ends after its own last token. Recurrent states are float32 (float64
when the parameters are float64). ``flops(seq_len)`` counts the forward matmuls, 2 per
multiply-add, of the projections and of the op's chunked (``xla``) engine.

Chunked-algorithm cost, used by every ``flops`` (:func:`chunked_op_flops`): ``T`` is cut into
chunks of ``chunk_size`` tokens (the last one shorter), and per head a chunk of ``c`` tokens with
the state ``S [K, V]`` entering it costs four matmuls, ``Q K^T`` and ``P V`` within the chunk
(counted whole, as computed, not halved by causality), ``Q S`` and ``K^T V`` against the state::

    2 c^2 (K + V) + 4 c K V

(with ``normalize`` the value width is ``V + 1``: the normaliser rides as an extra column). Padding
an implementation adds (e.g. to a power-of-two chunk) is not counted: these are model FLOPs (the
delta-rule mixers count the same way).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import (
    Dense,
    DType,
    GatedRMSNorm,
    LayerNorm,
    MeshAxes,
    RecurrentMixer,
    RMSNorm,
    ShortConvolution,
    apply_rope,
    check_bool,
    check_choice,
)
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "LinearAttention",
    "Based",
    "BaseConv",
    "MultiScaleRetention",
    "LightningAttention",
    "GatedLinearAttention",
    "FeatureMap",
    "taylor_feature_map",
    "retention_log_decays",
    "alibi_slopes",
    "lightning_slopes",
    "chunked_op_flops",
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def chunked_op_flops(seq_len: int, heads: int, key_dim: int, value_dim: int, chunk_size: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of the chunked linear recurrence over one sequence.

    ``T = seq_len`` is cut into chunks of ``chunk_size`` tokens, the last one shorter; a chunk of
    ``c`` tokens costs ``2 c^2 (K + V) + 4 c K V`` per head (``Q K^T``, ``P V``, ``Q S``,
    ``K^T V``), times ``heads``.
    """
    full, rest = divmod(seq_len, chunk_size)
    total = 0
    for size, count in ((chunk_size, full), (rest, 1 if rest else 0)):
        total += count * (2 * size * size * (key_dim + value_dim) + 4 * size * key_dim * value_dim)
    return int(heads * total)


def _split_dim(owner: str, dim: int, expand: float, num_heads: int, name: str) -> tuple[int, int]:
    """fla's ``int(dim * expand)`` width and its per-head share; the width must divide by the heads."""
    expand = check_float(owner, name, expand, positive=True, allow_none=False)
    width = int(dim * expand)
    if width < num_heads or width % num_heads:
        raise ValueError(
            f"{owner}: int(dim * {name}) = int({dim} * {expand}) = {width} must be a positive multiple of "
            f"num_heads ({num_heads})"
        )
    return width, width // num_heads


def _activation(owner: str, name: str, value) -> Callable | None:
    """Activations fla applies to q and k by name (``feature_map`` of RetNet / GLA)."""
    table = {None: None, "swish": jax.nn.silu, "silu": jax.nn.silu, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid}
    if value not in table:
        raise ValueError(f"{owner}: {name} must be one of {tuple(table)}, got {value!r}")
    return table[value]


def _identity_init(key, shape, dtype=jnp.float32):
    """Identity matrix initialiser (Hedgehog's trainable map starts as the identity)."""
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Feature maps
# ----------------------------------------------------------------------------------------------


class FeatureMap(nnx.Module):
    """fla's feature maps of linear attention, applied to each head's queries or keys.

    ``x [..., K] -> [..., F]``; ``F = K`` except ``hedgehog`` (``2K``). Kinds:

    * ``"elementwise_product"`` (fla's default, ``HadamardFeatureMap``): ``(x W1 + b1) * (x W2 + b2)``;
    * ``"hedgehog"`` (Zhang et al. 2024): ``softmax([2 (x W + b), -2 (x W + b)])`` over ``2K``, W = I at init;
    * ``"t2r"`` (Kasai et al. 2021): ``relu(x W)``;
    * ``"elu"``: ``elu(x) + 1`` (Katharopoulos et al. 2020); ``"relu"``; ``"identity"``.

    Parameters (shared by heads): ``proj``/``proj2 .kernel [K, K]`` (None, head_dim), ``.bias [K]`` (head_dim).
    """

    KINDS = ("elementwise_product", "hedgehog", "t2r", "elu", "relu", "identity")

    def __init__(self, kind: str, head_dim: int, *, dtype=None, param_dtype=jnp.float32, kernel_init=None,
                 rngs: nnx.Rngs):
        self.kind = check_choice("FeatureMap", "feature_map", kind, self.KINDS)
        self.head_dim = check_int("FeatureMap", "head_dim", head_dim)
        dense = dict(logical_axes=(None, "head_dim"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if kind in ("elementwise_product", "hedgehog", "t2r"):
            init = _identity_init if kind == "hedgehog" else kernel_init
            self.proj = Dense(head_dim, head_dim, use_bias=kind != "t2r", kernel_init=init, **dense)
        else:
            self.proj = None
        if kind == "elementwise_product":
            self.proj2 = Dense(head_dim, head_dim, use_bias=True, kernel_init=kernel_init, **dense)
        else:
            self.proj2 = None

    @property
    def features(self) -> int:
        """Output width ``F``."""
        return 2 * self.head_dim if self.kind == "hedgehog" else self.head_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., head_dim]`` -> ``[..., features]``."""
        if self.kind == "elementwise_product":
            return self.proj(x) * self.proj2(x)
        if self.kind == "hedgehog":
            y = 2 * self.proj(x)
            stat = jnp.promote_types(y.dtype, jnp.float32)
            return jax.nn.softmax(jnp.concatenate([y, -y], axis=-1).astype(stat), axis=-1).astype(y.dtype)
        if self.kind == "t2r":
            return jax.nn.relu(self.proj(x))
        if self.kind == "elu":
            return jax.nn.elu(x) + 1
        if self.kind == "relu":
            return jax.nn.relu(x)
        return x

    def flops(self, tokens: int) -> int:
        """Matmul FLOPs for ``tokens`` vectors (e.g. ``T * H``)."""
        matrices = {"elementwise_product": 2, "hedgehog": 1, "t2r": 1}.get(self.kind, 0)
        return 2 * tokens * self.head_dim * self.head_dim * matrices


def taylor_feature_map(x: jax.Array) -> jax.Array:
    """Based's 2nd-order Taylor feature map ``[..., f] -> [..., 1 + f + f (f + 1) / 2]``.

    ``phi(x) = [1, x / f^(1/4), x_i^2 / sqrt(2 f), x_i x_j / sqrt(f) (i < j)]``, so that
    ``phi(q) . phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 / (2 f)``, the Taylor expansion of
    ``exp(q.k / sqrt(f))`` to second order (always >= 1/2). This is fla's compact
    ``TaylorFeatureMap`` (each unordered pair once); Based's ``TaylorExp`` lists all ``f^2``
    ordered pairs divided by ``sqrt(2 f)``, which gives the same inner products.
    """
    features = x.shape[-1]
    rows, cols = np.triu_indices(features, k=1)
    root = math.sqrt(features)
    pieces = [
        jnp.ones(x.shape[:-1] + (1,), x.dtype),
        x / math.sqrt(root),
        jnp.square(x) / (root * math.sqrt(2.0)),
        x[..., rows] * x[..., cols] / root,
    ]
    return jnp.concatenate(pieces, axis=-1)


def taylor_features(feature_dim: int) -> int:
    """Width of :func:`taylor_feature_map` for ``feature_dim`` inputs."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


# ----------------------------------------------------------------------------------------------
# Linear attention (fla LinearAttention)
# ----------------------------------------------------------------------------------------------


@register_mixer("linear_attention")
class LinearAttention(RecurrentMixer):
    """Causal linear attention, fla's ``LinearAttention`` layer (``fla/layers/linear_attn.py``).

    ``q = phi_q(x W_q)``, ``k = phi_k(x W_k)``, ``v = x W_v`` per head (``phi`` a :class:`FeatureMap`,
    optionally divided by their sums: ``norm_q`` / ``norm_k``, ``q / (sum q + 1e-4)``), then
    ``o_t = scale * S_t^T q_t`` with ``S_t = S_{t-1} + k_t v_t^T`` (``pk.linear_attention``,
    ``scale = F ** -0.5``), divided by ``scale * q_t . sum_{s<=t} k_s + 1e-10`` when ``normalize``
    (fla's ``do_feature_map_norm``); each head's output RMS-normalised (``output_norm``), heads
    concatenated, ``W_o``. Katharopoulos et al. (2020), "Transformers are RNNs".

    Args:
      dim: model width ``D``. num_heads: ``H``.
      expand_k / expand_v: key and value widths ``int(D * expand)`` (divisible by ``H``).
      feature_map: one of :attr:`FeatureMap.KINDS` (fla's default ``"elementwise_product"``).
      tie_feature_map_qk: one feature map for queries and keys.
      norm_q / norm_k: divide the mapped queries / keys by their sum (+1e-4).
      normalize: divide by the running normaliser (state ``[B,H,F,V+1]``).
      output_norm: "rmsnorm" (per head, over ``V``) or "identity". elementwise_affine: learn its scale.
      norm_eps: RMSNorm epsilon (fla's 1e-5).
      impl / chunk_size: passed to the op. mesh_axes: :class:`MeshAxes` sharding batch and heads of
        the Pallas op under an active mesh (see :mod:`attnzoo.layers.common`).
      dtype / param_dtype: compute / parameter dtypes.
      kernel_init: initialiser of the projections. rngs: ``nnx.Rngs`` with a ``params`` stream.

    Parameters: ``q_proj``/``k_proj.kernel [D, H, K]``, ``v_proj.kernel [D, H, V]`` (embed, heads,
    head_dim), ``o_proj.kernel [H, V, D]`` (heads, head_dim, embed), ``feature_map_q``/``_k``
    (see :class:`FeatureMap`), ``norm.scale [V]`` (norm).
    """

    _op = "linear_attention"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        feature_map: str = "elementwise_product",
        tie_feature_map_qk: bool = False,
        norm_q: bool = False,
        norm_k: bool = False,
        normalize: bool = False,
        output_norm: str = "rmsnorm",
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "LinearAttention"
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self.key_dim, self.head_k_dim = _split_dim(owner, self.dim, expand_k, self.num_heads, "expand_k")
        self.value_dim, self.head_v_dim = _split_dim(owner, self.dim, expand_v, self.num_heads, "expand_v")
        check_choice(owner, "feature_map", feature_map, FeatureMap.KINDS)
        self.tie_feature_map_qk = check_bool(owner, "tie_feature_map_qk", tie_feature_map_qk)
        self.norm_q = check_bool(owner, "norm_q", norm_q)
        self.norm_k = check_bool(owner, "norm_k", norm_k)
        self._normalize = check_bool(owner, "normalize", normalize)
        check_choice(owner, "output_norm", output_norm, ("rmsnorm", "identity"))
        check_bool(owner, "elementwise_affine", elementwise_affine)
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)

        heads, dk, dv = self.num_heads, self.head_k_dim, self.head_v_dim
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.q_proj = Dense(dim, (heads, dk), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.k_proj = Dense(dim, (heads, dk), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.v_proj = Dense(dim, (heads, dv), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.o_proj = Dense((heads, dv), dim, logical_axes=("heads", "head_dim", "embed"), **dense)
        self.feature_map_q = FeatureMap(feature_map, dk, **dense)
        self.feature_map_k = None if tie_feature_map_qk else FeatureMap(feature_map, dk, **dense)
        self.features = self.feature_map_q.features
        self.norm = (
            RMSNorm(dv, epsilon=norm_eps, use_scale=elementwise_affine, dtype=dtype, param_dtype=param_dtype)
            if output_norm == "rmsnorm"
            else None
        )

    @property
    def normalize(self) -> bool:
        return self._normalize

    def _state_shape(self, batch):
        return (batch, self.num_heads, self.features, self.head_v_dim + int(self._normalize))

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add)::

            q, k projections:   2 * T * D * H * K  each
            v, o projections:   2 * T * D * H * V  each
            feature maps:       2 * T * H * K * K  per matrix (2 for elementwise_product,
                                1 for hedgehog / t2r), for queries and for keys
            op:                 chunked_op_flops(T, H, F, V (+1 with normalize))

        ``F`` the mapped feature width (``2K`` for hedgehog). Norms and activations are not
        counted; ``kv_len`` (a cache's length) does not change the cost of a recurrent layer.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        d, h, dk, dv = self.dim, self.num_heads, self.head_k_dim, self.head_v_dim
        projections = 2 * seq_len * d * h * (2 * dk + 2 * dv)
        feature_maps = 2 * self.feature_map_q.flops(seq_len * h)
        op = chunked_op_flops(seq_len, h, self.features, dv + int(self._normalize), self.chunk_size)
        return int(projections + feature_maps + op)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """``x [B, T, D] -> y [B, T, D]`` (with a cache ``(y, new_cache)``); ``positions`` is unused."""
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        batch, length = x.shape[:2]
        q = self.feature_map_q(self.q_proj(x))
        k = (self.feature_map_k or self.feature_map_q)(self.k_proj(x))
        v = self.v_proj(x)
        if self.norm_q:
            q = q / (jnp.sum(q, axis=-1, keepdims=True) + 1e-4)
        if self.norm_k:
            k = k / (jnp.sum(k, axis=-1, keepdims=True) + 1e-4)
        out, state = self._recur(q, k, v, None, segment_ids=segment_ids, cache=cache, mask=mask)
        if self.norm is not None:
            out = self.norm(out)
        y = self.o_proj(out)
        return self._finish(y, cache, state, (), mask, length)


# ----------------------------------------------------------------------------------------------
# Based: Taylor linear attention and BaseConv
# ----------------------------------------------------------------------------------------------


@register_mixer("based")
class Based(RecurrentMixer):
    """Based's linear attention (Arora et al. 2024, "Simple linear attention language models balance
    the recall-throughput tradeoff"; HazyResearch/based ``based/models/mixers/linear_attention.py``,
    fla ``fla/layers/based.py``).

    Queries and keys are projected to ``feature_dim`` (16) per head and expanded by
    :func:`taylor_feature_map` (``1 + f + f(f+1)/2`` = 153 features), values to ``head_dim``
    (``D / H``); the output is normalised linear attention with scale 1::

        o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / (sum_{s<=t} phi(q_t) . phi(k_s) + 1e-10)

    (``pk.linear_attention(normalize=True, scale=1)``; Based adds 1e-12, the op 1e-10: the
    denominator is at least ``(t + 1) / 2``), then ``W_o``. No output norm (as the published
    ``quadratic`` / ``linear`` / fla implementations). A Based LM interleaves this layer with
    :class:`BaseConv` and sliding-window attention: DecoderLM pattern ``"base_conv,based,swa"``, or
    the published configs' five-layer period ``"base_conv,based,swa,base_conv,base_conv"`` (sliding
    windows of 128 or 256 tokens there).

    Args:
      dim: ``D``. num_heads: ``H``. feature_dim: ``f`` per head (16). head_dim: value width per
        head (default ``D / H``). impl / chunk_size / mesh_axes / dtype / param_dtype / kernel_init / rngs:
        as :class:`LinearAttention`.

    Parameters: ``q_proj``/``k_proj.kernel [D, H, f]``, ``v_proj.kernel [D, H, Dh]``,
    ``o_proj.kernel [H, Dh, D]``.
    """

    _op = "linear_attention"
    _normalize = True
    scale = 1.0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        feature_dim: int = 16,
        head_dim: int | None = None,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "Based"
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self.feature_dim = check_int(owner, "feature_dim", feature_dim)
        if head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) when head_dim is not given"
                )
            head_dim = self.dim // self.num_heads
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.features = taylor_features(self.feature_dim)
        heads, f, dh = self.num_heads, self.feature_dim, self.head_dim
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.q_proj = Dense(dim, (heads, f), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.k_proj = Dense(dim, (heads, f), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.v_proj = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.o_proj = Dense((heads, dh), dim, logical_axes=("heads", "head_dim", "embed"), **dense)

    def _state_shape(self, batch):
        return (batch, self.num_heads, self.features, self.head_dim + 1)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add)::

            q, k projections:   2 * T * D * H * f   each
            v, o projections:   2 * T * D * H * Dh  each
            op:                 chunked_op_flops(T, H, 1 + f + f(f+1)/2, Dh + 1)

        The Taylor map (elementwise products) is not counted; ``kv_len`` does not change the cost.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        d, h, f, dh = self.dim, self.num_heads, self.feature_dim, self.head_dim
        projections = 2 * seq_len * d * h * (2 * f + 2 * dh)
        return int(projections + chunked_op_flops(seq_len, h, self.features, dh + 1, self.chunk_size))

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """``x [B, T, D] -> y [B, T, D]`` (with a cache ``(y, new_cache)``); ``positions`` is unused."""
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        batch, length = x.shape[:2]
        q = taylor_feature_map(self.q_proj(x))
        k = taylor_feature_map(self.k_proj(x))
        v = self.v_proj(x)
        out, state = self._recur(q, k, v, None, segment_ids=segment_ids, cache=cache, mask=mask)
        return self._finish(self.o_proj(out), cache, state, (), mask, length)


@register_mixer("base_conv")
class BaseConv(RecurrentMixer):
    """Based's gated short-convolution mixer ``BaseConv`` (HazyResearch/based
    ``based/models/mixers/convolution.py``; Arora et al. 2024)::

        u1, u2 = x W_1 + b_1, x W_2 + b_2                  (in_proj, split in two halves)
        y = (silu(causal_depthwise_conv(u1)) * u2) W_o + b_o

    with ``E = expand_proj * D / 2`` channels per half and a depthwise kernel of ``kernel_size``
    taps without bias. Defaults are those of the published Based configs (``expand_proj=4``,
    ``kernel_size=3``, biases on; the class default there is ``expand_proj=2``). ``num_heads`` is
    accepted for the uniform mixer interface and unused.

    Parameters: ``in_proj`` / ``gate_proj .kernel [D, E]`` (embed, mlp) and ``.bias [E]`` (the
    convolved half ``u1`` and the multiplying half ``u2`` of Based's ``in_proj``), ``conv.weight
    [kernel_size, E]`` (conv_kernel, mlp), ``out_proj.kernel [E, D]`` (mlp, embed), ``.bias [D]``.

    Cache: ``state`` is an empty ``[B, 0, 0, 0]`` array, ``conv`` holds the convolution's last
    ``kernel_size - 1`` inputs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_proj: int = 4,
        kernel_size: int = 3,
        use_bias: bool = True,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "BaseConv"
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self.expand_proj = check_int(owner, "expand_proj", expand_proj)
        if (self.expand_proj * self.dim) % 2:
            raise ValueError(
                f"{owner}: expand_proj * dim must be even (two halves), got {self.expand_proj} * {self.dim}"
            )
        self.inner_dim = self.expand_proj * self.dim // 2
        self.kernel_size = check_int(owner, "kernel_size", kernel_size)
        check_bool(owner, "use_bias", use_bias)
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, use_bias=use_bias, rngs=rngs)
        self.in_proj = Dense(dim, self.inner_dim, logical_axes=("embed", "mlp"), **dense)
        self.gate_proj = Dense(dim, self.inner_dim, logical_axes=("embed", "mlp"), **dense)
        self.conv = ShortConvolution(
            self.inner_dim, self.kernel_size, activation="silu", use_bias=False, dtype=dtype,
            param_dtype=param_dtype, logical_axes=("conv_kernel", "mlp"), rngs=rngs,
        )
        self.out_proj = Dense(self.inner_dim, dim, logical_axes=("mlp", "embed"), **dense)

    def _conv_modules(self):
        return (self.conv,)

    def _state_shape(self, batch):
        return (batch, 0, 0, 0)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add)::

            in_proj, gate_proj, out_proj:   2 * T * D * E  each

        The depthwise convolution (``2 * T * E * kernel_size``, elementwise) is not counted.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        return int(3 * 2 * seq_len * self.dim * self.inner_dim)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """``x [B, T, D] -> y [B, T, D]`` (with a cache ``(y, new_cache)``); ``positions`` is unused."""
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        batch, length = x.shape[:2]
        convs: list = []
        u = self._convolve(0, self.in_proj(x), segment_ids=segment_ids, cache=cache, mask=mask, new_convs=convs)
        y = self.out_proj(u * self.gate_proj(x))
        return self._finish(y, cache, None if cache is None else cache.state, convs, mask, length)


# ----------------------------------------------------------------------------------------------
# RetNet
# ----------------------------------------------------------------------------------------------


def retention_log_decays(num_heads: int) -> np.ndarray:
    """RetNet's fixed per-head decays as log-decays: ``log(1 - 2^(-5 - h))``, ``[H]`` float64."""
    return np.log1p(-np.exp2(-5.0 - np.arange(num_heads, dtype=np.float64)))


class _GatedOutputMixer(RecurrentMixer):
    """Pieces RetNet and GLA share (fla's layer code is the same for both): q/k/v projections with
    optional short convolutions and activation, and ``o_proj(norm(o) * swish(x W_g))``."""

    def _check_qkv(self, owner, expand_k, expand_v, feature_map, use_short_conv, conv_size, conv_bias,
                   use_output_gate, norm_eps):
        """Validates the shared options and records them (before any parameter is created)."""
        self.key_dim, self.head_k_dim = _split_dim(owner, self.dim, expand_k, self.num_heads, "expand_k")
        self.value_dim, self.head_v_dim = _split_dim(owner, self.dim, expand_v, self.num_heads, "expand_v")
        self.feature_map = feature_map
        self._feature_fn = _activation(owner, "feature_map", feature_map)
        self.use_short_conv = check_bool(owner, "use_short_conv", use_short_conv)
        self.use_output_gate = check_bool(owner, "use_output_gate", use_output_gate)
        self.conv_bias = check_bool(owner, "conv_bias", conv_bias)
        self.conv_size = check_int(owner, "conv_size", conv_size) if self.use_short_conv else None
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)

    def _build_qkv(self, dense):
        """Creates the projections, short convolutions and output norm checked by :meth:`_check_qkv`."""
        use_output_gate, conv_bias, norm_eps = self.use_output_gate, self.conv_bias, self.norm_eps
        dim, heads, dk, dv = self.dim, self.num_heads, self.head_k_dim, self.head_v_dim
        self.q_proj = Dense(dim, (heads, dk), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.k_proj = Dense(dim, (heads, dk), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.v_proj = Dense(dim, (heads, dv), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.g_proj = (
            Dense(dim, (heads, dv), logical_axes=("embed", "heads", "head_dim"), **dense) if use_output_gate else None
        )
        self.o_proj = Dense((heads, dv), dim, logical_axes=("heads", "head_dim", "embed"), **dense)
        if self.use_short_conv:
            conv = dict(
                kernel_size=self.conv_size, activation="silu", use_bias=conv_bias, dtype=dense["dtype"],
                param_dtype=dense["param_dtype"], logical_axes=("conv_kernel", "heads"), rngs=dense["rngs"],
            )
            self.q_conv = ShortConvolution(heads * dk, **conv)
            self.k_conv = ShortConvolution(heads * dk, **conv)
            self.v_conv = ShortConvolution(heads * dv, **conv)
        else:
            self.q_conv = self.k_conv = self.v_conv = None
        norm = dict(epsilon=norm_eps, dtype=dense["dtype"], param_dtype=dense["param_dtype"])
        if use_output_gate:
            self.g_norm = GatedRMSNorm(dv, activation="silu", **norm)
        else:
            self.g_norm = RMSNorm(dv, **norm)

    def _conv_modules(self):
        return (self.q_conv, self.k_conv, self.v_conv) if self.use_short_conv else ()

    def _project_qkv(self, x, *, segment_ids, cache, mask, convs: list):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            kw = dict(segment_ids=segment_ids, cache=cache, mask=mask, new_convs=convs)
            q, k, v = self._convolve(0, q, **kw), self._convolve(1, k, **kw), self._convolve(2, v, **kw)
        if self._feature_fn is not None:
            q, k = self._feature_fn(q), self._feature_fn(k)
        return q, k, v

    def _output(self, x, out):
        if self.g_proj is not None:
            out = self.g_norm(out, self.g_proj(x).astype(out.dtype))
        else:
            out = self.g_norm(out)
        return self.o_proj(out)

    def _qkvgo_flops(self, seq_len: int) -> int:
        d, h, dk, dv = self.dim, self.num_heads, self.head_k_dim, self.head_v_dim
        outputs = 3 if self.g_proj is not None else 2
        return 2 * seq_len * d * h * (2 * dk + outputs * dv)


@register_mixer("retnet")
class MultiScaleRetention(_GatedOutputMixer):
    """RetNet's multi-scale retention (Sun et al. 2023, "Retentive Network"), as fla's
    ``MultiScaleRetention`` (``fla/layers/multiscale_retention.py``, ``fla/ops/retention``)::

        q, k = RoPE(act(x W_q)), RoPE(act(x W_k))  per head (K = D * expand_k / H)
        v = x W_v  (V = D * expand_v / H)
        S_t = gamma_h S_{t-1} + k_t v_t^T,   gamma_h = 1 - 2^(-5 - h)   (h = 0 .. H-1)
        o_t = K^-1/2 S_t^T q_t
        y = W_o(RMSNorm_head(o) * swish(x W_g))

    (``pk.simple_gla`` with the log-decay ``log gamma_h`` at every token). RoPE is rotate-half with
    base ``rope_theta`` over all ``K`` features, at ``positions`` (default ``arange(T)``, or each
    row's cache length onwards); optional silu short convolutions on q, k, v (before the
    activation and RoPE), as fla.

    Args:
      dim: ``D``. num_heads: ``H``. expand_k / expand_v: fla's 1 and 2.
      feature_map: None (fla's default), "swish"/"silu", "relu" or "sigmoid", applied to q and k.
      use_short_conv / conv_size / conv_bias: short convolutions (fla: off, 4, no bias).
      use_output_gate: the swish gate ``x W_g`` (else RMSNorm only). norm_eps: 1e-5.
      rope_theta: RoPE base. impl / chunk_size / mesh_axes / dtype / param_dtype / kernel_init / rngs: as
      :class:`LinearAttention`.

    Parameters: ``q_proj``/``k_proj.kernel [D, H, K]``, ``v_proj``/``g_proj.kernel [D, H, V]``
    (embed, heads, head_dim), ``o_proj.kernel [H, V, D]``, ``g_norm`` scale ``[V]`` (norm),
    ``q_conv``/``k_conv``/``v_conv.weight [conv_size, H*K or H*V]`` (conv_kernel, heads).
    """

    _op = "simple_gla"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        feature_map: str | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "MultiScaleRetention"
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self._check_qkv(owner, expand_k, expand_v, feature_map, use_short_conv, conv_size, conv_bias,
                        use_output_gate, norm_eps)
        if self.head_k_dim % 2:
            raise ValueError(
                f"{owner}: RoPE needs an even key head dim, got int(dim * expand_k) / num_heads = {self.head_k_dim}"
            )
        self.rope_theta = check_float(owner, "rope_theta", rope_theta, positive=True, allow_none=False)
        self.log_decays = tuple(float(value) for value in retention_log_decays(self.num_heads))
        self._build_qkv(dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs))

    def _state_shape(self, batch):
        return (batch, self.num_heads, self.head_k_dim, self.head_v_dim)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add)::

            q, k projections:        2 * T * D * H * K  each
            v, g, o projections:     2 * T * D * H * V  each (no g without the output gate)
            op:                      chunked_op_flops(T, H, K, V)

        RoPE, norms, gates and the short convolutions are not counted; ``kv_len`` does not change
        the cost.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        op = chunked_op_flops(seq_len, self.num_heads, self.head_k_dim, self.head_v_dim, self.chunk_size)
        return int(self._qkvgo_flops(seq_len) + op)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """``x [B, T, D] -> y [B, T, D]`` (with a cache ``(y, new_cache)``).

        ``positions``: ``[B, T]`` or ``[T]`` RoPE positions; default ``arange(T)`` or, with a
        cache, ``cache.lengths[b] + arange(T)``. (RoPE is relative, so packed documents need no
        restarted positions.)
        """
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        batch, length = x.shape[:2]
        convs: list = []
        q, k, v = self._project_qkv(x, segment_ids=segment_ids, cache=cache, mask=mask, convs=convs)
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)[None, :]
            if cache is not None:
                positions = cache.lengths[:, None] + positions
        q = apply_rope(q, positions, theta=self.rope_theta)
        k = apply_rope(k, positions, theta=self.rope_theta)
        gate_dtype = jnp.promote_types(q.dtype, jnp.float32)
        g = jnp.broadcast_to(jnp.asarray(self.log_decays, gate_dtype), (batch, length, self.num_heads))
        out, state = self._recur(q, k, v, g, segment_ids=segment_ids, cache=cache, mask=mask)
        return self._finish(self._output(x, out), cache, state, convs, mask, length)


# ----------------------------------------------------------------------------------------------
# Lightning attention (TransNormerLLM / MiniMax)
# ----------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022): ``2^(-8 (i + 1) / n)`` for ``n`` a power of two, else
    those of the nearest lower power of two followed by every other slope of the next one up."""

    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def lightning_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> np.ndarray:
    """Lightning attention's per-head decay rates ``s_h`` (the state decays by ``e^(-s_h)``):
    ALiBi slopes times ``1 - layer_idx / (num_layers - 1) + 1e-5`` (TNL / MiniMax: early layers
    forget fast, the last layer almost never). With one layer the factor is ``1 + 1e-5``.
    Returns ``[H]`` float64."""
    ratio = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return np.asarray(alibi_slopes(num_heads), np.float64) * (1.0 - ratio + 1e-5)


@register_mixer("lightning")
class LightningAttention(RecurrentMixer):
    """Lightning attention, the linear attention of TransNormerLLM / TNL (Qin et al. 2024) and
    MiniMax-01 / M1: OpenNLPLab/lightning-attention ``examples/module/tnl_attn.py``,
    MiniMax-AI/MiniMax-M1 ``modeling_minimax_m1.py`` (``MiniMaxM1LightningAttention``)::

        q, k, v = silu(x W_q), silu(x W_k), silu(x W_v)      per head (Dh = head_dim)
        S_t = e^(-s_h) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t   (no scale, no normaliser)
        y = W_o(Norm(concat_h o) * sigmoid(Gate(x)))

    (``pk.simple_gla``, ``scale = 1``). ``s_h`` = :func:`lightning_slopes` ``(H, layer_idx,
    num_layers)``. Defaults follow MiniMax-M1: Norm = RMSNorm over all ``H * Dh`` channels
    (eps 1e-6), Gate a full-rank ``D -> H * Dh`` projection; TNL's module is ``norm="layernorm"``
    (eps 1e-5) with ``gate_low_rank_dim=head_dim`` (``D -> Dh -> D``).

    Args:
      dim: ``D``. num_heads: ``H``. head_dim: ``Dh`` (default ``D / H``).
      layer_idx / num_layers: this layer's depth and the model's, scaling the slopes.
      norm: "rmsnorm" or "layernorm" over ``H * Dh``. norm_eps: its epsilon.
      gate_low_rank_dim: None (full-rank gate) or the rank of a two-matrix gate.
      impl / chunk_size / mesh_axes / dtype / param_dtype / kernel_init / rngs: as :class:`LinearAttention`.

    Parameters: ``q_proj``/``k_proj``/``v_proj.kernel [D, H, Dh]``, ``gate_proj.kernel [D, H, Dh]``
    (or ``gate_down [D, r]`` (embed, None) and ``gate_up [r, H, Dh]`` (None, heads, head_dim)),
    ``o_proj.kernel [H, Dh, D]``, ``norm.scale`` (and ``.bias``) ``[H * Dh]`` (norm).

    The slopes are constants of the layer, not parameters: a scanned stack of identical layers
    (the zoo's DecoderLM) gives every layer the slopes of its ``layer_idx`` option.
    """

    _op = "simple_gla"
    scale = 1.0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        gate_low_rank_dim: int | None = None,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "LightningAttention"
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        if head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) when head_dim is not given"
                )
            head_dim = self.dim // self.num_heads
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.num_layers = check_int(owner, "num_layers", num_layers)
        self.layer_idx = check_int(owner, "layer_idx", layer_idx, minimum=0)
        if self.layer_idx >= self.num_layers:
            raise ValueError(f"{owner}: layer_idx must be in [0, num_layers={self.num_layers}), got {self.layer_idx}")
        check_choice(owner, "norm", norm, ("rmsnorm", "layernorm"))
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        self.gate_low_rank_dim = check_int(owner, "gate_low_rank_dim", gate_low_rank_dim, allow_none=True)
        self.slopes = tuple(float(s) for s in lightning_slopes(self.num_heads, self.layer_idx, self.num_layers))

        heads, dh = self.num_heads, self.head_dim
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.q_proj = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.k_proj = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.v_proj = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), **dense)
        if self.gate_low_rank_dim is None:
            self.gate_proj = Dense(dim, (heads, dh), logical_axes=("embed", "heads", "head_dim"), **dense)
            self.gate_down = self.gate_up = None
        else:
            rank = self.gate_low_rank_dim
            self.gate_proj = None
            self.gate_down = Dense(dim, rank, logical_axes=("embed", None), **dense)
            self.gate_up = Dense(rank, (heads, dh), logical_axes=(None, "heads", "head_dim"), **dense)
        self.o_proj = Dense((heads, dh), dim, logical_axes=("heads", "head_dim", "embed"), **dense)
        norm_kind = RMSNorm if norm == "rmsnorm" else LayerNorm
        self.norm = norm_kind(heads * dh, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)

    def _state_shape(self, batch):
        return (batch, self.num_heads, self.head_dim, self.head_dim)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add)::

            q, k, v, o projections:  2 * T * D * H * Dh  each
            gate:                    2 * T * D * H * Dh  (full rank)
                                     or 2 * T * r * (D + H * Dh)  (rank r)
            op:                      chunked_op_flops(T, H, Dh, Dh)

        Norm and activations are not counted; ``kv_len`` does not change the cost.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        d, width = self.dim, self.num_heads * self.head_dim
        projections = 4 * 2 * seq_len * d * width
        if self.gate_low_rank_dim is None:
            gate = 2 * seq_len * d * width
        else:
            gate = 2 * seq_len * self.gate_low_rank_dim * (d + width)
        op = chunked_op_flops(seq_len, self.num_heads, self.head_dim, self.head_dim, self.chunk_size)
        return int(projections + gate + op)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """``x [B, T, D] -> y [B, T, D]`` (with a cache ``(y, new_cache)``); ``positions`` is unused."""
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        batch, length = x.shape[:2]
        q = jax.nn.silu(self.q_proj(x))
        k = jax.nn.silu(self.k_proj(x))
        v = jax.nn.silu(self.v_proj(x))
        gate_dtype = jnp.promote_types(q.dtype, jnp.float32)
        g = jnp.broadcast_to(-jnp.asarray(self.slopes, gate_dtype), (batch, length, self.num_heads))
        out, state = self._recur(q, k, v, g, segment_ids=segment_ids, cache=cache, mask=mask)
        out = self.norm(out.reshape(batch, length, -1))
        gate = self.gate_proj(x) if self.gate_proj is not None else self.gate_up(self.gate_down(x))
        stat = jnp.promote_types(out.dtype, jnp.float32)
        out = (out.astype(stat) * jax.nn.sigmoid(gate.reshape(out.shape).astype(stat))).astype(out.dtype)
        y = self.o_proj(out.reshape(batch, length, self.num_heads, self.head_dim))
        return self._finish(y, cache, state, (), mask, length)


# ----------------------------------------------------------------------------------------------
# Gated linear attention
# ----------------------------------------------------------------------------------------------


@register_mixer("gla")
class GatedLinearAttention(_GatedOutputMixer):
    """Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with
    Hardware-Efficient Training"), as fla's ``GatedLinearAttention`` (``fla/layers/gla.py``)::

        q, k, v = act(x W_q), act(x W_k), x W_v         (K = D * expand_k / H, V = D * expand_v / H)
        g_t = max(logsigmoid((x W_down) W_up + b) / gate_logit_normalizer, clamp_min)   [H, K]
        S_t = diag(e^(g_t)) S_{t-1} + k_t v_t^T,   o_t = K^-1/2 S_t^T q_t
        y = W_o(RMSNorm_head(o) * swish(x W_g))

    (``pk.gla``). The log-decays are computed in float32. Optional silu short convolutions on
    q, k, v as fla (the gate reads ``x``).

    Args:
      dim: ``D``. num_heads: ``H``. expand_k / expand_v: fla's 0.5 and 1.
      feature_map: None (fla's default), "swish"/"silu", "relu" or "sigmoid", applied to q and k.
      use_short_conv / conv_size / conv_bias: short convolutions (fla: off, 4, no bias).
      use_output_gate: the swish gate ``x W_g`` (else RMSNorm only). norm_eps: 1e-5.
      gate_logit_normalizer: 16. gate_low_rank_dim: 16. clamp_min: None or a float <= 0.
      impl / chunk_size / mesh_axes / dtype / param_dtype / kernel_init / rngs: as :class:`LinearAttention`.

    Parameters: as :class:`MultiScaleRetention`, plus ``gk_down.kernel [D, r]`` (embed, None) and
    ``gk_up.kernel [r, H, K]`` (None, heads, head_dim) with ``gk_up.bias [H, K]``.
    """

    _op = "gla"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        feature_map: str | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        gate_logit_normalizer: float = 16,
        gate_low_rank_dim: int = 16,
        clamp_min: float | None = None,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "GatedLinearAttention"
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self._check_qkv(owner, expand_k, expand_v, feature_map, use_short_conv, conv_size, conv_bias,
                        use_output_gate, norm_eps)
        self.gate_logit_normalizer = check_float(
            owner, "gate_logit_normalizer", gate_logit_normalizer, positive=True, allow_none=False
        )
        self.gate_low_rank_dim = check_int(owner, "gate_low_rank_dim", gate_low_rank_dim)
        self.clamp_min = check_float(owner, "clamp_min", clamp_min)
        if self.clamp_min is not None and self.clamp_min > 0:
            raise ValueError(f"{owner}: clamp_min must be <= 0 (a log-decay), got {self.clamp_min}")
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self._build_qkv(dense)
        rank = self.gate_low_rank_dim
        self.gk_down = Dense(dim, rank, logical_axes=("embed", None), **dense)
        self.gk_up = Dense(
            rank, (self.num_heads, self.head_k_dim), logical_axes=(None, "heads", "head_dim"), use_bias=True, **dense
        )

    def _state_shape(self, batch):
        return (batch, self.num_heads, self.head_k_dim, self.head_v_dim)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs for one sequence of ``T = seq_len`` tokens (2 per multiply-add)::

            q, k projections:        2 * T * D * H * K  each
            v, g, o projections:     2 * T * D * H * V  each (no g without the output gate)
            decay projection:        2 * T * r * (D + H * K)
            op:                      chunked_op_flops(T, H, K, V)

        The in-chunk scores are counted as one dense ``c x c`` product, as for a scalar decay
        (the engine builds per-channel-decay scores from smaller rescaled blocks). Norms, gates and
        short convolutions are not counted; ``kv_len`` does not change the cost.
        """
        seq_len = self._flops_seq_len(seq_len, kv_len)
        decay = 2 * seq_len * self.gate_low_rank_dim * (self.dim + self.num_heads * self.head_k_dim)
        op = chunked_op_flops(seq_len, self.num_heads, self.head_k_dim, self.head_v_dim, self.chunk_size)
        return int(self._qkvgo_flops(seq_len) + decay + op)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, valid_lengths=None):
        """``x [B, T, D] -> y [B, T, D]`` (with a cache ``(y, new_cache)``); ``positions`` is unused."""
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        batch, length = x.shape[:2]
        convs: list = []
        q, k, v = self._project_qkv(x, segment_ids=segment_ids, cache=cache, mask=mask, convs=convs)
        logits = self.gk_up(self.gk_down(x))
        g = jax.nn.log_sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32))) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = jnp.maximum(g, self.clamp_min)
        out, state = self._recur(q, k, v, g, segment_ids=segment_ids, cache=cache, mask=mask)
        return self._finish(self._output(x, out), cache, state, convs, mask, length)
