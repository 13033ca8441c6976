"""Test helpers: random parameters, parameter counts, a matmul FLOP counter over jaxprs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KNOWN_LOGICAL_AXES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers", "conv_kernel", None}


def randomize(module, seed=0, scale=0.3):
    """Random values in every parameter (biases, norm scales, embeddings included), in place.

    Also turns a module from ``nnx.eval_shape`` into a concrete one without running (and
    compiling) the initializers: see :func:`build`.
    """
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            current = variable.get_value()  # an array, or a ShapeDtypeStruct after nnx.eval_shape
            value = rng.normal(size=current.shape) * scale
            if path[-1] == "scale":  # norm scales around one
                value = value + 1.0
            variable.set_value(jnp.asarray(value, current.dtype))
    return module


def num_params(module) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))))


def logical_axes(module):
    """``{path: logical axis names}`` of every parameter (from the variables' metadata)."""
    state = nnx.state(module, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return {jax.tree_util.keystr(path): (v.get_metadata().get("out_sharding"), v.get_value().ndim) for path, v in leaves}


def _dot_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            out_size = int(np.prod(eqn.outvars[0].aval.shape))
            total += 2 * out_size * int(np.prod([lhs_shape[d] for d in contract]))
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            subs = value if isinstance(value, (tuple, list)) else (value,)
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += repeat * _dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeat * _dot_flops(sub)
    return total


def traced_matmul_flops(module, *args) -> int:
    """FLOPs of every ``dot_general`` that ``module(*args)`` traces to (2 per multiply-add; scan
    bodies counted ``length`` times)."""
    graphdef, state = nnx.split(module)
    jaxpr = jax.make_jaxpr(lambda state, *args: nnx.merge(graphdef, state)(*args))(state, *args)
    return _dot_flops(jaxpr.jaxpr)


def build(factory, seed=0, scale=0.3):
    """``factory()`` built abstractly and filled with random parameters (fast: no initializer
    is compiled). Every variable must be an ``nnx.Param``."""
    module = nnx.eval_shape(factory)
    others = nnx.state(module, nnx.Not(nnx.Param))
    assert not jax.tree.leaves(others), others
    return randomize(module, seed=seed, scale=scale)


# These tests are dominated by XLA compile time; the backend's optimisation passes halve it and
# do not matter for what is checked (IEEE arithmetic either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn):
    """``fn(module, *args)`` under ``jax.jit`` (module passed as its state), compiled with
    :data:`FAST_COMPILE`; one compiled program per module structure."""
    compiled = {}

    def call(module, *args):
        graphdef, state = nnx.split(module)
        if graphdef not in compiled:
            compiled[graphdef] = jax.jit(
                lambda state, *args: fn(nnx.merge(graphdef, state), *args), compiler_options=FAST_COMPILE
            )
        return compiled[graphdef](state, *args)

    return call
