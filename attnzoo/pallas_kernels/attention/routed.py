"""Routed block-sparse attention: each query region attends to the key regions its routes name.

This is the fine-grained half of BiFormer's bi-level routing attention (Zhu et al., CVPR 2023):
a coarse region-to-region affinity picks, per image and query region, ``topk`` key regions, and
every query of the region then attends by one softmax to all ``topk * kv_region`` routed keys.

>>> out = routed_attention(q, k, v, routes, q_region=49, kv_region=49)

Layout. Tokens are region-major: query region ``r`` owns rows ``[r*q_region, (r+1)*q_region)`` of
``q [B, Tq, H, D]`` and key region ``j`` owns rows ``[j*kv_region, (j+1)*kv_region)`` of
``k [B, Tk, H, D]`` / ``v [B, Tk, H, Dv]``. ``routes`` is integer ``[B, Tq // q_region, topk]``,
shared by all heads (BiFormer routes per image). A repeated route counts twice, exactly as the
official code's gather does: its keys enter the softmax twice.

Route values. Out-of-range routes are rejected with a ``ValueError`` whenever ``routes`` is a
concrete array; under ``jit`` the values cannot be inspected, and every implementation clamps them
to ``[0, Tk // kv_region - 1]`` (so a negative route means region 0, never a Python-style wrap),
which keeps the three implementations identical on any input.

Implementations (``impl``):

* ``"reference"``: gathers the routed key/value regions and applies a plain softmax per query
  region in ``promote(dtype, float32)`` (float64 stays float64). The oracle of the tests.
* ``"xla"``: the same gather formulation (what the official BiFormer code does), written for
  speed: the inputs feed the two batched dots ``[B, H, R, q_region, topk*kv_region]`` in their own
  dtype with float32 accumulation, and the gradient of the gather is XLA's scatter-add. The CPU
  default of ``"auto"``.
* ``"pallas"``: the block-sparse flash-attention engine of :mod:`.tpu` / :mod:`.gpu` with the
  routes as its tile list (details in :mod:`.routed_pallas`). A query region is a query block and
  a key region a key block; step ``s`` of query region ``i`` in image ``b`` visits key block
  ``routes[b, i, s]``, and every routed tile is FULL (no element mask) unless regions are padded,
  so the forward and dq kernels run exactly ``topk`` steps per query block. The engine's kernel
  bodies run unchanged; they read the per-image tile list through a view that offsets every
  index by the image (TPU: the routes are scalar-prefetched into SMEM and read by the K/V
  BlockSpec index maps; GPU: an int32 operand walked by the Triton kernel). dk/dv: on TPU the
  engine's dk/dv kernel computes one float32 dK/dV tile per (query region, route) pair and XLA
  sums them into their key regions (``segment_sum``), keeping the grid at ``R * topk`` steps;
  on GPU the dk/dv kernel walks, per key region, the transposed tile list built at run time in
  XLA (the routes stably sorted by key region, with per-region counts; Triton's loops take
  data-dependent trip counts). A repeated route is visited twice everywhere, as in the gather.

Padding. Mosaic wants a block's second-minor dimension to be a multiple of 8 (sublanes), and
BiFormer's regions (a 7x7 grid of them over 56, 28, 14 and 7 px maps at 224 px) have 64, 16, 4
and 1 tokens. The
Pallas path pads every query region to ``round_up(q_region, 8)`` rows and every key region to
``round_up(kv_region, 8)`` rows inside the op (on GPU to powers of two >= 16, Triton's minimum
for a dot). Padded keys are masked out of every tile (the engine's PARTIAL path with a mask
``position % block < kv_region``); padded query rows are dropped from the output (their
cotangent is zero, so they add nothing to dk/dv). Unpadded regions run the unmasked FULL path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels import common

__all__ = ["routed_attention"]

_OP = "routed_attention"


def _check_arguments(q, k, v, routes, q_region, kv_region):
    common.check_array(_OP, "q", q, ndim=4, floating=True, expected="[B,Tq,H,D]")
    common.check_array(_OP, "k", k, ndim=4, floating=True, expected="[B,Tk,H,D]")
    common.check_array(_OP, "v", v, ndim=4, floating=True, expected="[B,Tk,H,Dv]")
    batch, q_len, heads, head_dim = q.shape
    common.check_array(_OP, "k", k, shape=(batch, None, heads, head_dim), expected="[B,Tk,H,D] with q's B, H and D")
    kv_len = k.shape[1]
    common.check_array(_OP, "v", v, shape=(batch, kv_len, heads, None), expected="[B,Tk,H,Dv] with k's B, Tk and H")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{_OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_len == 0 or kv_len == 0 or head_dim == 0 or v.shape[-1] == 0 or heads == 0 or batch == 0:
        raise ValueError(f"{_OP}: empty dimension: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    q_region = common.check_int(_OP, "q_region", q_region)
    kv_region = common.check_int(_OP, "kv_region", kv_region)
    if q_len % q_region:
        raise ValueError(f"{_OP}: q_region ({q_region}) must divide the query length Tq={q_len}")
    if kv_len % kv_region:
        raise ValueError(f"{_OP}: kv_region ({kv_region}) must divide the key length Tk={kv_len}")
    num_q, num_kv = q_len // q_region, kv_len // kv_region
    common.check_array(_OP, "routes", routes, ndim=3, integer=True, expected="[B,Tq//q_region,topk]")
    common.check_array(
        _OP, "routes", routes, shape=(batch, num_q, None),
        expected=f"[B,Tq//q_region,topk] = [{batch},{num_q},topk]",
    )
    if routes.shape[2] == 0:
        raise ValueError(f"{_OP}: routes must have topk >= 1 routes per query region, got shape {tuple(routes.shape)}")
    if not isinstance(routes, jax.core.Tracer):
        values = np.asarray(routes)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_kv:
            raise ValueError(
                f"{_OP}: routes must be key region indices in [0, {num_kv - 1}] (Tk // kv_region = "
                f"{kv_len} // {kv_region}), got values in [{low}, {high}]"
            )
    return q_region, kv_region


def routed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    routes: jax.Array,
    *,
    q_region: int,
    kv_region: int,
    scale: float | None = None,
    impl: str = "auto",
    interpret=None,
) -> jax.Array:
    """Attention of each query region to the key regions named by ``routes``.

    Args:
      q: ``[B, Tq, H, D]`` float, region-major (query region ``r`` = rows ``r*q_region ...``).
      k: ``[B, Tk, H, D]``, region-major with ``kv_region`` rows per region. v: ``[B, Tk, H, Dv]``.
        q, k and v share one float dtype.
      routes: integer ``[B, Tq // q_region, topk]``, key region indices in ``[0, Tk // kv_region)``,
        shared by all heads. Not differentiated. Out of range: ``ValueError`` when concrete,
        clamped under ``jit`` (see the module docstring).
      q_region, kv_region: tokens per query / key region; they must divide ``Tq`` / ``Tk``.
      scale: logit scale, default ``D ** -0.5``.
      impl: "auto" | "reference" | "xla" | "pallas" (see the module docstring).
      interpret: Pallas interpret mode, see ``attnzoo.pallas_kernels.common``.

    Returns:
      ``[B, Tq, H, Dv]`` in q's dtype: query region ``r`` of image ``b`` attends, by one softmax over
      its ``topk * kv_region`` routed keys, to the key regions ``routes[b, r, :]``. Differentiable
      with respect to q, k and v for every impl.
    """
    q_region, kv_region = _check_arguments(q, k, v, routes, q_region, kv_region)
    scale = common.check_float(_OP, "scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    interpret = common.check_interpret(interpret, _OP)
    impl = common.resolve_impl(impl, _OP)
    run = functools.partial(
        _routed_jit, impl=impl, q_region=q_region, kv_region=kv_region, scale=scale, interpret=interpret
    )
    explicit = common.explicit_mesh_axes()
    if explicit:
        spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 4
        out_spec = jax.sharding.PartitionSpec(spec[0], spec[1], spec[2], None)
        run = jax.sharding.auto_axes(run, axes=explicit, out_sharding=out_spec)
    return run(q, k, v, jnp.asarray(routes))


@functools.partial(jax.jit, static_argnames=("impl", "q_region", "kv_region", "scale", "interpret"))
def _routed_jit(q, k, v, routes, *, impl, q_region, kv_region, scale, interpret):
    num_kv = k.shape[1] // kv_region
    routes = jnp.clip(routes.astype(jnp.int32), 0, num_kv - 1)
    if impl == "reference":
        return routed_reference(q, k, v, routes, q_region=q_region, kv_region=kv_region, scale=scale)
    if impl == "xla":
        return routed_xla(q, k, v, routes, q_region=q_region, kv_region=kv_region, scale=scale)
    from attnzoo.pallas_kernels.attention import routed_pallas

    return routed_pallas.routed_attention(
        q, k, v, routes, q_region=q_region, kv_region=kv_region, scale=scale, interpret=interpret
    )


def _gather_regions(x, routes, region):
    """``x [B, Tk, H, E]``, ``routes [B, R, topk]`` -> ``[B, R, topk * region, H, E]``."""
    batch, length, heads, dim = x.shape
    regions = x.reshape(batch, length // region, region, heads, dim)
    picked = jax.vmap(lambda xb, rb: xb[rb])(regions, routes)  # [B, R, topk, region, H, E]
    return picked.reshape(batch, routes.shape[1], routes.shape[2] * region, heads, dim)


def routed_reference(q, k, v, routes, *, q_region: int, kv_region: int, scale: float):
    """Plain gather + softmax in ``promote(dtype, float32)``; ``routes`` already in range."""
    batch, q_len, heads, head_dim = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)
    num_q = q_len // q_region
    qr = q.astype(acc).reshape(batch, num_q, q_region, heads, head_dim)
    kg = _gather_regions(k.astype(acc), routes, kv_region)
    vg = _gather_regions(v.astype(acc), routes, kv_region)
    scores = jnp.einsum("brqhd,brkhd->brhqk", qr, kg) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("brhqk,brkhe->brqhe", probs, vg)
    return out.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)


def routed_xla(q, k, v, routes, *, q_region: int, kv_region: int, scale: float):
    """The gather formulation with head-major batched dots; ``routes`` already in range.

    Scores and softmax statistics are float32 (float64 for float64 inputs); the probabilities are
    cast to v's dtype for the second dot, as the flash kernels do.
    """
    batch, q_len, heads, head_dim = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)
    num_q, topk = q_len // q_region, routes.shape[2]
    # Head-major regions: [B, H, R, region, E]; the gather picks whole [region, E] slabs.
    qh = q.reshape(batch, num_q, q_region, heads, head_dim).transpose(0, 3, 1, 2, 4)
    kh = k.reshape(batch, -1, kv_region, heads, head_dim).transpose(0, 3, 1, 2, 4)
    vh = v.reshape(batch, -1, kv_region, heads, v.shape[-1]).transpose(0, 3, 1, 2, 4)

    def gather(xh):  # [B, H, Rk, region, E] -> [B, H, R, topk * region, E]
        picked = jax.vmap(lambda xb, rb: xb[:, rb])(xh, routes)  # [B, H, R, topk, region, E]
        return picked.reshape(batch, heads, num_q, topk * kv_region, xh.shape[-1])

    kg, vg = gather(kh), gather(vh)
    s = jnp.einsum("bhrqd,bhrkd->bhrqk", qh, kg, preferred_element_type=acc) * scale
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhrqk,bhrke->bhrqe", p.astype(v.dtype), vg, preferred_element_type=acc) / l
    return out.transpose(0, 2, 3, 1, 4).reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)
