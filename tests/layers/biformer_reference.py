"""Independent float64 numpy implementations of BiFormer's mixers (test helpers), written from the
paper's formula region by region and head by head: region means, top-k routing, gather of the routed
regions' tokens, one softmax per query, LePE as an explicit depthwise convolution, projections; and
the official backbone's forward (stem, downsamplers, blocks, final BatchNorm, head) around them."""

import numpy as np
from scipy.special import erf

from tests.layers.numpy_layers import dense, param64


def depthwise_conv(conv, x):
    """A depthwise ``Conv2d`` (kernel ``[k, k, 1, C]``, zero padding ``k // 2``, stride 1) on
    ``x [B, H, W, C]``, tap by tap."""
    kernel = param64(conv.kernel)
    size = kernel.shape[0]
    pad = size // 2
    batch, height, width, channels = x.shape
    padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels))
    padded[:, pad : pad + height, pad : pad + width] = x
    y = np.zeros_like(x)
    for a in range(size):
        for b in range(size):
            y += kernel[a, b, 0] * padded[:, a : a + height, b : b + width]
    return y if conv.bias is None else y + param64(conv.bias)


def softmax(scores):
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return scores / scores.sum(-1, keepdims=True)


def region_tokens(height, width, n_win):
    """Per region (row-major over the ``n_win x n_win`` grid), its tokens' (row, col), row-major."""
    rh, rw = height // n_win, width // n_win
    return [
        [(a * rh + i, c * rw + j) for i in range(rh) for j in range(rw)]
        for a in range(n_win)
        for c in range(n_win)
    ]


def numpy_routing(m, q, k, n_win):
    """``(affinity [B, S^2, S^2], routes [B, S^2, topk])`` from q, k ``[B, Hp, Wp, Hd, Dqk]``."""
    batch, height, width = q.shape[:3]
    regions = region_tokens(height, width, n_win)
    q_mean = np.stack([np.mean([q[:, y, x].reshape(batch, -1) for y, x in r], axis=0) for r in regions], 1)
    k_mean = np.stack([np.mean([k[:, y, x].reshape(batch, -1) for y, x in r], axis=0) for r in regions], 1)
    affinity = np.einsum("bqc,bkc->bqk", q_mean * m.scale, k_mean)
    routes = np.argsort(-affinity, axis=-1, kind="stable")[..., : m.topk]
    return affinity, routes


def numpy_bra(m, x, return_routing=False):
    """``m(x)`` of a ``BiLevelRoutingAttention`` in float64 numpy."""
    x = np.asarray(x, np.float64)
    batch, height, width, dim = x.shape
    n = m.n_win
    hp, wp = (-(-height // n) * n, -(-width // n) * n) if m.auto_pad else (height, width)
    padded = np.zeros((batch, hp, wp, dim))
    padded[:, :height, :width] = x
    qk = dense(m.qk, padded)  # [B, Hp, Wp, 2, Hd, Dqk]
    q, k = qk[..., 0, :, :], qk[..., 1, :, :]
    v = dense(m.v, padded)  # [B, Hp, Wp, Hd, Dv]
    affinity, routes = numpy_routing(m, q, k, n)
    regions = region_tokens(hp, wp, n)
    out = np.zeros_like(v)
    for b in range(batch):
        for r, tokens in enumerate(regions):
            keys = [token for j in routes[b, r] for token in regions[j]]
            rows, cols = np.array([t[0] for t in keys]), np.array([t[1] for t in keys])
            for y, z in tokens:
                for h in range(m.num_heads):
                    weights = softmax(m.scale * (k[b, rows, cols, h] @ q[b, y, z, h]))
                    out[b, y, z, h] = weights @ v[b, rows, cols, h]
    if m.lepe is not None:
        out = out + depthwise_conv(m.lepe, v.reshape(batch, hp, wp, dim)).reshape(out.shape)
    y = dense(m.proj, out)[:, :height, :width]
    return (y, affinity, routes) if return_routing else y


def numpy_attention_lepe(m, x):
    """``m(x)`` of an ``AttentionLePE`` in float64 numpy: global softmax attention per head plus a
    depthwise convolution of the input, then the output projection."""
    x = np.asarray(x, np.float64)
    batch, height, width, dim = x.shape
    qkv = dense(m.qkv, x).reshape(batch, height * width, 3, m.num_heads, m.head_dim)
    out = np.zeros((batch, height * width, m.num_heads, m.head_dim))
    for b in range(batch):
        for h in range(m.num_heads):
            q, k, v = qkv[b, :, 0, h], qkv[b, :, 1, h], qkv[b, :, 2, h]
            out[b, :, h] = softmax(m.scale * q @ k.T) @ v
    out = out.reshape(batch, height, width, m.num_heads, m.head_dim)
    if m.lepe is not None:
        out = out + depthwise_conv(m.lepe, x).reshape(out.shape)
    return dense(m.proj, out)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def layer_norm(norm, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def batch_norm_eval(norm, x):
    """BatchNorm with its running statistics (evaluation mode)."""
    return (x - param64(norm.mean)) / np.sqrt(param64(norm.var) + norm.epsilon) * param64(norm.scale) + param64(norm.bias)


def strided_conv3x3(conv, x):
    """A dense 3x3 stride-2 convolution with zero padding 1 (kernel HWIO ``[3, 3, I, O]``), tap by tap."""
    kernel = param64(conv.kernel)
    batch, height, width, _ = x.shape
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    padded = np.zeros((batch, height + 2, width + 2, x.shape[-1]))
    padded[:, 1 : height + 1, 1 : width + 1] = x
    y = np.zeros((batch, out_h, out_w, kernel.shape[-1]))
    for a in range(3):
        for b in range(3):
            y += padded[:, a : a + 2 * out_h : 2, b : b + 2 * out_w : 2] @ kernel[a, b]
    return y + param64(conv.bias)


def numpy_biformer(model, images):
    """The official BiFormer forward (evaluation mode) in float64 numpy with the model's parameters:
    ``(logits, [stage outputs])``. Stages whose mixer is not BRA use :func:`numpy_attention_lepe`."""
    x = np.asarray(images, np.float64)
    stem = model.stages[0].downsample
    x = batch_norm_eval(stem.norm1, strided_conv3x3(stem.conv1, x))
    x = batch_norm_eval(stem.norm2, strided_conv3x3(stem.conv2, gelu(x)))
    maps = []
    for s, stage in enumerate(model.stages):
        if s > 0:
            x = batch_norm_eval(stage.downsample.norm, strided_conv3x3(stage.downsample.conv, x))
        for block in stage.blocks:
            x = x + depthwise_conv(block.pos_embed, x)
            mixer = numpy_bra if hasattr(block.mixer, "n_win") else numpy_attention_lepe
            x = x + mixer(block.mixer, layer_norm(block.norm1, x))
            hidden = gelu(dense(block.mlp.up, layer_norm(block.norm2, x)))
            x = x + dense(block.mlp.down, hidden)
        maps.append(x)
    pooled = batch_norm_eval(model.norm, x).mean(axis=(1, 2))
    return dense(model.head, pooled), maps
