"""Mesh and sharding from a config: the mesh axes ``data``, ``fsdp``, ``tensor`` and the logical rules.

Layers name their parameter axes logically (``embed``, ``heads``, ``mlp``, ...); a config maps
those names to mesh axes (``config.sharding_rules``). Batches are sharded over ``data`` and
``fsdp`` along their leading dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis names used by attnzoo layers and zoo models, mapped for FSDP + tensor parallelism.
DEFAULT_RULES = (
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("conv_kernel", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor) from a config where at most one entry is -1 (= the rest).

    Raises ValueError naming the config key when the sizes do not multiply to ``num_devices``.
    """
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh sizes must be positive or -1 (fill), got {dict(zip(MESH_AXES, sizes))}")
    fills = [i for i, size in enumerate(sizes) if size == -1]
    if len(fills) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([size for size in sizes if size != -1]))
    if fills:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide "
                f"the {num_devices} available devices; change config.mesh so the sizes divide {num_devices}"
            )
        sizes[fills[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices but {num_devices} are available; "
            f"set config.mesh sizes whose product is {num_devices} (or -1 on one axis to fill)"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types (the SPMD partitioner places activations)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(rules: Sequence[Sequence] | None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Validates ``config.sharding_rules`` (pairs of logical name -> mesh axis, axes or None)."""
    if rules is None:
        return DEFAULT_RULES
    checked = []
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"config.sharding_rules entries must be (logical_name, mesh_axis), got {entry!r}")
        name, target = entry
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"config.sharding_rules maps {name!r} to unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}"
                )
        checked.append((name, target if isinstance(target, str) or target is None else tuple(target)))
    return tuple(checked)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Shards the leading (batch) dimension over ``data`` x ``fsdp``; other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways a batch is split (``data * fsdp``)."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
