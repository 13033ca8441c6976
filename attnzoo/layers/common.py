"""Pieces every mixer shares: parameter annotation, mesh helpers, norms, MLP, RoPE, short convolution.

Logical axis names
------------------
Parameters carry logical axis names (``nnx.with_partitioning``); a config maps them to mesh axes
with ``nnx.logical_axis_rules`` (layer code never names a mesh axis for a parameter):

==============  ================================================================
``embed``       model width ``D`` (input of q/k/v and MLP, output of o and MLP)
``heads``       query heads ``Hq``
``kv_heads``    key/value heads ``Hkv`` (GQA/MQA)
``head_dim``    features per head
``mlp``         MLP hidden width
``norm``        norm scale / bias vectors
``conv_kernel`` taps of a short convolution
==============  ================================================================

A parameter is sharded eagerly at creation only when a mesh is active and either logical rules are
set or every name is itself a mesh axis; otherwise the names are kept as metadata only (read them
with ``nnx.get_partition_spec``), so layers can be built without a mesh.

Activation sharding for Pallas calls: the SPMD partitioner does not partition Pallas kernels, so
:func:`shard_map_batch_heads` runs a per-shard function under ``jax.shard_map`` over the mesh axes
named by a :class:`MeshAxes` (default batch ``("data", "fsdp")``, heads ``"tensor"``). Without a
mesh it simply calls the function.

Recurrent mixers (linear attention, delta rule) subclass :class:`RecurrentMixer`: argument checks,
the decoding cache, short convolutions and the call of a :mod:`attnzoo.pallas_kernels.linear_rnn`
op (or its one-token step), shard-mapped over batch and heads for Pallas under a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.core.spmd as flax_spmd
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels import linear_rnn as pk_linear_rnn
from attnzoo.pallas_kernels.common import check_float, check_int

Initializer = Callable[..., jax.Array]
DType = Any

__all__ = [
    "RecurrentMixer",
    "check_bool",
    "check_choice",
    "as_pair",
    "MeshAxes",
    "partitioned",
    "active_mesh",
    "head_shards",
    "shard_map_batch_heads",
    "compute_dtype",
    "project",
    "RMSNorm",
    "LayerNorm",
    "Dense",
    "MLP",
    "RotaryEmbedding",
    "apply_rope",
    "rope_inv_frequencies",
    "ShortConvolution",
    "GatedRMSNorm",
    "log_uniform_a_init",
    "dt_bias_init",
    "RecurrentCache",
    "padding_mask",
]


# ----------------------------------------------------------------------------------------------
# Argument checks (errors name the argument, what was seen and what was expected)
# ----------------------------------------------------------------------------------------------


def check_bool(owner: str, name: str, value) -> bool:
    """``value`` as a bool, or TypeError naming ``owner`` and ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_choice(owner: str, name: str, value, choices):
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def as_pair(owner: str, name: str, value, *, minimum: int = 1, check=None, single: str = "an int") -> tuple:
    """An item or a pair of items as ``(height, width)``; an item is an int ``>= minimum``, or what
    ``check(owner, name, item)`` returns (e.g. :func:`check_bool`). A sequence of another length
    raises ``ValueError`` saying ``{name} must be {single} or a (height, width) pair``."""
    if check is None:
        def check(owner, name, item):
            return check_int(owner, name, item, minimum=minimum)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}: {name} must be {single} or a (height, width) pair, got {value!r}")
        return check(owner, f"{name}[0]", value[0]), check(owner, f"{name}[1]", value[1])
    item = check(owner, name, value)
    return item, item


def check_heads(owner: str, dim, num_heads) -> tuple[int, int]:
    """``(dim, num_heads)`` checked: positive ints, ``num_heads`` dividing ``dim``."""
    dim = check_int(owner, "dim", dim)
    num_heads = check_int(owner, "num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"{owner}: num_heads ({num_heads}) must divide dim ({dim})")
    return dim, num_heads


def check_input(owner: str, x, *, ndim: int, last: int | None, layout: str):
    """Raises unless ``x`` is a floating array of rank ``ndim`` whose last axis is ``last``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{owner}: x must be an array {layout}, got {type(x).__name__}")
    if x.ndim != ndim or (last is not None and x.shape[-1] != last):
        want = f" with last axis {last}" if last is not None else ""
        raise ValueError(f"{owner}: x must have shape {layout}{want}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{owner}: x must have a floating dtype, got {x.dtype}")


def check_features(owner: str, x, features: int, layout: str):
    """Raises unless ``x`` is a floating array of rank >= 1 whose last axis is ``features``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{owner}: x must be an array {layout}, got {type(x).__name__}")
    check_input(owner, x, ndim=max(x.ndim, 1), last=features, layout=layout)


def compute_dtype(dtype: DType | None, *arrays_or_dtypes) -> DType:
    """``dtype`` if given, else the promotion of the inputs' and parameters' dtypes (Flax's rule)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*[getattr(a, "dtype", a) for a in arrays_or_dtypes])


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """GELU, exact ``x * (1 + erf(x / sqrt(2))) / 2`` or with ``approximate`` the tanh form; x's dtype.

    The exact form is written with ``erf`` (as torch computes it): ``jax.nn.gelu``'s ``erfc`` form
    expands on XLA:CPU into an exponential and a division per element, ~2.4x slower (ViT-Ti MLP,
    8 x 197 x 768). They agree to a few units in the last place, except for x < -3, where
    ``1 + erf`` cancels: an absolute error below 1e-6 on values below 4e-3 in magnitude.
    """
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, accumulate: DType) -> jax.Array:
    """``x [N, K] @ w [K, M]`` accumulated (and returned) in ``accumulate``; the same values and
    derivatives (forward and reverse mode, any order) as ``jnp.dot(..., preferred_element_type=)``.

    Only the reverse-mode program differs: its input gradient ``dy @ w^T`` reads a transposed copy
    of ``w`` made once in the forward pass, instead of contracting ``w``'s minor axis. XLA:CPU
    runs that form 1.6-1.8x slower (e.g. [1568, 1024] x [256, 1024]^T: 8.9 ms against 5.3 ms for
    the same product with w stored [1024, 256]), which made the backward of every dense layer
    the largest single cost of a ViT, Swin or MaxViT train step on CPU.
    """
    return jnp.dot(x, w, preferred_element_type=accumulate)


def _matmul_jvp(accumulate, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = jnp.dot(x, w, preferred_element_type=accumulate)
    dy = jnp.zeros(y.shape, y.dtype)
    if type(dx) is not jax.custom_derivatives.SymbolicZero:
        # The barrier keeps XLA from folding the double transpose away: transposing this linear
        # map for the backward then contracts w_t's leading axis, the fast form.
        w_t = jax.lax.optimization_barrier(w.T)
        dy = dy + jnp.dot(dx, w_t.T, preferred_element_type=accumulate)
    if type(dw) is not jax.custom_derivatives.SymbolicZero:
        dy = dy + jnp.dot(x, dw, preferred_element_type=accumulate)
    return y, dy


matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def project(x: jax.Array, kernel: jax.Array, num_in: int, dtype: DType, bias: jax.Array | None = None):
    """Contracts the last ``num_in`` axes of ``x`` with the first ``num_in`` axes of ``kernel``
    (+ ``bias``), operands in ``dtype``, accumulated in at least float32, result in ``dtype``.

    The contraction runs as one 2-D matmul ``[N, prod(in)] @ [prod(in), prod(out)]``: XLA:CPU runs
    the weight gradient of a matmul with several batch-like axes ~3x slower than the flattened one.
    Accumulating bfloat16 operands into float32 (``preferred_element_type``) is both more accurate
    and, on CPU, ~3x faster than a bfloat16 result.
    """
    lead, in_shape = x.shape[: x.ndim - num_in], kernel.shape[:num_in]
    out_shape = kernel.shape[num_in:]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    accumulate = jnp.promote_types(dtype, jnp.float32)
    y = matmul(x.reshape(-1, fan_in).astype(dtype), kernel.reshape(fan_in, fan_out).astype(dtype), accumulate)
    if bias is not None:
        y = y + bias.reshape(fan_out).astype(accumulate)
    return y.reshape(*lead, *out_shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Parameter annotation and mesh helpers
# ----------------------------------------------------------------------------------------------


def active_mesh():
    """The mesh set with ``jax.set_mesh`` (an ``AbstractMesh``), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def partitioned(initializer: Initializer, logical_axes: Sequence[str | None]) -> Initializer:
    """Wraps ``initializer`` so the parameter carries ``logical_axes`` (one name or None per axis).

    Eager sharding (Flax's default) needs a mesh and names it can resolve; it is used only when a
    mesh is active and logical rules are set (or the names are mesh axes). Otherwise the names are
    recorded as metadata and the parameter is created unsharded.
    """
    logical_axes = tuple(logical_axes)
    mesh = active_mesh()
    eager = mesh is not None and (
        bool(flax_spmd.get_logical_axis_rules())
        or all(name is None or name in mesh.axis_names for name in logical_axes)
    )
    return nnx.with_partitioning(initializer, logical_axes, eager_sharding=eager)


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Which mesh axes shard activations for ``shard_map``-wrapped (Pallas) calls.

    Attributes:
      batch: mesh axes sharing the batch dimension, outermost first. Names absent from the active
        mesh are ignored.
      heads: the mesh axis sharding attention heads (tensor parallelism), or None.
    """

    batch: tuple[str, ...] = ("data", "fsdp")
    heads: str | None = "tensor"

    def __post_init__(self):
        batch = (self.batch,) if isinstance(self.batch, str) else tuple(self.batch)
        object.__setattr__(self, "batch", batch)


def _resolved_axes(mesh, mesh_axes: MeshAxes):
    """The requested axes that exist in ``mesh`` and are not already manual (inside a shard_map)."""
    usable = set(mesh.axis_names) - set(mesh.manual_axes)
    batch = tuple(a for a in mesh_axes.batch if a in usable)
    heads = mesh_axes.heads if mesh_axes.heads in usable else None
    return batch, heads


def head_shards(mesh_axes: MeshAxes) -> int:
    """Size of the head mesh axis in the active mesh (1 without a mesh or without that axis)."""
    mesh = active_mesh()
    if mesh is None:
        return 1
    _, heads = _resolved_axes(mesh, mesh_axes)
    return 1 if heads is None else mesh.shape[heads]


def shard_map_batch_heads(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array],
    layouts: Sequence[str],
    out_layout: str | tuple[str, ...],
    mesh_axes: MeshAxes,
    *,
    owner: str = "shard_map_batch_heads",
):
    """Calls ``fn(*args)`` per shard of batch and heads when a mesh is active, else directly.

    Args:
      fn: a function of per-shard arrays returning one array (e.g. a Pallas attention call), or a
        tuple of arrays when ``out_layout`` is a tuple.
      args: the global arrays.
      layouts: one string per arg naming its axes: ``"B"`` is sharded over ``mesh_axes.batch``,
        ``"H"`` over ``mesh_axes.heads``, any other letter is replicated, e.g. ``"BTHD"`` for
        ``[B,T,H,D]`` activations, ``"BT"`` for segment ids, ``"B"`` for lengths.
      out_layout: the layout of the result (a tuple of layouts for a tuple of results).
      mesh_axes: the mesh axis names to use.

    Batch is sharded over the longest prefix of ``mesh_axes.batch`` (those present in the mesh)
    whose total size divides it, heads over ``mesh_axes.heads`` if every head dimension divides by
    its size; otherwise that dimension is replicated (correct, but every shard computes it).
    """
    mesh = active_mesh()
    if mesh is None or mesh.are_all_axes_manual:
        return fn(*args)
    if len(args) != len(layouts):
        raise ValueError(f"{owner}: {len(args)} arguments but {len(layouts)} layouts")
    batch_dims, head_dims = [], []
    for index, (array, layout) in enumerate(zip(args, layouts)):
        if len(layout) != array.ndim:
            raise ValueError(f"{owner}: layout {layout!r} does not match argument {index} of shape {array.shape}")
        batch_dims += [array.shape[axis] for axis, letter in enumerate(layout) if letter == "B"]
        head_dims += [array.shape[axis] for axis, letter in enumerate(layout) if letter == "H"]
    candidate_batch, head_axis = _resolved_axes(mesh, mesh_axes)
    batch_axes, batch_shards = [], 1
    for axis in candidate_batch:
        if all(dim % (batch_shards * mesh.shape[axis]) == 0 for dim in batch_dims):
            batch_axes.append(axis)
            batch_shards *= mesh.shape[axis]
        else:
            break
    if head_axis is not None and any(dim % mesh.shape[head_axis] for dim in head_dims):
        head_axis = None

    def spec(layout: str) -> PartitionSpec:
        entries = []
        for letter in layout:
            if letter == "B" and batch_axes:
                entries.append(tuple(batch_axes) if len(batch_axes) > 1 else batch_axes[0])
            elif letter == "H" and head_axis is not None:
                entries.append(head_axis)
            else:
                entries.append(None)
        return PartitionSpec(*entries)

    mapped = jax.shard_map(
        fn,
        in_specs=tuple(spec(layout) for layout in layouts),
        out_specs=tuple(spec(layout) for layout in out_layout) if isinstance(out_layout, tuple) else spec(out_layout),
        check_vma=False,
    )
    return mapped(*args)


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis: ``x / sqrt(mean(x^2) + eps) * scale``.

    Statistics are computed in float32 (or wider); the result is in ``dtype`` (default: the
    promotion of the input and parameter dtypes).

    Args:
      num_features: size of the normalised (last) axis.
      epsilon: added to the mean square.
      use_scale: learn a ``[num_features]`` scale (initialised to ones).
      dtype: compute/output dtype. param_dtype: dtype of the scale.
      logical_axes: logical name of the scale's axis.
      rngs: unused (accepted for a uniform constructor).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        use_scale: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logical_axes: tuple[str | None] = ("norm",),
        rngs: nnx.Rngs | None = None,
    ):
        self.num_features = check_int("RMSNorm", "num_features", num_features)
        self.epsilon = check_float("RMSNorm", "epsilon", epsilon, positive=True, allow_none=False)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.scale = (
            nnx.Param(partitioned(nnx.initializers.ones, logical_axes)(None, (num_features,), param_dtype))
            if use_scale
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., num_features]`` -> same shape in the compute dtype."""
        check_features("RMSNorm", x, self.num_features, "[..., F]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(stat_dtype)
        mean_square = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(mean_square + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...].astype(stat_dtype)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """Layer norm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics in float32 (or wider); result in ``dtype`` (default: promotion of input and params).

    Args:
      num_features: size of the normalised (last) axis.
      epsilon: added to the variance.
      use_scale / use_bias: learn ``[num_features]`` scale (ones) / bias (zeros).
      dtype, param_dtype, logical_axes, rngs: as in :class:`RMSNorm`.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logical_axes: tuple[str | None] = ("norm",),
        rngs: nnx.Rngs | None = None,
    ):
        self.num_features = check_int("LayerNorm", "num_features", num_features)
        self.epsilon = check_float("LayerNorm", "epsilon", epsilon, positive=True, allow_none=False)
        self.dtype = dtype
        self.param_dtype = param_dtype
        shape = (num_features,)
        self.scale = (
            nnx.Param(partitioned(nnx.initializers.ones, logical_axes)(None, shape, param_dtype)) if use_scale else None
        )
        self.bias = (
            nnx.Param(partitioned(nnx.initializers.zeros, logical_axes)(None, shape, param_dtype)) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., num_features]`` -> same shape in the compute dtype."""
        check_features("LayerNorm", x, self.num_features, "[..., F]")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(stat_dtype)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(variance + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...].astype(stat_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(stat_dtype)
        return y.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Dense projections and the MLP
# ----------------------------------------------------------------------------------------------


def _as_shape(owner: str, name: str, features) -> tuple[int, ...]:
    features = (features,) if isinstance(features, (int, np.integer)) else tuple(features)
    if not features:
        raise ValueError(f"{owner}: {name} must be an int or a non-empty tuple of ints, got {features!r}")
    return tuple(check_int(owner, f"{name}[{i}]", f) for i, f in enumerate(features))


class Dense(nnx.Module):
    """A linear map over several trailing axes: ``x [..., *in_features] -> [..., *out_features]``.

    The kernel is ``[*in_features, *out_features]`` (e.g. ``[D, H, Dh]`` for a query projection,
    so heads can be sharded as their own axis), initialised Lecun-normal with fan-in the product of
    ``in_features``. Operands are cast to the compute dtype and accumulated in at least float32.

    Args:
      in_features / out_features: an int or a tuple of ints.
      logical_axes: one logical name per kernel axis (see the module docstring); the bias uses the
        names of the output axes.
      use_bias: learn a bias ``[*out_features]`` (zeros).
      dtype: compute dtype (default: promotion of input and params). param_dtype: parameter dtype.
      kernel_init: an ``nnx.initializers`` initializer for the kernel shape.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        logical_axes: Sequence[str | None],
        use_bias: bool = False,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = _as_shape("Dense", "in_features", in_features)
        self.out_features = _as_shape("Dense", "out_features", out_features)
        num_in, num_out = len(self.in_features), len(self.out_features)
        logical_axes = tuple(logical_axes)
        if len(logical_axes) != num_in + num_out:
            raise ValueError(
                f"Dense: logical_axes needs {num_in + num_out} names for kernel shape "
                f"{self.in_features + self.out_features}, got {logical_axes!r}"
            )
        self.dtype = dtype
        self.param_dtype = param_dtype
        if kernel_init is None:
            kernel_init = nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal",
                in_axis=tuple(range(num_in)), out_axis=tuple(range(num_in, num_in + num_out)),
            )
        shape = self.in_features + self.out_features
        self.kernel = nnx.Param(partitioned(kernel_init, logical_axes)(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(partitioned(nnx.initializers.zeros, logical_axes[num_in:])(None, self.out_features, param_dtype))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., *in_features]`` -> ``[..., *out_features]`` in the compute dtype."""
        num_in = len(self.in_features)
        if not hasattr(x, "shape") or x.ndim < num_in or tuple(x.shape[x.ndim - num_in :]) != self.in_features:
            raise ValueError(f"Dense: x must end in axes {self.in_features}, got shape {getattr(x, 'shape', None)}")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        bias = None if self.bias is None else self.bias[...]
        return project(x, self.kernel[...], num_in, dtype, bias)


class MLP(nnx.Module):
    """Feed-forward block ``[..., D] -> [..., D]``.

    ``kind="swiglu"``: ``down(silu(gate(x)) * up(x))`` (Llama); ``kind="gelu"``: ``down(gelu(up(x)))``
    (ViT/GPT). Kernels: ``gate``/``up`` ``[D, hidden]`` (``("embed", "mlp")``), ``down``
    ``[hidden, D]`` (``("mlp", "embed")``); optional biases.

    Args:
      dim: model width ``D``.
      hidden_dim: hidden width; default ``4 * dim`` for gelu and ``8 * dim / 3`` rounded up to a
        multiple of ``multiple_of`` for swiglu (about the parameter count of gelu's ``4 * dim``).
      kind: "swiglu" or "gelu". use_bias: learn biases. approximate_gelu: tanh GELU instead of erf.
      multiple_of: rounding of the default swiglu hidden width.
      dtype: compute dtype (default: promotion of input and params). param_dtype: kernel dtype.
      kernel_init: initializer of the three kernels (default Lecun normal).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        *,
        kind: str = "swiglu",
        use_bias: bool = False,
        approximate_gelu: bool = False,
        multiple_of: int = 8,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.dim = check_int("MLP", "dim", dim)
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"MLP: kind must be 'swiglu' or 'gelu', got {kind!r}")
        multiple_of = check_int("MLP", "multiple_of", multiple_of)
        if hidden_dim is None:
            hidden_dim = 4 * dim if kind == "gelu" else -(-int(8 * dim / 3) // multiple_of) * multiple_of
        self.hidden_dim = check_int("MLP", "hidden_dim", hidden_dim)
        self.kind = kind
        self.approximate_gelu = approximate_gelu
        self.dtype = dtype
        self.param_dtype = param_dtype
        options = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.up = Dense(dim, self.hidden_dim, logical_axes=("embed", "mlp"), **options)
        self.gate = Dense(dim, self.hidden_dim, logical_axes=("embed", "mlp"), **options) if kind == "swiglu" else None
        self.down = Dense(self.hidden_dim, dim, logical_axes=("mlp", "embed"), **options)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., D]`` -> ``[..., D]`` in the compute dtype."""
        check_features("MLP", x, self.dim, "[..., D]")
        up = self.up(x)
        if self.gate is not None:
            hidden = jax.nn.silu(self.gate(x)) * up
        else:
            hidden = gelu(up, approximate=self.approximate_gelu)
        return self.down(hidden)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------


def rope_inv_frequencies(rotary_dim: int, theta: float, dtype: DType = jnp.float32) -> jax.Array:
    """``theta ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``, ``[rotary_dim // 2]`` in ``dtype``
    (computed in float64 and rounded once)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return jnp.asarray(1.0 / (theta**exponents), dtype)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    theta: float = 10000.0,
    rotary_dim: int | None = None,
) -> jax.Array:
    """Rotary position embedding, rotate-half convention (Llama / Hugging Face / GPT-NeoX).

    The first ``rotary_dim`` features (default: all) are split in halves ``(x1, x2)`` and rotated:
    ``(x1 cos - x2 sin, x2 cos + x1 sin)`` with angle ``position * theta ** (-2i / rotary_dim)``.
    Remaining features pass through unchanged.

    Args:
      x: ``[B, T, H, D]`` (any float dtype).
      positions: ``[B, T]`` or ``[T]`` int positions; packed sequences restart them per document.
      theta: the RoPE base. rotary_dim: even number of rotated features, ``<= D``.

    Returns ``[B, T, H, D]`` in x's dtype; angles and the rotation are computed in float32 (float64
    for float64 inputs).
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must have shape [B,T,H,D], got {tuple(x.shape)}")
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"apply_rope: rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}")
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    if positions.ndim != 2 or positions.shape[-1] != x.shape[1] or positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"apply_rope: positions must have shape [B,T] or [T] = {tuple(x.shape[:2])}, got {tuple(positions.shape)}"
        )
    compute = jnp.promote_types(x.dtype, jnp.float32)
    angles = positions.astype(compute)[:, :, None] * rope_inv_frequencies(rotary_dim, theta, compute)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    rotated, passthrough = x[..., :rotary_dim].astype(compute), x[..., rotary_dim:]
    first, second = jnp.split(rotated, 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([out, passthrough], axis=-1) if rotary_dim < head_dim else out


class RotaryEmbedding(nnx.Module):
    """Rotary position embedding as a (parameter-free) module; see :func:`apply_rope`.

    Args:
      head_dim: features per head ``D``. theta: the RoPE base.
      rotary_dim: rotated features (even, default ``head_dim``), the rest pass through.
    """

    def __init__(self, head_dim: int, *, theta: float = 10000.0, rotary_dim: int | None = None):
        self.head_dim = check_int("RotaryEmbedding", "head_dim", head_dim)
        self.theta = check_float("RotaryEmbedding", "theta", theta, positive=True, allow_none=False)
        rotary_dim = head_dim if rotary_dim is None else check_int("RotaryEmbedding", "rotary_dim", rotary_dim)
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be even and <= head_dim={head_dim}, got {rotary_dim}")
        self.rotary_dim = rotary_dim

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x ``[B,T,H,head_dim]``, positions ``[B,T]`` or ``[T]`` -> rotated x (same dtype)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: x's last axis must be head_dim={self.head_dim}, got {tuple(x.shape)}")
        return apply_rope(x, positions, theta=self.theta, rotary_dim=self.rotary_dim)


# ----------------------------------------------------------------------------------------------
# Short causal convolution
# ----------------------------------------------------------------------------------------------


class ShortConvolution(nnx.Module):
    """Depthwise causal convolution over time (as in Mamba, DeltaNet, GLA's short conv).

    ``y[t, c] = act(bias[c] + sum_k weight[k, c] * x[t - (K-1) + k, c])``: ``weight[K-1]`` multiplies
    the current token. With ``segment_ids``, taps reaching into another segment read zero, so packed
    documents do not leak into each other.

    Decoding: ``state = m.init_state(batch)`` holds the last ``K-1`` inputs ``[B, K-1, C]``;
    ``y_t, state = m.step(x_t, state)`` equals the full forward token by token. A full forward can
    start from a state and return its final state (``state=``, ``return_state=True``).

    Args:
      channels: ``C``. kernel_size: ``K`` (default 4). activation: "silu" or None.
      use_bias: learn a ``[C]`` bias. dtype / param_dtype: compute / parameter dtypes.
      logical_axes: names of the weight's ``[K, C]`` axes (default ``("conv_kernel", "embed")``).
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Parameters: ``weight [K, C]`` (uniform in ``+-1/sqrt(K)``, PyTorch's Conv1d default), ``bias [C]``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        *,
        activation: str | None = "silu",
        use_bias: bool = False,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logical_axes: tuple[str | None, str | None] = ("conv_kernel", "embed"),
        rngs: nnx.Rngs,
    ):
        self.channels = check_int("ShortConvolution", "channels", channels)
        self.kernel_size = check_int("ShortConvolution", "kernel_size", kernel_size)
        if activation not in (None, "silu"):
            raise ValueError(f"ShortConvolution: activation must be 'silu' or None, got {activation!r}")
        self.activation = activation
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=0, out_axis=1)
        self.weight = nnx.Param(partitioned(init, logical_axes)(rngs.params(), (kernel_size, channels), param_dtype))
        self.bias = (
            nnx.Param(partitioned(nnx.initializers.zeros, logical_axes[1:])(None, (channels,), param_dtype))
            if use_bias
            else None
        )

    def init_state(self, batch: int, dtype: DType | None = None) -> jax.Array:
        """Zero decoding state ``[batch, K-1, C]`` (dtype default: compute dtype or param dtype)."""
        dtype = dtype or self.dtype or self.param_dtype
        return jnp.zeros((batch, self.kernel_size - 1, self.channels), dtype)

    def _finish(self, y: jax.Array, dtype) -> jax.Array:
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.activation == "silu":
            y = jax.nn.silu(y)
        return y.astype(dtype)

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        state: jax.Array | None = None,
        return_state: bool = False,
        lengths: jax.Array | None = None,
    ):
        """Full causal convolution.

        Args:
          x: ``[B, T, C]``.
          segment_ids: ``[B, T]`` ints; taps never cross a segment boundary.
          state: ``[B, K-1, C]`` previous inputs (e.g. from a prefill); default zeros. Ignored by
            positions whose taps stay inside a segment that started in this call.
          return_state: also return the state after the last token (or after ``lengths[b]`` tokens).
          lengths: ``[B]`` valid tokens per row (right padding) used for the returned state.

        Returns ``y [B, T, C]`` in the compute dtype, and with ``return_state`` the new state
        ``[B, K-1, C]`` in the state's dtype.
        """
        check_input("ShortConvolution", x, ndim=3, last=self.channels, layout="[B,T,C]")
        batch, length, _ = x.shape
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        taps = self.kernel_size - 1
        if state is None:
            state = self.init_state(batch, dtype)
        elif state.shape != (batch, taps, self.channels):
            raise ValueError(
                f"ShortConvolution: state must have shape {(batch, taps, self.channels)} [B,K-1,C], got {state.shape}"
            )
        if segment_ids is not None and tuple(segment_ids.shape) != (batch, length):
            raise ValueError(f"ShortConvolution: segment_ids must have shape {(batch, length)} [B,T], got {segment_ids.shape}")
        history = jnp.concatenate([state.astype(accumulate), x.astype(accumulate)], axis=1)  # [B, K-1+T, C]
        weight = self.weight[...].astype(accumulate)
        y = jnp.zeros((batch, length, self.channels), accumulate)
        if segment_ids is not None:
            # starts[t]: token t begins a new segment. The state counts as the first segment's past.
            starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
            starts_padded = jnp.pad(starts, ((0, 0), (taps, 0)))
            no_boundary = jnp.ones((batch, length), bool)
        for lag in range(self.kernel_size):
            shifted = history[:, taps - lag : taps - lag + length]  # x[t - lag] (from state when t < lag)
            if segment_ids is not None and lag > 0:
                # Tap t - lag is read only if no segment starts in (t - lag, t].
                no_boundary = no_boundary & ~starts_padded[:, taps - lag + 1 : taps - lag + 1 + length]
                shifted = shifted * no_boundary[..., None].astype(accumulate)
            y = y + shifted * weight[taps - lag]
        y = self._finish(y, dtype)
        if not return_state:
            return y
        if lengths is None:
            new_state = history[:, length:]
        else:
            lengths = jnp.asarray(lengths, jnp.int32)
            new_state = jax.vmap(lambda h, n: jax.lax.dynamic_slice_in_dim(h, n, taps, axis=0))(history, lengths)
        return y, new_state.astype(state.dtype)

    def step(self, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One decoding step: x_t ``[B, C]``, state ``[B, K-1, C]`` -> (y_t ``[B, C]``, new state)."""
        check_input("ShortConvolution.step", x_t, ndim=2, last=self.channels, layout="[B,C]")
        dtype = compute_dtype(self.dtype, x_t, self.param_dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        window = jnp.concatenate([state.astype(accumulate), x_t[:, None, :].astype(accumulate)], axis=1)  # [B,K,C]
        y = jnp.einsum("bkc,kc->bc", window, self.weight[...].astype(accumulate))
        return self._finish(y, dtype), window[:, 1:].astype(state.dtype)


# ----------------------------------------------------------------------------------------------
# Pieces of recurrent (linear-attention / delta-rule) mixers
# ----------------------------------------------------------------------------------------------


class GatedRMSNorm(nnx.Module):
    """RMSNorm of each head's output and an activated gate.

    ``rms(o) * scale * act(gate)`` by default: fla's ``FusedRMSNormGated`` (GLA, Gated DeltaNet:
    swish; KDA: sigmoid). With ``norm_before_gate=False`` the gate comes first,
    ``rms(o * act(gate)) * scale``, and with ``group_size`` the statistics are taken over groups of
    that many features: Mamba-2's ``RMSNormGated(norm_before_gate=False, group_size=d_inner / G)``.
    Statistics in float32.

    Args:
      num_features: the normalised last axis (a head's value dim, the scale shared by heads; or
        a whole layer's width with per-feature scales).
      activation: "silu" (swish) or "sigmoid". epsilon: added to the mean square.
      norm_before_gate: normalise, then gate (True) or gate, then normalise (False).
      group_size: features per normalisation group (a divisor of num_features; default all).
      dtype / param_dtype: compute / parameter dtypes. rngs: unused (uniform constructor).

    Parameters: ``norm.scale [num_features]`` (norm).
    """

    def __init__(
        self,
        num_features: int,
        *,
        activation: str = "silu",
        epsilon: float = 1e-5,
        norm_before_gate: bool = True,
        group_size: int | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        owner = "GatedRMSNorm"
        self.activation = check_choice(owner, "activation", activation, ("silu", "sigmoid"))
        self.norm_before_gate = check_bool(owner, "norm_before_gate", norm_before_gate)
        num_features = check_int(owner, "num_features", num_features)
        self.group_size = num_features if group_size is None else check_int(owner, "group_size", group_size)
        if num_features % self.group_size:
            raise ValueError(f"{owner}: group_size ({self.group_size}) must divide num_features ({num_features})")
        self.norm = RMSNorm(num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        """x, gate ``[..., num_features]`` -> same shape in the compute dtype."""
        if gate.shape != x.shape:
            raise ValueError(f"GatedRMSNorm: gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
        act = jax.nn.silu if self.activation == "silu" else jax.nn.sigmoid
        if self.norm_before_gate and self.group_size == self.norm.num_features:
            y = self.norm(x)
            stat_dtype = jnp.promote_types(y.dtype, jnp.float32)
            return (y.astype(stat_dtype) * act(gate.astype(stat_dtype))).astype(y.dtype)
        check_features("GatedRMSNorm", x, self.norm.num_features, "[..., F]")
        dtype = compute_dtype(self.norm.dtype, x, self.norm.param_dtype)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        y = x.astype(stat_dtype)
        gate = act(gate.astype(stat_dtype))
        if not self.norm_before_gate:
            y = y * gate
        grouped = y.reshape(y.shape[:-1] + (-1, self.group_size))
        mean_square = jnp.mean(jnp.square(grouped), axis=-1, keepdims=True)
        y = (grouped * jax.lax.rsqrt(mean_square + self.norm.epsilon)).reshape(y.shape)
        y = y * self.norm.scale[...].astype(stat_dtype)
        if self.norm_before_gate:
            y = y * gate
        return y.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Initialisers of decay rates (Mamba-2, fla's gated layers)
# ----------------------------------------------------------------------------------------------

# Mamba-2 / fla initialisation of the decay time step.
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


def log_uniform_a_init(low: float, high: float) -> Initializer:
    """``A_log = log(A)``, ``A ~ U[low, high)`` (Mamba-2 / fla); ``A = 0`` gives ``log(tiny)``."""

    def init(key, shape, dtype=jnp.float32):
        a = jax.random.uniform(key, shape, jnp.float32, low, high)
        return jnp.log(jnp.maximum(a, jnp.finfo(jnp.float32).tiny)).astype(dtype)

    return init


def dt_bias_init(dt_min: float = DT_MIN, dt_max: float = DT_MAX, floor: float = DT_INIT_FLOOR) -> Initializer:
    """``dt_bias = softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` floored at
    ``floor``, so ``softplus(dt_bias) = dt`` at initialisation (Mamba, Mamba-2, fla)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RecurrentCache:
    """Decoding cache of a recurrent mixer (linear attention, delta rule, SSM).

    Attributes:
      state: ``[B, H, K, V]`` float32 recurrent state after the tokens seen so far.
      conv: short-convolution states, a tuple of ``[B, kernel-1, C]`` arrays (empty if none).
      lengths: ``[B]`` int32 tokens seen per row.
      extra: mixer-specific arrays (e.g. a sliding-window KV cache), a tuple (often empty).
    """

    state: jax.Array
    conv: tuple = ()
    lengths: jax.Array | None = None
    extra: tuple = ()


def padding_mask(valid_lengths: jax.Array | None, batch: int, length: int) -> jax.Array | None:
    """``[B, T]`` bool, True at real tokens of right-padded rows (None when every token is real).

    Recurrent mixers zero keys, values and log-decays at padding, which leaves the state unchanged,
    so a prefill of rows with different lengths ends each row's state after its own last token.
    """
    if valid_lengths is None:
        return None
    valid_lengths = jnp.asarray(valid_lengths)
    if valid_lengths.shape != (batch,) or not jnp.issubdtype(valid_lengths.dtype, jnp.integer):
        raise ValueError(
            f"valid_lengths must be an int array of shape {(batch,)} [B], got "
            f"{valid_lengths.dtype}{tuple(valid_lengths.shape)}"
        )
    return jnp.arange(length)[None, :] < valid_lengths[:, None]


def check_mixer_call(owner: str, x, dim: int, segment_ids, cache, valid_lengths, check_cache=None):
    """The argument checks every cached 1-D mixer makes on ``x [B, T, D]``, ``segment_ids [B, T]``,
    ``cache`` and ``valid_lengths [B]`` (errors name ``owner``). ``check_cache(cache, batch)``
    validates a given cache. Returns the padding mask ``[B, T]`` bool, or None (every token real)."""
    check_input(owner, x, ndim=3, last=dim, layout="[B,T,D]")
    batch, length, _ = x.shape
    if segment_ids is not None:
        if cache is not None:
            raise ValueError(f"{owner}: segment_ids cannot be combined with a cache; decode one sequence per row")
        if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
            raise TypeError(f"{owner}: segment_ids must be an int array [B,T], got {type(segment_ids).__name__}")
        if tuple(segment_ids.shape) != (batch, length) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"{owner}: segment_ids must be an int array of shape {(batch, length)} [B,T], "
                f"got {segment_ids.dtype}{tuple(segment_ids.shape)}"
            )
    if cache is None:
        if valid_lengths is not None:
            raise ValueError(f"{owner}: valid_lengths needs a cache (use segment_ids for packing)")
        return None
    if check_cache is not None:
        check_cache(cache, batch)
    try:
        return padding_mask(valid_lengths, batch, length)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Recurrent mixers: the machinery shared by the linear-attention and delta-rule mixers
# ----------------------------------------------------------------------------------------------

# The ops a recurrent mixer can run, and which gate / beta inputs each takes.
_OP_INPUTS = {
    "linear_attention": (False, False),
    "simple_gla": (True, False),
    "gla": (True, False),
    "delta_rule": (False, True),
    "gated_delta_rule": (True, True),
    "kda": (True, True),
}


def _flat_conv(conv: ShortConvolution, x: jax.Array, **kwargs):
    """A short convolution over the flattened trailing axes of ``x [B, T, ...]``."""
    batch, length = x.shape[:2]
    out = conv(x.reshape(batch, length, -1), **kwargs)
    if isinstance(out, tuple):
        return out[0].reshape(x.shape), out[1]
    return out.reshape(x.shape)


class RecurrentMixer(nnx.Module):
    """Base of the recurrent mixers: argument checks, the decoding cache, short convolutions and
    the dispatch to the linear-RNN op.

    A subclass

    * sets ``_op``, the op it runs (``"linear_attention"``, ``"simple_gla"``, ``"gla"``,
      ``"delta_rule"``, ``"gated_delta_rule"`` or ``"kda"``), and may set ``_normalize``
      (normalised linear attention) and ``scale`` (None: the op's ``K ** -0.5``);
    * calls :meth:`_setup` first in its constructor;
    * defines ``_state_shape(batch) -> (B, H, K, V)``, the recurrent state of :meth:`init_cache`;
    * overrides ``_conv_modules()`` when it has short convolutions: their order is the order of
      ``cache.conv`` and of the ``index`` of :meth:`_convolve`;
    * in ``__call__``: ``mask = self._begin(x, ...)``, builds q, k, v (short convolutions through
      :meth:`_convolve`), ``out, state = self._recur(...)``, and returns :meth:`_finish`;
    * in ``flops``: ``seq_len = self._flops_seq_len(seq_len, kv_len)``.

    Errors name the concrete class (``"GatedDeltaNet: ..."``). Under an active mesh with ``impl``
    resolving to ``pallas``, the chunked op runs per shard of batch and heads in ``jax.shard_map``
    (:func:`shard_map_batch_heads`, axes from ``mesh_axes``): the SPMD partitioner does not split
    Pallas kernels. ``xla`` and ``reference``, and the one-token step (plain ``jnp``), are left to it.
    """

    _op = "linear_attention"
    _normalize = False
    scale: float | None = None

    def _setup(self, owner: str, dim: int, num_heads: int, *, impl: str, chunk_size: int,
               dtype: DType | None, param_dtype: DType, mesh_axes: MeshAxes):
        """Checks and records the arguments every recurrent mixer takes (errors name ``owner``)."""
        self.dim = check_int(owner, "dim", dim)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        self.impl = check_choice(owner, "impl", impl, pk_linear_rnn.IMPLS)
        chunk_size = check_int(owner, "chunk_size", chunk_size, minimum=16)
        if chunk_size & (chunk_size - 1):
            raise ValueError(f"{owner}: chunk_size must be a power of two >= 16, got {chunk_size}")
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        if not isinstance(mesh_axes, MeshAxes):
            raise TypeError(f"{owner}: mesh_axes must be a MeshAxes, got {type(mesh_axes).__name__}")
        self.mesh_axes = mesh_axes

    # -- cache ---------------------------------------------------------------------------------

    def _conv_modules(self) -> tuple[ShortConvolution, ...]:
        return ()

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> RecurrentCache:
        """An empty :class:`RecurrentCache` for ``batch`` rows.

        ``max_len`` is accepted for the uniform mixer interface: a recurrent state does not grow.
        ``dtype`` (default: compute dtype, else ``param_dtype``) is the short-convolution states'
        dtype; the recurrent state is float32 (float64 when ``dtype`` is float64).
        """
        owner = f"{type(self).__name__}.init_cache"
        batch = check_int(owner, "batch", batch)
        check_int(owner, "max_len", max_len)
        dtype = jnp.dtype(dtype or self.dtype or self.param_dtype)
        state = jnp.zeros(self._state_shape(batch), jnp.promote_types(dtype, jnp.float32))
        convs = tuple(conv.init_state(batch, dtype) for conv in self._conv_modules())
        return RecurrentCache(state=state, conv=convs, lengths=jnp.zeros((batch,), jnp.int32))

    def _check_cache(self, cache, batch: int):
        owner = type(self).__name__
        if not isinstance(cache, RecurrentCache):
            raise TypeError(f"{owner}: cache must be a RecurrentCache from init_cache, got {type(cache).__name__}")
        want = self._state_shape(batch)
        if tuple(cache.state.shape) != want:
            raise ValueError(f"{owner}: cache.state must have shape {want} [B,H,K,V], got {tuple(cache.state.shape)}")
        convs = self._conv_modules()
        if len(cache.conv) != len(convs):
            raise ValueError(
                f"{owner}: cache.conv must hold {len(convs)} short-convolution states, got {len(cache.conv)}"
            )
        for index, (conv, state) in enumerate(zip(convs, cache.conv)):
            shape = (batch, conv.kernel_size - 1, conv.channels)
            if tuple(state.shape) != shape:
                raise ValueError(
                    f"{owner}: cache.conv[{index}] must have shape {shape} [B,K-1,C], got {tuple(state.shape)}"
                )
        if cache.lengths is None or tuple(cache.lengths.shape) != (batch,):
            got = None if cache.lengths is None else tuple(cache.lengths.shape)
            raise ValueError(f"{owner}: cache.lengths must have shape ({batch},), got {got}")

    # -- forward pieces ------------------------------------------------------------------------

    def _begin(self, x, segment_ids, cache, valid_lengths):
        """Validates the call; returns the padding mask ``[B, T]`` bool, or None (every token real)."""
        return check_mixer_call(type(self).__name__, x, self.dim, segment_ids, cache, valid_lengths, self._check_cache)

    def _convolve(self, index: int, x, *, segment_ids, cache, mask, new_convs: list):
        """Short convolution ``index`` of :meth:`_conv_modules` over ``x [B,T,...]`` (trailing axes
        flattened). With a cache it starts from ``cache.conv[index]`` and appends its new state to
        ``new_convs``; a padding step (``mask`` False) leaves that row's state alone."""
        conv = self._conv_modules()[index]
        if cache is None:
            return _flat_conv(conv, x, segment_ids=segment_ids)
        state = cache.conv[index]
        batch, length = x.shape[:2]
        if length == 1:
            y, new_state = conv.step(x.reshape(batch, -1), state)
            if mask is not None:
                new_state = jnp.where(mask[:, :1, None], new_state, state)
            y = y.reshape(x.shape)
        else:
            lengths = None if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
            y, new_state = _flat_conv(conv, x, state=state, return_state=True, lengths=lengths)
        new_convs.append(new_state.astype(state.dtype))
        return y

    def _op_options(self) -> dict:
        options = dict(scale=self.scale)
        if self._op == "linear_attention":
            options["normalize"] = self._normalize
        return options

    def _recur(self, q, k, v, g=None, beta=None, *, segment_ids, cache, mask):
        """The recurrence: q, k ``[B,T,H,K]``, v ``[B,T,H,V]``, g ``[B,T,H]`` or ``[B,T,H,K]`` (gated
        ops), beta ``[B,T,H]`` (delta-rule ops).

        Keys, values and log-decays at padding (``mask`` False) are zeroed first: the state passes
        those tokens unchanged. Returns ``(o [B,T,H,V] in v's dtype, new state or None)``.
        """
        takes_gate, takes_beta = _OP_INPUTS[self._op]
        if mask is not None:
            k = jnp.where(mask[:, :, None, None], k, 0)
            v = jnp.where(mask[:, :, None, None], v, 0)
            if g is not None:
                g = jnp.where(mask.reshape(mask.shape + (1,) * (g.ndim - 2)), g, 0)
        extra = ((g,) if takes_gate else ()) + ((beta,) if takes_beta else ())
        options = self._op_options()
        if cache is not None and q.shape[1] == 1:
            step = getattr(pk, f"{self._op}_step")
            out, state = step(q[:, 0], k[:, 0], v[:, 0], *(x[:, 0] for x in extra), cache.state, **options)
            return out[:, None], state.astype(cache.state.dtype)
        options.update(chunk_size=self.chunk_size, impl=self.impl)
        initial = None if cache is None else cache.state
        out, final = self._chunked(q, k, v, extra, segment_ids, initial, options)
        return out, (None if final is None else final.astype(cache.state.dtype))

    def _chunked(self, q, k, v, extra, segment_ids, initial, options):
        """The chunked op, shard-mapped over batch and heads for Pallas under a mesh."""
        op = getattr(pk, self._op)
        named = {"q": q, "k": k, "v": v}
        named.update({f"extra{i}": x for i, x in enumerate(extra)})
        if segment_ids is not None:
            named["segment_ids"] = segment_ids
        if initial is not None:
            named["initial_state"] = initial
        names = tuple(named)

        def run(*arrays):
            got = dict(zip(names, arrays))
            result = op(
                got["q"], got["k"], got["v"], *(got[f"extra{i}"] for i in range(len(extra))),
                segment_ids=got.get("segment_ids"), initial_state=got.get("initial_state"),
                output_final_state=initial is not None, **options,
            )
            return result if initial is not None else result[0]

        if pk_common.resolve_impl(self.impl, type(self).__name__) != "pallas":
            result = run(*named.values())
        else:
            layouts = {"q": "BTHD", "k": "BTHD", "v": "BTHD", "segment_ids": "BT", "initial_state": "BHKV"}
            layouts.update({f"extra{i}": "BTH" + "D" * (x.ndim - 3) for i, x in enumerate(extra)})
            out_layout = ("BTHD", "BHKV") if initial is not None else "BTHD"
            result = shard_map_batch_heads(
                run, tuple(named.values()), tuple(layouts[name] for name in names), out_layout, self.mesh_axes,
                owner=type(self).__name__,
            )
        return result if initial is not None else (result, None)

    @staticmethod
    def _finish(y, cache, state, convs, mask, length):
        """``y`` alone, or ``(y, new cache)`` with lengths advanced by each row's valid tokens."""
        if cache is None:
            return y
        advance = length if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
        return y, RecurrentCache(
            state=state, conv=tuple(convs), lengths=cache.lengths + advance, extra=cache.extra
        )

    def _flops_seq_len(self, seq_len, kv_len) -> int:
        """Checks ``flops``' arguments; ``kv_len`` (a cache's length) does not change the cost."""
        owner = f"{type(self).__name__}.flops"
        seq_len = check_int(owner, "seq_len", seq_len)
        check_int(owner, "kv_len", kv_len, allow_none=True)
        return seq_len
