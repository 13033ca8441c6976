"""Run in a subprocess with 8 CPU devices: ops under Auto and Explicit meshes equal unsharded runs."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from attnzoo import pallas_kernels as pk  # noqa: E402
from attnzoo.pallas_kernels import testing  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 40, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 40, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, 40, 2, 16)), jnp.float32)
    lengths = jnp.array([1, 7, 40, 23], jnp.int32)
    impls = ("reference", "xla", "pallas")

    def run(impl, q, k, v):
        loss = lambda q, k, v: jnp.sum(pk.attention(q, k, v, causal=True, window=(9, 0), impl=impl) ** 2)
        out, lse = jax.jit(lambda q, k, v: pk.attention(q, k, v, causal=True, window=(9, 0), impl=impl, return_lse=True))(q, k, v)
        grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
        decoded = jax.jit(lambda q, k, v: pk.attention_decode(q[:, 0], k, v, lengths, impl=impl))(q, k, v)
        return [out, lse, *grads, decoded]

    expected = {impl: run(impl, q, k, v) for impl in impls}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(axis_type, axis_type))
        spec = NamedSharding(mesh, P("data", None, "tensor", None))
        sq, sk, sv = (jax.device_put(x, spec) for x in (q, k, v))
        with jax.set_mesh(mesh):
            for impl in impls:
                if impl == "pallas" and axis_type == AxisType.Explicit:
                    continue  # Pallas calls under a mesh go through shard_map (the layers do this)
                got = run(impl, sq, sk, sv)
                for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "decode"), got, expected[impl]):
                    testing.assert_close(a, b, f"{axis_type} {impl} {name}", dtype=jnp.float32)
                if axis_type == AxisType.Explicit:
                    assert got[0].sharding.spec == P("data", None, "tensor", None), got[0].sharding
    print("sharding ok")


if __name__ == "__main__":
    main()
