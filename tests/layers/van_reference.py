"""Float64 numpy references of the channel / spatial gates (ECA, CBAM), VAN's large kernel attention
and the VAN backbone (test helpers), written from the papers' formulas and reading a module's own
parameters. Convolutions are explicit sums over each output pixel's window (no padded tap slices)."""

import numpy as np

from tests.layers.conv_reference import batch_norm_eval
from tests.layers.numpy_layers import dense, param64, sigmoid


def gelu(x):
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def layer_norm(norm, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def batch_norm_train(norm, x):
    """BatchNorm with the statistics of ``x`` over every axis but the last (biased variance)."""
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def window_conv(x, kernel, bias, *, stride=1, padding=0, dilation=1, depthwise=False):
    """``x [B, H, W, I]`` convolved with ``kernel [k, k, I or 1, O]``: output pixel ``(p, q)`` is the
    sum over ``i, j`` of ``x[p s + i d - pad, q s + j d - pad]`` (zero outside the map) times the
    tap; depthwise: channel by channel (``O == I``)."""
    batch, height, width, channels = x.shape
    k = kernel.shape[0]
    out_h = (height + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    y = np.zeros((batch, out_h, out_w, kernel.shape[-1]))
    for p in range(out_h):
        for q in range(out_w):
            for i in range(k):
                for j in range(k):
                    r, c = p * stride + i * dilation - padding, q * stride + j * dilation - padding
                    if not (0 <= r < height and 0 <= c < width):
                        continue
                    pixel = x[:, r, c]
                    y[:, p, q] += pixel * kernel[i, j, 0] if depthwise else pixel @ kernel[i, j]
    return y if bias is None else y + bias


def conv_module(conv, x):
    """A symmetric-padding :class:`attnzoo.layers.Conv2d` (square kernel, stride and dilation)."""
    (top, _), _ = conv.padding
    bias = None if conv.bias is None else param64(conv.bias)
    return window_conv(x, param64(conv.kernel), bias, stride=conv.stride[0], padding=top, dilation=conv.dilation[0],
                       depthwise=conv.groups == conv.in_features and conv.groups > 1)


def eca_kernel_size(channels, gamma=2, b=1):
    """|log2(C)/gamma + b/gamma|, floored, made odd upwards (the official code's rounding)."""
    t = int(abs(np.log2(channels) / gamma + b / gamma))
    return t + 1 - t % 2


def eca(m, x):
    """ECA: channel c's gate is sigmoid(sum_j w[j] pooled[c - (k-1)/2 + j]), zero outside [0, C)."""
    pooled = x.mean(axis=(1, 2))  # [B, C]
    weight = param64(m.kernel)
    k, channels = len(weight), pooled.shape[1]
    logits = np.zeros_like(pooled)
    for c in range(channels):
        for j in range(k):
            source = c - (k - 1) // 2 + j
            if 0 <= source < channels:
                logits[:, c] += weight[j] * pooled[:, source]
    return x * sigmoid(logits)[:, None, None, :]


def cbam(m, x, *, training=False):
    """CBAM: channel gate from the shared MLP on avg and max pools, then the spatial gate from the
    7x7 conv (+ BatchNorm) of the stacked channel max and mean."""

    def mlp(v):
        return dense(m.fc2, np.maximum(dense(m.fc1, v), 0.0))

    x = x * sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))[:, None, None, :]
    if m.spatial_conv is None:
        return x
    descriptor = np.stack([x.max(axis=-1), x.mean(axis=-1)], axis=-1)
    logits = conv_module(m.spatial_conv, descriptor)
    logits = batch_norm_train(m.spatial_norm, logits) if training else batch_norm_eval(m.spatial_norm, logits)
    return x * sigmoid(logits)


def squeeze_excite(se, x):
    activation = {"relu": lambda v: np.maximum(v, 0.0), "silu": lambda v: v * sigmoid(v)}[se.activation]
    return x * sigmoid(dense(se.fc2, activation(dense(se.fc1, x.mean(axis=(1, 2))))))[:, None, None, :]


def gate(m, x):
    name = type(m).__name__
    return {"EfficientChannelAttention": eca, "CBAM": cbam, "SqueezeExcite": squeeze_excite}[name](m, x)


def lka(m, x):
    """x * conv1(dilated depthwise conv(depthwise conv(x)))."""
    attn = conv_module(m.conv0, x)
    attn = conv_module(m.conv_spatial, attn)
    return x * dense(m.conv1, attn)


def van_attention(m, x):
    return dense(m.proj_2, lka(m.spatial_gating_unit, gelu(dense(m.proj_1, x)))) + x


def van_block(block, x):
    """The official Block in evaluation mode (BatchNorm running statistics)."""
    mixed = van_attention(block.mixer, batch_norm_eval(block.norm1, x))
    x = x + param64(block.layer_scale_1) * mixed
    mlp = block.mlp
    hidden = gelu(conv_module(mlp.dwconv, dense(mlp.fc1, batch_norm_eval(block.norm2, x))))
    branch = dense(mlp.fc2, hidden)
    if block.gate is not None:
        branch = gate(block.gate, branch)
    return x + param64(block.layer_scale_2) * branch


def van(model, images):
    """The VAN forward (evaluation mode): stage outputs and logits."""
    x = np.asarray(images, np.float64)
    features = []
    for stage in model.stages:
        x = batch_norm_eval(stage.patch_embed.norm, conv_module(stage.patch_embed.proj, x))
        for block in stage.blocks:
            x = van_block(block, x)
        x = layer_norm(stage.norm, x)
        features.append(x)
    logits = dense(model.head, x.mean(axis=(1, 2)))
    return features, logits
