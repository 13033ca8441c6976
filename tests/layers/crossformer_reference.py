"""An independent float64 numpy implementation of CrossFormer (test helper), written from the official
code's semantics (cheerss/CrossFormer ``models/crossformer.py``) and reading an attnzoo module's own
parameters:

* :func:`numpy_cel`: the official ``PatchEmbed`` (convolutions, concatenation, then LayerNorm) and
  ``PatchMerging`` (LayerNorm, then convolutions), convolutions tap by tap with the official
  ``(k - s) // 2`` zero padding.
* :func:`numpy_dpb`: the official ``DynamicPosBias.forward`` (both ``residual`` branches) on one
  offset pair at a time.
* :func:`numpy_lsda`: ``CrossFormerBlock``'s grouping and ``Attention.forward``, group by group and
  head by head: the block's rule for small maps (``min(H, W) <= G`` -> SDA with ``G = min(H, W)``),
  the padding to multiples of ``G`` (SDA) or ``G I`` (LDA) at the bottom / right, the LDA group
  ``(rh, rw, a, b)`` = tokens ``(rh G I + i I + a, rw G I + j I + b)`` (the official
  ``reshape(B, Rh, Gh, I, Rw, Gw, I, C)``), padded keys left out of the softmax (the official
  ``attn_mask`` adds -1e6 to them), and the bias ``DPB(yq - yk, xq - xk)`` of each query/key pair.
* :func:`numpy_crossformer`: ``CrossFormer.forward`` (stem, blocks ``x + attn(norm1(x))``,
  ``x + mlp(norm2(x))`` with exact GELU, downsamplers, final norm, average pool, head).
"""

import numpy as np
from scipy.special import erf

from tests.layers.conv_reference import conv2d
from tests.layers.numpy_layers import dense, param64


def layer_norm(norm, x):
    """torch ``nn.LayerNorm`` over the last axis with the module's scale / bias / epsilon."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + norm.epsilon)
    if norm.scale is not None:
        y = y * param64(norm.scale)
    if norm.bias is not None:
        y = y + param64(norm.bias)
    return y


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def numpy_cel(cel, x):
    """A :class:`attnzoo.layers.crossformer.CrossScaleEmbedding` on ``x [B, H, W, I]`` in float64."""
    x = np.asarray(x, np.float64)
    if cel.norm_position == "before":
        x = layer_norm(cel.norm, x)
    outs = []
    for conv in cel.projs:
        k, stride = conv.kernel_size[0], conv.stride[0]
        pad = (k - stride) // 2
        outs.append(conv2d(x, param64(conv.kernel), param64(conv.bias), stride, ((pad, pad), (pad, pad))))
    y = np.concatenate(outs, axis=-1)
    if cel.norm_position == "after":
        y = layer_norm(cel.norm, y)
    return y


def numpy_dpb(dpb, dy, dx):
    """The official ``DynamicPosBias`` on one offset ``(dy, dx)``: ``[Hd]``."""
    def linear(d, v):
        return v @ param64(d.kernel) + param64(d.bias)

    def branch(norm, fc, v):
        return linear(fc, np.maximum(layer_norm(norm, v), 0.0))

    p = linear(dpb.pos_proj, np.array([float(dy), float(dx)]))
    if dpb.residual:
        p = p + branch(dpb.norm1, dpb.fc1, p)
        p = p + branch(dpb.norm2, dpb.fc2, p)
    else:
        p = branch(dpb.norm2, dpb.fc2, branch(dpb.norm1, dpb.fc1, p))
    return branch(dpb.norm3, dpb.fc3, p)


def lsda_groups(height, width, mode, group, interval, shrink=True):
    """``(groups, padded)``: per group the list of its tokens' (row, col) on the padded map in token
    order, following the official block (small-map rule, padding, SDA / LDA layout)."""
    if shrink and min(height, width) <= group:
        mode, group = "sda", min(height, width)
    size_div = group * interval if mode == "lda" else group
    hp = height + (size_div - height % size_div) % size_div
    wp = width + (size_div - width % size_div) % size_div
    groups = []
    if mode == "sda":
        for r in range(hp // group):
            for c in range(wp // group):
                groups.append([(r * group + i, c * group + j) for i in range(group) for j in range(group)])
    else:
        span = group * interval
        for rh in range(hp // span):
            for rw in range(wp // span):
                for a in range(interval):
                    for b in range(interval):
                        groups.append([(rh * span + i * interval + a, rw * span + j * interval + b)
                                       for i in range(group) for j in range(group)])
    return groups, (hp, wp), group


def numpy_lsda(m, x):
    """``m(x)`` of a :class:`attnzoo.layers.crossformer.CrossFormerAttention` in float64 numpy."""
    x = np.asarray(x, np.float64)
    batch, height, width, dim = x.shape
    groups, (hp, wp), group = lsda_groups(height, width, m.mode, m.group_size, m.interval, m.shrink_group)
    padded = np.zeros((batch, hp, wp, dim))
    padded[:, :height, :width] = x
    qkv = dense(m.qkv, padded)  # [B, hp, wp, 3, Hd, Dh]
    attended = np.zeros((batch, hp, wp, m.num_heads, m.head_dim))
    bias_cache = {}
    for tokens in groups:
        rows = np.array([t[0] for t in tokens])
        cols = np.array([t[1] for t in tokens])
        keys = [n for n, (r, c) in enumerate(tokens) if r < height and c < width]  # padded keys are masked
        if not keys:  # a group of padding only (LDA): its queries are cropped
            continue
        q = qkv[:, rows, cols, 0]
        k, v = qkv[:, rows[keys], cols[keys], 1], qkv[:, rows[keys], cols[keys], 2]
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) * m.scale
        if m.pos is not None:
            bias = np.zeros((m.num_heads, len(tokens), len(keys)))
            for a in range(len(tokens)):
                for b, key in enumerate(keys):
                    dy = a // group - key // group
                    dx = a % group - key % group
                    if (dy, dx) not in bias_cache:
                        bias_cache[(dy, dx)] = numpy_dpb(m.pos, dy, dx)
                    bias[:, a, b] = bias_cache[(dy, dx)]
            scores = scores + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        weights = scores / scores.sum(-1, keepdims=True)
        attended[:, rows, cols] = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return dense(m.proj, attended)[:, :height, :width]


def numpy_crossformer(model, images):
    """``model(images)`` of a :class:`attnzoo.zoo.CrossFormer` (all stages ``crossformer_lsda``) in
    float64: logits ``[B, K]`` and the stage outputs."""
    x = numpy_cel(model.patch_embed, images)
    stages = []
    for stage in model.layers:
        if stage.downsample is not None:
            x = numpy_cel(stage.downsample, x)
        for block in stage.blocks:
            x = x + numpy_lsda(block.mixer, layer_norm(block.norm1, x))
            x = x + dense(block.mlp.down, gelu(dense(block.mlp.up, layer_norm(block.norm2, x))))
        stages.append(x)
    pooled = layer_norm(model.norm, x).mean(axis=(1, 2))
    return dense(model.head, pooled), stages
