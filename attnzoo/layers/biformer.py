"""BiFormer's token mixers (Zhu et al. 2023, "BiFormer: Vision Transformer with Bi-Level Routing
Attention"; official code rayleizhu/BiFormer ``ops/bra_legacy.py`` and ``models/_common.py``).

>>> bra = create_mixer("biformer_routing", dim=64, num_heads=2, n_win=7, topk=1, rngs=nnx.Rngs(0))
>>> y = bra(x)                                 # x [B,56,56,64] -> [B,56,56,64]
>>> full = create_mixer("attention_lepe", dim=512, num_heads=8, rngs=nnx.Rngs(0))
>>> z = full(w)                                # w [B,7,7,512] -> [B,7,7,512]

Bi-level routing attention (:class:`BiLevelRoutingAttention`, ``biformer_routing``; the official
``BiLevelRoutingAttention`` with ``kv_downsample_mode="identity"``, ``param_attention="qkvo"``,
``param_routing=False``, ``diff_routing=False``, ``soft_routing=False``, as every released model):

1. ``auto_pad``: the map is zero-padded at the bottom / right to multiples of ``n_win`` (padded
   tokens take part as queries, keys and in the region means, as in the official code; they are
   cropped after the output projection). Without it H and W must divide by ``n_win``.
2. ``q, k, v = x Wq + bq, x Wk + bk, x Wv + bv`` per token (``q, k``: ``qk_dim``, ``v``: ``dim``).
3. The map is cut into ``S x S`` regions (``S = n_win``) of ``r_h x r_w = (Hp / S) x (Wp / S)``
   tokens (:func:`attnzoo.layers.window.window_partition`, regions numbered row-major).
4. Routing, per image and without gradient: region means ``q^r, k^r [S^2, qk_dim]`` (all heads
   together), affinities ``A = (scale q^r) (k^r)^T``, and each query region's ``topk`` regions of
   largest affinity (``jax.lax.top_k``).
5. Token attention, head by head, of each query region's tokens over the ``topk * r_h r_w`` tokens
   of its routed regions with one softmax of ``scale * q . k``
   (:func:`attnzoo.pallas_kernels.attention.routed_attention`, ``impl = kernel``).
6. LePE: a depthwise ``side_dwconv x side_dwconv`` convolution (zero padding ``side_dwconv // 2``)
   of ``v`` on the padded map is added to the attention output; then the output projection.

``scale`` is ``qk_dim ** -0.5`` by default, the official ``qk_scale or qk_dim ** -0.5``: the full
query width, NOT the head width (the official code's choice; with head width 32 and ``qk_dim``
64 ... 768 the token logits are ``sqrt(num_heads)`` times flatter than ``head_dim ** -0.5`` would make them).

Attention with LePE (:class:`AttentionLePE`, ``attention_lepe``; the official ``AttentionLePE``
of BiFormer's last stage, ``topk=-2``): global multi-head softmax attention over all ``H W`` tokens
(``qkv`` without bias by default, scale ``head_dim ** -0.5``), plus a depthwise
``side_dwconv x side_dwconv`` convolution of the mixer's INPUT ``x`` (not of ``v``, unlike BRA),
then the output projection. The official block builds it with its default 8 heads whatever the
stage width.

Parameters (logical axes): BRA ``qk.kernel [D, 2, Hd, Dqk]`` (embed, None, heads, head_dim) with q, k
along axis 1 and ``qk.bias [2, Hd, Dqk]``; ``v.kernel [D, Hd, Dv]`` (``Dv = D / Hd``), ``v.bias``;
``proj.kernel [Hd, Dv, D]``, ``proj.bias [D]``; ``lepe.kernel [k, k, 1, D]`` (depthwise, HWIO),
``lepe.bias [D]``. An official ``attn.qkv.qkv.weight [2 qk_dim + D, D]`` holds the rows q | k | v
(heads major inside each); ``attn.wo`` is ``proj``; ``attn.lepe`` is ``lepe``.
AttentionLePE: ``qkv.kernel [D, 3, Hd, Dh]``, ``proj``, ``lepe`` (official ``qkv``, ``proj``, ``lepe``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import DType, Dense, check_bool, check_choice, check_heads, check_input, compute_dtype
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.window import window_partition, window_reverse
from attnzoo.pallas_kernels.attention import attention, routed_attention
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = ["BiLevelRoutingAttention", "AttentionLePE", "KV_DOWNSAMPLE_MODES"]

# The official kv_downsample_mode values this implementation computes (every released BiFormer uses
# "identity"; the pooled modes of the official code are only used by unreleased ablations).
KV_DOWNSAMPLE_MODES = ("identity",)


def _check_side_dwconv(owner: str, side_dwconv) -> int:
    side_dwconv = check_int(owner, "side_dwconv", side_dwconv, minimum=0)
    if side_dwconv % 2 == 0 and side_dwconv:
        raise ValueError(f"{owner}: side_dwconv must be 0 (no LePE) or odd (a same-size convolution), got {side_dwconv}")
    return side_dwconv


def _lepe(owner: str, dim: int, side_dwconv: int, dtype, param_dtype, rngs) -> Conv2d | None:
    if side_dwconv == 0:
        return None
    return Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def _check_kernel(owner: str, kernel: str) -> str:
    return check_choice(owner, "kernel", kernel, pk_common.IMPLS)


@register_mixer("biformer_routing")
class BiLevelRoutingAttention(nnx.Module):
    """BiFormer's bi-level routing attention (BRA) on a 2-D map (see the module docstring).

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype.

    Args:
      dim: channels ``D`` (divisible by ``num_heads``).
      num_heads: heads ``Hd`` (official: ``qk_dim // 32``).
      n_win: regions per side ``S`` (paper: 7).
      topk: routed regions per query region, ``1 <= topk <= S^2`` (paper: 1, 4, 16 in stages 0-2).
      qk_dim: width of q and k (divisible by ``num_heads``); default ``dim``.
      qk_scale: logit scale; default ``qk_dim ** -0.5`` (the official default, see the module docstring).
      side_dwconv: LePE kernel size (odd), 0 = no LePE (paper: 5).
      kv_downsample_mode: must be ``"identity"`` (the released models' setting).
      auto_pad: zero-pad H and W to multiples of ``n_win`` (else they must divide).
      qkv_bias / out_bias: biases of the q/k/v and of the output projections (official: both).
      kernel: ``routed_attention``'s impl: "auto" | "xla" | "pallas" | "reference".
      interpret: Pallas interpret mode (see ``attnzoo.pallas_kernels.common``).
      dtype: compute dtype (default: promotion of input and parameters); routing affinities are
        float32 (or wider). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        kv_downsample_mode: str = "identity",
        auto_pad: bool = False,
        qkv_bias: bool = True,
        out_bias: bool = True,
        kernel: str = "auto",
        interpret=None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.qk_dim = self.dim if qk_dim is None else check_int(owner, "qk_dim", qk_dim)
        if self.dim % self.num_heads or self.qk_dim % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) and qk_dim ({self.qk_dim})"
            )
        self.n_win = check_int(owner, "n_win", n_win)
        self.topk = check_int(owner, "topk", topk)
        if self.topk > self.n_win**2:
            raise ValueError(
                f"{owner}: topk ({self.topk}) must be at most the number of regions n_win**2 = {self.n_win**2}"
            )
        self.kv_downsample_mode = check_choice(owner, "kv_downsample_mode", kv_downsample_mode, KV_DOWNSAMPLE_MODES)
        self.auto_pad = check_bool(owner, "auto_pad", auto_pad)
        qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        out_bias = check_bool(owner, "out_bias", out_bias)
        self.scale = check_float(owner, "qk_scale", qk_scale, positive=True)
        if self.scale is None:
            self.scale = self.qk_dim**-0.5
        self.kernel = _check_kernel(owner, kernel)
        self.interpret = pk_common.check_interpret(interpret, owner)
        self.side_dwconv = _check_side_dwconv(owner, side_dwconv)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.qk_head_dim = self.qk_dim // self.num_heads
        self.v_head_dim = self.dim // self.num_heads

        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        heads = self.num_heads
        self.qk = Dense(dim, (2, heads, self.qk_head_dim), logical_axes=("embed", None, "heads", "head_dim"),
                        use_bias=qkv_bias, **dense)
        self.v = Dense(dim, (heads, self.v_head_dim), logical_axes=("embed", "heads", "head_dim"), use_bias=qkv_bias,
                       **dense)
        self.proj = Dense((heads, self.v_head_dim), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=out_bias,
                          **dense)
        self.lepe = _lepe(owner, self.dim, self.side_dwconv, dtype, param_dtype, rngs)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """``(Hp, Wp)``: the map the regions cut, ``(H, W)`` rounded up to multiples of ``n_win``
        with ``auto_pad`` (else ``(H, W)``, which must divide)."""
        n = self.n_win
        if not self.auto_pad:
            if height % n or width % n:
                raise ValueError(
                    f"{type(self).__name__}: H x W = {height} x {width} must be divisible by n_win ({n}); "
                    "pass auto_pad=True to zero-pad the map"
                )
            return height, width
        return -(-height // n) * n, -(-width // n) * n

    def routes(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """Region routing: ``q, k [B, S^2, r, Hd, Dqk]`` (regions of tokens) -> int32 ``[B, S^2, topk]``,
        the ``topk`` key regions of largest ``(scale mean q) . (mean k)`` per query region (no gradient)."""
        accumulate = jnp.promote_types(q.dtype, jnp.float32)
        batch, regions = q.shape[:2]
        q_win = jnp.mean(q.astype(accumulate), axis=2).reshape(batch, regions, self.qk_dim)
        k_win = jnp.mean(k.astype(accumulate), axis=2).reshape(batch, regions, self.qk_dim)
        affinity = jnp.einsum("bqc,bkc->bqk", q_win * self.scale, k_win)
        _, index = jax.lax.top_k(jax.lax.stop_gradient(affinity), self.topk)
        return index.astype(jnp.int32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        owner = type(self).__name__
        check_input(owner, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        batch, height, width, _ = x.shape
        padded = self.padded_size(height, width)
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        x = jnp.pad(x.astype(dtype), ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0)))
        region = (padded[0] // self.n_win, padded[1] // self.n_win)
        tokens = region[0] * region[1]

        qk = self.qk(x)  # [B, Hp, Wp, 2, Hd, Dqk]
        v = self.v(x)  # [B, Hp, Wp, Hd, Dv]
        q = window_partition(qk[..., 0, :, :], region)  # [B, S^2, r, Hd, Dqk]
        k = window_partition(qk[..., 1, :, :], region)
        routes = self.routes(q, k)
        total = self.n_win**2 * tokens
        heads = self.num_heads
        out = routed_attention(
            q.reshape(batch, total, heads, self.qk_head_dim),
            k.reshape(batch, total, heads, self.qk_head_dim),
            window_partition(v, region).reshape(batch, total, heads, self.v_head_dim),
            routes, q_region=tokens, kv_region=tokens, scale=self.scale, impl=self.kernel, interpret=self.interpret,
        )
        out = window_reverse(out.reshape(batch, self.n_win**2, tokens, heads, self.v_head_dim), region, padded)
        if self.lepe is not None:
            lepe = self.lepe(v.reshape(batch, *padded, self.dim))
            out = out + lepe.reshape(out.shape).astype(out.dtype)
        y = self.proj(out.astype(dtype))
        return y[:, :height, :width]

    def flops(self, height: int, width: int) -> int:
        """Forward matmul / convolution FLOPs for one ``height x width`` map (2 per multiply-add), on
        the padded map of ``T = Hp Wp`` tokens, ``S^2`` regions of ``r`` tokens: q, k, v
        ``2 T D (2 Dqk_total + D)``; routing ``2 S^4 Dqk_total``; token attention
        ``2 T (topk r) (Dqk_total + D)``; LePE ``2 T k^2 D``; output projection ``2 T D^2``."""
        hp, wp = self.padded_size(height, width)
        tokens = hp * wp
        regions = self.n_win**2
        routed_keys = self.topk * tokens // regions
        d, qk = self.dim, self.qk_dim
        lepe = 0 if self.lepe is None else 2 * tokens * self.lepe.kernel_size[0] * self.lepe.kernel_size[1] * d
        return (2 * tokens * d * (2 * qk + d) + 2 * regions * regions * qk + 2 * tokens * routed_keys * (qk + d)
                + lepe + 2 * tokens * d * d)


@register_mixer("attention_lepe")
class AttentionLePE(nnx.Module):
    """Global multi-head softmax attention over a 2-D map plus a depthwise convolution of the input
    (BiFormer's ``AttentionLePE``; see the module docstring).

    ``x [B, H, W, D] -> [B, H, W, D]`` in the compute dtype.

    Args:
      dim: channels ``D``. num_heads: heads ``Hd`` (official: 8), dividing ``D``.
      side_dwconv: LePE kernel size (odd), 0 = no LePE (paper: 5).
      qkv_bias: bias of the qkv projection (official: False). out_bias: bias of the output projection.
      qk_scale: logit scale; default ``head_dim ** -0.5``.
      kernel: the attention op's impl: "auto" | "xla" | "pallas" | "reference".
      interpret: Pallas interpret mode.
      dtype / param_dtype / kernel_init / rngs: as :class:`BiLevelRoutingAttention`.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        side_dwconv: int = 5,
        qkv_bias: bool = False,
        out_bias: bool = True,
        qk_scale: float | None = None,
        kernel: str = "auto",
        interpret=None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim, self.num_heads = check_heads(owner, dim, num_heads)
        self.head_dim = self.dim // self.num_heads
        qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        out_bias = check_bool(owner, "out_bias", out_bias)
        self.scale = check_float(owner, "qk_scale", qk_scale, positive=True)
        if self.scale is None:
            self.scale = self.head_dim**-0.5
        self.kernel = _check_kernel(owner, kernel)
        self.interpret = pk_common.check_interpret(interpret, owner)
        self.side_dwconv = _check_side_dwconv(owner, side_dwconv)
        self.dtype = dtype
        self.param_dtype = param_dtype
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        heads, dh = self.num_heads, self.head_dim
        self.qkv = Dense(dim, (3, heads, dh), logical_axes=("embed", None, "heads", "head_dim"), use_bias=qkv_bias,
                         **dense)
        self.proj = Dense((heads, dh), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=out_bias, **dense)
        self.lepe = _lepe(owner, self.dim, self.side_dwconv, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, D]`` -> ``[B, H, W, D]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        batch, height, width, _ = x.shape
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        x = x.astype(dtype)
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=self.scale, impl=self.kernel,
                                     interpret=self.interpret)
        out = out.reshape(batch, height, width, self.num_heads, self.head_dim)
        if self.lepe is not None:
            out = out + self.lepe(x).reshape(out.shape).astype(out.dtype)
        return self.proj(out.astype(dtype))

    def flops(self, height: int, width: int) -> int:
        """Forward matmul / convolution FLOPs for one ``height x width`` map (2 per multiply-add) with
        ``T = H W``: qkv ``2 T D 3D``, scores and weights @ values ``2 * 2 T^2 D``, LePE ``2 T k^2 D``,
        output projection ``2 T D^2``."""
        tokens, d = height * width, self.dim
        lepe = 0 if self.lepe is None else 2 * tokens * self.lepe.kernel_size[0] * self.lepe.kernel_size[1] * d
        return 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + lepe + 2 * tokens * d * d
