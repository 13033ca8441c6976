"""Independent float64 numpy implementations of Twins' attentions and PEG (test helpers), written
from the paper and timm's description: LSA walks the zero-padded windows one by one, GSA convolves
patch by patch, normalises and attends every query to all sub-sampled keys, PEG convolves tap by tap."""

import numpy as np

from tests.layers.numpy_layers import dense, param64


def _softmax_attention(q, k, v, scale):
    """q ``[B, Tq, H, D]``, k, v ``[B, Tk, H, D]`` -> ``[B, Tq, H, D]``."""
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    weights = scores / scores.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def numpy_locally_grouped(m, x):
    """LSA ``m(x)`` in float64: pad to the window, attend inside each window, crop, project."""
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape
    ph, pw = m.window_size
    hp, wp = -(-height // ph) * ph, -(-width // pw) * pw
    padded = np.zeros((batch, hp, wp, channels))
    padded[:, :height, :width] = x
    qkv = dense(m.qkv, padded)  # [B, hp, wp, 3, Hd, Dh]
    out = np.zeros(qkv.shape[:3] + qkv.shape[4:])
    for top in range(0, hp, ph):
        for left in range(0, wp, pw):
            rows, cols = np.meshgrid(np.arange(top, top + ph), np.arange(left, left + pw), indexing="ij")
            rows, cols = rows.reshape(-1), cols.reshape(-1)
            q, k, v = (qkv[:, rows, cols, part] for part in range(3))
            out[:, rows, cols] = _softmax_attention(q, k, v, m.scale)
    return dense(m.proj, out[:, :height, :width])


def layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + norm.epsilon)
    return y * param64(norm.scale) + param64(norm.bias)


def numpy_global_subsampled(m, x):
    """GSA ``m(x)`` in float64: queries from every token; keys and values from the non-overlapping
    ``rh x rw`` patches (incomplete ones dropped), each convolved, then layer-normalised."""
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape
    q = dense(m.q, x).reshape(batch, height * width, m.num_heads, m.head_dim)
    if m.sr is None:
        source = x.reshape(batch, height * width, channels)
    else:
        rh, rw = m.sr_ratio
        kernel, bias = param64(m.sr.kernel), param64(m.sr.bias)  # [rh, rw, D, D]
        patches = []
        for i in range(height // rh):
            for j in range(width // rw):
                patch = x[:, i * rh : (i + 1) * rh, j * rw : (j + 1) * rw]  # [B, rh, rw, D]
                patches.append(np.einsum("byxc,yxco->bo", patch, kernel) + bias)
        source = layer_norm(np.stack(patches, axis=1), m.norm)
    kv = dense(m.kv, source)  # [B, Tk, 2, Hd, Dh]
    out = _softmax_attention(q, kv[:, :, 0], kv[:, :, 1], m.scale)
    return dense(m.proj, out).reshape(batch, height, width, channels)


def numpy_peg(m, x):
    """PEG ``m(x)`` in float64: ``x`` plus its zero-padded depthwise convolution."""
    x = np.asarray(x, np.float64)
    _, height, width, _ = x.shape
    kernel, bias = param64(m.proj.kernel)[:, :, 0], param64(m.proj.bias)  # [k, k, D]
    k = kernel.shape[0]
    half = k // 2
    padded = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    y = np.zeros_like(x) + bias
    for i in range(k):
        for j in range(k):
            y += padded[:, i : i + height, j : j + width] * kernel[i, j]
    return x + y
