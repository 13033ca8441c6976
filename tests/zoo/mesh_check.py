"""Builds zoo models under an 8-device CPU mesh; executed in a subprocess by test_mesh.py.

It needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX is imported, which
a pytest process that already imported JAX cannot do. For each model: parameters created under
``jax.set_mesh`` + ``nnx.logical_axis_rules`` are placed as the rules say (stacked layer axis
replicated), and the jitted forward on a batch-sharded input equals the unsharded model's.
Prints one ``ok`` line per model and exits non-zero on failure. Arguments name the cases to run
(default: all of ``CASES``).
"""

import os

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 before running")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnzoo import zoo  # noqa: E402

# The test's "config": logical name -> mesh axis.
RULES = (
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)
RULE_MAP = dict(RULES)

CASES = {
    "vit": dict(
        name="vit_tiny_patch16_224",
        overrides=dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=4, num_classes=64),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
    ),
    # Vision backbones: heads divisible by the tensor axis (2) in every stage.
    "swin": dict(
        name="swin_tiny_patch4_window7_224",
        overrides=dict(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4, num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
    ),
    "dinat": dict(
        name="dinat_mini",
        overrides=dict(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(2, 4), num_classes=10,
                       block_options=[[{"dilation": 1}, {"dilation": 2}], [{"dilation": 1}]]),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
    ),
    "maxvit": dict(
        name="maxvit_tiny_tf_224",
        overrides=dict(img_size=64, embed_dims=(32, 64), depths=(1, 1), stem_width=16, head_dim=16,
                       head_hidden_size=32, num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
    ),
    "twins": dict(
        name="twins_svt_small",
        overrides=dict(img_size=64, embed_dims=(16, 16, 32, 32), num_heads=(2, 2, 2, 4), depths=(2, 1, 1, 1),
                       mlp_ratios=(2, 2, 2, 2), sr_ratios=(4, 2, 2, 1), wss=(3, 1, 1, 1), num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
    ),
    "davit": dict(
        name="davit_tiny",
        overrides=dict(img_size=28, embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 2), window_size=3,
                       num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 28, 28, 3)), jnp.float32),
    ),
    "crossformer": dict(
        name="crossformer_tiny",
        overrides=dict(img_size=64, embed_dim=(64, 64, 64, 64), depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 2),
                       group_size=3, intervals=(4, 2, 1, 1), num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
    ),
    "van": dict(
        name="van_b0",
        overrides=dict(img_size=48, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 48, 48, 3)), jnp.float32),
    ),
    "agent_swin": dict(
        name="agent_swin_tiny",
        overrides=dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 4), num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
    ),
    # Agent-DeiT-B narrowed: 2 agent blocks then 1 attention block (two stacked runs of the ViT).
    "agent_deit": dict(
        name="agent_deit_base",
        overrides=dict(img_size=32, patch_size=8, dim=32, depth=3, num_heads=4, num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
    ),
    "biformer": dict(
        name="biformer_tiny",
        overrides=dict(img_size=64, embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), n_win=3,
                       topk=(1, 2, 4, None), auto_pad=True, num_classes=10),
        inputs=lambda rng: jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
    ),
    "hat": dict(
        name="hat_s_x2",
        overrides=dict(in_chans=1, img_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4,
                       compress_ratio=4, squeeze_factor=2, rgb_mean=(0.3,)),
        inputs=lambda rng: jnp.asarray(rng.uniform(size=(4, 4, 4, 1)), jnp.float32),
    ),
    "lm": dict(
        name="lm_nano",
        # Shapes shared with the ViT where possible: initializers compile once per shape.
        overrides=dict(dim=32, depth=4, num_heads=4, pattern="swa,attn", sliding_window=3, vocab_size=64),
        inputs=lambda rng: jnp.asarray(rng.integers(0, 64, size=(4, 12)), jnp.int32),
    ),
}


def _expected_spec(names):
    return P(*[None if name is None else RULE_MAP[name] for name in names])


def _forward(model, x):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def check(case: str) -> None:
    spec = CASES[case]
    x = spec["inputs"](np.random.default_rng(0))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        model = zoo.create_model(spec["name"], rngs=nnx.Rngs(0), **spec["overrides"])
        params = nnx.state(model, nnx.Param)
        variables = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        sharded = 0
        for path, variable in variables:
            leaf = variable[...]
            want = _expected_spec(tuple(variable.get_metadata()["out_sharding"]))
            assert isinstance(leaf.sharding, NamedSharding), (path, leaf.sharding)
            got = leaf.sharding.spec
            pad = lambda s: tuple(s) + (None,) * (leaf.ndim - len(s))  # noqa: E731  (trailing Nones)
            assert pad(got) == pad(want), f"{jax.tree_util.keystr(path)}: sharding {got}, rules say {want}"
            sharded += any(axis is not None for axis in got)
        assert sharded > 0, "no parameter is sharded"
        x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        y = _forward(model, x_sharded)
        assert y.sharding.mesh.shape == mesh.shape

    # The same parameters, gathered onto one device, without a mesh.
    graphdef, state = nnx.split(model)
    single = jax.devices()[0]
    local = nnx.merge(graphdef, jax.tree.map(lambda a: jax.device_put(np.asarray(a), single), state))
    y_ref = _forward(local, jax.device_put(x, single))
    assert len(y_ref.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    print(f"ok {case}: {len(variables)} parameters placed by the rules ({sharded} sharded), forward equal", flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    import sys

    names = sys.argv[1:] or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    for case in names:
        check(case)
