"""Float64 numpy references of the MBConv pieces (test helpers): convolution tap by tap, TF 'SAME'
padding, BatchNorm, average pooling window by window, squeeze-excitation and MBConv, reading a
module's own parameters; and random BatchNorm running statistics for the modules under test."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers import BatchNorm
from tests.layers.numpy_layers import dense, param64, sigmoid, silu


def randomize_batch_stats(module, seed):
    """Random running statistics in every BatchNorm of ``module`` (means ~ N(0, 0.5^2), variances
    uniform in [0.5, 2]), in place; also makes the statistics of an ``nnx.eval_shape`` module concrete."""
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, BatchNorm):
            node.mean.set_value(jnp.asarray(rng.normal(size=node.num_features) * 0.5, node.mean.get_value().dtype))
            node.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size=node.num_features), node.var.get_value().dtype))
    return module


def tf_same_pads(size, kernel, stride, dilation=1):
    """TensorFlow's documented 'SAME' rule: ``ceil(size / stride)`` outputs, the total padding
    needed for them split with the smaller half before."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def conv2d(x, kernel, bias, stride, pads, groups=1):
    """``x [B, H, W, I]`` (float64) convolved with ``kernel [kh, kw, I / groups, O]``, one tap at a time."""
    kh, kw, group_in, out_features = kernel.shape
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    group_out = out_features // groups
    y = np.zeros((x.shape[0], out_h, out_w, out_features))
    for i in range(kh):
        for j in range(kw):
            pixels = x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            for g in range(groups):
                ins, outs = slice(g * group_in, (g + 1) * group_in), slice(g * group_out, (g + 1) * group_out)
                y[..., outs] += pixels[..., ins] @ kernel[i, j, :, outs]
    return y if bias is None else y + bias


def conv_same(conv, x):
    """A :class:`attnzoo.layers.Conv2d` with ``padding="SAME"`` (square stride, no dilation)."""
    kh, kw = conv.kernel_size
    stride = conv.stride[0]
    pads = (tf_same_pads(x.shape[1], kh, stride), tf_same_pads(x.shape[2], kw, stride))
    bias = None if conv.bias is None else param64(conv.bias)
    return conv2d(x, param64(conv.kernel), bias, stride, pads, conv.groups)


def batch_norm_eval(norm, x):
    """BatchNorm with the running statistics."""
    return (x - param64(norm.mean)) / np.sqrt(param64(norm.var) + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def avg_pool_same(x, window):
    """Mean of each ``window x window`` tile of the TF 'SAME' zero-padded map (padding counted)."""
    batch, height, width, channels = x.shape
    (top, _), (left, _) = tf_same_pads(height, window, window), tf_same_pads(width, window, window)
    out = np.zeros((batch, math.ceil(height / window), math.ceil(width / window), channels))
    for oy in range(out.shape[1]):
        for ox in range(out.shape[2]):
            for i in range(window):
                for j in range(window):
                    y, z = oy * window + i - top, ox * window + j - left
                    if 0 <= y < height and 0 <= z < width:
                        out[:, oy, ox] += x[:, y, z]
    return out / window**2


def squeeze_excite(se, x):
    pooled = x.mean(axis=(1, 2))
    activation = {"silu": silu, "relu": lambda v: np.maximum(v, 0.0)}[se.activation]
    gate = sigmoid(dense(se.fc2, activation(dense(se.fc1, pooled))))
    return x * gate[:, None, None, :]


def mbconv(m, x):
    """An :class:`attnzoo.layers.MBConv` in evaluation mode (running statistics)."""
    activation = {"gelu_tanh": gelu_tanh}[m.activation]
    shortcut = avg_pool_same(x, m.stride) if m.stride > 1 else x
    if m.shortcut_proj is not None:
        shortcut = dense(m.shortcut_proj, shortcut)
    h = activation(batch_norm_eval(m.norm1, dense(m.expand, batch_norm_eval(m.pre_norm, x))))
    h = activation(batch_norm_eval(m.norm2, conv_same(m.depthwise, h)))
    if m.se is not None:
        h = squeeze_excite(m.se, h)
    return dense(m.project, h) + shortcut
