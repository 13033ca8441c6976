"""``pk.ssd`` (Mamba-2) against an independent numpy loop and its own float64 oracle.

The numpy loop below is the SSD recurrence written from the paper, token by token; it checks the
oracle (``impl="reference"``) and the mapping of SSD onto the linear-RNN engine. The chunked
``xla`` form and the ``pallas`` kernels (interpret mode) must then match the oracle: outputs, final
states and the gradients of every input, with groups, the D skip, dt bias / softplus / limit,
initial states, packed sequences and segment restarts; decoding steps reproduce the sequence; the
kernels lower for TPU and GPU, forward and backward.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import testing
from attnzoo.pallas_kernels.testing import assert_close, assert_grads_close, float64, to_float64
from tests.layers.numpy_layers import numpy_ssd


def make_inputs(seed, batch, length, heads, head_dim, groups, state_dim, *, sequences=None, dtype=np.float64,
                dt_range=(0.01, 0.6), d_per_channel=False):
    rng = np.random.default_rng(seed)
    arrays = dict(
        x=rng.normal(size=(batch, length, heads, head_dim)),
        dt=rng.uniform(*dt_range, size=(batch, length, heads)),
        A=-rng.uniform(0.2, 3.0, size=(heads,)),
        B=rng.normal(size=(batch, length, groups, state_dim)),
        C=rng.normal(size=(batch, length, groups, state_dim)),
        D=rng.normal(size=(heads, head_dim) if d_per_channel else (heads,)),
        initial_state=rng.normal(size=(sequences or batch, heads, state_dim, head_dim)),
    )
    return {name: a.astype(dtype) for name, a in arrays.items()}


def run(inputs, impl, **options):
    inputs = dict(inputs)
    return pk.ssd(inputs.pop("x"), inputs.pop("dt"), inputs.pop("A"), inputs.pop("B"), inputs.pop("C"),
                  output_final_state=True, impl=impl, **inputs, **options)


def test_oracle_equals_numpy_loop():
    with float64():
        inputs = make_inputs(0, 2, 23, 4, 3, 2, 5)
        for options in (dict(), dict(dt_bias=np.linspace(-1, 1, 4), dt_softplus=True, dt_limit=(0.05, 0.9))):
            y, final = run(inputs, "reference", **options)
            ref_y, ref_final = numpy_ssd(**inputs, **options)
            assert_close(y, ref_y, "y", dtype=jnp.float64)
            assert_close(final, ref_final, "final_state", dtype=jnp.float64)


def test_comparison_detects_a_wrong_recurrence():
    """Dropping the dt on the input (a classic SSD slip) is caught by the numpy comparison."""
    with float64():
        inputs = make_inputs(1, 1, 20, 2, 3, 1, 4)
        y, _ = run(inputs, "reference")
        wrong = dict(inputs, dt=inputs["dt"] * 1.01)
        ref_y, _ = numpy_ssd(**wrong)
        with pytest.raises(AssertionError, match="relative RMS"):
            assert_close(y, ref_y, "y", dtype=jnp.float64)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "seed, batch, length, heads, head_dim, groups, state_dim, chunk, per_channel",
    [
        (0, 2, 37, 4, 6, 2, 8, 16, False),
        (1, 1, 130, 2, 5, 1, 3, 32, True),
        (2, 2, 1, 2, 4, 2, 16, 64, False),
        (3, 1, 63, 6, 8, 3, 16, 16, False),
    ],
)
def test_forward_float64(impl, seed, batch, length, heads, head_dim, groups, state_dim, chunk, per_channel):
    with float64():
        inputs = make_inputs(seed, batch, length, heads, head_dim, groups, state_dim, d_per_channel=per_channel)
        options = dict(dt_bias=np.full((heads,), -0.5), dt_softplus=True) if seed % 2 else {}
        y, final = run(inputs, impl, chunk_size=chunk, **options)
        ref_y, ref_final = run(inputs, "reference", **options)
        assert y.dtype == jnp.float64 and final.dtype == jnp.float64
        assert_close(y, ref_y, "y", dtype=jnp.float64)
        assert_close(final, ref_final, "final_state", dtype=jnp.float64)


NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]


def _positional(impl, **options):
    def fn(x, dt, A, B, C, D, dt_bias, initial_state):
        return pk.ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, initial_state=initial_state,
                      output_final_state=True, impl=impl, **options)

    return fn


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gradients_of_every_input_float64(impl):
    with float64():
        inputs = make_inputs(4, 2, 41, 4, 5, 2, 6)
        args = [inputs[n] if n != "dt_bias" else np.linspace(-1.0, 0.5, 4) for n in NAMES]
        assert_grads_close(_positional(impl, chunk_size=16), _positional("reference"), args,
                           argnums=range(len(args)), dtype=jnp.float64, names=NAMES)


def test_float32_against_float64_oracle():
    inputs = make_inputs(5, 2, 150, 4, 16, 2, 16, dtype=np.float32)
    y, final = run(inputs, "xla")
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    with float64():
        ref_y, ref_final = run(to_float64(inputs), "reference")
    assert_close(y, ref_y, "y", dtype=jnp.float32)
    assert_close(final, ref_final, "final_state", dtype=jnp.float32)
    args = [inputs[n] if n != "dt_bias" else np.zeros(4, np.float32) for n in NAMES]
    assert_grads_close(_positional("xla"), _positional("reference"), args, argnums=range(len(args)),
                       dtype=jnp.float32, names=NAMES)


def test_large_steps_stay_finite():
    """dt * A down to about -300 per token (decays far below float32's range) stays exact."""
    inputs = make_inputs(6, 1, 96, 2, 4, 1, 8, dtype=np.float32, dt_range=(5.0, 100.0))
    y, final = run(inputs, "xla", chunk_size=32)
    with float64():
        ref_y, ref_final = run(to_float64(inputs), "reference")
    assert np.isfinite(np.asarray(y)).all()
    assert_close(y, ref_y, "y", dtype=jnp.float32)
    assert_close(final, ref_final, "final_state", dtype=jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_packed_sequences_equal_separate_runs(impl):
    lengths = [5, 0, 40, 17]
    total = sum(lengths)
    with float64():
        inputs = make_inputs(7, 1, total, 4, 3, 2, 4, sequences=len(lengths))
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        y, final = run(inputs, impl, cu_seqlens=jnp.asarray(cu), chunk_size=16)
        for index, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
            piece = {n: a[:, start:end] for n, a in inputs.items() if n in ("x", "dt", "B", "C")}
            piece.update(A=inputs["A"], D=inputs["D"], initial_state=inputs["initial_state"][index : index + 1])
            if end > start:
                ref_y, ref_final = numpy_ssd(**piece)
                assert_close(y[:, start:end], ref_y, f"y[{index}]", dtype=jnp.float64)
            else:
                ref_final = piece["initial_state"]
            assert_close(final[index : index + 1], ref_final, f"final_state[{index}]", dtype=jnp.float64)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_segment_ids_restart_the_state(impl):
    with float64():
        inputs = make_inputs(8, 2, 50, 2, 3, 1, 4)
        ids = np.zeros((2, 50), np.int32)
        ids[0, 16:] = 1  # on a chunk boundary
        ids[0, 37:] = 2
        ids[1, 9:] = 5
        y, final = run(inputs, impl, segment_ids=jnp.asarray(ids), chunk_size=16)
        for row, starts in ((0, [0, 16, 37, 50]), (1, [0, 9, 50])):
            for start, end in zip(starts[:-1], starts[1:]):
                piece = {n: inputs[n][row : row + 1, start:end] for n in ("x", "dt", "B", "C")}
                initial = inputs["initial_state"][row : row + 1] if start == 0 else None
                ref_y, ref_final = numpy_ssd(**piece, A=inputs["A"], D=inputs["D"], initial_state=initial)
                assert_close(y[row : row + 1, start:end], ref_y, f"y[{row}, {start}:{end}]", dtype=jnp.float64)
            assert_close(final[row : row + 1], ref_final, f"final_state[{row}]", dtype=jnp.float64)


def test_steps_equal_the_chunked_op():
    with float64():
        inputs = make_inputs(9, 2, 19, 4, 3, 2, 5, d_per_channel=True)
        options = dict(dt_bias=np.linspace(-1, 1, 4), dt_softplus=True, dt_limit=(0.0, 2.0))
        y, final = run(inputs, "xla", chunk_size=16, **options)
        state = inputs["initial_state"]
        for t in range(19):
            y_t, state = pk.ssd_step(inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                                     inputs["C"][:, t], state, D=inputs["D"], **options)
            assert_close(y_t, y[:, t], f"y[{t}]", dtype=jnp.float64)
        assert_close(state, final, "state", dtype=jnp.float64)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype, state_dim, head_dim", [(jnp.float32, 16, 64), (jnp.bfloat16, 128, 64), (jnp.float32, 8, 48)])
def test_pallas_kernels_lower(platform, dtype, state_dim, head_dim):
    batch, length, heads, groups = 1, 200, 4, 2
    x = jnp.zeros((batch, length, heads, head_dim), dtype)
    dt = jnp.zeros((batch, length, heads), dtype)
    A = -jnp.ones((heads,), jnp.float32)
    B = jnp.zeros((batch, length, groups, state_dim), dtype)

    def f(x, dt, A, B, C):
        return pk.ssd(x, dt, A, B, C, D=jnp.ones((heads,)), dt_softplus=True, impl="pallas")[0]

    testing.assert_lowers(f, x, dt, A, B, B, platforms=(platform,), backward=True, argnums=(0, 1, 2, 3, 4))


def test_errors_name_the_argument():
    inputs = make_inputs(0, 1, 8, 4, 3, 2, 5, dtype=np.float32)
    x, dt, A, B, C = (inputs[n] for n in ("x", "dt", "A", "B", "C"))
    cases = [
        (lambda: pk.ssd(x[0], dt, A, B, C), ValueError, "x must have rank 4"),
        (lambda: pk.ssd(x, dt[..., :3], A, B, C), ValueError, "dt must have shape"),
        (lambda: pk.ssd(x, dt, A[:2], B, C), ValueError, "A must have shape"),
        (lambda: pk.ssd(x, dt, A, B[:, :, :, :4], C), ValueError, "C must have shape"),
        (lambda: pk.ssd(x, dt, A, np.zeros((1, 8, 3, 5), np.float32), np.zeros((1, 8, 3, 5), np.float32)),
         ValueError, "G = 3"),
        (lambda: pk.ssd(x, dt, -A, B, C), ValueError, "A must be <= 0"),
        (lambda: pk.ssd(x, dt, A, B, C, D=np.ones((3,), np.float32)), ValueError, "D must have shape"),
        (lambda: pk.ssd(x, dt, A, B, C, dt_bias=np.ones((2,), np.float32)), ValueError, "dt_bias must have shape"),
        (lambda: pk.ssd(x, dt, A, B, C, dt_softplus=1), TypeError, "dt_softplus must be a bool"),
        (lambda: pk.ssd(x, dt, A, B, C, dt_limit=(1.0, 0.5)), ValueError, "dt_limit"),
        (lambda: pk.ssd(x, dt, A, B, C, impl="cuda"), ValueError, "impl must be one of"),
        (lambda: pk.ssd(x, dt, A, B, C, initial_state=np.zeros((1, 4, 3, 5), np.float32)), ValueError,
         r"ssd: initial_state must have shape \(1, 4, 5, 3\) \[N_seq,H,N,P\]"),
        (lambda: pk.ssd(x, dt, A, B, C, chunk_size=24), ValueError, "ssd: chunk_size must be a power of two"),
        (lambda: pk.ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], np.zeros((1, 4, 3, 5), np.float32)),
         ValueError, "ssd_step: state must have shape"),
        (lambda: pk.ssd_step(x[:, 0], dt, A, B[:, 0], C[:, 0], np.zeros((1, 4, 5, 3), np.float32)),
         ValueError, "ssd_step: dt must have shape"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
