"""Float64 numpy pieces of the layers' independent reference implementations (test helpers).

Each takes a module's own parameters (read as float64) and applies the published formula with
plain numpy, token by token where the layer is causal, so a test compares a layer against code
that shares nothing with it.
"""

import numpy as np


def param64(variable) -> np.ndarray:
    """A parameter's value as a float64 numpy array."""
    return np.asarray(variable[...], np.float64)


def dense(module, x):
    """``x [..., *in] @ kernel [*in, *out] + bias`` of a ``Dense`` in float64."""
    y = np.tensordot(x, param64(module.kernel), axes=len(module.in_features))
    return y if module.bias is None else y + param64(module.bias)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def rms_norm(x, scale, eps):
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, times ``scale`` (None: no scale)."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale


def short_conv(conv, x, segment_ids=None):
    """A ``ShortConvolution`` over ``x [B, T, C]``: ``y_t = sum_j w[j] x[t - (K-1) + j]`` (+ bias),
    taps never reaching before the token's segment start, then the conv's activation."""
    weight = param64(conv.weight)  # [K, C]: weight[K-1] multiplies the current token
    taps = weight.shape[0]
    batch, length, _ = x.shape
    y = np.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            for j in range(taps):
                source = t - (taps - 1) + j
                if source < 0:
                    continue
                if segment_ids is not None and np.any(segment_ids[b, source : t + 1] != segment_ids[b, t]):
                    continue
                y[b, t] += weight[j] * x[b, source]
    if conv.bias is not None:
        y = y + param64(conv.bias)
    return silu(y) if conv.activation == "silu" else y


def numpy_ssd(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, dt_limit=None, initial_state=None,
              segment_ids=None):
    """Mamba-2's SSD token by token in float64, written from the paper::

        S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T;   y_t = S_t^T C_t + D_h x_t

    x ``[B,T,H,P]``, dt ``[B,T,H]``, A ``[H]``, B, C ``[B,T,G,N]`` (head h reads group
    ``h // (H/G)``), D ``[H]`` or ``[H,P]``; the state restarts at zero where the segment id changes.
    Returns (y ``[B,T,H,P]``, final state ``[B,H,N,P]``)."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    batch, length, heads, head_dim = x.shape
    groups, state_dim = B.shape[2:]
    if dt_bias is not None:
        dt = dt + np.asarray(dt_bias, np.float64)
    if dt_softplus:
        dt = np.log1p(np.exp(dt))
    if dt_limit is not None:
        dt = np.clip(dt, *dt_limit)
    y = np.zeros_like(x)
    final = np.zeros((batch, heads, state_dim, head_dim))
    for b in range(batch):
        for h in range(heads):
            group = h // (heads // groups)
            state = np.zeros((state_dim, head_dim)) if initial_state is None else np.array(initial_state[b, h], np.float64)
            for t in range(length):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    state = np.zeros_like(state)
                state = np.exp(dt[b, t, h] * A[h]) * state + dt[b, t, h] * np.outer(B[b, t, group], x[b, t, h])
                y[b, t, h] = state.T @ C[b, t, group]
                if D is not None:
                    skip = np.asarray(D, np.float64)[h]
                    y[b, t, h] += skip * x[b, t, h]
            final[b, h] = state
    return y, final


def numpy_rope(x, positions, theta):
    """Rotate-half RoPE of ``x [B, T, H, D]`` at ``positions [B, T]``."""
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = positions[:, :, None, None] * freqs  # [B,T,1,half]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate(
        [first * np.cos(angles) - second * np.sin(angles), second * np.cos(angles) + first * np.sin(angles)], -1
    )


def numpy_attention_layer(module, x, *, segment_ids=None, positions=None):
    """An ``Attention`` layer in float64 numpy: projections, qk-norm, RoPE, masked softmax, output
    projection (or the heads flattened without one)."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape

    def dense(d, inp, eq):
        out = np.einsum(eq, inp, p(d.kernel))
        return out if d.bias is None else out + p(d.bias)

    q = dense(module.q_proj, x, "btd,dhk->bthk")
    k = dense(module.k_proj, x, "btd,dhk->bthk")
    v = dense(module.v_proj, x, "btd,dhk->bthk")
    if module.q_norm is not None:
        rms = lambda a, s: a / np.sqrt(np.mean(a**2, -1, keepdims=True) + 1e-6) * s  # noqa: E731
        q, k = rms(q, p(module.q_norm.scale)), rms(k, p(module.k_norm.scale))
    if positions is None:
        positions = np.broadcast_to(np.arange(length), (batch, length))
    if module.use_rope:
        q, k = numpy_rope(q, np.asarray(positions), module.rope_theta), numpy_rope(k, np.asarray(positions), module.rope_theta)
    group = module.num_heads // module.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = module.head_dim**-0.5 if module.scale is None else module.scale
    scores = np.einsum("bthk,bshk->bhts", q, k) * scale
    if module.softcap is not None:
        scores = module.softcap * np.tanh(scores / module.softcap)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    visible = np.ones((batch, 1, length, length), bool)
    if module.causal:
        visible &= j <= i
    if module.window is not None:
        left, right = module.window
        if left is not None:
            visible &= j >= i - left
        if right is not None:
            visible &= j <= i + right
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        visible &= (seg[:, :, None] == seg[:, None, :])[:, None]
    scores = np.where(visible, scores, -np.inf)
    row_max = np.max(scores, -1, keepdims=True)
    weights = np.where(visible, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0)), 0)
    denom = weights.sum(-1, keepdims=True)
    probs = weights / np.where(denom > 0, denom, 1)
    out = np.einsum("bhts,bshk->bthk", probs, v)
    if module.o_proj is None:
        return out.reshape(batch, length, -1)
    return dense(module.o_proj, out, "bthk,hkd->btd")


def numpy_mamba(m, x, segment_ids=None):
    """mamba_ssm's Mamba (selective_scan_ref) token by token from a ``Mamba`` layer's parameters,
    with its optional RMSNorms on dt, B, C and without ``out_proj`` when it has none."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    xs = short_conv(m.conv1d, dense(m.x_in_proj, x), segment_ids)
    z = dense(m.z_proj, x)
    dt_low, B, C = dense(m.dt_in_proj, xs), dense(m.B_proj, xs), dense(m.C_proj, xs)  # [B,T,R], [B,T,N]
    if m.dt_layernorm is not None:
        dt_low = rms_norm(dt_low, param64(m.dt_layernorm.scale), m.dt_layernorm.epsilon)
        B = rms_norm(B, param64(m.B_layernorm.scale), m.B_layernorm.epsilon)
        C = rms_norm(C, param64(m.C_layernorm.scale), m.C_layernorm.epsilon)
    dt = softplus(dense(m.dt_proj, dt_low) + param64(m.dt_bias))  # [B, T, d_inner]
    A = -np.exp(param64(m.A_log))  # [d_inner, N]
    y = np.zeros_like(xs)
    for b in range(batch):
        state = np.zeros(A.shape)
        for t in range(length):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                state = np.zeros_like(state)
            state = np.exp(dt[b, t][:, None] * A) * state + (dt[b, t] * xs[b, t])[:, None] * B[b, t][None, :]
            y[b, t] = state @ C[b, t]
    y = (y + xs * param64(m.D)) * silu(z)
    return y if m.out_proj is None else dense(m.out_proj, y)
