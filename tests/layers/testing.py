"""Helpers shared by the layer tests: building a registered mixer with random parameters, float64
parameters, random maps, and the finite-difference check of the gradients of every parameter and
of the input against a numpy reference."""

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import layers
from tests.zoo.helpers import build, fast_jit


def make_mixer(name: str, seed: int = 0, *, scale: float = 0.5, **options) -> nnx.Module:
    """``layers.create_mixer(name, **options)`` built abstractly, with random parameters
    (``tests.zoo.helpers.build``: seed ``seed``, normal of std ``scale``)."""
    return build(lambda: layers.create_mixer(name, rngs=nnx.Rngs(seed), **options), seed=seed, scale=scale)


def as_float64(module: nnx.Module) -> nnx.Module:
    """Every parameter cast to float64, in place (call inside ``float64()``)."""
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            variable.set_value(jnp.asarray(variable.get_value(), jnp.float64))
    return module


def parameters(module: nnx.Module) -> list:
    """``[(path, nnx.Param)]`` of every parameter, in the module's order."""
    return [(path, variable) for path, variable in nnx.iter_graph(module) if isinstance(variable, nnx.Param)]


def random_map(seed: int, shape) -> jnp.ndarray:
    """A float32 array of standard normal values."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def weighted_sum_grads(module: nnx.Module, x: np.ndarray, cotangent: np.ndarray):
    """``(grads, x_grad)``: the gradients of ``sum(module(x) * cotangent)`` with respect to the
    module's parameters (an ``nnx.State``) and ``x``, by jax (jitted)."""

    def loss(model, x):
        return jnp.sum(model(x) * cotangent)

    return fast_jit(lambda model, x: nnx.grad(loss, argnums=(0, 1))(model, x))(module, jnp.asarray(x))


def check_finite_differences(
    module: nnx.Module,
    x: np.ndarray,
    cotangent: np.ndarray,
    grads,
    x_grad,
    reference: Callable[[nnx.Module, np.ndarray], np.ndarray],
    rng: np.random.Generator,
    *,
    eps: float = 1e-5,
    rtol: float = 1e-6,
    floor: float = 1.0,
) -> list[str]:
    """Checks jax's gradients of ``sum(y * cotangent)`` against central differences of the float64
    ``reference(module, x)``: along one random direction (from ``rng``) of each parameter in turn
    (``grads``, from :func:`weighted_sum_grads`), then of ``x`` (``x_grad``). Each directional
    derivative must agree to ``rtol * max(floor, |numeric|)`` (``floor=0``: purely relative), and
    every parameter gradient must have a non-zero entry. Parameters are restored after each step.

    Returns the checked parameter paths, ``"a.b.kernel"``, in the module's order.
    """
    checked = []
    for path, variable in parameters(module):
        grad = grads
        for key in path:
            grad = grad[key]
        grad = np.asarray(grad[...])
        value = np.asarray(variable.get_value())
        direction = rng.normal(size=value.shape)
        variable.set_value(jnp.asarray(value + eps * direction))
        up = np.sum(reference(module, x) * cotangent)
        variable.set_value(jnp.asarray(value - eps * direction))
        down = np.sum(reference(module, x) * cotangent)
        variable.set_value(jnp.asarray(value))
        numeric = (up - down) / (2 * eps)
        assert np.abs(np.sum(grad * direction) - numeric) <= rtol * max(floor, abs(numeric)), path
        assert np.any(grad != 0), path
        checked.append(".".join(map(str, path)))
    direction = rng.normal(size=x.shape)
    numeric = (
        np.sum(reference(module, x + eps * direction) * cotangent) - np.sum(reference(module, x - eps * direction) * cotangent)
    ) / (2 * eps)
    assert np.abs(np.sum(np.asarray(x_grad) * direction) - numeric) <= rtol * max(floor, abs(numeric))
    return checked


def check_gradients(
    module: nnx.Module,
    x: np.ndarray,
    cotangent: np.ndarray,
    reference: Callable[[nnx.Module, np.ndarray], np.ndarray],
    rng: np.random.Generator,
    **tolerances,
) -> list[str]:
    """:func:`weighted_sum_grads` then :func:`check_finite_differences`; returns the checked paths."""
    grads, x_grad = weighted_sum_grads(module, x, cotangent)
    return check_finite_differences(module, x, cotangent, grads, x_grad, reference, rng, **tolerances)
