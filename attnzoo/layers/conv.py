"""Convolutions on NHWC feature maps.

>>> conv = Conv2d(3, 32, 3, stride=2, padding=1, rngs=nnx.Rngs(0))
>>> y = conv(x)                                # x [B,H,W,3] -> [B,ceil(H/2),ceil(W/2),32]

Parameters (logical axes): ``kernel [kh, kw, I / groups, O]`` (HWIO; default names
``(None, None, None, "embed")``), ``bias [O]`` (the output axis's name). A torch
``Conv2d.weight [O, I / groups, kh, kw]`` (OIHW) is ``kernel.transpose(3, 2, 0, 1)``
(:func:`attnzoo.zoo.timm_convert.conv_kernel` converts).

Pieces of MBConv-style networks (MaxViT, CoAtNet, EfficientNet) follow :class:`Conv2d`:
:class:`BatchNorm` (running statistics as ``nnx.BatchStat``, switched by ``model.train()`` /
``model.eval()``), TensorFlow 'SAME' padding (:func:`tf_same_padding`, :func:`avg_pool_same`;
``Conv2d(padding="SAME")`` pads by the same rule), :class:`SqueezeExcite` and :class:`MBConv`.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import (
    DType, Dense, as_pair, check_bool, check_choice, check_features, check_input, compute_dtype, gelu, matmul, partitioned,
)
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = [
    "Conv2d",
    "shifted_conv2d",
    "BatchNorm",
    "SqueezeExcite",
    "MBConv",
    "tf_same_padding",
    "avg_pool_same",
    "make_divisible",
    "ACTIVATIONS",
    "activation_fn",
]


def _padding(owner: str, padding) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """``"SAME"`` / ``"VALID"``, an int or ``(ph, pw)`` (symmetric, torch's meaning), or
    ``((top, bottom), (left, right))``."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{owner}: padding must be 'SAME', 'VALID', an int or pairs of ints, got {padding!r}")
        return padding.upper()
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, (tuple, list)) for p in padding):
        return tuple(as_pair(owner, f"padding[{axis}]", side, minimum=0) for axis, side in enumerate(padding))  # type: ignore[return-value]
    ph, pw = as_pair(owner, "padding", padding, minimum=0)
    return (ph, ph), (pw, pw)


class Conv2d(nnx.Module):
    """2-D convolution ``x [B, H, W, I] -> [B, H', W', O]`` (NHWC, kernel HWIO), operands in the
    compute dtype, accumulated in float32 (or wider). Depthwise and dense convolutions with a
    kernel larger than 1x1 run as :func:`shifted_conv2d` (much faster gradients on XLA:CPU);
    other ones (1x1, grouped) as ``jax.lax.conv_general_dilated``.

    Args:
      in_features / out_features: channels ``I`` / ``O`` (both divisible by ``groups``).
      kernel_size: an int or ``(kh, kw)``.
      stride: an int or ``(sh, sw)``. dilation: kernel dilation, an int or a pair.
      padding: an int or ``(ph, pw)`` (zeros on both sides, as torch's ``padding``), explicit
        ``((top, bottom), (left, right))``, or ``"SAME"`` / ``"VALID"``. Default 0.
      groups: feature groups (``groups == I`` is depthwise).
      use_bias: learn a ``[O]`` bias.
      logical_axes: names of the kernel's four axes; the bias takes the last.
      dtype: compute dtype (default: promotion of input and parameters). param_dtype: parameter dtype.
      kernel_init: initializer of the ``[kh, kw, I/groups, O]`` kernel; default uniform in
        ``+-1/sqrt(fan_in)`` (torch's default), ``fan_in = kh * kw * I / groups``.
      scan_taps: run :func:`shifted_conv2d`'s loop over kernel taps as a ``jax.lax.scan`` (one
        compiled tap) instead of unrolled; the same sums in the same order. For large kernels it
        compiles much faster: forward + backward of a 7x7 dilation-3 depthwise convolution compiled
        in 1.2 s instead of 9.7 s (tiny map); at batch 8, 56 x 56 x 64 it ran in 1.2 s against 1.0 s
        unrolled (2-core machine, shared, so +-25%). VAN's LKA, its 7x7 stem and CBAM's 7x7 use it.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding=0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        logical_axes: Sequence[str | None] = (None, None, None, "embed"),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        scan_taps: bool = False,
        rngs: nnx.Rngs,
    ):
        owner = "Conv2d"
        self.in_features = check_int(owner, "in_features", in_features)
        self.out_features = check_int(owner, "out_features", out_features)
        self.groups = check_int(owner, "groups", groups)
        if self.in_features % self.groups or self.out_features % self.groups:
            raise ValueError(
                f"{owner}: groups ({self.groups}) must divide in_features ({self.in_features}) and "
                f"out_features ({self.out_features})"
            )
        self.kernel_size = as_pair(owner, "kernel_size", kernel_size)
        self.stride = as_pair(owner, "stride", stride)
        self.dilation = as_pair(owner, "dilation", dilation)
        self.padding = _padding(owner, padding)
        if not isinstance(use_bias, bool):
            raise TypeError(f"{owner}: use_bias must be a bool, got {type(use_bias).__name__}")
        self.scan_taps = check_bool(owner, "scan_taps", scan_taps)
        logical_axes = tuple(logical_axes)
        if len(logical_axes) != 4:
            raise ValueError(f"{owner}: logical_axes needs 4 names for the [kh, kw, I, O] kernel, got {logical_axes!r}")
        self.dtype = dtype
        self.param_dtype = param_dtype
        if kernel_init is None:
            kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3)
        shape = (*self.kernel_size, self.in_features // self.groups, self.out_features)
        self.kernel = nnx.Param(partitioned(kernel_init, logical_axes)(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(partitioned(nnx.initializers.zeros, logical_axes[3:])(None, (self.out_features,), param_dtype))
            if use_bias
            else None
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` of the output for an ``H x W`` input."""
        sizes = []
        for axis, size in enumerate((height, width)):
            extent = (self.kernel_size[axis] - 1) * self.dilation[axis] + 1
            stride = self.stride[axis]
            if self.padding == "SAME":
                sizes.append(-(-size // stride))
            elif self.padding == "VALID":
                sizes.append((size - extent) // stride + 1)
            else:
                sizes.append((size + sum(self.padding[axis]) - extent) // stride + 1)
        return tuple(sizes)

    def explicit_padding(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((top, bottom), (left, right))`` zeros for an ``H x W`` input."""
        if self.padding == "VALID":
            return (0, 0), (0, 0)
        if self.padding != "SAME":
            return self.padding
        return tuple(
            tf_same_padding(size, self.kernel_size[axis], self.stride[axis], self.dilation[axis])
            for axis, size in enumerate((height, width))
        )

    def flops(self, height: int, width: int) -> int:
        """Forward matmul FLOPs for one ``height x width`` input: ``2 H' W' kh kw (I / groups) O``."""
        out_h, out_w = self.output_size(height, width)
        taps = self.kernel_size[0] * self.kernel_size[1] * (self.in_features // self.groups)
        return 2 * out_h * out_w * taps * self.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, I]`` -> ``[B, H', W', O]`` in the compute dtype."""
        check_input("Conv2d", x, ndim=4, last=self.in_features, layout="[B,H,W,C]")
        if min(self.output_size(x.shape[1], x.shape[2])) < 1:
            raise ValueError(
                f"Conv2d: a {x.shape[1]} x {x.shape[2]} input is smaller than the kernel {self.kernel_size} "
                f"(dilation {self.dilation}, padding {self.padding})"
            )
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        depthwise = self.groups == self.in_features
        if depthwise or (self.groups == 1 and self.kernel_size != (1, 1)):
            y = shifted_conv2d(
                x.astype(dtype), self.kernel[...].astype(dtype), stride=self.stride,
                padding=self.explicit_padding(x.shape[1], x.shape[2]), dilation=self.dilation,
                depthwise=depthwise, scan_taps=self.scan_taps,
            )
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(dtype),
                self.kernel[...].astype(dtype),
                window_strides=self.stride,
                padding=self.padding,
                rhs_dilation=self.dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
                preferred_element_type=accumulate,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(accumulate)
        return y.astype(dtype)

def _taps(x: jax.Array, kernel_size, stride, padding, dilation):
    """``(i, j, x_ij)`` for every kernel tap: ``x_ij [B, H', W', C]`` is the zero-padded input
    sampled at the output positions' tap ``(i, j)``, a strided slice."""
    batch, height, width, channels = x.shape
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (height + top + bottom - (kernel_size[0] - 1) * dilation[0] - 1) // stride[0] + 1
    out_w = (width + left + right - (kernel_size[1] - 1) * dilation[1] - 1) // stride[1] + 1
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            start = (0, i * dilation[0], j * dilation[1], 0)
            limit = (batch, start[1] + (out_h - 1) * stride[0] + 1, start[2] + (out_w - 1) * stride[1] + 1, channels)
            yield i, j, jax.lax.slice(x, start, limit, (1, stride[0], stride[1], 1))


def shifted_conv2d(x: jax.Array, kernel: jax.Array, *, stride, padding, dilation, depthwise: bool,
                   scan_taps: bool = False) -> jax.Array:
    """Convolution as a sum over kernel taps of shifted inputs times the tap's weights.

    Args:
      x: ``[B, H, W, C]``. kernel: ``[kh, kw, C, O]`` (dense), or ``[kh, kw, 1, C * m]`` for
        ``depthwise`` (``groups == C``; output channel ``o`` reads input channel ``o // m``).
      stride, dilation: ``(sh, sw)``, ``(dh, dw)``. padding: ``((top, bottom), (left, right))``.
      scan_taps: loop over the taps with ``jax.lax.scan`` (a dynamic slice per tap) instead of
        unrolling them: the same sums in the same order, one compiled tap.

    Returns ``[B, H', W', O]``, accumulated in at least float32, in that dtype.

    The same result as ``jax.lax.conv_general_dilated``, computed differently because XLA:CPU's
    convolution gradients are slow: it lowers a grouped convolution's weight gradient as a dense
    one (``[kh, kw, C, C]``, then masked to the diagonal), and runs a dense 3x3 weight gradient
    at ~20 GFLOP/s. Measured forward + backward, batch 8, on the 2-core development machine:

    * depthwise 3x3, 56 x 56 x 256: 0.99 s as a grouped convolution, 44 ms here (torch 51 ms);
    * dense 3x3, 112 x 112, 64 -> 64: 0.90 s as a convolution, 0.21 s here (torch 0.20 s).

    A dense tap is one 2-D matmul ``[B H' W', C] @ [C, O]``, a depthwise tap a per-channel product;
    the backward is slices, pads and matmuls or per-channel reductions, with no ``kh kw``-fold
    copy of the input (as im2col would make).
    """
    kh, kw, _, out_channels = kernel.shape
    if depthwise and out_channels > x.shape[-1]:
        x = jnp.repeat(x, out_channels // x.shape[-1], axis=-1)
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    if scan_taps:
        return _scanned_taps(x, kernel, stride, padding, dilation, depthwise, accumulate)
    y = None
    for i, j, tap in _taps(x, (kh, kw), stride, padding, dilation):
        if depthwise:
            term = tap.astype(accumulate) * kernel[i, j, 0].astype(accumulate)
        else:
            rows = matmul(tap.reshape(-1, tap.shape[-1]), kernel[i, j], accumulate)
            term = rows.reshape(*tap.shape[:3], out_channels)
        y = term if y is None else y + term
    return y


def _scanned_taps(x, kernel, stride, padding, dilation, depthwise, accumulate):
    """:func:`shifted_conv2d`'s sum over taps as a ``jax.lax.scan`` over the tap index ``i * kw + j``:
    each step slices the padded input at the tap's offset (``dynamic_slice``, then the stride) and
    adds its product with the tap's weights to the carried sum (started at zeros, so the first
    step's sum is the first term exactly, as in the unrolled loop)."""
    kh, kw, _, out_channels = kernel.shape
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    batch, height, width, channels = x.shape
    out_h = (height - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    out_w = (width - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    extent = (batch, (out_h - 1) * stride[0] + 1, (out_w - 1) * stride[1] + 1, channels)
    taps = kernel.reshape(kh * kw, *kernel.shape[2:])

    def step(y, inputs):
        index, weight = inputs
        start = (0, (index // kw) * dilation[0], (index % kw) * dilation[1], 0)
        tap = jax.lax.dynamic_slice(x, start, extent)[:, :: stride[0], :: stride[1]]
        if depthwise:
            term = tap.astype(accumulate) * weight[0].astype(accumulate)
        else:
            term = matmul(tap.reshape(-1, channels), weight, accumulate).reshape(batch, out_h, out_w, out_channels)
        return y + term, None

    zeros = jnp.zeros((batch, out_h, out_w, out_channels), accumulate)
    y, _ = jax.lax.scan(step, zeros, (jnp.arange(kh * kw), taps))
    return y


# ----------------------------------------------------------------------------------------------
# Convolutional pieces of MBConv-style blocks (MaxViT, CoAtNet, EfficientNet): BatchNorm,
# TensorFlow 'SAME' padding, depthwise convolution, squeeze-excitation, MBConv
# ----------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": functools.partial(gelu, approximate=True),
    "gelu": gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation_fn(owner: str, name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), one multiple up if rounding lost more than ``1 - round_limit`` of it (timm's and
    TF EfficientNet's channel rounding)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def tf_same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``'SAME'`` padding ``(before, after)`` of one spatial axis.

    The output has ``ceil(size / stride)`` positions; the total padding
    ``max((ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)`` is split
    with the smaller half first, so a stride-2 3x3 convolution of an even size pads only after
    (timm's ``'same'`` padding of its ``*_tf`` models; ``jax.lax``'s ``"SAME"`` is the same rule).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def avg_pool_same(x: jax.Array, window: int = 2) -> jax.Array:
    """Average pooling of ``x [B, H, W, C]`` with a ``window x window`` kernel and stride ``window``,
    TF 'SAME' zero padding counted in the average (timm's ``AvgPool2dSame``, ``count_include_pad``).

    Returns ``[B, ceil(H / window), ceil(W / window), C]`` in x's dtype (sums in float32 or wider).
    """
    pads = [(0, 0), tf_same_padding(x.shape[1], window, window), tf_same_padding(x.shape[2], window, window), (0, 0)]
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    padded = jnp.pad(x.astype(accumulate), pads)
    batch, height, width, channels = padded.shape
    tiles = padded.reshape(batch, height // window, window, width // window, window, channels)
    return jnp.mean(tiles, axis=(2, 4)).astype(x.dtype)


class BatchNorm(nnx.Module):
    """Batch normalisation of channels-last activations (NHWC, or any ``[..., C]``).

    Training (``use_running_average=False``): normalises with the mean and (biased) variance over
    every axis but the last, and updates the running statistics
    ``running = momentum * running + (1 - momentum) * batch`` (Flax / TensorFlow convention:
    torch's ``momentum=0.1`` is ``0.9`` here). Evaluation (``use_running_average=True``): uses the
    running statistics. ``model.train()`` / ``model.eval()`` switch every BatchNorm of a model
    (``nnx.Module.set_attributes``), ``nnx.view(model, use_running_average=True)`` makes an evaluation
    view; the call argument ``use_running_average`` overrides the attribute.

    Statistics and the normalisation are computed in float32 (or wider); the result is in the compute
    dtype. Variables: ``scale`` / ``bias`` ``[C]`` (``nnx.Param``, logical axes ``logical_axes``),
    ``mean`` / ``var`` ``[C]`` (``nnx.BatchStat``, float32 or ``param_dtype`` if wider).

    Args:
      num_features: channels ``C`` (the last axis).
      epsilon: added to the variance (timm MBConv in TF-ported models: 1e-3).
      momentum: decay of the running averages, in [0, 1).
      use_running_average: the initial mode (False = training, as ``nnx.BatchNorm``).
      use_scale / use_bias: learn a scale (ones) / bias (zeros).
      dtype: compute/output dtype. param_dtype: dtype of scale and bias.
      logical_axes: logical name of the channel axis.
      rngs: unused (accepted for a uniform constructor).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        momentum: float = 0.99,
        use_running_average: bool = False,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logical_axes: tuple[str | None] = ("norm",),
        rngs: nnx.Rngs | None = None,
    ):
        owner = "BatchNorm"
        self.num_features = check_int(owner, "num_features", num_features)
        self.epsilon = check_float(owner, "epsilon", epsilon, positive=True, allow_none=False)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"{owner}: momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.use_running_average = check_bool(owner, "use_running_average", use_running_average)
        self.dtype = dtype
        self.param_dtype = param_dtype
        shape = (self.num_features,)
        self.scale = (
            nnx.Param(partitioned(nnx.initializers.ones, logical_axes)(None, shape, param_dtype)) if use_scale else None
        )
        self.bias = (
            nnx.Param(partitioned(nnx.initializers.zeros, logical_axes)(None, shape, param_dtype)) if use_bias else None
        )
        stat_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(partitioned(nnx.initializers.zeros, logical_axes)(None, shape, stat_dtype))
        self.var = nnx.BatchStat(partitioned(nnx.initializers.ones, logical_axes)(None, shape, stat_dtype))

    def set_view(self, use_running_average: bool | None = None):
        """``nnx.view(model, use_running_average=...)`` support, as ``nnx.BatchNorm``."""
        if use_running_average is not None:
            self.use_running_average = check_bool("BatchNorm", "use_running_average", use_running_average)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """x ``[..., C]`` -> same shape in the compute dtype; in training mode also updates
        ``mean`` / ``var`` in place."""
        check_features("BatchNorm", x, self.num_features, "[..., C] (channels last)")
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        stat_dtype = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), self.mean[...].dtype)
        xf = x.astype(stat_dtype)
        if use_running_average:
            mean, var = self.mean[...].astype(stat_dtype), self.var[...].astype(stat_dtype)
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            decay = self.momentum
            running_mean, running_var = self.mean[...], self.var[...]
            self.mean[...] = jax.lax.stop_gradient(decay * running_mean + (1 - decay) * mean.astype(running_mean.dtype))
            self.var[...] = jax.lax.stop_gradient(decay * running_var + (1 - decay) * var.astype(running_var.dtype))
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...].astype(stat_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(stat_dtype)
        return y.astype(dtype)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as in timm's ``SEModule`` and MaxViT's ``SE``:
    ``x * sigmoid(fc2(act(fc1(mean_hw(x)))))``.

    ``x [B, H, W, C] -> [B, H, W, C]`` in the compute dtype. ``fc1 [C, R]`` and ``fc2 [R, C]`` are
    the 1x1 convolutions as Dense kernels, both with biases; the channels carry the logical name
    ``channel_axis`` (MBConv applies SE to its expanded ``"mlp"`` channels).

    Args:
      channels: ``C``. reduced_channels: ``R`` (MBConv: ``int(0.25 * output channels)``).
      activation: name of the activation between the two (:data:`ACTIVATIONS`; timm / MaxViT: "silu").
      channel_axis: logical axis name of ``C``.
      dtype, param_dtype, rngs: as in :class:`attnzoo.layers.Dense`.
    """

    def __init__(
        self,
        channels: int,
        reduced_channels: int,
        *,
        activation: str = "silu",
        channel_axis: str | None = "mlp",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "SqueezeExcite"
        self.channels = check_int(owner, "channels", channels)
        self.reduced_channels = check_int(owner, "reduced_channels", reduced_channels)
        activation_fn(owner, activation)
        self.activation = activation
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(channels, reduced_channels, logical_axes=(channel_axis, None), **dense)
        self.fc2 = Dense(reduced_channels, channels, logical_axes=(None, channel_axis), **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        check_input("SqueezeExcite", x, ndim=4, last=self.channels, layout="[B,H,W,C]")
        accumulate = jnp.promote_types(x.dtype, jnp.float32)
        pooled = jnp.mean(x.astype(accumulate), axis=(1, 2))
        gate = jax.nn.sigmoid(self.fc2(ACTIVATIONS[self.activation](self.fc1(pooled))))
        return x * gate[:, None, None, :].astype(x.dtype)

    def flops(self, height: int, width: int) -> int:
        """The two 1x1 convolutions on the pooled vector, ``2 * 2 C R`` (pool and product not counted)."""
        return 4 * self.channels * self.reduced_channels


class MBConv(nnx.Module):
    """Pre-norm inverted-bottleneck block of MaxViT (timm ``MbConvBlock``, official ``MBConvBlock``).

    ``x [B, H, W, I] -> [B, ceil(H / s), ceil(W / s), O]`` in the compute dtype, ``s = stride``::

        residual = BN(x) -> 1x1 expand (no bias) -> BN -> act -> kxk depthwise, stride s, TF 'SAME'
                   (no bias) -> BN -> act -> squeeze-excite -> 1x1 project (bias)
        shortcut = x -> 2x2 average pool, stride 2, TF 'SAME' (if s == 2) -> 1x1 conv (bias; if I != O)
        out      = residual + shortcut

    The expanded width is ``M = make_divisible(O * expand_ratio)``; squeeze-excite reduces it to
    ``int(se_ratio * O)`` channels (of the *output* width, as timm's ``expand_output`` and MaxViT's
    ``se_ratio * hidden_size``). ``gate`` swaps squeeze-excite for another registered gate
    (:func:`attnzoo.layers.gates.make_gate`: ``"eca"``, ``"cbam"``, or None for no gate) applied at the
    same place, on the ``M`` expanded channels. TF 'SAME' padding of a stride-2 kernel is asymmetric (more after),
    as in timm's ``*_tf`` models and TensorFlow; the shortcut pool counts the zero padding.

    Parameters: ``pre_norm``, ``norm1``, ``norm2`` (:class:`BatchNorm`), ``expand.kernel [I, M]``
    (embed, mlp), ``depthwise.kernel [k, k, 1, M]`` (None, None, None, mlp), ``se``
    (:class:`SqueezeExcite`; None unless ``gate == "se"``), ``gate`` (the other gates; None for
    ``"se"``), ``project.kernel [M, O]`` (mlp, embed) + bias, ``shortcut_proj.kernel
    [I, O]`` + bias (None when ``I == O``).

    Args:
      in_features / out_features: ``I`` / ``O``.
      stride: 1 or 2 (in the depthwise convolution and the shortcut pool).
      expand_ratio: ``M / O`` before rounding to a multiple of 8.
      kernel_size: the depthwise kernel (odd).
      se_ratio: squeeze-excite width as a fraction of ``O``; 0 disables it.
      activation: activation after the expand and depthwise norms (MaxViT TF: "gelu_tanh").
      se_activation: activation inside squeeze-excite ("silu").
      gate: the gate after the depthwise convolution, by name (:func:`attnzoo.layers.gates.list_gates`):
        ``"se"`` (default, MaxViT's squeeze-excite sized by ``se_ratio``), ``"eca"``, ``"cbam"``, or
        None (no gate).
      gate_options: extra options of the gate's constructor (e.g. ``{"reduction_ratio": 8}`` for
        CBAM); for ``"se"`` they override ``reduced_channels`` / ``activation`` from ``se_ratio`` /
        ``se_activation``.
      norm_eps: BatchNorm epsilon (MaxViT: 1e-3). norm_momentum: BatchNorm running-average decay.
      dtype, param_dtype, rngs: as in :class:`Conv2d`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        stride: int = 1,
        expand_ratio: float = 4.0,
        kernel_size: int = 3,
        se_ratio: float = 0.25,
        activation: str = "gelu_tanh",
        se_activation: str = "silu",
        gate: str | None = "se",
        gate_options: dict | None = None,
        norm_eps: float = 1e-3,
        norm_momentum: float = 0.99,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "MBConv"
        self.in_features = check_int(owner, "in_features", in_features)
        self.out_features = check_int(owner, "out_features", out_features)
        self.stride = check_choice(owner, "stride", stride, (1, 2))
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, (int, float)) or expand_ratio <= 0:
            raise ValueError(f"{owner}: expand_ratio must be a positive number, got {expand_ratio!r}")
        kernel_size = check_int(owner, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd, got {kernel_size}")
        if isinstance(se_ratio, bool) or not isinstance(se_ratio, (int, float)) or not 0 <= se_ratio <= 1:
            raise ValueError(f"{owner}: se_ratio must be a number in [0, 1], got {se_ratio!r}")
        activation_fn(owner, activation)
        self.activation = activation
        self.hidden_features = make_divisible(self.out_features * expand_ratio)
        hidden = self.hidden_features
        norm = dict(epsilon=norm_eps, momentum=norm_momentum, dtype=dtype, param_dtype=param_dtype)
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_norm = BatchNorm(self.in_features, **norm)
        self.expand = Dense(self.in_features, hidden, logical_axes=("embed", "mlp"), use_bias=False, **dense)
        self.norm1 = BatchNorm(hidden, **norm)
        self.depthwise = Conv2d(
            hidden, hidden, kernel_size, stride=self.stride, padding="SAME", groups=hidden, use_bias=False,
            logical_axes=(None, None, None, "mlp"), **dense,
        )
        self.norm2 = BatchNorm(hidden, **norm)
        from attnzoo.layers.gates import list_gates, make_gate  # gates imports this module

        if gate is not None and gate not in list_gates():
            raise ValueError(f"{owner}: gate must be None or one of {list_gates()}, got {gate!r}")
        if gate_options is not None and not isinstance(gate_options, dict):
            raise TypeError(f"{owner}: gate_options must be a dict or None, got {type(gate_options).__name__}")
        gate_options = dict(gate_options or {})
        self.gate_name = gate
        se = other = None
        if gate == "se":
            reduced = int(se_ratio * self.out_features)
            if se_ratio > 0 and reduced > 0:
                options = {"reduced_channels": reduced, "activation": se_activation, "channel_axis": "mlp", **gate_options}
                se = make_gate("se", hidden, **options, **dense)
        elif gate is not None:
            other = make_gate(gate, hidden, **{"channel_axis": "mlp", **gate_options}, **dense)
        self.se = nnx.data(se)
        self.gate = nnx.data(other)
        self.project = Dense(hidden, self.out_features, logical_axes=("mlp", "embed"), use_bias=True, **dense)
        self.shortcut_proj = (
            Dense(self.in_features, self.out_features, logical_axes=(None, "embed"), use_bias=True, **dense)
            if self.in_features != self.out_features
            else None
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(ceil(H / stride), ceil(W / stride))``."""
        return -(-height // self.stride), -(-width // self.stride)

    def flops(self, height: int, width: int) -> int:
        """Forward matmul and convolution FLOPs for one ``height x width`` input (2 per multiply-add):
        expand ``2 H W I M``, depthwise ``2 H' W' k^2 M``, squeeze-excite ``2 * 2 M R`` (or the other
        gate's ``flops(H', W')``), project
        ``2 H' W' M O``, shortcut projection ``2 H' W' I O``. Norms, activations and pools are not counted."""
        out_h, out_w = self.output_size(height, width)
        hidden = self.hidden_features
        total = 2 * height * width * self.in_features * hidden + self.depthwise.flops(height, width)
        if self.se is not None:
            total += self.se.flops(out_h, out_w)
        if self.gate is not None:
            total += int(self.gate.flops(out_h, out_w))
        total += 2 * out_h * out_w * hidden * self.out_features
        if self.shortcut_proj is not None:
            total += 2 * out_h * out_w * self.in_features * self.out_features
        return int(total)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, I]`` -> ``[B, ceil(H / stride), ceil(W / stride), O]``."""
        check_input("MBConv", x, ndim=4, last=self.in_features, layout="[B,H,W,C]")
        shortcut = avg_pool_same(x, self.stride) if self.stride > 1 else x
        if self.shortcut_proj is not None:
            shortcut = self.shortcut_proj(shortcut)
        act = ACTIVATIONS[self.activation]
        h = act(self.norm1(self.expand(self.pre_norm(x))))
        h = act(self.norm2(self.depthwise(h)))
        if self.se is not None:
            h = self.se(h)
        if self.gate is not None:
            h = self.gate(h)
        y = self.project(h)
        return y + shortcut.astype(y.dtype)
