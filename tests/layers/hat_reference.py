"""Independent float64 numpy implementations of HAT's pieces (test helpers), written from the official
``hat_arch.py`` formulas: the channel attention block, the HAB's hybrid mixing, the OCAB's overlapping
cross-attention (query by query, key by key, with the official relative position index and its torch
negative-index wrap-around), and the whole HAT network (mean, reflect padding, pixel shuffle, crop)."""

import math

import numpy as np

from tests.layers.conv_reference import conv2d
from tests.layers.numpy_layers import dense, param64, sigmoid
from tests.layers.window_reference import numpy_window_attention

_erf = np.vectorize(math.erf)


def gelu(x):
    """Exact (erf) GELU, torch's ``nn.GELU()``."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def conv3x3(conv, x):
    """A 3x3 ``Conv2d`` with zero padding 1 (torch ``nn.Conv2d(i, o, 3, 1, 1)``)."""
    return conv2d(x, param64(conv.kernel), param64(conv.bias), 1, ((1, 1), (1, 1)))


def channel_attention_block(m, x):
    """CAB: conv3x3 -> GELU -> conv3x3 -> ``y * sigmoid(W2 relu(W1 mean_hw(y) + b1) + b2)``."""
    y = conv3x3(m.conv2, gelu(conv3x3(m.conv1, np.asarray(x, np.float64))))
    pooled = y.mean(axis=(1, 2))
    gate = sigmoid(dense(m.attention.fc2, np.maximum(dense(m.attention.fc1, pooled), 0.0)))
    return y * gate[:, None, None, :]


def hybrid_attention(m, x):
    """HAB mixing: window attention (Swin's, walked window by window) + conv_scale * CAB, same input."""
    x = np.asarray(x, np.float64)
    return numpy_window_attention(m.attn, x) + m.conv_scale * channel_attention_block(m.conv_block, x)


def official_oca_index(window, overlap):
    """The official ``calculate_rpi_oca`` (generalised to a (height, width) window): key coordinate
    minus query coordinate, shifted by ``M - M_o + 1``, rows times ``M_w + M_ow - 1``; may be negative
    (numpy indexing then wraps around from the end, as torch does)."""
    (ph, pw), (oh, ow) = window, overlap
    index = np.zeros((ph * pw, oh * ow), np.int64)
    for yq in range(ph):
        for xq in range(pw):
            for yk in range(oh):
                for xk in range(ow):
                    row = yk - yq + ph - oh + 1
                    col = xk - xq + pw - ow + 1
                    index[yq * pw + xq, yk * ow + xk] = row * (pw + ow - 1) + col
    return index


def overlapping_cross_attention(m, x):
    """OCAB attention: each query of the M x M window at (r, c) attends to the keys at
    ``(r M - (M_o - M)/2 + a, c M - (M_o - M)/2 + b)``, zero vectors outside the (zero-padded) map."""
    x = np.asarray(x, np.float64)
    batch, height, width, _ = x.shape
    (ph, pw), (oh, ow) = m.window_size, m.overlap_size
    hp, wp = -(-height // ph) * ph, -(-width // pw) * pw
    qkv = dense(m.qkv, x)  # [B, H, W, 3, Hd, Dh]
    table = param64(m.relative_position_bias_table)
    index = official_oca_index((ph, pw), (oh, ow))
    pad_h, pad_w = (oh - ph) // 2, (ow - pw) // 2
    out = np.zeros((batch, hp, wp, m.num_heads, m.head_dim))
    for r in range(hp // ph):
        for c in range(wp // pw):
            keys = np.zeros((batch, oh * ow, m.num_heads, m.head_dim))
            values = np.zeros_like(keys)
            for a in range(oh):
                for b in range(ow):
                    y, z = r * ph - pad_h + a, c * pw - pad_w + b
                    if 0 <= y < height and 0 <= z < width:
                        keys[:, a * ow + b] = qkv[:, y, z, 1]
                        values[:, a * ow + b] = qkv[:, y, z, 2]
            for i in range(ph):
                for j in range(pw):
                    y, z = r * ph + i, c * pw + j
                    if y >= height or z >= width:
                        continue
                    q = qkv[:, y, z, 0]  # [B, Hd, Dh]
                    scores = np.einsum("bhd,bkhd->bhk", q, keys) * m.scale
                    scores = scores + table[index[i * pw + j]].T[None]  # [Hd, No]
                    scores = np.exp(scores - scores.max(-1, keepdims=True))
                    weights = scores / scores.sum(-1, keepdims=True)
                    out[:, y, z] = np.einsum("bhk,bkhd->bhd", weights, values)
    return dense(m.proj, out[:, :height, :width])


def layer_norm(norm, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def mlp(m, x):
    return dense(m.down, gelu(dense(m.up, x)))


def pixel_shuffle(x, r):
    """torch ``PixelShuffle`` in NHWC, element by element: ``out[h r + i, w r + j, c] = x[h, w, c r^2 + i r + j]``."""
    batch, height, width, channels = x.shape
    out = np.zeros((batch, height * r, width * r, channels // (r * r)))
    for i in range(r):
        for j in range(r):
            for c in range(channels // (r * r)):
                out[:, i::r, j::r, c] = x[..., c * r * r + i * r + j]
    return out


def hat_network(model, x):
    """The whole HAT forward in float64 numpy (``x [B, h, w, C]``)."""
    x = np.asarray(x, np.float64)
    height, width = x.shape[1:3]
    mean = np.asarray(model.rgb_mean)
    x = (x - mean) * model.img_range
    m = model.window_size
    x = np.pad(x, ((0, 0), (0, (-height) % m), (0, (-width) % m), (0, 0)), mode="reflect")
    f = conv3x3(model.conv_first, x)
    y = layer_norm(model.patch_norm, f)
    for layer in model.layers:
        g = y
        for block in layer.blocks:
            g = g + hybrid_attention(block.mixer, layer_norm(block.norm1, g))
            g = g + mlp(block.mlp, layer_norm(block.norm2, g))
        block = layer.overlap_attn
        g = g + overlapping_cross_attention(block.mixer, layer_norm(block.norm1, g))
        g = g + mlp(block.mlp, layer_norm(block.norm2, g))
        y = y + conv3x3(layer.conv, g)
    y = f + conv3x3(model.conv_after_body, layer_norm(model.norm, y))
    y = conv3x3(model.conv_before_upsample, y)
    y = np.where(y >= 0, y, 0.01 * y)
    for conv, factor in zip(model.upsample, model.upsample_factors, strict=True):
        y = pixel_shuffle(conv3x3(conv, y), factor)
    y = conv3x3(model.conv_last, y)[:, : height * model.upscale, : width * model.upscale]
    return y / model.img_range + mean
