"""The public linear-attention / delta-rule ops: the chunked ``xla`` engine against the float64 oracle.

The oracle (``impl="reference"``, the token-by-token scan) is itself checked against an independent
numpy loop in ``test_linear_rnn_reference.py``. Here every op's chunked form must match it: outputs,
final states, and the gradients of every input, in float64 (to 1e-10) and in float32 (to the
float32 tolerance); packed sequences against per-sequence runs; restarts at segment ids; decoding
steps against the whole sequence; large decays without overflow; bad arguments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels.testing import assert_close, assert_grads_close, float64, rel_rms, to_float64

# op -> (function, uses scalar g, uses per-channel g, uses beta)
OPS = {
    "linear_attention": (pk.linear_attention, False, False, False),
    "simple_gla": (pk.simple_gla, True, False, False),
    "gla": (pk.gla, False, True, False),
    "delta_rule": (pk.delta_rule, False, False, True),
    "gated_delta_rule": (pk.gated_delta_rule, True, False, True),
    "kda": (pk.kda, False, True, True),
}
STEPS = {
    "linear_attention": pk.linear_attention_step,
    "simple_gla": pk.simple_gla_step,
    "gla": pk.gla_step,
    "delta_rule": pk.delta_rule_step,
    "gated_delta_rule": pk.gated_delta_rule_step,
    "kda": pk.kda_step,
}


def make_inputs(op, seed, batch, length, heads, key_dim, value_dim, *, sequences=None, decay=(0.01, 0.5),
                dtype=np.float64):
    """Positional op inputs (q, k, v[, g][, beta]) and an initial state, as numpy arrays."""
    _, use_g, use_gk, use_beta = OPS[op]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, key_dim))
    k = rng.normal(size=(batch, length, heads, key_dim))
    if use_beta:  # the delta rule's layers L2-normalise keys and keep beta in (0, 1)
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, heads, value_dim))
    args = [q, k, v]
    if use_g:
        args.append(-rng.uniform(*decay, size=(batch, length, heads)))
    if use_gk:
        args.append(-rng.uniform(*decay, size=(batch, length, heads, key_dim)))
    if use_beta:
        args.append(rng.uniform(0.05, 0.95, size=(batch, length, heads)))
    state = rng.normal(size=(sequences or batch, heads, key_dim, value_dim))
    return [a.astype(dtype) for a in args], state.astype(dtype)


def run(op, args, state, *, impl, **kwargs):
    fn = OPS[op][0]
    return fn(*args, initial_state=state, output_final_state=True, impl=impl, **kwargs)


# ------------------------------------------------------------------------------------------------
# Forward and gradients against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "seed, batch, length, heads, key_dim, value_dim, chunk",
    [
        (0, 2, 37, 3, 8, 6, 16),
        (1, 1, 130, 2, 5, 7, 32),
        (2, 2, 1, 1, 4, 3, 64),
        (3, 1, 200, 2, 16, 16, 64),
    ],
)
def test_forward_float64(op, seed, batch, length, heads, key_dim, value_dim, chunk):
    with float64():
        args, state = make_inputs(op, seed, batch, length, heads, key_dim, value_dim)
        out, final = run(op, args, state, impl="xla", chunk_size=chunk)
        ref, ref_final = run(op, args, state, impl="reference")
        assert out.dtype == jnp.float64 and final.dtype == jnp.float64
        assert_close(out, ref, "o", dtype=jnp.float64)
        assert_close(final, ref_final, "final_state", dtype=jnp.float64)


@pytest.mark.parametrize("op", list(OPS))
def test_gradients_float64(op):
    """Gradients of q, k, v, gates, beta and the initial state, the chunked form against the oracle."""
    with float64():
        args, state = make_inputs(op, 11, 2, 45, 2, 6, 5)
        inputs = [*args, state]
        names = _names(op)

        def chunked(*xs):
            return run(op, xs[:-1], xs[-1], impl="xla", chunk_size=16)

        def reference(*xs):
            return run(op, xs[:-1], xs[-1], impl="reference")

        assert_grads_close(chunked, reference, inputs, argnums=range(len(inputs)), dtype=jnp.float64,
                           names=names)


def _names(op):
    _, use_g, use_gk, use_beta = OPS[op]
    return ["q", "k", "v"] + (["g"] if use_g or use_gk else []) + (["beta"] if use_beta else []) + ["initial_state"]


@pytest.mark.parametrize("op", list(OPS))
def test_float32_against_float64_oracle(op):
    """float32 inputs: outputs, final state and every gradient within the float32 tolerance."""
    args, state = make_inputs(op, 5, 2, 150, 2, 16, 12, dtype=np.float32)
    out, final = run(op, args, state, impl="xla")
    assert out.dtype == jnp.float32 and final.dtype == jnp.float32
    with float64():
        ref, ref_final = run(op, to_float64(args), to_float64(state), impl="reference")
    assert_close(out, ref, "o", dtype=jnp.float32)
    assert_close(final, ref_final, "final_state", dtype=jnp.float32)
    inputs = [*args, state]
    assert_grads_close(
        lambda *xs: run(op, xs[:-1], xs[-1], impl="xla"),
        lambda *xs: run(op, xs[:-1], xs[-1], impl="reference"),
        inputs, argnums=range(len(inputs)), dtype=jnp.float32, names=_names(op),
    )


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule", "kda"])
@pytest.mark.parametrize("decay", [(1.0, 5.0), (20.0, 60.0)])
def test_strong_decay_stays_finite_and_exact(op, decay):
    """Cumulative log-decays far below -88 inside a chunk (e^-88 underflows float32) stay exact."""
    args, state = make_inputs(op, 7, 1, 140, 2, 16, 8, decay=decay, dtype=np.float32)
    out, final = run(op, args, state, impl="xla")
    with float64():
        ref, ref_final = run(op, to_float64(args), to_float64(state), impl="reference")
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, ref, "o", dtype=jnp.float32)
    assert_close(final, ref_final, "final_state", dtype=jnp.float32)


def test_bfloat16_inputs():
    args, state = make_inputs("gated_delta_rule", 3, 1, 100, 2, 16, 16, dtype=np.float32)
    out, final = run("gated_delta_rule", [jnp.asarray(a, jnp.bfloat16) for a in args], state, impl="xla")
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    with float64():
        ref, _ = run("gated_delta_rule", to_float64([np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in args]),
                     to_float64(state), impl="reference")
    assert_close(out, ref, "o", dtype=jnp.bfloat16)


# ------------------------------------------------------------------------------------------------
# Packed sequences and segments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS))
def test_cu_seqlens_equals_per_sequence_runs(op):
    """Packed sequences (one empty, one shorter than a chunk, one spanning chunks) equal separate runs."""
    offsets = [0, 9, 9, 50, 83]
    with float64():
        args, states = make_inputs(op, 21, 1, offsets[-1], 2, 6, 5, sequences=len(offsets) - 1)
        cu = jnp.asarray(offsets, jnp.int32)
        out, final = run(op, args, states, impl="xla", cu_seqlens=cu, chunk_size=16)
        ref, ref_final = run(op, args, states, impl="reference", cu_seqlens=cu)
        assert_close(out, ref, "o", dtype=jnp.float64)
        assert_close(final, ref_final, "final_state", dtype=jnp.float64)
        for index, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            if start == end:
                np.testing.assert_array_equal(final[index], states[index])
                continue
            piece = [a[:, start:end] for a in args]
            alone, alone_final = run(op, piece, states[index : index + 1], impl="xla", chunk_size=16)
            assert_close(out[:, start:end], alone, f"o of sequence {index}", dtype=jnp.float64)
            assert_close(final[index : index + 1], alone_final, f"final state of sequence {index}", dtype=jnp.float64)


@pytest.mark.parametrize("op", ["kda", "simple_gla", "linear_attention"])
def test_cu_seqlens_traced_under_jit_and_gradients(op):
    """Packed sequences under jit: every gradient, initial states included (per-channel delta rule,
    scalar decay, no decay)."""
    offsets = jnp.asarray([0, 20, 21, 70], jnp.int32)
    with float64():
        args, states = make_inputs(op, 4, 1, 70, 2, 5, 4, sequences=3)
        inputs = [*args, states]

        def chunked(*xs):
            return jax.jit(lambda cu, *ys: run(op, ys[:-1], ys[-1], impl="xla", cu_seqlens=cu, chunk_size=16))(
                offsets, *xs)

        def reference(*xs):
            return run(op, xs[:-1], xs[-1], impl="reference", cu_seqlens=offsets)

        assert_grads_close(chunked, reference, inputs, argnums=range(len(inputs)), dtype=jnp.float64,
                           names=_names(op))


@pytest.mark.parametrize("op", list(OPS))
def test_segment_ids_restart_the_state(op):
    """Restarts inside chunks, on chunk boundaries and at a row's first token, against the oracle
    and against running each segment alone (zero state, except the row's first segment)."""
    segments = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 4] + [4] * 20,
                         [5] * 16 + [6] * 24])
    length = segments.shape[1]
    with float64():
        args, state = make_inputs(op, 8, 2, length, 2, 6, 5)
        ids = jnp.asarray(segments, jnp.int32)
        out, final = run(op, args, state, impl="xla", segment_ids=ids, chunk_size=16)
        ref, ref_final = run(op, args, state, impl="reference", segment_ids=ids)
        assert_close(out, ref, "o", dtype=jnp.float64)
        assert_close(final, ref_final, "final_state", dtype=jnp.float64)
        for row in range(2):
            starts = [0] + [t for t in range(1, length) if segments[row, t] != segments[row, t - 1]] + [length]
            for first, (start, end) in enumerate(zip(starts[:-1], starts[1:])):  # against runs alone
                piece = [a[row : row + 1, start:end] for a in args]
                init = state[row : row + 1] if first == 0 else np.zeros_like(state[row : row + 1])
                alone, _ = run(op, piece, init, impl="reference")
                assert_close(out[row : row + 1, start:end], alone, f"row {row} segment {first}", dtype=jnp.float64)
        if op not in ("delta_rule", "simple_gla", "kda"):  # one op per gate kind (none, scalar, channel)
            return
        inputs = [*args, state]
        assert_grads_close(
            lambda *xs: run(op, xs[:-1], xs[-1], impl="xla", segment_ids=ids, chunk_size=16),
            lambda *xs: run(op, xs[:-1], xs[-1], impl="reference", segment_ids=ids),
            inputs, argnums=range(len(inputs)), dtype=jnp.float64, names=_names(op),
        )


# ------------------------------------------------------------------------------------------------
# Normalised linear attention, decoding steps
# ------------------------------------------------------------------------------------------------


def test_normalized_linear_attention():
    """o_t = q_t^T S_t / (q_t^T z_t + 1e-10), z the running key sum carried as an extra state column."""
    rng = np.random.default_rng(2)
    with float64():
        q = np.exp(rng.normal(size=(2, 40, 2, 4)))  # positive features (as elu + 1 gives)
        k = np.exp(rng.normal(size=(2, 40, 2, 4)))
        v = rng.normal(size=(2, 40, 2, 3))
        out, final = pk.linear_attention(q, k, v, normalize=True, output_final_state=True, chunk_size=16)
        assert final.shape == (2, 2, 4, 4)
        scores = np.einsum("bthk,bshk->bhts", q, k) * np.tril(np.ones((40, 40)))
        numerator = np.einsum("bhts,bshv->bthv", scores, v)
        denominator = scores.sum(-1).transpose(0, 2, 1)[..., None]
        assert_close(out, numerator / (denominator + 1e-10), "o", dtype=jnp.float64)
        # Continuing from the final state equals one longer run.
        more = [rng.normal(size=(2, 5, 2, 4)) ** 2 + 0.1, rng.normal(size=(2, 5, 2, 4)) ** 2 + 0.1,
                rng.normal(size=(2, 5, 2, 3))]
        tail, _ = pk.linear_attention(*more, normalize=True, initial_state=final)
        whole, _ = pk.linear_attention(*[np.concatenate([a, b], 1) for a, b in zip((q, k, v), more)], normalize=True)
        assert_close(tail, whole[:, 40:], "continued o", dtype=jnp.float64)
        state = jnp.zeros((2, 2, 4, 4))
        for t in range(3):
            step_out, state = pk.linear_attention_step(q[:, t], k[:, t], v[:, t], state, normalize=True)
            assert_close(step_out, out[:, t], f"step {t}", dtype=jnp.float64)


@pytest.mark.parametrize("op", list(OPS))
def test_steps_equal_the_chunked_op(op):
    """Decoding token by token with ``*_step`` reproduces the chunked op and its final state."""
    with float64():
        args, state = make_inputs(op, 13, 2, 21, 2, 5, 4)
        out, final = run(op, args, state, impl="xla", chunk_size=16)
        step = jax.jit(STEPS[op])
        current = jnp.asarray(state)
        for t in range(args[0].shape[1]):
            o_t, current = step(*[a[:, t] for a in args], current)
            assert_close(o_t, out[:, t], f"step {t}", dtype=jnp.float64)
        assert_close(current, final, "state after the last step", dtype=jnp.float64)


def test_comparison_detects_a_wrong_recurrence():
    """The float32 tolerance is tight enough to see a decay off by 1e-3 or a dropped beta."""
    args, state = make_inputs("gated_delta_rule", 1, 1, 64, 2, 8, 8, dtype=np.float32)
    out, _ = run("gated_delta_rule", args, state, impl="xla")
    q, k, v, g, beta = args
    with float64():
        wrong_decay, _ = run("gated_delta_rule", to_float64([q, k, v, g * 1.001, beta]), to_float64(state),
                             impl="reference")
        no_beta, _ = run("gated_delta_rule", to_float64([q, k, v, g, np.ones_like(beta)]), to_float64(state),
                         impl="reference")
    for wrong in (wrong_decay, no_beta):
        with pytest.raises(AssertionError, match="relative RMS error"):
            assert_close(out, wrong, "o", dtype=jnp.float32)
    assert rel_rms(out, wrong_decay) < 1e-2  # the perturbation is small, yet detected


def test_memory_is_linear_in_length():
    """XLA's temp buffers of forward + backward grow linearly in T (no T x T matrix)."""
    sizes = {}
    for length in (2048, 8192):
        args, _ = make_inputs("gated_delta_rule", 0, 1, length, 2, 32, 32, dtype=np.float32)

        def loss(*xs):
            return pk.gated_delta_rule(*xs)[0].sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        sizes[length] = compiled.memory_analysis().temp_size_in_bytes
    assert sizes[8192] <= 4.5 * sizes[2048], sizes


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    q = jnp.zeros((1, 8, 2, 4))
    v = jnp.zeros((1, 8, 2, 3))
    g = jnp.zeros((1, 8, 2))
    with pytest.raises(ValueError, match=r"gla: g must have shape \(1, 8, 2, 4\)"):
        pk.gla(q, q, v, g)
    with pytest.raises(ValueError, match="simple_gla: g must have shape"):
        pk.simple_gla(q, q, v, jnp.zeros((1, 8, 2, 4)))
    with pytest.raises(ValueError, match="delta_rule: beta must have shape"):
        pk.delta_rule(q, q, v, jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match="k must have shape"):
        pk.kda(q, jnp.zeros((1, 8, 2, 5)), v, q, g)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 4, 3\)"):
        pk.linear_attention(q, q, v, initial_state=jnp.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 4, 4\) \[N,H,K,V\+1\]"):
        pk.linear_attention(q, q, v, normalize=True, initial_state=jnp.zeros((1, 2, 4, 3)))
    with pytest.raises(ValueError, match="impl must be one of"):
        pk.simple_gla(q, q, v, g, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        pk.simple_gla(q, q, v, g, chunk_size=48)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 16"):
        pk.simple_gla(q, q, v, g, chunk_size=8)
    with pytest.raises(ValueError, match="cu_seqlens packs sequences along T and needs B == 1"):
        pk.simple_gla(jnp.zeros((2, 8, 2, 4)), jnp.zeros((2, 8, 2, 4)), jnp.zeros((2, 8, 2, 3)),
                      jnp.zeros((2, 8, 2)), cu_seqlens=jnp.asarray([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T = 8"):
        pk.simple_gla(q, q, v, g, cu_seqlens=jnp.asarray([0, 5, 4, 8]))
    with pytest.raises(ValueError, match="either segment_ids or cu_seqlens"):
        pk.simple_gla(q, q, v, g, cu_seqlens=jnp.asarray([0, 8]), segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        pk.simple_gla(q, q, v, g, segment_ids=jnp.zeros((1, 8)))
    with pytest.raises(TypeError, match="normalize must be a bool"):
        pk.linear_attention(q, q, v, normalize=1)
    with pytest.raises(ValueError, match=r"gated_delta_rule_step: state must have shape \(1, 2, 4, 3\)"):
        pk.gated_delta_rule_step(q[:, 0], q[:, 0], v[:, 0], g[:, 0], g[:, 0], jnp.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"kda_step: g must have shape \(1, 2, 4\)"):
        pk.kda_step(q[:, 0], q[:, 0], v[:, 0], g[:, 0], g[:, 0], jnp.zeros((1, 2, 4, 3)))


# ------------------------------------------------------------------------------------------------
# The public ops' pallas dispatch (the kernels themselves: test_linear_rnn_pallas.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS))
def test_pallas_impl_through_the_public_op(op):
    """impl="pallas" (interpreted on CPU) against the float64 oracle, packed sequences included."""
    offsets = jnp.asarray([0, 7, 30], jnp.int32)
    with float64():
        args, states = make_inputs(op, 31, 1, 30, 2, 5, 3, sequences=2)
        out, final = run(op, args, states, impl="pallas", cu_seqlens=offsets, chunk_size=16,
                         block_sizes=pk.RecurrentBlockSizes(block_v=16, subchunk=8))
        ref, ref_final = run(op, args, states, impl="reference", cu_seqlens=offsets)
        assert_close(out, ref, "o", dtype=jnp.float64)
        assert_close(final, ref_final, "final_state", dtype=jnp.float64)


def test_pallas_normalized_linear_attention_and_lowering():
    from attnzoo.pallas_kernels.testing import assert_lowers

    rng = np.random.default_rng(3)
    q, k = (np.exp(rng.normal(size=(2, 24, 2, 4))).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, 24, 2, 3)).astype(np.float32)
    out, _ = pk.linear_attention(q, k, v, normalize=True, impl="pallas")
    with float64():
        ref, _ = pk.linear_attention(*to_float64([q, k, v]), normalize=True, impl="reference")
    assert_close(out, ref, "o", dtype=jnp.float32)
    args, state = make_inputs("gated_delta_rule", 0, 1, 40, 2, 16, 16, dtype=np.float32)

    def gated(q, k, v, g, beta, state):
        return pk.gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True, impl="pallas")

    assert_lowers(gated, *args, state, argnums=(0, 1, 2, 3, 4, 5))


def test_pallas_dispatch_of_segment_ids_and_block_sizes():
    """impl="pallas" takes segment_ids (the kernels restart per id, tested in test_linear_rnn_pallas)
    and agrees with the xla engine through the public op; block_sizes only with pallas."""
    args, _ = make_inputs("gla", 0, 1, 20, 2, 4, 3, dtype=np.float32)
    ids = jnp.asarray([[0] * 8 + [1] * 12], jnp.int32)
    pallas, _ = pk.gla(*args, impl="pallas", segment_ids=ids, interpret=True, chunk_size=16)
    xla, _ = pk.gla(*args, impl="xla", segment_ids=ids, chunk_size=16)
    unsegmented, _ = pk.gla(*args, impl="xla", chunk_size=16)
    assert_close(pallas, xla, "out", dtype=jnp.float32)
    assert not np.allclose(xla, unsegmented, atol=1e-3)
    with pytest.raises(ValueError, match="block_sizes tiles the pallas kernels"):
        pk.gla(*args, impl="xla", block_sizes=pk.RecurrentBlockSizes())
    with pytest.raises(TypeError, match="block_sizes must be a RecurrentBlockSizes"):
        pk.gla(*args, impl="pallas", block_sizes=(16, 8))


# ------------------------------------------------------------ hand-written gradients of the engine


def _plain_state_pass(k_to_end, chunk_decay, w, values, initial, sequence, starts):
    """The state pass by a plain Python loop over chunks, for autodiff (no custom VJP)."""
    state = initial if sequence is None else initial[:1]
    states, writes = [], []
    for n in range(values.shape[2]):
        if sequence is not None:
            state = jnp.where(starts[n], initial[sequence[n]][None], state)
        states.append(state)
        u = values[:, :, n] - (0.0 if w is None else w[:, :, n] @ state)
        writes.append(u)
        decay = chunk_decay[:, :, n]
        state = state * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
        state = state + jnp.swapaxes(k_to_end[:, :, n], -1, -2) @ u
    return jnp.stack(states, 2), jnp.stack(writes, 2), state


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_custom_gradients_equal_autodiff(seed):
    """scale_rows, pair_decays, solve_unit_lower and the state pass (scalar and per-channel decay,
    delta and plain, packed sequences) have hand-written backwards: each equals autodiff of the
    plain formula in float64, for every differentiable input."""
    from attnzoo.pallas_kernels.linear_rnn import chunk

    rng = np.random.default_rng(seed)
    with float64():
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape))  # noqa: E731
        x, s = normal(2, 3, 5, 7), normal(2, 3, 5)
        assert_grads_close(chunk.scale_rows, lambda x, s: x * s[..., None], (x, s), argnums=(0, 1),
                           dtype=jnp.float64, names=("x", "s"))

        gates = jnp.cumsum(-jnp.abs(normal(2, 3, 9)), -1)
        rows, cols = np.indices((9, 9))
        keep = jnp.asarray((rows >= cols) & (rng.random((2, 1, 9, 9)) < 0.7))

        def plain_pair_decays(g):
            return jnp.exp(jnp.where(keep, g[..., :, None] - g[..., None, :], 0.0))

        assert_grads_close(lambda g: chunk.pair_decays(g, keep), plain_pair_decays, (gates,), argnums=(0,),
                           dtype=jnp.float64, names=("gates",))

        a = jnp.tril(normal(2, 8, 8), -1) * 0.3
        rhs = normal(2, 8, 5)
        assert_grads_close(chunk.solve_unit_lower, lambda a, r: jnp.linalg.solve(jnp.eye(8) + jnp.tril(a, -1), r), (a, rhs),
                           argnums=(0, 1), dtype=jnp.float64, names=("a", "rhs"))

        b, h, n, c, kd, vd = 1, 2, 5, 4, 3, 6
        sequence, starts = jnp.asarray([0, 0, 1, 2, 2]), jnp.asarray([True, False, True, True, False])
        for decay_shape, delta, packed in [((b, h, n), True, False), ((b, h, n, kd), True, True),
                                           ((b, h, n), False, True), ((b, h, n, kd), False, False)]:
            args = [normal(b, h, n, c, kd), jnp.exp(-jnp.abs(normal(*decay_shape))),
                    normal(b, h, n, c, kd) if delta else None, normal(b, h, n, c, vd),
                    normal(3 if packed else b, h, kd, vd)]
            resets = (sequence, starts) if packed else (None, None)
            names = ("k_to_end", "chunk_decay", "w", "values", "initial")
            argnums = tuple(i for i, arg in enumerate(args) if arg is not None)

            def engine(*xs):
                prepared = chunk.Prepared(None, None, xs[0], xs[1], xs[2], xs[3])
                states, writes, final = chunk.state_pass(prepared, xs[4], None if resets[0] is None else resets)
                return states, writes, final

            assert_grads_close(engine, lambda *xs: _plain_state_pass(*xs, *resets), args, argnums=argnums,
                               dtype=jnp.float64, names=[names[i] for i in argnums])
