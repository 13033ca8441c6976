"""``pk.selective_scan`` (Mamba-1): the oracle against a numpy loop written from the paper, the
chunked ``xla`` form against the oracle (outputs, last states, every gradient) with groups, skip,
gate, bias/softplus, initial states, packed sequences and segment restarts; decoding steps; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels.testing import assert_close, assert_grads_close, float64, to_float64


def numpy_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
               segment_ids=None):
    """mamba_ssm's selective_scan_ref token by token in float64: (y [B,T,D], last state [B,D,N])."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    batch, length, channels = u.shape
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    groups = B.shape[2]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)
    if delta_softplus:
        delta = np.logaddexp(0.0, delta)
    y = np.zeros_like(u)
    last = np.zeros((batch, channels, A.shape[1]))
    for b in range(batch):
        h = np.zeros(A.shape) if initial_state is None else np.array(initial_state[b], np.float64)
        for t in range(length):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                h = np.zeros_like(h)
            Bt = np.repeat(B[b, t], channels // groups, axis=0)
            Ct = np.repeat(C[b, t], channels // groups, axis=0)
            h = np.exp(delta[b, t][:, None] * A) * h + (delta[b, t] * u[b, t])[:, None] * Bt
            y[b, t] = (h * Ct).sum(-1)
            if D is not None:
                y[b, t] += np.asarray(D, np.float64) * u[b, t]
        last[b] = h
    if z is not None:
        z = np.asarray(z, np.float64)
        y = y * z / (1 + np.exp(-z))
    return y, last


def make(seed, batch, length, channels, state, groups, *, sequences=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shape_bc = (batch, length, state) if groups is None else (batch, length, groups, state)
    arrays = dict(
        u=rng.normal(size=(batch, length, channels)), delta=rng.uniform(-2, 1, size=(batch, length, channels)),
        A=-rng.uniform(0.5, 4.0, size=(channels, state)), B=rng.normal(size=shape_bc), C=rng.normal(size=shape_bc),
        D=rng.normal(size=(channels,)), z=rng.normal(size=(batch, length, channels)),
        delta_bias=rng.normal(size=(channels,)) * 0.5,
        initial_state=rng.normal(size=(sequences or batch, channels, state)),
    )
    return {k: v.astype(dtype) for k, v in arrays.items()}


def run(arrays, impl, **options):
    a = dict(arrays)
    return pk.selective_scan(a.pop("u"), a.pop("delta"), a.pop("A"), a.pop("B"), a.pop("C"), delta_softplus=True,
                             return_last_state=True, impl=impl, **a, **options)


def test_oracle_equals_numpy_loop_and_the_check_can_fail():
    with float64():
        arrays = make(0, 2, 21, 6, 4, 2)
        y, last = run(arrays, "reference")
        ref_y, ref_last = numpy_scan(**arrays, delta_softplus=True)
        assert_close(y, ref_y, "y", dtype=jnp.float64)
        assert_close(last, ref_last, "last", dtype=jnp.float64)
        wrong, _ = numpy_scan(**dict(arrays, A=arrays["A"] * 1.01), delta_softplus=True)
        with pytest.raises(AssertionError, match="relative RMS"):
            assert_close(y, wrong, "y", dtype=jnp.float64)


@pytest.mark.parametrize(
    "seed, batch, length, channels, state, groups, chunk",
    [(0, 2, 37, 6, 4, 2, 8), (1, 1, 130, 5, 3, None, 32), (2, 2, 1, 4, 16, 1, 64), (3, 1, 63, 8, 5, 4, 16)],
)
def test_xla_equals_oracle_float64(seed, batch, length, channels, state, groups, chunk):
    with float64():
        arrays = make(seed, batch, length, channels, state, groups)
        y, last = run(arrays, "xla", chunk_size=chunk)
        ref_y, ref_last = run(arrays, "reference")
        assert y.dtype == jnp.float64 and last.dtype == jnp.float64
        assert_close(y, ref_y, "y", dtype=jnp.float64)
        assert_close(last, ref_last, "last", dtype=jnp.float64)


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _positional(impl, **options):
    def fn(*xs):
        return run(dict(zip(NAMES, xs)), impl, **options)

    return fn


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradients_of_every_input(dtype):
    arrays = make(4, 2, 45, 6, 4, 2, dtype=dtype)
    args = [arrays[n] for n in NAMES]
    if dtype == np.float64:
        with float64():
            assert_grads_close(_positional("xla", chunk_size=16), _positional("reference"), args,
                               argnums=range(len(args)), dtype=jnp.float64, names=NAMES)
    else:
        assert_grads_close(_positional("xla", chunk_size=16), _positional("reference"), args,
                           argnums=[i for i, n in enumerate(NAMES) if n != "A"], dtype=jnp.float32,
                           names=[n for n in NAMES if n != "A"])


def test_float32_outputs_against_float64():
    arrays = make(5, 2, 200, 16, 16, None, dtype=np.float32)
    y, last = run(arrays, "xla")
    with float64():
        ref_y, ref_last = run(to_float64(arrays), "reference")
    assert_close(y, ref_y, "y", dtype=jnp.float32)
    assert_close(last, ref_last, "last", dtype=jnp.float32)


def test_packed_sequences_equal_separate_runs():
    lengths = [5, 0, 40, 17]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    with float64():
        arrays = make(6, 1, int(cu[-1]), 6, 4, 2, sequences=len(lengths))
        for impl in ("xla", "reference"):
            y, last = run(arrays, impl, cu_seqlens=jnp.asarray(cu), chunk_size=16)
            for index, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
                initial = arrays["initial_state"][index : index + 1]
                if end > start:
                    piece = {k: (v[:, start:end] if k in ("u", "delta", "B", "C", "z") else v) for k, v in arrays.items()}
                    ref_y, ref_last = numpy_scan(**dict(piece, initial_state=initial), delta_softplus=True)
                    assert_close(y[:, start:end], ref_y, f"{impl} y[{index}]", dtype=jnp.float64)
                else:
                    ref_last = initial
                assert_close(last[index : index + 1], ref_last, f"{impl} last[{index}]", dtype=jnp.float64)


def test_segment_ids_restart_the_state():
    with float64():
        arrays = make(7, 2, 50, 6, 4, None)
        ids = np.zeros((2, 50), np.int32)
        ids[0, 16:], ids[0, 37:], ids[1, 9:] = 1, 2, 5
        y, last = run(arrays, "xla", segment_ids=jnp.asarray(ids), chunk_size=16)
        ref_y, ref_last = numpy_scan(**arrays, delta_softplus=True, segment_ids=ids)
        assert_close(y, ref_y, "y", dtype=jnp.float64)
        assert_close(last, ref_last, "last", dtype=jnp.float64)


def test_gradients_with_segment_ids():
    """Restarts at a chunk boundary (16), inside chunks and at the last token; every input's
    gradient, the final state's cotangent included, against the token-by-token reference."""
    with float64():
        arrays = make(8, 3, 50, 6, 4, 2)
        ids = np.zeros((3, 50), np.int32)
        ids[0, 16:], ids[0, 37:], ids[1, 9:], ids[2, 49:] = 1, 2, 5, 3
        args = [arrays[n] for n in NAMES]
        assert_grads_close(_positional("xla", chunk_size=16, segment_ids=jnp.asarray(ids)),
                           _positional("reference", segment_ids=jnp.asarray(ids)), args,
                           argnums=range(len(args)), dtype=jnp.float64, names=NAMES)


def test_steps_equal_the_scan():
    with float64():
        arrays = make(8, 2, 19, 6, 4, 3)
        y, last = run(arrays, "xla", chunk_size=8)
        state = arrays["initial_state"]
        for t in range(19):
            y_t, state = pk.selective_scan_step(
                arrays["u"][:, t], arrays["delta"][:, t], arrays["A"], arrays["B"][:, t], arrays["C"][:, t], state,
                D=arrays["D"], z=arrays["z"][:, t], delta_bias=arrays["delta_bias"], delta_softplus=True,
            )
            assert_close(y_t, y[:, t], f"y[{t}]", dtype=jnp.float64)
        assert_close(state, last, "state", dtype=jnp.float64)


def test_memory_is_linear_in_length():
    """The backward keeps chunk-boundary states, not one state per token: from T = 1024 to 4096 the
    temporaries grow by a few ``[D]`` vectors per token (inputs, outputs and their cotangents moved
    to chunk-major order), far less than the ``[D, N]`` state a per-token residual would add."""
    def footprint(length):
        arrays = make(0, 1, length, 64, 16, None, dtype=np.float32)
        args = [arrays[n] for n in ("u", "delta", "A", "B", "C")]
        grad = jax.jit(jax.grad(lambda *xs: jnp.sum(pk.selective_scan(*xs, impl="xla")[0]), argnums=(0, 1)))
        analysis = grad.lower(*args).compile().memory_analysis()
        return analysis.temp_size_in_bytes

    small, large = footprint(1024), footprint(4096)
    per_token = (large - small) / 3072
    assert per_token < 8 * 64 * 4  # at most 8 float32 [D] vectors per token (a [D, N] state is 16 of them)
    assert large < 4096 * 64 * 16 * 4 / 2  # in all, less than half a float32 state per token


def test_errors_name_the_argument():
    a = make(0, 1, 8, 4, 3, None, dtype=np.float32)
    u, dl, A, B, C = (a[n] for n in ("u", "delta", "A", "B", "C"))
    cases = [
        (lambda: pk.selective_scan(u[0], dl, A, B, C), ValueError, "u must have rank 3"),
        (lambda: pk.selective_scan(u, dl[..., :3], A, B, C), ValueError, "delta must have shape"),
        (lambda: pk.selective_scan(u, dl, A[:3], B, C), ValueError, "A must have shape"),
        (lambda: pk.selective_scan(u, dl, A, B[..., :2], C), ValueError, "B must have shape"),
        (lambda: pk.selective_scan(u, dl, A, np.zeros((1, 8, 3, 3), np.float32), np.zeros((1, 8, 3, 3), np.float32)),
         ValueError, "G = 3"),
        (lambda: pk.selective_scan(u, dl, A, B, C, D=np.ones(3, np.float32)), ValueError, "D must have shape"),
        (lambda: pk.selective_scan(u, dl, A, B, C, delta_softplus=1), TypeError, "delta_softplus must be a bool"),
        (lambda: pk.selective_scan(u, dl, A, B, C, impl="triton"), ValueError, "impl must be one of"),
        (lambda: pk.selective_scan(u, dl, A, B, C, chunk_size=24), ValueError, "chunk_size must be a power of two"),
        (lambda: pk.selective_scan(np.zeros((2, 8, 4), np.float32), np.zeros((2, 8, 4), np.float32), A,
                                   np.zeros((2, 8, 3), np.float32), np.zeros((2, 8, 3), np.float32),
                                   cu_seqlens=np.array([0, 8])), ValueError, "needs B == 1"),
        (lambda: pk.selective_scan(u, dl, A, B, C, initial_state=np.zeros((1, 4, 4), np.float32)), ValueError,
         r"initial_state must have shape \(1, 4, 3\)"),
        (lambda: pk.selective_scan_step(u[:, 0], dl[:, 0], A, B[:, 0], C[:, 0], np.zeros((1, 4, 4), np.float32)),
         ValueError, "selective_scan_step: state must have shape"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
