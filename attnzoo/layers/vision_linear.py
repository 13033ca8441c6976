"""Linear-complexity global attention on 2-D feature maps: Agent Attention, FLatten's focused linear
attention and Efficient Attention.

>>> m = AgentAttention(dim=96, num_heads=3, resolution=56, agent_num=9, rngs=nnx.Rngs(0))
>>> y = m(x)                                   # x [B,56,56,96] -> [B,56,56,96]
>>> f = create_mixer("focused_linear_attention", dim=96, num_heads=3, resolution=(56, 56), rngs=nnx.Rngs(0))
>>> e = create_mixer("efficient_attention", dim=96, num_heads=3, rngs=nnx.Rngs(0))   # any H, W

Registered mixers (``spatial_ndim = 2``: ``x [B, H, W, C] -> [B, H, W, C]``, every token attends to
the whole map; ``T = H * W`` tokens, ``Hd`` heads of ``Dh = C / Hd`` features, channels head-major):

===========================  ===================================================================
``agent_attention``          Agent Attention (Han et al. 2024), Agent-Swin's ``AgentAttention``
``focused_linear_attention`` FLatten (Han et al. 2023), FLatten-Swin's ``FocusedLinearAttention``
``efficient_attention``      Efficient Attention (Shen et al. 2021), softmax normalisation
===========================  ===================================================================

and two 1-D token mixers for the ViT (``x [B, P + H * W, C]``: ``P`` prefix tokens such as the class
token, then the map row-major): ``agent_attention_tokens`` (Agent-DeiT's ``AgentAttention``) and
``focused_linear_attention_tokens`` (FLatten on ViT tokens). The ViT passes them ``resolution`` (its
patch grid) and ``num_prefix_tokens``.

Agent Attention and FLatten learn position parameters sized to the map, so they are built for one
``resolution = (H, W)`` and must be called on exactly that size (the Swin backbone passes each
stage's resolution). They are global over the map, as Agent-Swin's stages 1-3 and FLatten-Swin's
stages 1-2 use them (the official configs set the window to the whole map): ``window_size``, if
given, must equal ``resolution`` and ``shift_size`` must be 0; other values raise ``ValueError``.

**Agent Attention.** ``q, k, v = x W_qkv (+ b)``; agent tokens ``A [n, C]`` are the adaptive average
pool of the query map to ``p x p = n = agent_num`` cells (torch's ``AdaptiveAvgPool2d``: cell ``i``
of an axis of length ``L`` averages rows ``floor(i L / p) .. ceil((i + 1) L / p) - 1``; agent
``i * p + j``), split into heads as q. Per head, with ``s = Dh ** -0.5``::

    V_A = softmax_keys(s A K^T + B1) V          B1 [n, T] = bilinear(an_bias) + ah_bias + aw_bias
    O   = softmax_agents(s Q A^T + B2) V_A      B2 [T, n] = bilinear(na_bias)^T + ha_bias + wa_bias
    y   = (O + DWConv3x3(V)) W_proj + b_proj

``bilinear`` resizes a ``[Hd, n, 7, 7]`` table to ``[Hd, n, H, W]`` as torch's
``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing; :func:`bilinear_matrix`);
``ah_bias[h, a, y] + aw_bias[h, a, x]`` is the bias of agent ``a`` and token ``(y, x)``, and
``ha_bias[h, y, a] + wa_bias[h, x, a]`` that of token ``(y, x)`` and agent ``a``. The depthwise
3x3 convolution (padding 1, bias) runs over all ``C`` channels of v on the map.

**Focused linear attention.** ``q, k, v = x W_qkv (+ b)``, ``k += positional_encoding [T, C]``;
the focusing function ``phi`` on all ``C`` channels of a token (norms over ``C``, not per head)::

    u = (relu(z) + 1e-6) / softplus(scale)      phi(z) = ||u|| * u**p / ||u**p||

then per head ``O_t = phi(q_t) (phi(K)^T V / T) / (phi(q_t) . mean_j phi(k_j) + 1e-6)`` and
``y = (O + DWConv(V)) W_proj + b_proj``: the depthwise ``kernel_size`` convolution (padding
``kernel_size // 2``, bias) has ``Dh`` channels shared by every head (FLatten's ``dwc`` on
``[B * Hd, Dh, H, W]``).

**Efficient Attention.** Per head, queries ``Q [T, Dk]`` and keys ``K [T, Dk]``, values ``V [T, Dv]``::

    y = (softmax_features(Q) (softmax_positions(K)^T V)) W_proj + b_proj

the context ``softmax_positions(K)^T V [Dk, Dv]`` formed first (linear in ``T``). The official
module adds its input to the output; here the backbone block's residual does that.

Parameters (logical axes): ``qkv.kernel [C, 3, Hd, Dh]`` (embed, None, heads, head_dim),
``qkv.bias [3, Hd, Dh]``; ``proj.kernel [Hd, Dh, C]``, ``proj.bias [C]``; agent:
``dwc.kernel [3, 3, 1, C]``, ``dwc.bias [C]``, ``an_bias`` / ``na_bias [Hd, n, 7, 7]`` (heads, ...),
``ah_bias [Hd, n, H]``, ``aw_bias [Hd, n, W]``, ``ha_bias [Hd, H, n]``, ``wa_bias [Hd, W, n]`` (the
official tensors with their singleton axes dropped; trunc-normal std 0.02); focused:
``dwc.kernel [k, k, 1, Dh]``, ``dwc.bias [Dh]``, ``scale [Hd, Dh]`` and
``positional_encoding [T, Hd, Dh]`` (zeros, as the official code); efficient: ``query`` / ``key``
``[C, Hd, Dk]``, ``value [C, Hd, Dv]`` (with biases), ``proj [Hd, Dv, C]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import DType, Dense, as_pair, check_bool, check_input, compute_dtype, partitioned
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.registry import register_mixer
from attnzoo.layers.window import qk_scale_or_default, qkv_projections
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "AgentAttention",
    "FocusedLinearAttention",
    "EfficientAttention",
    "AgentAttentionTokens",
    "FocusedLinearAttentionTokens",
    "adaptive_pool_matrix",
    "bilinear_matrix",
]


def adaptive_pool_matrix(output: int, length: int) -> np.ndarray:
    """``[output, length]`` float64 averaging matrix of torch's adaptive average pooling along one axis:
    row ``i`` averages positions ``floor(i L / P) .. ceil((i + 1) L / P) - 1`` (``P = output``)."""
    matrix = np.zeros((output, length))
    for i in range(output):
        start, end = (i * length) // output, -(-((i + 1) * length) // output)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def bilinear_matrix(output: int, length: int) -> np.ndarray:
    """``[output, length]`` float64 weights of torch's 1-D linear resize with ``align_corners=False``
    (no antialiasing): output ``i`` samples ``max((i + 0.5) L / P - 0.5, 0)`` between its two
    neighbours (the last one repeated at the border)."""
    matrix = np.zeros((output, length))
    for i in range(output):
        source = max((i + 0.5) * length / output - 0.5, 0.0)
        low = min(int(math.floor(source)), length - 1)
        high = min(low + 1, length - 1)
        frac = source - low
        matrix[i, low] += 1.0 - frac
        matrix[i, high] += frac
    return matrix


def _init_common(module, owner: str, dim, num_heads, dtype, param_dtype) -> None:
    module.dim = check_int(owner, "dim", dim)
    module.num_heads = check_int(owner, "num_heads", num_heads)
    if module.dim % module.num_heads:
        raise ValueError(f"{owner}: num_heads ({module.num_heads}) must divide dim ({module.dim})")
    module.head_dim = module.dim // module.num_heads
    module.dtype = dtype
    module.param_dtype = param_dtype


def _check_global(owner: str, resolution, window_size, shift_size) -> tuple[int, int]:
    """The map size; a ``window_size`` other than the map or a non-zero ``shift_size`` is refused."""
    size = as_pair(owner, "resolution", resolution)
    if window_size is not None and as_pair(owner, "window_size", window_size) != size:
        raise ValueError(
            f"{owner}: attends over the whole map, so window_size must be None or the resolution {size}, "
            f"got {window_size!r}"
        )
    if any(as_pair(owner, "shift_size", shift_size, minimum=0)):
        raise ValueError(f"{owner}: attends over the whole map, so shift_size must be 0, got {shift_size!r}")
    return size


def _check_map(owner: str, x, dim: int, resolution: tuple[int, int]) -> None:
    check_input(owner, x, ndim=4, last=dim, layout="[B,H,W,C]")
    if tuple(x.shape[1:3]) != resolution:
        raise ValueError(
            f"{owner}: x must be a {resolution[0]} x {resolution[1]} map (the resolution the layer was built for), "
            f"got {x.shape[1]} x {x.shape[2]}"
        )


def _param(init, axes, rngs, shape, param_dtype):
    return nnx.Param(partitioned(init, axes)(rngs.params(), shape, param_dtype))


@register_mixer("agent_attention")
class AgentAttention(nnx.Module):
    """Agent Attention over a whole ``H x W`` map (Agent-Swin's ``AgentAttention``, window = map).

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype, ``(H, W) == resolution``.

    Args:
      dim: channels ``C``. num_heads: heads ``Hd`` (must divide ``dim``).
      resolution: ``(H, W)`` or an int: the map the position biases are made for.
      agent_num: agent tokens ``n``, a perfect square ``p * p`` (Agent-Swin-T: 9, 16, 49).
      window_size / shift_size: accepted only as "the whole map" (``None`` or ``resolution``, 0).
      qkv_bias / out_bias: biases of the fused qkv and of the output projections.
      qk_scale: score scale; default ``Dh ** -0.5`` (the official code always uses it).
      kernel_size: side of the depthwise convolution on v (official: 3).
      bias_size: side of the interpolated ``an_bias`` / ``na_bias`` tables (official: 7).
      dtype: compute dtype (default: promotion of input and parameters); scores, softmax and the
        position biases are float32 (or wider). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        resolution: int | Sequence[int],
        agent_num: int = 49,
        window_size: int | Sequence[int] | None = None,
        shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_scale: float | None = None,
        kernel_size: int = 3,
        bias_size: int = 7,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        _init_common(self, owner, dim, num_heads, dtype, param_dtype)
        self.resolution = _check_global(owner, resolution, window_size, shift_size)
        self.agent_num = check_int(owner, "agent_num", agent_num)
        self.pool_size = math.isqrt(self.agent_num)
        if self.pool_size * self.pool_size != self.agent_num:
            raise ValueError(f"{owner}: agent_num must be a perfect square (agents pooled to p x p), got {agent_num}")
        self.kernel_size = check_int(owner, "kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd (padding kernel_size // 2 keeps the size), got {kernel_size}")
        self.bias_size = check_int(owner, "bias_size", bias_size)
        check_bool(owner, "qkv_bias", qkv_bias)
        check_bool(owner, "out_bias", out_bias)
        self.scale = qk_scale_or_default(owner, qk_scale, self.head_dim)

        heads, dh, n = self.num_heads, self.head_dim, self.agent_num
        self.qkv, self.proj = qkv_projections(dim, heads, dh, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype,
                                              param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.dwc = Conv2d(self.dim, self.dim, self.kernel_size, padding=self.kernel_size // 2, groups=self.dim,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        height, width, g = *self.resolution, self.bias_size
        self.an_bias = _param(init, ("heads", None, None, None), rngs, (heads, n, g, g), param_dtype)
        self.na_bias = _param(init, ("heads", None, None, None), rngs, (heads, n, g, g), param_dtype)
        self.ah_bias = _param(init, ("heads", None, None), rngs, (heads, n, height), param_dtype)
        self.aw_bias = _param(init, ("heads", None, None), rngs, (heads, n, width), param_dtype)
        self.ha_bias = _param(init, ("heads", None, None), rngs, (heads, height, n), param_dtype)
        self.wa_bias = _param(init, ("heads", None, None), rngs, (heads, width, n), param_dtype)

    def position_biases(self) -> tuple[jax.Array, jax.Array]:
        """``(B1 [Hd, n, T], B2 [Hd, T, n])`` float32 (or wider): the agent->token and token->agent
        biases (token ``y * W + x``)."""
        height, width = self.resolution
        accumulate = jnp.promote_types(self.an_bias[...].dtype, jnp.float32)
        rows = jnp.asarray(bilinear_matrix(height, self.bias_size), accumulate)
        cols = jnp.asarray(bilinear_matrix(width, self.bias_size), accumulate)
        get = lambda p: p[...].astype(accumulate)  # noqa: E731
        resize = lambda t: jnp.einsum("xj,hayj->hayx", cols, jnp.einsum("yi,haij->hayj", rows, t))  # noqa: E731
        an, na = resize(get(self.an_bias)), resize(get(self.na_bias))
        b1 = an + get(self.ah_bias)[:, :, :, None] + get(self.aw_bias)[:, :, None, :]
        b2 = jnp.moveaxis(na, 1, 3) + get(self.ha_bias)[:, :, None, :] + get(self.wa_bias)[:, None, :, :]
        tokens = height * width
        return b1.reshape(self.num_heads, self.agent_num, tokens), b2.reshape(self.num_heads, tokens, self.agent_num)

    def agent_tokens(self, q: jax.Array) -> jax.Array:
        """``q [B, H, W, Hd, Dh]`` -> agents ``[B, n, Hd, Dh]`` float32 (or wider): the adaptive
        average pool of the query map to ``p x p`` cells, agent ``i * p + j``."""
        batch, height, width = q.shape[:3]
        accumulate = jnp.promote_types(q.dtype, jnp.float32)
        pool_h = jnp.asarray(adaptive_pool_matrix(self.pool_size, height), accumulate)
        pool_w = jnp.asarray(adaptive_pool_matrix(self.pool_size, width), accumulate)
        rows = jnp.einsum("iy,byxhd->bixhd", pool_h, q.astype(accumulate))
        agents = jnp.einsum("jx,bixhd->bijhd", pool_w, rows)
        return agents.reshape(batch, self.agent_num, self.num_heads, self.head_dim)

    def _attend(self, q, k, v, agents, b1, b2, dtype) -> jax.Array:
        """The two agent softmaxes: ``q, k, v [B, N, Hd, Dh]``, ``agents [B, n, Hd, Dh]``, biases
        ``b1 [Hd, n, N]`` and ``b2 [Hd, N, n]`` -> ``[B, N, Hd, Dh]`` float32 (or wider)."""
        accumulate = jnp.promote_types(dtype, jnp.float32)
        scores = jnp.einsum("bahd,bthd->bhat", agents, k, preferred_element_type=accumulate) * self.scale
        weights = jax.nn.softmax(scores + b1.astype(accumulate), axis=-1).astype(dtype)
        agent_v = jnp.einsum("bhat,bthd->bahd", weights, v, preferred_element_type=accumulate).astype(dtype)
        scores = jnp.einsum("bthd,bahd->bhta", q, agents, preferred_element_type=accumulate) * self.scale
        weights = jax.nn.softmax(scores + b2.astype(accumulate), axis=-1).astype(dtype)
        return jnp.einsum("bhta,bahd->bthd", weights, agent_v, preferred_element_type=accumulate)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype."""
        owner = type(self).__name__
        _check_map(owner, x, self.dim, self.resolution)
        batch, height, width, _ = x.shape
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        qkv = self.qkv(x)  # [B, H, W, 3, Hd, Dh]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        agents = self.agent_tokens(q).astype(dtype)
        tokens = height * width
        q = q.reshape(batch, tokens, self.num_heads, self.head_dim)
        k = k.reshape(batch, tokens, self.num_heads, self.head_dim)
        v_map = v
        v = v.reshape(batch, tokens, self.num_heads, self.head_dim)
        b1, b2 = self.position_biases()
        out = self._attend(q, k, v, agents, b1, b2, dtype)

        local = self.dwc(v_map.reshape(batch, height, width, self.dim))  # [B, H, W, C]
        out = out.reshape(batch, height, width, self.num_heads, self.head_dim) + local.reshape(
            batch, height, width, self.num_heads, self.head_dim).astype(accumulate)
        return self.proj(out.astype(dtype))

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), ``T = H W``:
        qkv ``2 T C 3C``, the four agent products ``4 * 2 T n C``, the depthwise convolution
        ``2 T C k^2``, the output projection ``2 T C C``. Pooling, bias interpolation and softmax are
        not counted."""
        tokens, c = height * width, self.dim
        return (2 * tokens * c * 3 * c + 8 * tokens * self.agent_num * c + 2 * tokens * c * self.kernel_size**2
                + 2 * tokens * c * c)


@register_mixer("focused_linear_attention")
class FocusedLinearAttention(nnx.Module):
    """FLatten's focused linear attention over a whole ``H x W`` map (FLatten-Swin's
    ``FocusedLinearAttention``, window = map).

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype, ``(H, W) == resolution``; the focusing
    function and the linear attention run in float32 (or wider).

    Args:
      dim: channels ``C``. num_heads: heads ``Hd`` (must divide ``dim``).
      resolution: ``(H, W)`` or an int: the map the positional encoding ``[H * W, C]`` is made for.
      focusing_factor: the power ``p`` of the focusing function (official: 3), a positive float.
      kernel_size: odd side of the depthwise convolution on v (official: 5).
      window_size / shift_size: accepted only as "the whole map" (``None`` or ``resolution``, 0).
      qkv_bias / out_bias: biases of the fused qkv and of the output projections.
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2
    EPS = 1e-6  # the official code's offset after ReLU and in the normaliser

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        resolution: int | Sequence[int],
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        window_size: int | Sequence[int] | None = None,
        shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        _init_common(self, owner, dim, num_heads, dtype, param_dtype)
        self.resolution = _check_global(owner, resolution, window_size, shift_size)
        self.focusing_factor = check_float(owner, "focusing_factor", focusing_factor, positive=True, allow_none=False)
        self.kernel_size = check_int(owner, "kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd (padding kernel_size // 2 keeps the size), got {kernel_size}")
        check_bool(owner, "qkv_bias", qkv_bias)
        check_bool(owner, "out_bias", out_bias)

        heads, dh = self.num_heads, self.head_dim
        self.qkv, self.proj = qkv_projections(dim, heads, dh, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype,
                                              param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.dwc = Conv2d(dh, dh, self.kernel_size, padding=self.kernel_size // 2, groups=dh,
                          logical_axes=(None, None, None, "head_dim"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        zeros = nnx.initializers.zeros
        tokens = self._encoded_tokens()
        self.scale = _param(zeros, ("heads", "head_dim"), rngs, (heads, dh), param_dtype)
        self.positional_encoding = _param(zeros, (None, "heads", "head_dim"), rngs, (tokens, heads, dh), param_dtype)

    def _encoded_tokens(self) -> int:
        """Rows of the positional encoding: the tokens the layer is called on."""
        return self.resolution[0] * self.resolution[1]

    def focus(self, z: jax.Array) -> jax.Array:
        """The focusing function on ``z [..., Hd, Dh]`` (norms over all ``Hd * Dh`` channels)."""
        scale = jax.nn.softplus(self.scale[...].astype(z.dtype))
        u = (jax.nn.relu(z) + self.EPS) / scale
        powered = u**self.focusing_factor
        norm = lambda a: jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True))  # noqa: E731
        return powered * (norm(u) / norm(powered))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype."""
        owner = type(self).__name__
        _check_map(owner, x, self.dim, self.resolution)
        batch, height, width, _ = x.shape
        tokens = height * width
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, Hd, Dh]
        out = self._linear_attend(q, k, v, accumulate) + self._local(v).astype(accumulate)
        return self.proj(out.reshape(batch, height, width, self.num_heads, self.head_dim).astype(dtype))

    def _linear_attend(self, q, k, v, accumulate) -> jax.Array:
        """``q, k, v [B, N, Hd, Dh]`` (``N`` = the encoded tokens) -> focused linear attention
        ``[B, N, Hd, Dh]`` in ``accumulate``, the positional encoding added to k."""
        k = k.astype(accumulate) + self.positional_encoding[...].astype(accumulate)
        q, k = self.focus(q.astype(accumulate)), self.focus(k)
        context = jnp.einsum("bthd,bthe->bhde", k, v.astype(accumulate)) / q.shape[1]
        normaliser = jnp.einsum("bthd,bhd->bth", q, jnp.mean(k, axis=1)) + self.EPS
        return jnp.einsum("bthd,bhde->bthe", q, context) / normaliser[..., None]

    def _local(self, v) -> jax.Array:
        """The depthwise convolution of each head's values on the map (``Dh`` channels, one kernel
        for every head): ``v [B, H * W, Hd, Dh] -> [B, H * W, Hd, Dh]``."""
        batch = v.shape[0]
        (height, width), tokens = self.resolution, v.shape[1]
        per_head = jnp.moveaxis(v.reshape(batch, height, width, self.num_heads, self.head_dim), 3, 1)
        local = self.dwc(per_head.reshape(batch * self.num_heads, height, width, self.head_dim))
        return jnp.moveaxis(local.reshape(batch, self.num_heads, tokens, self.head_dim), 1, 2)

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), ``T = H W``:
        qkv ``2 T C 3C``, context ``phi(K)^T V`` and ``phi(Q)`` times it ``2 * 2 T C Dh``, the
        normaliser ``2 T C``, the depthwise convolution ``2 T C k^2``, the output projection
        ``2 T C C``. The focusing function and the norms are not counted."""
        tokens, c = height * width, self.dim
        return (2 * tokens * c * 3 * c + 4 * tokens * c * self.head_dim + 2 * tokens * c
                + 2 * tokens * c * self.kernel_size**2 + 2 * tokens * c * c)


@register_mixer("efficient_attention")
class EfficientAttention(nnx.Module):
    """Efficient Attention (Shen et al. 2021) over a whole map of any size, softmax normalisation.

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype; the two softmaxes and the context
    are float32 (or wider).

    Args:
      dim: channels ``C``. num_heads: heads ``Hd``.
      key_dim: query / key features per head ``Dk``; default ``dim // num_heads``.
      value_dim: value features per head ``Dv``; default ``dim // num_heads``.
      qkv_bias / out_bias: biases of the query / key / value and of the output projections (the
        official 1x1 convolutions have biases).
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      kernel_init: initializer of the projection kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    spatial_ndim = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        key_dim: int | None = None,
        value_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        if (key_dim is None or value_dim is None) and self.dim % self.num_heads:
            raise ValueError(
                f"{owner}: num_heads ({self.num_heads}) must divide dim ({self.dim}) when key_dim or value_dim is not given"
            )
        self.key_dim = check_int(owner, "key_dim", self.dim // self.num_heads if key_dim is None else key_dim)
        self.value_dim = check_int(owner, "value_dim", self.dim // self.num_heads if value_dim is None else value_dim)
        check_bool(owner, "qkv_bias", qkv_bias)
        check_bool(owner, "out_bias", out_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        heads = self.num_heads
        axes = ("embed", "heads", "head_dim")
        self.query = Dense(dim, (heads, self.key_dim), logical_axes=axes, use_bias=qkv_bias, **dense)
        self.key = Dense(dim, (heads, self.key_dim), logical_axes=axes, use_bias=qkv_bias, **dense)
        self.value = Dense(dim, (heads, self.value_dim), logical_axes=axes, use_bias=qkv_bias, **dense)
        self.proj = Dense((heads, self.value_dim), dim, logical_axes=("heads", "head_dim", "embed"), use_bias=out_bias,
                          **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype."""
        check_input(type(self).__name__, x, ndim=4, last=self.dim, layout="[B,H,W,C]")
        batch, height, width, _ = x.shape
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        tokens = height * width
        q = self.query(x).reshape(batch, tokens, self.num_heads, self.key_dim).astype(accumulate)
        k = self.key(x).reshape(batch, tokens, self.num_heads, self.key_dim).astype(accumulate)
        v = self.value(x).reshape(batch, tokens, self.num_heads, self.value_dim)
        q = jax.nn.softmax(q, axis=-1)  # over each query's features
        k = jax.nn.softmax(k, axis=1)  # over positions, per key feature
        context = jnp.einsum("bthd,bthe->bhde", k, v.astype(accumulate))  # [B, Hd, Dk, Dv]
        out = jnp.einsum("bthd,bhde->bthe", q, context)
        return self.proj(out.reshape(batch, height, width, self.num_heads, self.value_dim).astype(dtype))

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` map (2 per multiply-add), ``T = H W``:
        projections ``2 T C Hd (2 Dk + Dv)``, context and output ``2 * 2 T Hd Dk Dv``, output
        projection ``2 T Hd Dv C``. Softmaxes are not counted."""
        tokens, heads = height * width, self.num_heads
        return (2 * tokens * self.dim * heads * (2 * self.key_dim + self.value_dim)
                + 4 * tokens * heads * self.key_dim * self.value_dim + 2 * tokens * heads * self.value_dim * self.dim)


def _check_tokens(owner: str, x, dim: int, num_prefix_tokens: int, resolution: tuple[int, int]) -> None:
    check_input(owner, x, ndim=3, last=dim, layout="[B,N,C]")
    expected = num_prefix_tokens + resolution[0] * resolution[1]
    if x.shape[1] != expected:
        raise ValueError(
            f"{owner}: x must have {num_prefix_tokens} prefix tokens then a {resolution[0]} x {resolution[1]} map "
            f"({expected} tokens, the layout the layer was built for), got {x.shape[1]} tokens"
        )


@register_mixer("agent_attention_tokens")
class AgentAttentionTokens(AgentAttention):
    """Agent Attention on a token sequence of ``P`` prefix tokens (class / distillation tokens) then an
    ``H x W`` map, row-major (Agent-DeiT's ``AgentAttention``, the ViT's token mixer).

    ``x [B, P + H * W, C] -> [B, P + H * W, C]`` in the compute dtype. As Agent-DeiT: the agents are
    pooled from the queries of the map tokens only; every token (prefix ones included) is a key and a
    query of the two agent softmaxes, the prefix tokens with their own learned biases ``ac_bias`` (agent
    -> prefix key) and ``ca_bias`` (prefix query -> agent) beside the map's interpolated ones; the
    depthwise convolution of v adds to the map tokens only::

        V_A = softmax_keys(s A K^T + [ac_bias | B1]) V        over all P + T keys
        O   = softmax_agents(s Q A^T + [ca_bias ; B2]) V_A     for all P + T queries
        y   = (O + [0 ; DWConv3x3(V_map)]) W_proj + b_proj

    Args: as :class:`AgentAttention` (without ``window_size`` / ``shift_size``), plus
      num_prefix_tokens: ``P >= 0`` tokens before the map (Agent-DeiT: 1, the class token).

    Parameters: :class:`AgentAttention`'s, plus ``ac_bias [Hd, n, P]`` and ``ca_bias [Hd, P, n]``
    (heads, ...; trunc-normal std 0.02; absent when ``P = 0``); the official ``[1, Hd, n, 1]`` and
    ``[1, Hd, 1, n]`` tensors are these with ``P = 1`` and the leading singleton dropped.
    """

    spatial_ndim = 1
    grid_tokens = True  # tokens of a fixed patch grid: a ViT mixer, not a causal sequence mixer

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        resolution: int | Sequence[int],
        num_prefix_tokens: int = 1,
        agent_num: int = 49,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_scale: float | None = None,
        kernel_size: int = 3,
        bias_size: int = 7,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self.num_prefix_tokens = check_int(owner, "num_prefix_tokens", num_prefix_tokens, minimum=0)
        super().__init__(dim, num_heads, resolution=resolution, agent_num=agent_num, qkv_bias=qkv_bias,
                         out_bias=out_bias, qk_scale=qk_scale, kernel_size=kernel_size, bias_size=bias_size,
                         dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        heads, n, prefix = self.num_heads, self.agent_num, self.num_prefix_tokens
        self.ac_bias = _param(init, ("heads", None, None), rngs, (heads, n, prefix), param_dtype) if prefix else None
        self.ca_bias = _param(init, ("heads", None, None), rngs, (heads, prefix, n), param_dtype) if prefix else None

    @property
    def num_tokens(self) -> int:
        """``P + H * W``: the sequence length the layer is built for."""
        return self.num_prefix_tokens + self.resolution[0] * self.resolution[1]

    def position_biases(self) -> tuple[jax.Array, jax.Array]:
        """``(B1 [Hd, n, P + T], B2 [Hd, P + T, n])`` float32 (or wider): the map's biases
        (:meth:`AgentAttention.position_biases`) after the prefix tokens' ``ac_bias`` / ``ca_bias``."""
        b1, b2 = super().position_biases()
        if not self.num_prefix_tokens:
            return b1, b2
        b1 = jnp.concatenate([self.ac_bias[...].astype(b1.dtype), b1], axis=2)
        b2 = jnp.concatenate([self.ca_bias[...].astype(b2.dtype), b2], axis=1)
        return b1, b2

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, P + H * W, C]`` -> ``[B, P + H * W, C]`` in the compute dtype."""
        owner = type(self).__name__
        _check_tokens(owner, x, self.dim, self.num_prefix_tokens, self.resolution)
        batch, prefix = x.shape[0], self.num_prefix_tokens
        (height, width), shape = self.resolution, (batch, x.shape[1], self.num_heads, self.head_dim)
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        qkv = self.qkv(x)  # [B, N, 3, Hd, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        agents = self.agent_tokens(q[:, prefix:].reshape(batch, height, width, self.num_heads, self.head_dim))
        b1, b2 = self.position_biases()
        out = self._attend(q, k, v, agents.astype(dtype), b1, b2, dtype).reshape(shape)
        local = self.dwc(v[:, prefix:].reshape(batch, height, width, self.dim)).astype(accumulate)
        out = out.at[:, prefix:].add(local.reshape(batch, height * width, self.num_heads, self.head_dim))
        return self.proj(out.astype(dtype))

    def flops(self, num_tokens: int) -> int:
        """Forward matmul FLOPs for one sequence of ``N = P + H W`` tokens (2 per multiply-add): qkv
        ``2 N C 3C``, the four agent products ``4 * 2 N n C``, the depthwise convolution on the map
        ``2 H W C k^2``, the output projection ``2 N C C``."""
        tokens, c, area = num_tokens, self.dim, self.resolution[0] * self.resolution[1]
        return (2 * tokens * c * 3 * c + 8 * tokens * self.agent_num * c + 2 * area * c * self.kernel_size**2
                + 2 * tokens * c * c)


@register_mixer("focused_linear_attention_tokens")
class FocusedLinearAttentionTokens(FocusedLinearAttention):
    """FLatten's focused linear attention on a token sequence of ``P`` prefix tokens then an ``H x W``
    map, row-major (the ViT's token mixer).

    ``x [B, P + H * W, C] -> [B, P + H * W, C]`` in the compute dtype. Every token (prefix ones
    included) is a query and a key of the linear attention, the positional encoding has a row per token
    ``[P + T, Hd, Dh]``, and the normalisation divides by ``P + T``; the depthwise convolution of v runs
    on the map and adds to the map tokens only. FLatten's paper reports DeiT models but its code
    publishes none; the class token is handled here as Agent-DeiT handles it (our choice).

    Args: as :class:`FocusedLinearAttention` (without ``window_size`` / ``shift_size``), plus
      num_prefix_tokens: ``P >= 0`` tokens before the map (a ViT with a class token: 1).
    """

    spatial_ndim = 1
    grid_tokens = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        resolution: int | Sequence[int],
        num_prefix_tokens: int = 1,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        self.num_prefix_tokens = check_int(type(self).__name__, "num_prefix_tokens", num_prefix_tokens, minimum=0)
        super().__init__(dim, num_heads, resolution=resolution, focusing_factor=focusing_factor,
                         kernel_size=kernel_size, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype,
                         param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)

    def _encoded_tokens(self) -> int:
        return self.num_prefix_tokens + self.resolution[0] * self.resolution[1]

    @property
    def num_tokens(self) -> int:
        """``P + H * W``: the sequence length the layer is built for."""
        return self._encoded_tokens()

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, P + H * W, C]`` -> ``[B, P + H * W, C]`` in the compute dtype."""
        _check_tokens(type(self).__name__, x, self.dim, self.num_prefix_tokens, self.resolution)
        batch, tokens, prefix = x.shape[0], x.shape[1], self.num_prefix_tokens
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        qkv = self.qkv(x)  # [B, N, 3, Hd, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = self._linear_attend(q, k, v, accumulate)
        out = out.at[:, prefix:].add(self._local(v[:, prefix:]).astype(accumulate))
        return self.proj(out.reshape(batch, tokens, self.num_heads, self.head_dim).astype(dtype))

    def flops(self, num_tokens: int) -> int:
        """Forward matmul FLOPs for one sequence of ``N = P + H W`` tokens (2 per multiply-add): qkv
        ``2 N C 3C``, context and output ``2 * 2 N C Dh``, the normaliser ``2 N C``, the depthwise
        convolution on the map ``2 H W C k^2``, the output projection ``2 N C C``."""
        tokens, c, area = num_tokens, self.dim, self.resolution[0] * self.resolution[1]
        return (2 * tokens * c * 3 * c + 4 * tokens * c * self.head_dim + 2 * tokens * c
                + 2 * area * c * self.kernel_size**2 + 2 * tokens * c * c)
