"""Channel and spatial gates on NHWC feature maps: squeeze-excitation, ECA and CBAM, made by name.

>>> gate = make_gate("eca", 256, rngs=nnx.Rngs(0))       # kernel size 5 from the paper's rule
>>> y = gate(x)                                           # x [B,H,W,256] -> x * gate(x), same shape
>>> make_gate(None, 256, rngs=nnx.Rngs(0)) is None        # "no gate"
>>> list_gates()
['cbam', 'eca', 'se']

Every gate maps ``x [B, H, W, C]`` to ``x * g(x)`` (same shape, the compute dtype) with ``g`` in
(0, 1), broadcast over the axes the gate does not depend on. Pooled statistics and the gate are
computed in float32 (or wider); the product is taken in x's dtype.

==========  =======================================================================================
``"se"``    :class:`attnzoo.layers.conv.SqueezeExcite` (Hu et al. 2018):
            ``g = sigmoid(fc2(act(fc1(mean_hw x))))``, ``g [B, 1, 1, C]``; made here with the paper's
            reduction ``R = C // 16`` and ReLU unless ``reduced_channels`` / ``activation`` say otherwise
``"eca"``   :class:`EfficientChannelAttention` (Wang et al. 2020, official BangguWu/ECANet ``eca_layer``):
            ``g = sigmoid(conv1d_k(mean_hw x))`` along the channel axis, no bias, zero padding
            ``(k - 1) / 2``; ``k = eca_kernel_size(C)``
``"cbam"``  :class:`CBAM` (Woo et al. 2018, official Jongchan/attention-module ``CBAM``): channel gate
            ``sigmoid(mlp(mean_hw x) + mlp(max_hw x))`` (one shared MLP ``C -> C // r -> C`` with
            biases and ReLU, r = 16), then on its output a spatial gate
            ``sigmoid(BN(conv7x7([max_c x', mean_c x'])))`` (conv without bias, zero padding 3)
==========  =======================================================================================

Any function ``fn(channels, *, rngs, **options) -> nnx.Module`` can be added with
:func:`register_gate`; :func:`make_gate` is how backbones build a gate from a name given by the
user (``MBConv(gate=...)``, ``MaxViT(mbconv_gate=...)``, ``VAN(gate=...)``).

Parameters (logical axes; ``channel_axis`` names the gated channels, ``"mlp"`` by default as
inside MBConv): ECA ``kernel [k]`` (conv_kernel); CBAM ``fc1.kernel [C, R]`` (channel_axis, None)
+ bias, ``fc2.kernel [R, C]`` (None, channel_axis) + bias, ``spatial_conv.kernel [7, 7, 2, 1]``,
``spatial_norm`` (:class:`attnzoo.layers.conv.BatchNorm` over one channel: ``scale`` / ``bias``
parameters and running ``mean`` / ``var``, switched by ``model.train()`` / ``model.eval()``).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import DType, Dense, check_input, partitioned
from attnzoo.layers.conv import ACTIVATIONS, BatchNorm, Conv2d, SqueezeExcite, activation_fn
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "SqueezeExcite",
    "EfficientChannelAttention",
    "CBAM",
    "eca_kernel_size",
    "register_gate",
    "list_gates",
    "make_gate",
]

_GATES: dict[str, Callable[..., nnx.Module]] = {}


def register_gate(name: str) -> Callable:
    """Decorator registering ``fn(channels, *, rngs, **options) -> nnx.Module`` (a class or a
    factory) as the gate ``name``; registering another object under a taken name raises ``ValueError``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_gate: name must be a non-empty string, got {name!r}")

    def decorate(fn):
        existing = _GATES.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"register_gate: {name!r} is already registered to {existing.__module__}.{existing.__qualname__}")
        _GATES[name] = fn
        return fn

    return decorate


def list_gates(pattern: str = "*") -> list[str]:
    """Sorted names of the registered gates matching the shell-style ``pattern``."""
    return sorted(fnmatch.filter(_GATES, pattern))


def make_gate(name: str | None, channels: int, *, rngs: nnx.Rngs, **options: Any) -> nnx.Module | None:
    """The gate registered as ``name`` over ``channels`` channels (None for ``name=None``).

    ``options`` go to the gate's constructor (e.g. ``reduction_ratio``, ``kernel_size``,
    ``channel_axis``, ``dtype``, ``param_dtype``); an unknown name raises ``ValueError`` listing the
    registered ones.
    """
    if name is None:
        return None
    if not isinstance(name, str) or name not in _GATES:
        raise ValueError(f"make_gate: gate must be None or one of {list_gates()}, got {name!r}")
    return _GATES[name](channels, rngs=rngs, **options)


@register_gate("se")
def squeeze_excite_gate(
    channels: int,
    *,
    reduced_channels: int | None = None,
    reduction_ratio: int = 16,
    activation: str = "relu",
    channel_axis: str | None = "mlp",
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
) -> SqueezeExcite:
    """:class:`attnzoo.layers.conv.SqueezeExcite` over ``channels`` with the SE paper's defaults:
    ``reduced_channels = channels // reduction_ratio`` (r = 16) and ReLU."""
    owner = "make_gate('se')"
    channels = check_int(owner, "channels", channels)
    if reduced_channels is None:
        reduction_ratio = check_int(owner, "reduction_ratio", reduction_ratio)
        reduced_channels = channels // reduction_ratio
        if reduced_channels < 1:
            raise ValueError(
                f"{owner}: channels // reduction_ratio = {channels} // {reduction_ratio} is 0; "
                "pass reduced_channels or a smaller reduction_ratio"
            )
    return SqueezeExcite(channels, reduced_channels, activation=activation, channel_axis=channel_axis, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size ``k = |log2(C) / gamma + b / gamma|_odd``, as the official code
    computes it: ``t = int(|(log2(C) + b) / gamma|)``, then ``t`` if odd else ``t + 1``.

    E.g. C = 64 -> 3, 128 / 256 / 512 / 1024 -> 5, 2048 -> 7 (gamma 2, b 1). timm's ``EcaModule``
    additionally never goes below 3; here C < 8 gives k = 1, as the paper's formula.
    """
    owner = "eca_kernel_size"
    channels = check_int(owner, "channels", channels)
    gamma = check_float(owner, "gamma", gamma, positive=True, allow_none=False)
    b = check_float(owner, "b", b, allow_none=False)
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def _pooled_gate_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


@register_gate("eca")
class EfficientChannelAttention(nnx.Module):
    """ECA (Wang et al. 2020): ``x * sigmoid(conv1d_k(mean_hw(x)))`` with a 1-D convolution of ``k``
    taps along the channel axis (shared by all channels, no bias, zero padding), no reduction.

    ``x [B, H, W, C] -> [B, H, W, C]``: gate channel ``c`` is
    ``sigmoid(sum_j kernel[j] * p[c + j - (k - 1) / 2])`` with ``p = mean_hw(x)`` and ``p`` zero
    outside ``[0, C)`` (torch's ``Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)``).

    Args:
      channels: ``C``.
      kernel_size: odd number of taps ``k``; default :func:`eca_kernel_size` ``(C, gamma, b)``.
      gamma / b: the kernel size rule's constants (paper: 2, 1).
      channel_axis: accepted for a uniform gate constructor (the kernel has no channel axis).
      dtype: compute dtype of the product (default: promotion of x and the parameter).
      param_dtype: parameter dtype.
      kernel_init: initializer of ``kernel [k]``; default uniform in ``+-1/sqrt(k)`` (torch's).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2.0,
        b: float = 1.0,
        channel_axis: str | None = "mlp",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = "EfficientChannelAttention"
        self.channels = check_int(owner, "channels", channels)
        if kernel_size is None:
            kernel_size = eca_kernel_size(self.channels, gamma, b)
        self.kernel_size = check_int(owner, "kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd, got {self.kernel_size}")
        self.dtype = dtype
        self.param_dtype = param_dtype
        if kernel_init is None:
            bound = 1.0 / math.sqrt(self.kernel_size)

            def kernel_init(key, shape, dtype):
                return jax.random.uniform(key, shape, dtype, -bound, bound)

        self.kernel = nnx.Param(
            partitioned(kernel_init, ("conv_kernel",))(rngs.params(), (self.kernel_size,), param_dtype)
        )

    def gate(self, x: jax.Array) -> jax.Array:
        """The gate ``[B, C]`` in float32 (or wider)."""
        accumulate = _pooled_gate_dtype(x)
        pooled = jnp.mean(x.astype(accumulate), axis=(1, 2))  # [B, C]
        half = (self.kernel_size - 1) // 2
        padded = jnp.pad(pooled, ((0, 0), (half, half)))
        kernel = self.kernel[...].astype(accumulate)
        logits = sum(kernel[j] * padded[:, j : j + self.channels] for j in range(self.kernel_size))
        return jax.nn.sigmoid(logits)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``x * gate`` ``[B, H, W, C]``."""
        check_input("EfficientChannelAttention", x, ndim=4, last=self.channels, layout="[B,H,W,C]")
        dtype = jnp.result_type(x.dtype, self.param_dtype) if self.dtype is None else jnp.dtype(self.dtype)
        return x.astype(dtype) * self.gate(x)[:, None, None, :].astype(dtype)

    def flops(self, height: int, width: int) -> int:
        """The 1-D convolution's ``2 C k`` (pooling and the product are not counted)."""
        return 2 * self.channels * self.kernel_size


@register_gate("cbam")
class CBAM(nnx.Module):
    """CBAM (Woo et al. 2018): a channel gate, then a spatial gate on its output.

    ``x [B, H, W, C] -> [B, H, W, C]``::

        x'  = x * sigmoid(mlp(mean_hw x) + mlp(max_hw x))        [B, 1, 1, C] gate
        out = x' * sigmoid(BN(conv7x7([max_c x', mean_c x'])))   [B, H, W, 1] gate

    ``mlp = fc2(relu(fc1(.)))`` is shared by both pools (biases, ``C -> R -> C``, as the official
    ``nn.Linear`` layers; timm's ``CbamModule`` has none and rounds ``R = C / r`` to nearest). The spatial
    descriptor stacks the channel-wise max first, then the mean (the official ``ChannelPool``;
    timm's ``SpatialAttn`` stacks mean first), and is convolved with a ``7 x 7`` kernel, zero
    padding 3, no bias, followed by a one-channel BatchNorm (official ``BasicConv(..., bn=True,
    relu=False)``: eps 1e-5, torch momentum 0.01 = Flax momentum 0.99).

    Args:
      channels: ``C``.
      reduction_ratio: ``r``; ``R = C // r`` (official; 16). reduced_channels: ``R`` directly.
      spatial_kernel_size: the spatial convolution's kernel (odd; 7).
      use_spatial: apply the spatial gate (the official ``no_spatial=False``).
      activation: activation inside the MLP ("relu").
      norm_eps / norm_momentum: the spatial BatchNorm's epsilon and running-average decay.
      channel_axis: logical axis name of the gated channels.
      dtype, param_dtype, rngs: as in :class:`attnzoo.layers.Dense`.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction_ratio: int = 16,
        reduced_channels: int | None = None,
        spatial_kernel_size: int = 7,
        use_spatial: bool = True,
        activation: str = "relu",
        norm_eps: float = 1e-5,
        norm_momentum: float = 0.99,
        channel_axis: str | None = "mlp",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "CBAM"
        self.channels = check_int(owner, "channels", channels)
        if reduced_channels is None:
            reduction_ratio = check_int(owner, "reduction_ratio", reduction_ratio)
            reduced_channels = self.channels // reduction_ratio
            if reduced_channels < 1:
                raise ValueError(
                    f"{owner}: channels // reduction_ratio = {self.channels} // {reduction_ratio} is 0; "
                    "pass reduced_channels or a smaller reduction_ratio"
                )
        self.reduced_channels = check_int(owner, "reduced_channels", reduced_channels)
        self.spatial_kernel_size = check_int(owner, "spatial_kernel_size", spatial_kernel_size)
        if self.spatial_kernel_size % 2 == 0:
            raise ValueError(f"{owner}: spatial_kernel_size must be odd, got {self.spatial_kernel_size}")
        if not isinstance(use_spatial, bool):
            raise TypeError(f"{owner}: use_spatial must be a bool, got {type(use_spatial).__name__}")
        activation_fn(owner, activation)
        self.activation = activation
        self.dtype = dtype
        self.param_dtype = param_dtype
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(self.channels, self.reduced_channels, logical_axes=(channel_axis, None), **dense)
        self.fc2 = Dense(self.reduced_channels, self.channels, logical_axes=(None, channel_axis), **dense)
        if use_spatial:
            k = self.spatial_kernel_size
            self.spatial_conv = Conv2d(2, 1, k, padding=k // 2, use_bias=False, logical_axes=(None, None, None, None),
                                       scan_taps=k > 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.spatial_norm = BatchNorm(1, epsilon=norm_eps, momentum=norm_momentum, dtype=dtype,
                                          param_dtype=param_dtype, logical_axes=(None,))
        else:
            self.spatial_conv = None
            self.spatial_norm = None

    def channel_gate(self, x: jax.Array) -> jax.Array:
        """The channel gate ``[B, C]`` in float32 (or wider)."""
        accumulate = _pooled_gate_dtype(x)
        xf = x.astype(accumulate)
        pooled = jnp.stack([jnp.mean(xf, axis=(1, 2)), jnp.max(xf, axis=(1, 2))])  # [2, B, C]
        act = ACTIVATIONS[self.activation]
        logits = self.fc2(act(self.fc1(pooled)))
        return jax.nn.sigmoid(jnp.sum(logits.astype(accumulate), axis=0))

    def spatial_gate(self, x: jax.Array) -> jax.Array:
        """The spatial gate ``[B, H, W, 1]`` in float32 (or wider) of the (channel-gated) map ``x``."""
        accumulate = _pooled_gate_dtype(x)
        xf = x.astype(accumulate)
        descriptor = jnp.stack([jnp.max(xf, axis=-1), jnp.mean(xf, axis=-1)], axis=-1)  # [B, H, W, 2]
        logits = self.spatial_norm(self.spatial_conv(descriptor))
        return jax.nn.sigmoid(logits.astype(accumulate))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]`` (the compute dtype)."""
        check_input("CBAM", x, ndim=4, last=self.channels, layout="[B,H,W,C]")
        dtype = jnp.result_type(x.dtype, self.param_dtype) if self.dtype is None else jnp.dtype(self.dtype)
        x = x.astype(dtype) * self.channel_gate(x)[:, None, None, :].astype(dtype)
        if self.spatial_conv is None:
            return x
        return x * self.spatial_gate(x).astype(dtype)

    def flops(self, height: int, width: int) -> int:
        """The shared MLP on both pooled vectors, ``2 * 2 * 2 C R``, and the spatial convolution,
        ``2 H W k^2 * 2`` (pools, norm and products are not counted)."""
        total = 8 * self.channels * self.reduced_channels
        if self.spatial_conv is not None:
            total += self.spatial_conv.flops(height, width)
        return int(total)
