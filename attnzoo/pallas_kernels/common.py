"""The op contract shared by every op in ``attnzoo.pallas_kernels``.

* ``impl``: "reference" (plainest correct code, the oracle), "xla" (efficient pure JAX), "pallas"
  (fused kernels) or "auto" (pallas on TPU/GPU, xla on CPU).
* ``interpret``: None runs Pallas kernels compiled on TPU/GPU and in the interpreter on CPU,
  decided per lowering platform with ``jax.lax.platform_dependent``, so lowering a CPU-traced
  function for ``("tpu",)`` or ``("cuda",)`` yields the real kernel. True (or a
  ``pltpu.InterpretParams``) forces the TPU kernel through the interpreter; False forces the
  compiled TPU kernel.
* Argument validation raising ``ValueError``/``TypeError`` that names the argument, what was seen
  and what was expected.
* Padding of lengths that do not divide the block size.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "reference", "xla", "pallas")


def resolve_impl(impl: str, op: str) -> str:
    """Validates ``impl`` and resolves "auto" for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    return impl


def run_pallas(
    tpu_fn: Callable[..., Any],
    gpu_fn: Callable[..., Any],
    interpret,
    *args,
):
    """Calls the kernel for the platform being lowered for.

    ``tpu_fn(*args, interpret=...)`` and ``gpu_fn(*args, interpret=...)`` must each be
    differentiable (a ``jax.custom_vjp`` around their forward and backward kernels).
    """
    if interpret is None:
        return jax.lax.platform_dependent(
            *args,
            cpu=lambda *a: tpu_fn(*a, interpret=True),
            tpu=lambda *a: tpu_fn(*a, interpret=False),
            cuda=lambda *a: gpu_fn(*a, interpret=False),
            rocm=lambda *a: gpu_fn(*a, interpret=False),
        )
    return tpu_fn(*args, interpret=interpret)


def explicit_mesh_axes() -> tuple[str, ...]:
    """Names of the active mesh's Explicit axes (empty without a mesh or with Auto axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(
        name for name, kind in zip(mesh.axis_names, mesh.axis_types)
        if kind == jax.sharding.AxisType.Explicit
    )


def check_interpret(interpret, op: str):
    from jax.experimental.pallas import tpu as pltpu

    if interpret is None or isinstance(interpret, (bool, pltpu.InterpretParams)):
        return interpret
    raise TypeError(
        f"{op}: interpret must be None, a bool or pltpu.InterpretParams, got {type(interpret).__name__}"
    )


def check_array(
    op: str,
    name: str,
    x,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool | None = None,
    integer: bool | None = None,
    shape: Sequence[int | None] | None = None,
    expected: str = "",
):
    """Raises a clear error unless ``x`` is an array with the given rank, kind and shape.

    ``shape`` entries that are None are not checked. ``expected`` names the layout, e.g. "[B,T,H,D]".
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
    layout = f" {expected}" if expected else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(
                f"{op}: {name} must have rank {' or '.join(map(str, allowed))}{layout}, "
                f"got shape {tuple(x.shape)}"
            )
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")
    if integer and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {x.dtype}")
    if shape is not None:
        if len(shape) != x.ndim or any(
            want is not None and want != got for want, got in zip(shape, x.shape)
        ):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{op}: {name} must have shape {want}{layout}, got {tuple(x.shape)}")
    return x


def check_int(op: str, name: str, value, *, minimum: int = 1, allow_none: bool = False):
    """Returns ``value`` as an int ``>= minimum`` (or None when allowed), else ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_float(op: str, name: str, value, *, positive: bool = False, allow_none: bool = True):
    """Returns ``value`` as a finite float (or None when allowed), else ``TypeError``/``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        kind = "a float or None" if allow_none else "a float"
        raise TypeError(f"{op}: {name} must be {kind}, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(
            f"{op}: {name} must be a finite {'positive ' if positive else ''}float, got {value!r}"
        )
    return value


def check_window(op: str, window) -> tuple[int | None, int | None] | None:
    """None or a ``(left, right)`` pair of ints >= 0, either of which may be None (unbounded)."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"{op}: window must be a (left, right) pair of ints or None, got {window!r}")
    left = check_int(op, "window[0] (left)", window[0], allow_none=True, minimum=0)
    right = check_int(op, "window[1] (right)", window[1], allow_none=True, minimum=0)
    return (left, right)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pads ``x`` at the end of ``axis`` to a multiple of ``multiple``."""
    size = x.shape[axis]
    target = round_up(size, multiple)
    if target == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, target - size)
    return jnp.pad(x, widths, constant_values=value)


def fit_block(requested: int, length: int, align: int) -> int:
    """The block size actually used: ``requested`` shrunk to the length rounded up to ``align``."""
    return max(align, min(requested, round_up(length, align)))
