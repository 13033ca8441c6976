"""``selective_scan(..., impl="pallas")`` (Mamba-1's selective scan in Pallas kernels) against the
float64 ``reference`` implementation.

Kernels run in interpret mode on this CPU machine: the TPU (Mosaic) kernels through the
``interpret=True`` path (and once through the TPU interpreter with race detection, NaN-filled
uninitialised memory and bounds checks), the GPU (Triton) kernels by routing
``common.run_pallas`` to them. Outputs, final states and the gradient of every input (u, delta,
A, B, C, D, z, delta_bias, initial_state) are compared; the kernels, forward and backward, also
lower for TPU and CUDA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import common, testing
from attnzoo.pallas_kernels.ssm.scan import ScanBlockSizes, selective_scan

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")


def make_inputs(batch, length, channels, state_dim, *, groups=None, sequences=None, seed=0, dtype=np.float64):
    """``[u, delta, A, B, C, D, z, delta_bias, initial_state]``."""
    rng = np.random.default_rng(seed)
    group_axis = () if groups is None else (groups,)
    u = rng.normal(size=(batch, length, channels))
    delta = rng.normal(size=(batch, length, channels)) - 1.0
    A = -np.exp(rng.normal(size=(channels, state_dim)) * 0.5)
    B = rng.normal(size=(batch, length) + group_axis + (state_dim,))
    C = rng.normal(size=(batch, length) + group_axis + (state_dim,))
    D = rng.normal(size=(channels,))
    z = rng.normal(size=(batch, length, channels))
    delta_bias = rng.normal(size=(channels,)) * 0.5
    state = rng.normal(size=(sequences or batch, channels, state_dim))
    return [jnp.asarray(x, dtype) for x in (u, delta, A, B, C, D, z, delta_bias, state)]


def scan_fn(impl, **options):
    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                              initial_state=initial_state, return_last_state=True, impl=impl, **options)

    return f


def check(args, dtype, reference=None, **options):
    """Outputs, final states and every gradient against the float64 reference."""
    reference = jax.jit(reference or scan_fn("reference", **{k: v for k, v in options.items()
                                                            if k in ("cu_seqlens", "segment_ids")}))
    f = jax.jit(scan_fn("pallas", **options))
    y, final = f(*args)
    assert y.dtype == args[0].dtype and final.dtype == jnp.promote_types(dtype, jnp.float32)
    with testing.float64():
        ref_y, ref_final = reference(*testing.to_float64(args))
    errors = {"y": testing.assert_close(y, ref_y, "y", dtype=dtype),
              "final": testing.assert_close(final, ref_final, "final", dtype=dtype)}
    errors.update(testing.assert_grads_close(f, reference, args, argnums=range(len(NAMES)), dtype=dtype, names=NAMES))
    return errors


@pytest.fixture
def gpu_kernels(monkeypatch):
    """Routes ``run_pallas`` to the GPU (Triton) kernels, run by the interpreter."""
    def run_gpu(tpu_fn, gpu_fn, interpret, *args):
        return gpu_fn(*args, interpret=interpret)

    monkeypatch.setattr(common, "run_pallas", run_gpu)


# ----------------------------------------------------------------------------------- float64


@pytest.mark.parametrize("seed", [0, 1])
def test_float64_matches_reference(seed):
    """T = 21 in chunks of 8 (a padded last chunk), odd D and N, every option, every gradient."""
    with testing.float64():
        check(make_inputs(2, 21, 7, 5, seed=seed), jnp.float64, chunk_size=8, interpret=True)


def test_groups_and_channel_blocks():
    """G = 2 groups of 136 channels: two TPU channel blocks of 128 per group (the second padded)."""
    with testing.float64():
        check(make_inputs(1, 11, 272, 3, groups=2, seed=2), jnp.float64, chunk_size=8, interpret=True,
              block_sizes=ScanBlockSizes(block_d=128))


def test_length_one():
    with testing.float64():
        args = make_inputs(2, 1, 6, 4, seed=3)
        y, final = scan_fn("pallas", interpret=True)(*args)
        ref_y, ref_final = scan_fn("reference")(*args)
        testing.assert_close(y, ref_y, "y", dtype=jnp.float64)
        testing.assert_close(final, ref_final, "final", dtype=jnp.float64)


# ----------------------------------------------------------------------------------- float32


def test_float32_tpu_interpreter_checks():
    """The TPU interpreter with race detection, NaN-filled uninitialised memory and bounds checks."""
    check(make_inputs(2, 13, 6, 4, groups=2, seed=4, dtype=np.float32), jnp.float32, chunk_size=8,
          interpret=TPU_INTERPRET)


@pytest.mark.slow
def test_float32_longer():
    """float32 over 70 tokens in chunks of 16 (the last one padded), N = 16."""
    check(make_inputs(1, 70, 10, 16, seed=9, dtype=np.float32), jnp.float32, chunk_size=16, interpret=True)


# ----------------------------------------------------------------------------------- packing


def packed_reference(lengths):
    """The reference run on each packed sequence separately (an empty one keeps its state)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    def f(u, delta, A, B, C, D, z, delta_bias, state):
        ys, finals = [], []
        for i, n in enumerate(lengths):
            if n == 0:
                finals.append(state[i])
                continue
            cut = slice(int(offsets[i]), int(offsets[i + 1]))
            y, final = scan_fn("reference")(u[:, cut], delta[:, cut], A, B[:, cut], C[:, cut], D, z[:, cut],
                                            delta_bias, state[i:i + 1])
            ys.append(y)
            finals.append(final[0])
        return jnp.concatenate(ys, axis=1), jnp.stack(finals)

    return f


def check_packed(lengths, chunk_size=8, **options):
    with testing.float64():
        args = make_inputs(1, sum(lengths), 6, 3, groups=2, sequences=len(lengths), seed=5)
        cu_seqlens = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
        check(args, jnp.float64, reference=packed_reference(lengths), cu_seqlens=cu_seqlens, chunk_size=chunk_size,
              **options)


def test_cu_seqlens():
    """Empty sequences inside and at the end, a sequence of exactly one chunk, a short one."""
    check_packed([5, 0, 13, 8, 0], interpret=True)


# Rows of 21 tokens in chunks of 8: restarts inside a chunk (3, 13), on a chunk boundary (8, 16),
# at token 1 and in the last, padded chunk (19); none in some chunks.
SEGMENT_IDS = np.array([[0] * 3 + [1] * 5 + [2] * 5 + [3] * 6 + [4] * 2,
                        [7] + [1] * 15 + [2] * 3 + [0] * 2])


def check_segments(args, **options):
    segment_ids = jnp.asarray(SEGMENT_IDS, jnp.int32)
    with testing.float64():
        wide = testing.to_float64(args)
        restarted, _ = jax.jit(scan_fn("reference", segment_ids=segment_ids))(*wide)
        assert not np.allclose(restarted, jax.jit(scan_fn("reference"))(*wide)[0])  # the restarts matter
    check(args, args[0].dtype, segment_ids=segment_ids, chunk_size=8, **options)


def test_segment_ids():
    with testing.float64():
        check_segments(make_inputs(2, 21, 5, 4, seed=6), interpret=True)


# ------------------------------------------------------------------------- GPU kernels (interpreted)


@pytest.mark.slow
def test_gpu_kernels(gpu_kernels):
    """The Triton kernels (chunks walked in a loop): groups, channel blocks of 8 (padded), odd T."""
    with testing.float64():
        check(make_inputs(2, 37, 20, 3, groups=2, seed=7), jnp.float64, chunk_size=16, interpret=True,
              block_sizes=ScanBlockSizes(gpu_block_d=8))


@pytest.mark.slow
def test_gpu_kernels_packed(gpu_kernels):
    """Sequences aligned to chunks of 32 (split in two GPU chunks: a start and an end in each)."""
    check_packed([5, 0, 20, 8, 0], chunk_size=32, interpret=True)


def test_gpu_kernels_segment_ids(gpu_kernels):
    with testing.float64():
        check_segments(make_inputs(2, 21, 5, 4, seed=8), interpret=True)


# ------------------------------------------------------------------------------------ lowering


def lowering_case(**options):
    args = make_inputs(2, 40, 160, 16, groups=2, dtype=np.float32)
    return scan_fn("pallas", chunk_size=16, **options), args


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower(platform):
    """Forward and backward kernels (interpret=None: platform_dependent picks the kernel), in the
    default chunks of 64 tokens."""
    args = make_inputs(2, 100, 160, 16, groups=2, dtype=np.float32)
    testing.assert_lowers(scan_fn("pallas"), *args, platforms=(platform,), argnums=range(len(NAMES)))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_small_chunk_kernels_lower(platform):
    f, args = lowering_case()
    testing.assert_lowers(f, *args, platforms=(platform,), argnums=range(len(NAMES)))


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_packed_and_segment_kernels_lower(platform):
    f, args = lowering_case(segment_ids=jnp.asarray(np.arange(80).reshape(2, 40) // 7, jnp.int32))
    testing.assert_lowers(f, *args, platforms=(platform,), argnums=(0, 1, 8))
    args = make_inputs(1, 40, 160, 16, sequences=3, dtype=np.float32)
    f = scan_fn("pallas", chunk_size=16, cu_seqlens=jnp.array([0, 10, 10, 40], jnp.int32))
    testing.assert_lowers(f, *args, platforms=(platform,), argnums=(0, 1, 8))


# ----------------------------------------------------------------------------------- arguments


def test_auto_and_arguments():
    args = make_inputs(1, 8, 4, 3, dtype=np.float32)
    u, delta, A, B, C = args[:5]
    assert "pallas" in pk.ssm.scan.SCAN_IMPLS
    auto, _ = selective_scan(u, delta, A, B, C, impl="auto")  # xla on CPU
    xla, _ = selective_scan(u, delta, A, B, C, impl="xla")
    np.testing.assert_array_equal(auto, xla)
    default, _ = selective_scan(u, delta, A, B, C, impl="pallas")  # interpret=None: the interpreter on CPU
    testing.assert_close(default, xla, "y", dtype=jnp.float32)
    assert ScanBlockSizes() == ScanBlockSizes(block_d=128, gpu_block_d=32)
    for bad in (dict(block_d=4), dict(block_d=96), dict(gpu_block_d=12), dict(block_d=128.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ScanBlockSizes(**bad)
    with pytest.raises(TypeError, match="block_sizes"):
        selective_scan(u, delta, A, B, C, impl="pallas", block_sizes={"block_d": 128})
    with pytest.raises(ValueError, match="block_sizes"):
        selective_scan(u, delta, A, B, C, impl="xla", block_sizes=ScanBlockSizes())
    with pytest.raises(TypeError, match="interpret"):
        selective_scan(u, delta, A, B, C, impl="pallas", interpret="yes")
