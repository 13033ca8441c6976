"""Runs mixers under an 8-device CPU mesh; executed in a subprocess by test_mesh.py.

It needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX is imported, which
a pytest process that already imported JAX cannot do.

Usage: ``python mesh_check.py IMPL:NUM_KV_HEADS[:full] ... recurrent:MIXER:IMPL ...``: the
attention layer (``full`` adds gradients and prefill + decode to the forward check), or a
registered recurrent mixer (always forward, gradients and prefill + decode). Every check asserts;
the script prints one ``ok`` line per check and exits non-zero on failure.
"""

import os
import sys

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 before running")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnzoo.layers import Attention, create_mixer  # noqa: E402


def logical_rules(num_kv_heads: int, tensor_size: int):
    """The mapping from logical names to mesh axes (a config's job; here the test's config).

    Key/value heads are sharded like query heads unless there are too few of them (MQA), then
    replicated; the layer repeats them inside the shard_map for Pallas.
    """
    return (
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor" if num_kv_heads % tensor_size == 0 else None),
        ("head_dim", None),
        ("norm", None),
    )


def _forward(module, x, segment_ids=None):
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, x, segment_ids):
        return nnx.merge(graphdef, state)(x, segment_ids=segment_ids)

    return run(state, x, segment_ids), jax.make_jaxpr(run)(state, x, segment_ids)


def _decode(module, x, prefills):
    """Prefill chunks of ``prefills`` tokens one after the other (the first from an empty cache, the
    next ones from the state it left), then decode the rest one by one; concatenated outputs."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def step(state, x, cache):
        return nnx.merge(graphdef, state)(x, cache=cache)

    cache = module.init_cache(x.shape[0], x.shape[1])
    outputs, start = [], 0
    for size in prefills:
        y, cache = step(state, x[:, start : start + size], cache)
        outputs.append(y)
        start += size
    for t in range(start, x.shape[1]):
        y, cache = step(state, x[:, t : t + 1], cache)
        outputs.append(y)
    return jnp.concatenate(outputs, axis=1)


def _segment_ids(length, cuts):
    """``[4, length]`` int32 ids: row ``b`` starts a new document at each position in ``cuts[b]``
    (ids differ between rows)."""
    ids = np.zeros((4, length), np.int32)
    for b, row in enumerate(cuts):
        ids[b] = 10 * b + np.searchsorted(np.asarray(row), np.arange(length), side="right")
    return jnp.asarray(ids)


def check(impl: str, num_kv_heads: int, axis_type: AxisType = AxisType.Auto, full: bool = False):
    options = dict(dim=32, num_heads=4, num_kv_heads=num_kv_heads, qk_norm=True, window=(5, 0), impl=impl)
    label = f"impl={impl} num_kv_heads={num_kv_heads} axes={axis_type.name}"
    _compare(lambda rngs: Attention(rngs=rngs, **options), impl, label, logical_rules(num_kv_heads, 2), full, axis_type,
             length=12, cuts=[[6], [], [6], [6]], prefills=(5,))


RECURRENT_RULES = (("embed", "fsdp"), ("heads", "tensor"), ("head_dim", None), ("norm", None), ("conv_kernel", None))


def check_recurrent(mixer: str, impl: str):
    """A recurrent mixer (4 heads over the tensor axis, batch over data x fsdp), T = 40 in chunks
    of 16 (three chunks, the last one partial): documents end inside and at chunk boundaries; a
    prefill of 20 tokens, one of 17 from the state it left, then 3 one-token steps."""
    label = f"mixer={mixer} impl={impl}"
    _compare(lambda rngs: create_mixer(mixer, dim=16, num_heads=4, impl=impl, chunk_size=16, rngs=rngs),
             impl, label, RECURRENT_RULES, full=True, length=40, cuts=[[13], [], [16, 25], [7, 33]],
             prefills=(20, 17))


def _compare(build, impl: str, label: str, rules, full: bool, axis_type: AxisType = AxisType.Auto, *,
             length: int, cuts, prefills):
    """The module built under the mesh equals the unsharded one: forward (with segment_ids starting
    new documents at ``cuts``), and with ``full`` every parameter gradient and decoding (prefill
    chunks of ``prefills`` tokens, then one-token steps)."""
    unsharded = build(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, length, unsharded.dim)), jnp.float32)
    segment_ids = _segment_ids(length, cuts)
    y_ref, jaxpr = _forward(unsharded, x, segment_ids)
    assert "shard_map" not in str(jaxpr), "shard_map used without a mesh"
    loss_grad = nnx.jit(nnx.grad(lambda m, x, segment_ids: jnp.mean(m(x, segment_ids=segment_ids) ** 2)))
    if full:
        decode_ref = _decode(unsharded, x, prefills)
        grads_ref = nnx.state(loss_grad(unsharded, x, segment_ids))

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        module = build(nnx.Rngs(0))
        kernel = module.q_proj.kernel[...]
        assert kernel.sharding.spec == P("fsdp", "tensor", None), kernel.sharding
        x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        seg_sharded = jax.device_put(segment_ids, NamedSharding(mesh, P(("data", "fsdp"))))
        y, jaxpr = _forward(module, x_sharded, seg_sharded)
        uses_shard_map = "shard_map" in str(jaxpr)
        assert uses_shard_map == (impl == "pallas"), f"shard_map in jaxpr: {uses_shard_map}"
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
        if not full:
            print(f"ok {label}", flush=True)
            return

        grads = nnx.state(loss_grad(module, x_sharded, seg_sharded))
        for (path, leaf), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
            assert np.any(np.asarray(leaf) != 0), path
            np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-4, atol=1e-6, err_msg=str(path))

        decoded = _decode(module, x_sharded, prefills)
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(decode_ref), rtol=1e-5, atol=1e-5)
        full_forward = _forward(module, x_sharded)[0]
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(full_forward), rtol=2e-5, atol=2e-5)
    print(f"ok {label} (forward, gradients, prefill + decode)", flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    for spec in sys.argv[1:] or ["xla:2:full"]:
        if spec.startswith("recurrent:"):
            _, mixer, impl = spec.split(":")
            check_recurrent(mixer, impl)
            continue
        impl, num_kv_heads, *rest = spec.split(":")
        check(impl, int(num_kv_heads), full=rest == ["full"])
