"""The harness that proves ops: float64 references, gradients of every input, lowering checks.

Every op's tests use these helpers (see ``tests/pallas_kernels``):

>>> with float64():
...     ref = f_reference(*to_float64(args))
>>> assert_close(f(*args), ref, "out", dtype=jnp.float32)
>>> assert_grads_close(f, f_reference, args, argnums=(0, 1, 2), dtype=jnp.float32)
>>> assert_lowers(f, *args, platforms=("tpu", "cuda"))   # forward and backward kernels

Tolerances are relative RMS errors ``||out - ref|| / ||ref||`` per dtype (``TOLERANCE``). They are
fixed: a failing comparison is a bug to find, not a tolerance to raise.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 5e-3,
}

# What a lowered module must contain for a Pallas kernel of each platform.
KERNEL_CALL_TARGETS = {"tpu": ("tpu_custom_call",), "cuda": ("__gpu$xla.gpu.triton", "mosaic_gpu")}


@contextlib.contextmanager
def float64():
    """Enables ``jax_enable_x64`` inside the block (restored afterwards)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def to_float64(tree):
    """Casts every floating leaf to float64 (call inside :func:`float64`)."""
    return jax.tree.map(
        lambda x: np.asarray(x, np.float64) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
        tree,
    )


def rel_rms(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``||out||`` if ref is all zero)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {out.shape} vs reference {ref.shape}")
    denom = np.linalg.norm(ref)
    err = np.linalg.norm(out - ref)
    return float(err / denom) if denom > 0 else float(err)


def tolerance(dtype) -> float:
    return TOLERANCE[jnp.dtype(dtype)]


def assert_close(out, ref, name: str, *, dtype=None, tol: float | None = None):
    """Asserts finite values with relative RMS error within the dtype's tolerance.

    Non-finite entries must match the reference's exactly (e.g. -inf lse of empty rows).
    """
    out_np = np.asarray(out, np.float64)
    ref_np = np.asarray(ref, np.float64)
    if out_np.shape != ref_np.shape:
        raise AssertionError(f"{name}: shape {out_np.shape} != reference {ref_np.shape}")
    if np.isnan(out_np).any():
        raise AssertionError(f"{name}: {int(np.isnan(out_np).sum())} NaN values")
    finite_ref = np.isfinite(ref_np)
    if not np.array_equal(np.isfinite(out_np), finite_ref) or not np.array_equal(
        out_np[~finite_ref], ref_np[~finite_ref]
    ):
        raise AssertionError(f"{name}: non-finite entries differ from the reference")
    tol = tolerance(dtype if dtype is not None else jnp.asarray(out).dtype) if tol is None else tol
    err = rel_rms(out_np[finite_ref], ref_np[finite_ref])
    if not err <= tol:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}")
    return err


def random_cotangent(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [
            jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else np.zeros(x.shape, jax.dtypes.float0)
            for k, x in zip(keys, leaves)
        ]
    )


def _zero_nonfinite(tree):
    return jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0), tree)


def assert_grads_close(
    f: Callable,
    f_reference: Callable,
    args: Sequence[Any],
    *,
    argnums: Iterable[int],
    dtype,
    key=None,
    names: Sequence[str] | None = None,
    tol: float | None = None,
):
    """Compares ``vjp`` of ``f`` (on ``args``) with that of ``f_reference`` run in float64.

    A random cotangent is drawn for every output; non-finite outputs (e.g. lse -inf) get a zero
    cotangent through masking. Every input in ``argnums`` is checked.
    """
    argnums = tuple(argnums)
    key = jax.random.PRNGKey(0) if key is None else key

    def restrict(fn, base):
        def wrapped(*diff):
            full = list(base)
            for i, a in zip(argnums, diff):
                full[i] = a
            return _zero_nonfinite(fn(*full))

        return wrapped

    out, vjp = jax.vjp(restrict(f, args), *[args[i] for i in argnums])
    cot = random_cotangent(key, out)
    grads = vjp(cot)
    with float64():
        args64 = to_float64(list(args))
        _, vjp64 = jax.vjp(restrict(f_reference, args64), *[args64[i] for i in argnums])
        ref_grads = vjp64(to_float64(cot))
    names = names or [f"arg{i}" for i in argnums]
    errors = {}
    for name, g, r in zip(names, grads, ref_grads):
        errors[name] = assert_close(g, r, f"d{name}", dtype=dtype, tol=tol)
    return errors


def lowered_text(f: Callable, *args, platform: str) -> str:
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def assert_lowers(
    f: Callable,
    *args,
    platforms: Sequence[str] = ("tpu", "cuda"),
    backward: bool = True,
    argnums: Sequence[int] = (0,),
):
    """Lowers ``f`` (and, with ``backward``, the gradient of ``sum(outputs)`` w.r.t. ``argnums``)
    for each platform and asserts the module contains that platform's Pallas kernel call.

    This is the one-line check every kernel's tests reuse: on this CPU machine it proves the
    block shapes obey the platform's tiling rules and every primitive has a lowering.
    """
    fns = {"forward": f}
    if backward:

        def loss(*a):
            outs = jax.tree.leaves(f(*a))
            return sum(jnp.sum(jnp.where(jnp.isfinite(o), o, 0).astype(jnp.float32)) for o in outs)

        fns["backward"] = jax.grad(loss, argnums=tuple(argnums))
    for platform in platforms:
        for kind, fn in fns.items():
            text = lowered_text(fn, *args, platform=platform)
            targets = KERNEL_CALL_TARGETS[platform]
            if not any(t in text for t in targets):
                found = sorted(set(re.findall(r"custom_call @([\w$.]+)", text)))
                raise AssertionError(
                    f"{kind} pass lowered for {platform} has no Pallas kernel ({targets}); "
                    f"custom calls found: {found}"
                )
