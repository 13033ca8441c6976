"""Bad arguments get an error that names the argument, what was seen and what was expected."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import pallas_kernels as pk

Q = jnp.zeros((2, 8, 4, 16))
K = jnp.zeros((2, 8, 2, 16))
V = jnp.zeros((2, 8, 2, 8))

BAD_CALLS = [
    ("q rank", dict(q=jnp.zeros((8, 4, 16))), ValueError, r"q must have rank 4 \[B,T,Hq,D\], got shape \(8, 4, 16\)"),
    ("q dtype", dict(q=jnp.zeros((2, 8, 4, 16), jnp.int32)), TypeError, r"q must have a floating dtype, got int32"),
    ("k batch", dict(k=jnp.zeros((3, 8, 2, 16))), ValueError, r"k must have shape \(2, \*, \*, 16\)"),
    ("k head dim", dict(k=jnp.zeros((2, 8, 2, 15))), ValueError, r"k must have shape \(2, \*, \*, 16\).*got \(2, 8, 2, 15\)"),
    ("v length", dict(v=jnp.zeros((2, 9, 2, 8))), ValueError, r"v must have shape \(2, 8, 2, \*\)"),
    ("gqa ratio", dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 8))), ValueError, r"the number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("mixed dtypes", dict(k=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), TypeError, r"q, k and v must share a dtype"),
    ("causal type", dict(causal="yes"), TypeError, r"causal must be a bool, got str"),
    ("window shape", dict(window=5), ValueError, r"window must be a \(left, right\) pair"),
    ("window negative", dict(window=(-1, 0)), ValueError, r"window\[0\] \(left\) must be an int >= 0, got -1"),
    ("window float", dict(window=(2, 1.5)), ValueError, r"window\[1\] \(right\) must be an int >= 0, got 1.5"),
    ("segment shape", dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), ValueError, r"segment_ids \(queries\) must have shape \(2, 8\) \[B,T\], got \(2, 7\)"),
    ("segment dtype", dict(segment_ids=jnp.zeros((2, 8))), TypeError, r"segment_ids \(queries\) must have an integer dtype, got float32"),
    ("segment pair", dict(segment_ids=(jnp.zeros((2, 8), jnp.int32),)), ValueError, r"segment_ids must be \[B,T\] or a \(q_ids, kv_ids\) pair"),
    ("mask type", dict(mask="causal"), TypeError, r"mask must be an attnzoo Mask or a callable"),
    ("scale type", dict(scale="0.1"), TypeError, r"scale must be a float or None, got str"),
    ("scale nan", dict(scale=float("nan")), ValueError, r"scale must be a finite float"),
    ("softcap", dict(softcap=0.0), ValueError, r"softcap must be a finite positive float, got 0.0"),
    ("impl", dict(impl="triton"), ValueError, r"impl must be one of .*got 'triton'"),
    ("return_lse", dict(return_lse=1), TypeError, r"return_lse must be a bool"),
    ("block sizes type", dict(impl="xla", block_sizes=pk.BlockSizes()), TypeError, r"block_sizes must be a XlaBlockSizes for this impl, got BlockSizes"),
    ("block sizes value", dict(impl="pallas", block_sizes=pk.BlockSizes(block_q=0)), ValueError, r"block_sizes.block_q must be an int >= 1, got 0"),
    ("interpret", dict(interpret="yes"), TypeError, r"interpret must be None, a bool or pltpu.InterpretParams"),
    ("q not array", dict(q=[[1.0]]), TypeError, r"q must be an array, got list"),
]


@pytest.mark.parametrize("label,overrides,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_attention_bad_arguments(label, overrides, error, message):
    args = dict(q=Q, k=K, v=V)
    args.update(overrides)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=r"^attention: " + message):
        pk.attention(q, k, v, **args)


def test_single_segment_ids_need_self_attention():
    with pytest.raises(ValueError, match=r"single segment_ids array needs T == S.*T=8, S=5"):
        pk.attention(Q, K[:, :5], V[:, :5], segment_ids=jnp.zeros((2, 8), jnp.int32))


DECODE_Q = jnp.zeros((2, 4, 16))
CACHE_K = jnp.zeros((2, 32, 2, 16))
CACHE_V = jnp.zeros((2, 32, 2, 8))
LENGTHS = jnp.array([3, 32], jnp.int32)

BAD_DECODE = [
    ("q rank", dict(q=jnp.zeros((2, 1, 4, 16))), ValueError, r"q must have rank 3 \[B,Hq,D\]"),
    ("cache head dim", dict(k_cache=jnp.zeros((2, 32, 2, 8))), ValueError, r"k_cache must have shape \(2, \*, \*, 16\)"),
    ("v cache length", dict(v_cache=jnp.zeros((2, 31, 2, 8))), ValueError, r"v_cache must have shape \(2, 32, 2, \*\)"),
    ("lengths shape", dict(lengths=jnp.array([3], jnp.int32)), ValueError, r"lengths must have shape \(2,\) \[B\], got \(1,\)"),
    ("lengths dtype", dict(lengths=jnp.array([3.0, 4.0])), TypeError, r"lengths must have an integer dtype"),
    ("gqa", dict(q=jnp.zeros((2, 3, 16))), ValueError, r"the number of query heads \(3\) must be a multiple"),
    ("block sizes", dict(block_sizes=pk.XlaBlockSizes()), TypeError, r"block_sizes must be a DecodeBlockSizes"),
]


@pytest.mark.parametrize("label,overrides,error,message", BAD_DECODE, ids=[c[0] for c in BAD_DECODE])
def test_decode_bad_arguments(label, overrides, error, message):
    args = dict(q=DECODE_Q, k_cache=CACHE_K, v_cache=CACHE_V, lengths=LENGTHS)
    args.update(overrides)
    with pytest.raises(error, match=r"^attention_decode: " + message):
        pk.attention_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("lengths"), **args)


def test_errors_are_raised_before_tracing_deep_xla_code():
    """A shape error surfaces as our ValueError even under jit, not as an XLA error."""
    import jax

    with pytest.raises(ValueError, match=r"^attention: k must have shape"):
        jax.jit(lambda q, k, v: pk.attention(q, k, v))(Q, np.zeros((2, 8, 2, 15), np.float32), V)
