"""The Pallas chunked linear-RNN engine (``linear_rnn.pallas``) against the float64 oracle.

Kernels run in interpret mode on this CPU machine: the TPU kernels (the ``interpret=True`` path),
and the GPU (Triton) kernels by routing ``common.run_pallas`` to them. Every kernel, forward and
backward, also lowers for TPU (Mosaic) and CUDA (Triton).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnzoo.pallas_kernels import common, testing
from attnzoo.pallas_kernels.linear_rnn import reference
from attnzoo.pallas_kernels.linear_rnn.pallas import RecurrentBlockSizes, chunked_recurrence_pallas

# op -> which of (g, gk, beta) it uses
OPS = {
    "linear_attention": (False, False, False),
    "simple_gla": (True, False, False),
    "gla": (False, True, False),
    "delta_rule": (False, False, True),
    "gated_delta_rule": (True, False, True),
    "kda": (False, True, True),
}
NAMES = ("q", "k", "v", "g", "gk", "beta", "initial_state")
SCALE = 0.7
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")


def make_inputs(op, batch, length, heads, key_dim, value_dim, *, seed=0, sequences=None, gate_range=(0.01, 0.5),
                dtype=np.float64):
    """``[q, k, v, g, gk, beta, initial_state]`` (None for inputs the op does not use)."""
    use_g, use_gk, use_beta = OPS[op]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, key_dim))
    k = rng.normal(size=(batch, length, heads, key_dim))
    if use_beta:  # the delta rule is stable for L2-normalised keys and beta in (0, 1)
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, heads, value_dim))
    g = -rng.uniform(*gate_range, size=(batch, length, heads)) if use_g else None
    gk = -rng.uniform(*gate_range, size=(batch, length, heads, key_dim)) if use_gk else None
    beta = rng.uniform(0.05, 0.95, size=(batch, length, heads)) if use_beta else None
    state = rng.normal(size=(sequences or batch, heads, key_dim, value_dim))
    return [None if x is None else jnp.asarray(x, dtype) for x in (q, k, v, g, gk, beta, state)]


def argnums(args):
    return tuple(i for i, x in enumerate(args) if x is not None)


def pallas_fn(**options):
    def f(q, k, v, g, gk, beta, initial_state):
        return chunked_recurrence_pallas(q, k, v, g=g, gk=gk, beta=beta, scale=SCALE, initial_state=initial_state,
                                         output_final_state=True, **options)

    return jax.jit(f)


def reference_fn(q, k, v, g, gk, beta, initial_state, **options):
    return reference.recurrence(q, k, v, g=g, gk=gk, beta=beta, scale=SCALE, initial_state=initial_state,
                                output_final_state=True, **options)


def check(op, args, dtype, **options):
    """Outputs, final states and the gradients of every input against the float64 reference."""
    f = pallas_fn(**options)
    out, final = f(*args)
    with testing.float64():
        ref_out, ref_final = reference_fn(*testing.to_float64(args))
    assert out.dtype == args[2].dtype and final.dtype == jnp.promote_types(dtype, jnp.float32)
    errors = {"out": testing.assert_close(out, ref_out, "out", dtype=dtype),
              "final": testing.assert_close(final, ref_final, "final", dtype=dtype)}
    names = [NAMES[i] for i in argnums(args)]
    errors.update(testing.assert_grads_close(f, reference_fn, args, argnums=argnums(args), dtype=dtype, names=names))
    return errors


@pytest.fixture
def gpu_kernels(monkeypatch):
    """Routes ``run_pallas`` to the GPU (Triton) kernels, run by the interpreter."""
    def run_gpu(tpu_fn, gpu_fn, interpret, *args):
        return gpu_fn(*args, interpret=interpret)

    monkeypatch.setattr(common, "run_pallas", run_gpu)


# ----------------------------------------------------------------------------------- float64


@pytest.mark.parametrize("op", sorted(OPS))
def test_float64_matches_reference(op):
    """Odd length and head dims, several chunks, initial and final states, every gradient."""
    with testing.float64():
        args = make_inputs(op, 2, 37, 2, 5, 3, seed=1)
        check(op, args, jnp.float64, chunk_size=16, interpret=True)


@pytest.mark.parametrize("op, length, chunk_size, dims", [
    ("kda", 70, 32, (20, 17)),  # per-channel gates over 2 sub-chunks of 16
    pytest.param("gla", 70, 32, (20, 17), marks=pytest.mark.slow),
    pytest.param("gated_delta_rule", 130, 64, (9, 12), marks=pytest.mark.slow),
    pytest.param("kda", 130, 64, (9, 12), marks=pytest.mark.slow),  # 4 sub-chunks
    pytest.param("gla", 130, 64, (33, 7), marks=pytest.mark.slow),
])
def test_float64_subchunks(op, length, chunk_size, dims):
    with testing.float64():
        args = make_inputs(op, 1, length, 1, *dims, seed=2)
        check(op, args, jnp.float64, chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("op", sorted(OPS))
def test_length_one(op):
    """One token (a chunk of 16 with 15 padded tokens): outputs and final states."""
    with testing.float64():
        args = make_inputs(op, 2, 1, 3, 4, 6, seed=3)
        out, final = pallas_fn(interpret=True)(*args)
        ref_out, ref_final = reference_fn(*args)
        testing.assert_close(out, ref_out, "out", dtype=jnp.float64)
        testing.assert_close(final, ref_final, "final", dtype=jnp.float64)


def packed_reference(args, lengths):
    """The reference run on each packed sequence separately (an empty one keeps its state)."""
    q, k, v, g, gk, beta, state = args
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    outs, finals = [], []
    for i, n in enumerate(lengths):
        cut = slice(int(offsets[i]), int(offsets[i + 1]))
        if n == 0:
            finals.append(state[i])
            continue
        part = [None if x is None else x[:, cut] for x in (q, k, v, g, gk, beta)]
        out, final = reference_fn(*part, state[i:i + 1])
        outs.append(out)
        finals.append(final[0])
    return jnp.concatenate(outs, axis=1), jnp.stack(finals)


def check_packed(op, lengths, interpret):
    """cu_seqlens against per-sequence reference runs: outputs, finals, every gradient."""
    with testing.float64():
        args = make_inputs(op, 1, sum(lengths), 2, 7, 5, seed=4, sequences=len(lengths))
        cu_seqlens = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
        f = pallas_fn(cu_seqlens=cu_seqlens, chunk_size=16, interpret=interpret)
        ref = lambda *a: packed_reference(a, lengths)  # noqa: E731
        out, final = f(*args)
        ref_out, ref_final = ref(*args)
        testing.assert_close(out, ref_out, "out", dtype=jnp.float64)
        testing.assert_close(final, ref_final, "final", dtype=jnp.float64)
        names = [NAMES[i] for i in argnums(args)]
        testing.assert_grads_close(f, ref, args, argnums=argnums(args), dtype=jnp.float64, names=names)


@pytest.mark.parametrize("op", [
    "gated_delta_rule",
    pytest.param("linear_attention", marks=pytest.mark.slow),
    pytest.param("gla", marks=pytest.mark.slow),
    pytest.param("simple_gla", marks=pytest.mark.slow),
    pytest.param("delta_rule", marks=pytest.mark.slow),
    pytest.param("kda", marks=pytest.mark.slow),
])
def test_packed_sequences(op):
    check_packed(op, [5, 0, 37, 16, 0], interpret=True)  # empty sequences inside and at the end


@pytest.mark.slow
def test_packed_sequences_short():
    check_packed("kda", [20, 3, 0], interpret=True)


# ----------------------------------------------------------------------------------- float32


@pytest.mark.parametrize("op", [
    "gla", "gated_delta_rule",
    *[pytest.param(op, marks=pytest.mark.slow) for op in ("linear_attention", "simple_gla", "delta_rule", "kda")],
])
def test_float32_matches_reference(op):
    args = make_inputs(op, 1, 130, 2, 32, 24, seed=5, dtype=np.float32)
    check(op, args, jnp.float32, interpret=True)


@pytest.mark.parametrize("op", ["kda", pytest.param("simple_gla", marks=pytest.mark.slow)])
def test_tpu_interpreter_checks(op):
    """The TPU interpreter with race detection, NaN-filled uninitialised memory and bounds checks."""
    args = make_inputs(op, 1, 40, 2, 16, 16, seed=5, dtype=np.float32)
    check(op, args, jnp.float32, chunk_size=16, interpret=TPU_INTERPRET)


@pytest.mark.parametrize("op", [
    "kda", pytest.param("gated_delta_rule", marks=pytest.mark.slow), pytest.param("gla", marks=pytest.mark.slow),
])
def test_float32_strong_decay(op):
    """Log-decays down to -10 per token (a chunk decays by up to e^-640): no exponent is positive,
    so nothing overflows. (Much stronger decays make dL/dg ill-conditioned in float32, for the
    ``xla`` engine alike.)"""
    args = make_inputs(op, 1, 100, 1, 16, 16, seed=6, gate_range=(0.0, 10.0), dtype=np.float32)
    check(op, args, jnp.float32, interpret=True)


def test_value_blocks():
    """A value dim of 200 runs as two value blocks of 128 (the state pass's second grid axis)."""
    with testing.float64():
        args = make_inputs("gated_delta_rule", 1, 20, 1, 8, 200, seed=7)
        check("gated_delta_rule", args, jnp.float64, interpret=True, block_sizes=RecurrentBlockSizes(block_v=128))


# ------------------------------------------------------------------------- GPU kernels (interpreted)


@pytest.mark.parametrize("op", ["kda", pytest.param("simple_gla", marks=pytest.mark.slow)])
def test_gpu_kernels(op, gpu_kernels):
    """The Triton kernels (state pass as an in-kernel loop) in the interpreter, with value blocks of 16."""
    with testing.float64():
        args = make_inputs(op, 2, 37, 2, 5, 40, seed=8)
        check(op, args, jnp.float64, chunk_size=16, interpret=True, block_sizes=RecurrentBlockSizes(block_v=16))


@pytest.mark.slow
def test_gpu_kernels_packed(gpu_kernels):
    check_packed("gated_delta_rule", [5, 0, 37, 16], interpret=True)


# ------------------------------------------------------------------------------------ lowering


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_kernels_lower(op, platform):
    """Forward and backward kernels, with interpret=None (platform_dependent picks the kernel)."""
    args = make_inputs(op, 2, 300, 2, 64, 200, dtype=np.float32)  # 5 chunks, 2 value blocks, padded V
    testing.assert_lowers(pallas_fn(), *args, platforms=(platform,), argnums=argnums(args))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_packed_kernels_lower(platform):
    args = make_inputs("kda", 1, 100, 2, 5, 3, sequences=3, dtype=np.float32)
    f = pallas_fn(cu_seqlens=jnp.array([0, 30, 30, 100], jnp.int32))
    testing.assert_lowers(f, *args, platforms=(platform,), argnums=argnums(args))


# ----------------------------------------------------------------------------------- block sizes


def test_block_sizes():
    assert RecurrentBlockSizes() == RecurrentBlockSizes(block_v=128, subchunk=16)
    for bad in (dict(block_v=8), dict(block_v=96), dict(block_v=128.0), dict(subchunk=1), dict(subchunk=12)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RecurrentBlockSizes(**bad)
    q = jnp.zeros((1, 4, 1, 4))
    with pytest.raises(TypeError, match="block_sizes"):
        chunked_recurrence_pallas(q, q, q, scale=1.0, block_sizes={"block_v": 16})


@pytest.mark.slow
def test_small_subchunk():
    """A sub-chunk of 4 inside chunks of 16 (more off-diagonal blocks)."""
    with testing.float64():
        args = make_inputs("kda", 1, 40, 1, 6, 5, seed=9)
        check("kda", args, jnp.float64, chunk_size=16, interpret=True, block_sizes=RecurrentBlockSizes(subchunk=4))


# ----------------------------------------------------------------------------------- segment_ids

# Rows of 37 tokens in chunks of 16: restarts inside the first chunk (5), on a chunk boundary (16)
# and in the last, padded chunk (32); at token 1, two in one chunk (21, 24) and none in the last.
SEGMENT_IDS = np.array([[0] * 5 + [1] * 11 + [2] * 16 + [3] * 5,
                        [7] + [1] * 20 + [2] * 3 + [0] * 13])


def check_segments(op, args, segment_ids, dtype, **options):
    """segment_ids against ``reference.recurrence(..., segment_ids=...)``: outputs, final states,
    every gradient."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    f = pallas_fn(segment_ids=segment_ids, **options)
    ref = lambda *a: reference_fn(*a, segment_ids=segment_ids)  # noqa: E731
    out, final = f(*args)
    with testing.float64():
        wide = testing.to_float64(args)
        ref_out, ref_final = ref(*wide)
        unsegmented, _ = reference_fn(*wide)
        assert not np.allclose(ref_out, unsegmented)  # the restarts matter
    errors = {"out": testing.assert_close(out, ref_out, "out", dtype=dtype),
              "final": testing.assert_close(final, ref_final, "final", dtype=dtype)}
    names = [NAMES[i] for i in argnums(args)]
    errors.update(testing.assert_grads_close(f, ref, args, argnums=argnums(args), dtype=dtype, names=names))
    return errors


@pytest.mark.parametrize("op", sorted(OPS))
def test_segment_ids(op):
    """Every op with restarts inside chunks, on a chunk boundary, at token 1, per-row segmentations."""
    with testing.float64():
        args = make_inputs(op, 2, 37, 2, 5, 3, seed=10)
        check_segments(op, args, SEGMENT_IDS, jnp.float64, chunk_size=16, interpret=True)


@pytest.mark.parametrize("op", ["kda", pytest.param("gla", marks=pytest.mark.slow)])
def test_segment_ids_subchunks(op):
    """Per-channel scores over sub-chunks of 4: restarts on (8), just before (3) and just after (13)
    a sub-chunk boundary, so off-diagonal blocks mix segments, and at a chunk's last token (15)."""
    ids = np.cumsum(np.isin(np.arange(24), [3, 8, 13, 15, 20]))[None]
    with testing.float64():
        args = make_inputs(op, 1, 24, 1, 6, 5, seed=11)
        check_segments(op, args, ids, jnp.float64, chunk_size=16, interpret=True,
                       block_sizes=RecurrentBlockSizes(subchunk=4))


@pytest.mark.parametrize("op", ["linear_attention", pytest.param("kda", marks=pytest.mark.slow)])
def test_segment_ids_gpu_kernels(op, gpu_kernels):
    """The Triton kernels in the interpreter with segment_ids (value blocks of 16; without gates
    the state kernels get the 0/1 chunk decay)."""
    with testing.float64():
        args = make_inputs(op, 2, 37, 2, 5, 40, seed=12)
        check_segments(op, args, SEGMENT_IDS, jnp.float64, chunk_size=16, interpret=True,
                       block_sizes=RecurrentBlockSizes(block_v=16))


@pytest.mark.parametrize("op", ["kda", pytest.param("gated_delta_rule", marks=pytest.mark.slow)])
def test_segment_ids_float32_strong_decay(op):
    """Log-decays down to -10 per token: the gates restart at resets, so the rescaling exponents
    across a restart would be positive (up to +320); masked and clamped, nothing overflows."""
    ids = np.cumsum(np.isin(np.arange(64), [10, 32, 40, 63]))[None]
    args = make_inputs(op, 1, 64, 1, 16, 16, seed=13, gate_range=(0.0, 10.0), dtype=np.float32)
    check_segments(op, args, ids, jnp.float32, chunk_size=32, interpret=True)


def test_segment_ids_with_cu_seqlens():
    q = jnp.zeros((1, 4, 1, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        chunked_recurrence_pallas(q, q, q, scale=1.0, cu_seqlens=jnp.array([0, 4]),
                                  segment_ids=jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_segment_kernels_lower(op, platform):
    """Forward and backward kernels with segment_ids (reset flags in the prepare kernels)."""
    args = make_inputs(op, 2, 300, 2, 64, 200, dtype=np.float32)
    segment_ids = jnp.asarray(np.cumsum(np.arange(300) % 97 == 50)[None].repeat(2, 0), jnp.int32)
    testing.assert_lowers(pallas_fn(segment_ids=segment_ids), *args, platforms=(platform,),
                          argnums=argnums(args))
