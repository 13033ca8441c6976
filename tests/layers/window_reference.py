"""An independent float64 numpy implementation of window attention (Swin W-MSA / SW-MSA, MaxViT block
and grid) that walks the windows one by one, with timm's mask slicing (test helper)."""

import numpy as np

from tests.layers.numpy_layers import dense, param64


def timm_region_labels(hp, wp, window, shift):
    """Region ids of the padded map written the way Swin / timm do: a counter over three slices
    per axis, later slices overwriting earlier ones."""
    labels = np.zeros((hp, wp), np.int64)
    count = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            labels[slice(h0, h1), slice(w0, w1)] = count
            count += 1
    return labels


def windows_of(hp, wp, window, partition):
    """Per window, the list of its tokens' (row, col) positions on the padded map, in token order,
    and each token's coordinate inside the window (for the bias)."""
    ph, pw = window
    result = []
    if partition == "window":
        for r in range(hp // ph):
            for c in range(wp // pw):
                result.append([((r * ph + i, c * pw + j), (i, j)) for i in range(ph) for j in range(pw)])
    else:
        sh, sw = hp // ph, wp // pw
        for a in range(sh):
            for b in range(sw):
                result.append([((i * sh + a, j * sw + b), (i, j)) for i in range(ph) for j in range(pw)])
    return result


def numpy_window_attention(m, x):
    """``m(x)`` in float64 numpy, window by window, head by head."""
    x = np.asarray(x, np.float64)
    batch, height, width, _ = x.shape
    (ph, pw), (sh, sw) = m.window_size, m.shift_size
    hp, wp = -(-height // ph) * ph, -(-width // pw) * pw
    shifted = np.zeros((batch, hp, wp, x.shape[-1]))
    for y in range(height):
        for z in range(width):
            shifted[:, y, z] = x[:, (y + sh) % height, (z + sw) % width]
    labels = timm_region_labels(hp, wp, (ph, pw), (sh, sw)) if (sh or sw) else np.zeros((hp, wp), np.int64)
    qkv = dense(m.qkv, shifted)  # [B, hp, wp, 3, Hd, Dh]
    table = None if m.relative_position_bias_table is None else param64(m.relative_position_bias_table)
    attended = np.zeros(qkv.shape[:3] + qkv.shape[4:])  # [B, hp, wp, Hd, Dh]
    for tokens in windows_of(hp, wp, (ph, pw), m.partition):
        rows = np.array([p[0] for p, _ in tokens])
        cols = np.array([p[1] for p, _ in tokens])
        q, k, v = (qkv[:, rows, cols, part] for part in range(3))  # [B, N, Hd, Dh]
        bias = np.zeros((m.num_heads, len(tokens), len(tokens)))
        for a, (pa, ca) in enumerate(tokens):
            for b, (pb, cb) in enumerate(tokens):
                if table is not None:
                    bias[:, a, b] = table[(ca[0] - cb[0] + ph - 1) * (2 * pw - 1) + (ca[1] - cb[1] + pw - 1)]
                if labels[pa] != labels[pb]:
                    bias[:, a, b] += -100.0
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) * m.scale + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        weights = scores / scores.sum(-1, keepdims=True)
        attended[:, rows, cols] = np.einsum("bhqk,bkhd->bqhd", weights, v)
    out = dense(m.proj, attended)[:, :height, :width]
    result = np.zeros_like(out)
    for y in range(height):
        for z in range(width):
            result[:, (y + sh) % height, (z + sw) % width] = out[:, y, z]
    return result
