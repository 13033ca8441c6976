"""Independent float64 numpy references of DaViT's channel group attention and convolutional position
encoding (test helpers), reading a module's own parameters."""

import math

import numpy as np

from tests.layers.conv_reference import conv2d
from tests.layers.numpy_layers import dense, param64

_erf = np.vectorize(math.erf)


def numpy_channel_group_attention(m, x):
    """``m(x)`` for ``x [B, H, W, C]`` in float64, group by group and sample by sample, written from
    the paper's formula ``softmax(Q_g^T K_g * scale) V_g^T`` over channels, with the official code's
    assignment of the fused projection's slices: ``Q = slice 1``, ``K = slice 2``, ``V = slice 0``."""
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, height * width, channels)
    projected = dense(m.qkv, tokens)  # [B, T, 3, G, Cg]
    groups, size = projected.shape[3], projected.shape[4]
    out = np.zeros((batch, height * width, groups, size))
    for b in range(batch):
        for g in range(groups):
            query, key, value = projected[b, :, 1, g], projected[b, :, 2, g], projected[b, :, 0, g]  # [T, Cg]
            scores = np.zeros((size, size))
            for i in range(size):
                for j in range(size):
                    scores[i, j] = m.scale * np.dot(query[:, i], key[:, j])
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            out[b, :, g] = (weights @ value.T).T
    return dense(m.proj, out).reshape(batch, height, width, channels)


def numpy_conv_pos_enc(m, x):
    """``x + act(depthwise_conv(x) + bias)`` of a :class:`attnzoo.layers.davit.ConvPosEnc` in float64."""
    x = np.asarray(x, np.float64)
    pad = m.kernel_size // 2
    feature = conv2d(x, param64(m.proj.kernel), param64(m.proj.bias), 1, ((pad, pad), (pad, pad)), groups=x.shape[-1])
    if m.act:
        feature = 0.5 * feature * (1.0 + _erf(feature / math.sqrt(2.0)))
    return x + feature
