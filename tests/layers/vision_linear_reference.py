"""Independent float64 numpy implementations of Agent Attention, FLatten's focused linear attention and
Efficient Attention on a 2-D map (test helpers), written from the papers' formulas and the official
torch modules' order of operations: pooling cell by cell, bilinear resizing pixel by pixel, the
depthwise convolution tap by tap and attention head by head (no code shared with the layers)."""

import math

import numpy as np

from tests.layers.numpy_layers import dense, param64


def adaptive_avg_pool(plane, size):
    """torch's ``AdaptiveAvgPool2d(size)`` of ``plane [H, W, ...]``: cell ``(i, j)`` is the mean over
    rows ``floor(i H / p) .. ceil((i + 1) H / p) - 1`` and the same columns."""
    height, width = plane.shape[:2]
    out = np.zeros((size, size) + plane.shape[2:])
    for i in range(size):
        r0, r1 = math.floor(i * height / size), math.ceil((i + 1) * height / size)
        for j in range(size):
            c0, c1 = math.floor(j * width / size), math.ceil((j + 1) * width / size)
            out[i, j] = plane[r0:r1, c0:c1].mean(axis=(0, 1))
    return out


def bilinear_resize(table, height, width):
    """torch's ``F.interpolate(table, (height, width), mode="bilinear", align_corners=False)`` of a
    ``[..., h, w]`` table, pixel by pixel."""
    h, w = table.shape[-2:]
    out = np.zeros(table.shape[:-2] + (height, width))

    def source(index, size_in, size_out):
        s = max((index + 0.5) * size_in / size_out - 0.5, 0.0)
        lo = min(int(s), size_in - 1)
        return lo, min(lo + 1, size_in - 1), s - lo

    for y in range(height):
        y0, y1, fy = source(y, h, height)
        for x in range(width):
            x0, x1, fx = source(x, w, width)
            top = (1 - fx) * table[..., y0, x0] + fx * table[..., y0, x1]
            bottom = (1 - fx) * table[..., y1, x0] + fx * table[..., y1, x1]
            out[..., y, x] = (1 - fy) * top + fy * bottom
    return out


def depthwise_conv(x, conv):
    """A depthwise ``Conv2d`` (``kernel [k, k, 1, C]``, padding ``k // 2``, bias) on ``x [N, H, W, C]``."""
    kernel = param64(conv.kernel)
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    y = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            y += padded[:, i : i + height, j : j + width, :] * kernel[i, j, 0]
    return y + param64(conv.bias)


def softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _qkv(m, x):
    """``x [B, H, W, C]`` -> q, k, v ``[B, H, W, C]`` (channels head-major) in float64."""
    qkv = dense(m.qkv, np.asarray(x, np.float64))  # [B, H, W, 3, Hd, Dh]
    shape = x.shape[:3] + (m.dim,)
    return (qkv[..., i, :, :].reshape(shape) for i in range(3))


def numpy_agent_attention(m, x):
    """Agent-Swin's AgentAttention with the module's parameters, float64."""
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape
    heads, dh, n = m.num_heads, channels // m.num_heads, m.agent_num
    p = math.isqrt(n)
    scale = m.scale
    q, k, v = _qkv(m, x)
    # Position biases: agent -> token [Hd, n, H, W] and token -> agent [Hd, H, W, n].
    an = bilinear_resize(param64(m.an_bias), height, width)
    na = bilinear_resize(param64(m.na_bias), height, width)
    ah, aw, ha, wa = (param64(b) for b in (m.ah_bias, m.aw_bias, m.ha_bias, m.wa_bias))
    agent_to_token = np.zeros((heads, n, height, width))
    token_to_agent = np.zeros((heads, height, width, n))
    for h in range(heads):
        for a in range(n):
            for y in range(height):
                for xx in range(width):
                    agent_to_token[h, a, y, xx] = an[h, a, y, xx] + ah[h, a, y] + aw[h, a, xx]
                    token_to_agent[h, y, xx, a] = na[h, a, y, xx] + ha[h, y, a] + wa[h, xx, a]
    tokens = height * width
    out = np.zeros((batch, tokens, channels))
    for b in range(batch):
        agents = adaptive_avg_pool(q[b], p).reshape(n, channels)
        qb, kb, vb = (t[b].reshape(tokens, channels) for t in (q, k, v))
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            ag, qh, kh, vh = agents[:, cols], qb[:, cols], kb[:, cols], vb[:, cols]
            gather = softmax((ag * scale) @ kh.T + agent_to_token[h].reshape(n, tokens), axis=1)
            agent_values = gather @ vh  # [n, Dh]
            spread = softmax((qh * scale) @ ag.T + token_to_agent[h].reshape(tokens, n), axis=1)
            out[b, :, cols] = spread @ agent_values
    out = out.reshape(batch, height, width, channels) + depthwise_conv(v, m.dwc)
    return dense(m.proj, out.reshape(batch, height, width, heads, dh))


def _focus(m, z):
    """FLatten's focusing function on ``z [..., C]`` (norms over all ``C`` channels of a token)."""
    softplus_scale = np.logaddexp(0.0, param64(m.scale).reshape(z.shape[-1]))
    z = (np.maximum(z, 0.0) + 1e-6) / softplus_scale
    zp = z**m.focusing_factor
    return zp / np.linalg.norm(zp, axis=-1, keepdims=True) * np.linalg.norm(z, axis=-1, keepdims=True)


def numpy_focused_linear_attention(m, x):
    """FLatten-Swin's FocusedLinearAttention with the module's parameters, float64."""
    x = np.asarray(x, np.float64)
    batch, height, width, channels = x.shape
    heads, dh, tokens = m.num_heads, channels // m.num_heads, height * width
    q, k, v = (t.reshape(batch, tokens, channels) for t in _qkv(m, x))
    k = k + param64(m.positional_encoding).reshape(tokens, channels)
    q, k = _focus(m, q), _focus(m, k)
    out = np.zeros((batch, tokens, channels))
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]
            for t in range(tokens):
                numerator = sum(np.dot(qh[t], kh[j]) * vh[j] for j in range(tokens)) / tokens
                denominator = np.dot(qh[t], kh.mean(axis=0)) + 1e-6
                out[b, t, cols] = numerator / denominator
    # DWConv over each head's Dh value channels with one kernel shared by the heads.
    per_head = v.reshape(batch, height, width, heads, dh).transpose(0, 3, 1, 2, 4).reshape(batch * heads, height, width, dh)
    local = depthwise_conv(per_head, m.dwc).reshape(batch, heads, height, width, dh).transpose(0, 2, 3, 1, 4)
    out = out.reshape(batch, height, width, heads, dh) + local
    return dense(m.proj, out)


def numpy_efficient_attention(m, x):
    """Efficient Attention (softmax normalisation) with the module's parameters, float64."""
    x = np.asarray(x, np.float64)
    batch, height, width, _ = x.shape
    tokens = height * width
    q = dense(m.query, x).reshape(batch, tokens, m.num_heads, -1)
    k = dense(m.key, x).reshape(batch, tokens, m.num_heads, -1)
    v = dense(m.value, x).reshape(batch, tokens, m.num_heads, -1)
    out = np.zeros((batch, tokens, m.num_heads, v.shape[-1]))
    for b in range(batch):
        for h in range(m.num_heads):
            keys = softmax(k[b, :, h], axis=0)  # each key feature a distribution over positions
            context = keys.T @ v[b, :, h]  # [Dk, Dv]
            for t in range(tokens):
                out[b, t, h] = softmax(q[b, t, h], axis=0) @ context
    return dense(m.proj, out.reshape(batch, height, width, m.num_heads, -1))


def numpy_agent_attention_tokens(m, x):
    """Agent-DeiT's AgentAttention on ``x [B, P + H W, C]`` (``P`` prefix tokens, then the map row-major)
    with the module's parameters, float64: agents pooled from the map's queries, the prefix tokens'
    ``ac_bias`` / ``ca_bias`` before the map's biases, the depthwise convolution on the map tokens only."""
    x = np.asarray(x, np.float64)
    batch, count, channels = x.shape
    (height, width), prefix = m.resolution, m.num_prefix_tokens
    heads, dh, n = m.num_heads, channels // m.num_heads, m.agent_num
    qkv = dense(m.qkv, x)  # [B, N, 3, Hd, Dh]
    q, k, v = (qkv[:, :, i].reshape(batch, count, channels) for i in range(3))
    an = bilinear_resize(param64(m.an_bias), height, width)
    na = bilinear_resize(param64(m.na_bias), height, width)
    ah, aw, ha, wa = (param64(b) for b in (m.ah_bias, m.aw_bias, m.ha_bias, m.wa_bias))
    agent_to_key = np.zeros((heads, n, count))
    query_to_agent = np.zeros((heads, count, n))
    for h in range(heads):
        for a in range(n):
            for t in range(count):
                if t < prefix:
                    agent_to_key[h, a, t] = param64(m.ac_bias)[h, a, t]
                    query_to_agent[h, t, a] = param64(m.ca_bias)[h, t, a]
                else:
                    y, xx = divmod(t - prefix, width)
                    agent_to_key[h, a, t] = an[h, a, y, xx] + ah[h, a, y] + aw[h, a, xx]
                    query_to_agent[h, t, a] = na[h, a, y, xx] + ha[h, y, a] + wa[h, xx, a]
    out = np.zeros((batch, count, channels))
    for b in range(batch):
        agents = adaptive_avg_pool(q[b, prefix:].reshape(height, width, channels), math.isqrt(n)).reshape(n, channels)
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            ag, qh, kh, vh = agents[:, cols], q[b, :, cols], k[b, :, cols], v[b, :, cols]
            agent_values = softmax((ag * m.scale) @ kh.T + agent_to_key[h], axis=1) @ vh
            out[b, :, cols] = softmax((qh * m.scale) @ ag.T + query_to_agent[h], axis=1) @ agent_values
    local = depthwise_conv(v[:, prefix:].reshape(batch, height, width, channels), m.dwc)
    out[:, prefix:] += local.reshape(batch, height * width, channels)
    return dense(m.proj, out.reshape(batch, count, heads, dh))


def numpy_focused_linear_attention_tokens(m, x):
    """Focused linear attention on ``x [B, P + H W, C]`` with the module's parameters, float64: every
    token a query and a key (positional encoding per token, normalised by ``P + H W``), the per-head
    depthwise convolution on the map tokens only."""
    x = np.asarray(x, np.float64)
    batch, count, channels = x.shape
    (height, width), prefix = m.resolution, m.num_prefix_tokens
    heads, dh = m.num_heads, channels // m.num_heads
    qkv = dense(m.qkv, x)
    q, k, v = (qkv[:, :, i].reshape(batch, count, channels) for i in range(3))
    k = k + param64(m.positional_encoding).reshape(count, channels)
    q, k = _focus(m, q), _focus(m, k)
    out = np.zeros((batch, count, channels))
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]
            for t in range(count):
                numerator = sum(np.dot(qh[t], kh[j]) * vh[j] for j in range(count)) / count
                out[b, t, cols] = numerator / (np.dot(qh[t], kh.mean(axis=0)) + 1e-6)
    per_head = v[:, prefix:].reshape(batch, height, width, heads, dh).transpose(0, 3, 1, 2, 4)
    local = depthwise_conv(per_head.reshape(batch * heads, height, width, dh), m.dwc)
    local = local.reshape(batch, heads, height * width, dh).transpose(0, 2, 1, 3).reshape(batch, height * width, channels)
    out[:, prefix:] += local
    return dense(m.proj, out.reshape(batch, count, heads, dh))
