"""Pieces the backbones share: stacked layers applied by scan or loop, remat policies, presets.

A :class:`LayerStack` holds ``N`` identical layers as one module whose parameters have a leading
``[N]`` axis (logical name ``"layers"``). It is built with ``nnx.split_rngs`` + ``nnx.vmap`` and
applied either with ``nnx.scan`` (one compiled layer body, compile time independent of ``N``) or
with a Python loop over slices ``i`` of the same parameters. The choice never changes the
parameter structure, so one set of parameters can be applied both ways.

>>> stack = LayerStack(lambda rngs: Block(64, rngs=rngs), 12, rngs=nnx.Rngs(0), remat="dots")
>>> y = stack(x, segment_ids=ids)             # calls block(x, segment_ids=ids) 12 times
>>> y, per_layer = stack(x, return_all=True)  # per_layer [12, *y.shape]
>>> cache = stack.init_cache(lambda layer: layer.init_cache(batch, max_len))   # leaves [12, ...]
>>> y, cache = stack(x, cache=cache)           # calls y, c_i = block(x, cache=c_i) 12 times
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from attnzoo.layers.common import MLP, compute_dtype
from attnzoo.pallas_kernels.common import check_int

__all__ = ["REMAT_POLICIES", "remat_policy", "LayerStack", "mixer_flops", "mlp_flops", "build_from_preset",
           "feature_indices", "classifier_logits"]

LAYERS_AXIS = "layers"
_STACK_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}

# name -> jax.checkpoint policy; "none" means no rematerialisation at all.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": None,
    "save_nothing": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str) -> tuple[bool, Callable[..., bool] | None]:
    """``(use_remat, policy)`` for a policy name.

    Names: ``"none"`` (no remat: every activation is kept for the backward pass), ``"full"`` /
    ``"save_nothing"`` (remat, save nothing: each layer is recomputed), ``"dots"``
    (``jax.checkpoint_policies.checkpoint_dots``: keep matmul outputs), ``"dots_no_batch"``
    (``dots_with_no_batch_dims_saveable``: keep matmul outputs without batch dimensions, i.e. the
    projections but not attention scores). Unknown names raise ``ValueError`` listing them.
    """
    if not isinstance(name, str) or name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {name!r}")
    return name != "none", REMAT_POLICIES[name]


def _call_layer(layer: nnx.Module, x: jax.Array, kwargs: dict[str, Any]) -> jax.Array:
    return layer(x, **kwargs)


def _call_cached_layer(layer: nnx.Module, x: jax.Array, cache: Any, kwargs: dict[str, Any]):
    return layer(x, cache=cache, **kwargs)


class LayerStack(nnx.Module):
    """``num_layers`` identical layers with stacked parameters, applied in sequence.

    Args:
      make_layer: ``make_layer(rngs) -> nnx.Module`` building one layer; each layer gets its own
        split of ``rngs`` (different initial parameters). The layer is called as
        ``layer(x, **kwargs) -> y`` with ``y`` of the same shape and dtype as ``x``.
      num_layers: ``N``.
      remat: a policy name (see :func:`remat_policy`); applied per layer.
      scan_layers: apply with ``nnx.scan`` (True) or a Python loop over the slices (False). Both
        give the same outputs and gradients from the same parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Attributes:
      layers: the stacked layer module; every parameter has shape ``[N, *shape]`` and logical axes
        ``("layers", *axes)``.

    Layers must be stateless at call time (they read parameters and write nothing): the loop path
    does not write variables back.
    """

    def __init__(
        self,
        make_layer: Callable[[nnx.Rngs], nnx.Module],
        num_layers: int,
        *,
        remat: str = "none",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.num_layers = check_int("LayerStack", "num_layers", num_layers)
        self.use_remat, self.policy = remat_policy(remat)
        self.remat = remat
        if not isinstance(scan_layers, bool):
            raise TypeError(f"LayerStack: scan_layers must be a bool, got {type(scan_layers).__name__}")
        self.scan_layers = scan_layers

        @nnx.split_rngs(splits=self.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK_METADATA)
        def create(rngs: nnx.Rngs) -> nnx.Module:
            return make_layer(rngs)

        self.layers = create(rngs)

    def layer(self, index: int) -> nnx.Module:
        """Layer ``index`` (negative counts from the end) as a standalone module whose parameters
        are slices ``[index]`` of the stacked ones (differentiable, usable under ``jit``)."""
        if isinstance(index, bool) or not isinstance(index, int) or not -self.num_layers <= index < self.num_layers:
            raise ValueError(f"LayerStack.layer: index must be an int in [-{self.num_layers}, {self.num_layers}), got {index!r}")
        graphdef, state = nnx.split(self.layers)
        sliced = jax.tree.map(lambda value: value[index], state)
        return nnx.merge(graphdef, spmd.remove_axis(sliced, 0, _STACK_METADATA))

    def _body(self, scan: bool) -> Callable:
        if not self.use_remat:
            return _call_layer
        # Inside scan, CSE cannot merge the recomputation with the forward pass (JAX docs).
        return nnx.remat(_call_layer, policy=self.policy, prevent_cse=not scan)

    def init_cache(self, make_cache: Callable[[nnx.Module], Any]) -> Any:
        """A decoding cache for every layer: ``make_cache(layer)`` (a pytree of arrays) for one
        layer, with each leaf repeated to ``[N, *leaf.shape]``. The layers are identical in
        structure, so layer 0 stands for all of them; the cache must not depend on parameter values."""
        one = make_cache(self.layer(0))
        return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf[None], (self.num_layers,) + leaf.shape), one)

    def __call__(self, x: jax.Array, *, return_all: bool = False, cache: Any = None, **kwargs: Any):
        """Applies the layers in order: ``x -> layer_{N-1}(... layer_0(x, **kwargs) ..., **kwargs)``.

        Args:
          x: the carried activation (any shape the layers accept), e.g. ``[B, T, D]``.
          return_all: also return every layer's output stacked, ``[N, *x.shape]`` (not with a cache).
          cache: a pytree whose leaves have a leading ``[N]`` axis (from :meth:`init_cache`), or
            None. Layer ``i`` is called as ``y, c_i = layer(x, cache=c_i, **kwargs)``.
          **kwargs: passed unchanged to every layer (e.g. ``segment_ids``, ``positions``).

        Returns ``y`` (shape and dtype of x), or ``(y, outputs [N, *x.shape])`` with ``return_all``,
        or ``(y, new_cache)`` with a cache.
        """
        if cache is not None:
            if return_all:
                raise ValueError("LayerStack: return_all cannot be combined with a cache")
            return self._call_cached(x, cache, kwargs)
        if self.scan_layers:
            body = self._body(scan=True)

            def step(layer, carry):
                out = body(layer, carry, kwargs)
                return out, (out if return_all else None)

            scanned = nnx.scan(
                step, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0), transform_metadata=_STACK_METADATA
            )
            y, outputs = scanned(self.layers, x)
            return (y, outputs) if return_all else y
        body = self._body(scan=False)
        outputs = []
        for index in range(self.num_layers):
            x = body(self.layer(index), x, kwargs)
            outputs.append(x)
        return (x, jnp.stack(outputs)) if return_all else x

    def _call_cached(self, x: jax.Array, cache: Any, kwargs: dict[str, Any]):
        """Inference with a per-layer cache (no remat: nothing is differentiated here)."""
        for leaf in jax.tree.leaves(cache):
            if not leaf.ndim or leaf.shape[0] != self.num_layers:
                raise ValueError(
                    f"LayerStack: every cache leaf must have a leading axis of {self.num_layers} layers, got "
                    f"shape {tuple(leaf.shape)}; build the cache with init_cache"
                )
        if self.scan_layers:
            def step(layer, carry, layer_cache):
                return _call_cached_layer(layer, carry, layer_cache, kwargs)

            scanned = nnx.scan(
                step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata=_STACK_METADATA
            )
            return scanned(self.layers, x, cache)
        new_caches = []
        for index in range(self.num_layers):
            layer_cache = jax.tree.map(lambda leaf: leaf[index], cache)
            x, layer_cache = _call_cached_layer(self.layer(index), x, layer_cache, kwargs)
            new_caches.append(layer_cache)
        return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *new_caches)


def mixer_flops(mixer: nnx.Module, seq_len: int, owner: str) -> int:
    """``mixer.flops(seq_len)``; a mixer without a ``flops`` method raises ``TypeError``."""
    flops = getattr(mixer, "flops", None)
    if not callable(flops):
        raise TypeError(
            f"{owner}.forward_flops: mixer {type(mixer).__module__}.{type(mixer).__qualname__} has no "
            "flops(seq_len) method, so its cost cannot be counted; add one to the mixer"
        )
    return int(flops(seq_len))


def mlp_flops(mlp: MLP, tokens: int) -> int:
    """Matmul FLOPs of an :class:`attnzoo.layers.MLP` on ``tokens`` tokens:
    ``2 * tokens * D * F * (3 if swiglu else 2)`` (gate, up, down or up, down)."""
    matrices = 3 if mlp.gate is not None else 2
    return 2 * tokens * mlp.dim * mlp.hidden_dim * matrices


def build_from_preset(
    cls: type, model_name: str, preset: dict[str, Any], overrides: dict[str, Any], rngs: nnx.Rngs
) -> nnx.Module:
    """``cls(**{**preset, **overrides}, rngs=rngs)``; an override the constructor does not take
    raises ``TypeError`` naming it, the model and the accepted arguments."""
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "rngs")]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise TypeError(
            f"{model_name}: unknown argument(s) {', '.join(map(repr, unknown))}; "
            f"{cls.__name__} accepts {', '.join(accepted)}"
        )
    return cls(**{**preset, **overrides}, rngs=rngs)


def feature_indices(owner: str, count: int, indices) -> list[int]:
    """The positions ``forward_intermediates`` returns, as timm's ``feature_take_indices``: None = all
    ``count``, an int ``n`` = the last ``n``, a sequence = those (negative counts from the end),
    each in ``[0, count)`` and in the given order; anything else raises ``ValueError`` naming ``owner``."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= count:
            raise ValueError(f"{owner}: an int indices takes the last n of {count}, n in [1, {count}], got {indices}")
        return list(range(count - indices, count))
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise ValueError(f"{owner}: indices must be None, an int or a sequence of ints, got {indices!r}")
    chosen = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise ValueError(f"{owner}: indices must be ints in [-{count}, {count}), got {list(indices)!r}")
        chosen.append(index % count)
    return chosen


def classifier_logits(head, pooled: jax.Array, dtype, param_dtype, logits_dtype) -> jax.Array:
    """A classifier head's ``pooled [B, D] @ head.kernel [D, K] + head.bias`` with operands in the
    compute dtype (``dtype``, or the promotion of ``pooled`` and ``param_dtype``), accumulated in
    at least float32 and returned in ``logits_dtype``."""
    dtype = compute_dtype(dtype, pooled, param_dtype)
    accumulate = jnp.promote_types(dtype, jnp.float32)
    logits = jnp.dot(pooled.astype(dtype), head.kernel[...].astype(dtype), preferred_element_type=accumulate)
    return (logits + head.bias[...].astype(accumulate)).astype(logits_dtype)
