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
