"""Pieces the backbones share: stacked layers applied by scan or loop, remat policies, presets,
and timm's image-model contract (:class:`TimmVisionModel`).

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import spmd

from attnzoo.layers.common import MLP, Dense, check_bool, check_choice, compute_dtype
from attnzoo.layers.registry import get_mixer_class
from attnzoo.pallas_kernels.common import check_float, check_int

__all__ = ["REMAT_POLICIES", "remat_policy", "LayerStack", "LayerRuns", "mixer_flops", "mlp_flops", "build_from_preset",
           "feature_indices", "classifier_logits", "global_avg_pool", "pool_map", "TimmVisionModel",
           "is_int", "is_number", "is_int_or_pair", "per_stage", "check_depths", "check_widths_and_depths", "ints_per_stage", "stage_widths",
           "ratios_per_stage", "check_block_options", "check_drop_path_rate", "drop_path_rates", "check_logits_dtype",
           "takes_option", "mixer_defaults", "is_spatial_mixer", "apply_mixer", "map_mixer_flops", "block_caller",
           "BlockStage"]

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


def _one_layer(graphdef, state) -> nnx.Module:
    """A layer module from the stack's graph and one layer's slice of its state (no ``layers`` axis)."""
    return nnx.merge(graphdef, spmd.remove_axis(state, 0, _STACK_METADATA))


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
        return _one_layer(graphdef, jax.tree.map(lambda value: value[index], state))

    def unstacked(self) -> list[nnx.Module]:
        """Every layer as a standalone module, ``[layer(0), ..., layer(N - 1)]``, from one split of
        each stacked parameter. Under differentiation a split's transpose is one concatenation per
        parameter, where ``N`` separate slices would each pad their gradient back to ``[N, ...]``
        and sum ``N`` full-size buffers."""
        graphdef, state = nnx.split(self.layers)
        leaves, treedef = jax.tree.flatten(state)
        pieces = [jnp.split(leaf, self.num_layers, axis=0) for leaf in leaves]
        return [
            _one_layer(graphdef, jax.tree.unflatten(treedef, [jnp.squeeze(piece[index], 0) for piece in pieces]))
            for index in range(self.num_layers)
        ]

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
        for layer in self.unstacked():
            x = body(layer, x, kwargs)
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
        for index, layer in enumerate(self.unstacked()):
            layer_cache = jax.tree.map(lambda leaf, index=index: leaf[index], cache)
            x, layer_cache = _call_cached_layer(layer, x, layer_cache, kwargs)
            new_caches.append(layer_cache)
        return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *new_caches)


class LayerRuns(nnx.Module):
    """Runs of layers applied in sequence, each run a :class:`LayerStack` of identical layers (e.g.
    a ViT whose first blocks use one mixer and the rest another).

    Args:
      runs: the stacks, in order (at least one).

    Attributes:
      runs: ``nnx.List`` of the stacks (parameters ``runs.{r}.layers.*``, stacked per run).
      num_layers: the layers of all runs.

    ``__call__(x, return_all=...)`` and :meth:`layer` / :meth:`unstacked` number the layers across
    the runs as one sequence, as a single :class:`LayerStack` does.
    """

    def __init__(self, runs: Sequence[LayerStack]):
        runs = list(runs)
        if not runs or not all(isinstance(run, LayerStack) for run in runs):
            raise TypeError(f"LayerRuns: runs must be a non-empty sequence of LayerStack, got {runs!r}")
        self.runs = nnx.List(runs)
        self.num_layers = sum(run.num_layers for run in runs)

    def _locate(self, index: int) -> tuple[LayerStack, int]:
        if isinstance(index, bool) or not isinstance(index, int) or not -self.num_layers <= index < self.num_layers:
            raise ValueError(f"LayerRuns.layer: index must be an int in [-{self.num_layers}, {self.num_layers}), got {index!r}")
        index %= self.num_layers
        for run in self.runs:
            if index < run.num_layers:
                return run, index
            index -= run.num_layers
        raise AssertionError("unreachable: index was range-checked")

    def layer(self, index: int) -> nnx.Module:
        """Layer ``index`` of the whole sequence (negative counts from the end), standalone."""
        run, local = self._locate(index)
        return run.layer(local)

    def unstacked(self) -> list[nnx.Module]:
        """Every layer of every run as a standalone module, in order."""
        return [layer for run in self.runs for layer in run.unstacked()]

    def __call__(self, x: jax.Array, *, return_all: bool = False, **kwargs: Any):
        """Applies the runs in order; ``return_all`` also returns every layer's output stacked
        ``[num_layers, *x.shape]``; ``kwargs`` go to every layer."""
        outputs = []
        for run in self.runs:
            if return_all:
                x, run_outputs = run(x, return_all=True, **kwargs)
                outputs.append(run_outputs)
            else:
                x = run(x, **kwargs)
        return (x, jnp.concatenate(outputs, axis=0)) if return_all else x


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


def global_avg_pool(features: jax.Array) -> jax.Array:
    """``features [B, h, w, C] -> [B, C]``: the mean over h and w, accumulated in at least float32
    and returned in the features' dtype."""
    accumulate = jnp.promote_types(features.dtype, jnp.float32)
    return jnp.mean(features.astype(accumulate), axis=(1, 2)).astype(features.dtype)


def pool_map(features: jax.Array, global_pool: str) -> jax.Array:
    """``features [B, h, w, C] -> [B, C]``: ``"avg"`` (:func:`global_avg_pool`) or ``"max"`` over h, w."""
    return global_avg_pool(features) if global_pool == "avg" else jnp.max(features, axis=(1, 2))


class TimmVisionModel(nnx.Module):
    """timm's contract of an NHWC image model: ``__call__``, ``forward_head``,
    ``forward_intermediates``, ``reset_classifier`` and the image check, written once.

    A subclass sets ``_owner`` (its name in error messages) and ``output_fmts`` (the formats of
    ``forward_intermediates``, default ``("NHWC", "NCHW")``); it has the attributes
    ``img_size (H, W)``, ``in_chans``, ``num_features``, ``features_only``, ``head`` (a
    :class:`attnzoo.layers.Dense` or None), ``num_classes``, ``dtype``, ``param_dtype`` and
    ``logits_dtype``, and the methods ``forward_features(images)``, ``feature_info`` (one entry
    per feature map ``forward_intermediates`` can return) and the hooks below:

    * ``_feature_maps(images, last)``: feature maps ``0 .. last`` (indices of ``feature_info``);
    * ``_pre_logits(features)``: ``forward_features``' output -> the classifier's input ``[B, width]``
      (default: "avg" / "max" pooling of a ``[B, h, w, num_features]`` map by ``global_pool``);
    * ``_set_global_pool(owner, global_pool)``: checks (and applies) a new pooling (default: "avg"
      or "max");
    * optional: ``_final_norm``, ``_intermediate_norm``, ``_to_output_fmt``, ``_check_output_fmt``,
      ``_classifier_input``.

    Constructors may use ``_set_common_options`` (features_only, remat, dtypes), ``_init_head``
    and, in ``forward_flops``, ``_check_example_shape``.
    """

    _owner: str = "TimmVisionModel"
    output_fmts: tuple[str, ...] = ("NHWC", "NCHW")

    def _check_images(self, images) -> None:
        owner = self._owner
        if not hasattr(images, "shape") or not hasattr(images, "dtype"):
            raise TypeError(f"{owner}: images must be an array [B,H,W,C], got {type(images).__name__}")
        want = (*self.img_size, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"{owner}: images must have shape [B,H,W,C] = [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                f"got {tuple(images.shape)}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"{owner}: images must have a floating dtype, got {images.dtype}")

    def _check_feature_map(self, features) -> None:
        """Raises unless ``features`` is ``[B, h, w, num_features]`` (``forward_head``'s input)."""
        if not hasattr(features, "shape") or features.ndim != 4 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"{self._owner}.forward_head: features must have shape [B, h, w, {self.num_features}], "
                f"got {getattr(features, 'shape', type(features).__name__)}"
            )

    def _check_example_shape(self, example_shape) -> None:
        """``forward_flops``' ``example_shape``: None or the model's ``(H, W, C)``."""
        want = (*self.img_size, self.in_chans)
        if example_shape is not None and tuple(example_shape) != want:
            raise ValueError(
                f"{self._owner}.forward_flops: example_shape must be (H, W, C) = {want}, got {tuple(example_shape)!r}"
            )

    def _set_common_options(self, owner: str, *, features_only, remat, dtype, param_dtype, logits_dtype) -> None:
        """Checks and sets ``features_only`` (a bool), ``remat`` (a policy name), ``dtype``,
        ``param_dtype`` and ``logits_dtype`` (floating)."""
        self.features_only = check_bool(owner, "features_only", features_only)
        remat_policy(remat)  # ValueError listing the policies
        self.remat = remat
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.logits_dtype = check_logits_dtype(owner, logits_dtype)

    def _init_head(self, num_classes: int, rngs: nnx.Rngs) -> None:
        """No classifier with ``features_only``, else ``reset_classifier(num_classes)``."""
        self.head = nnx.data(None)
        self.num_classes = 0
        if not self.features_only:
            self.reset_classifier(num_classes, rngs=rngs)

    # ------------------------------------------------------------------------------------------
    # Classifier
    # ------------------------------------------------------------------------------------------

    def _set_global_pool(self, owner: str, global_pool: str) -> None:
        """Hook: checks and sets ``global_pool`` (``__init__`` and ``reset_classifier``); default
        "avg" or "max" over H, W."""
        self.global_pool = check_choice(owner, "global_pool", global_pool, ("avg", "max"))

    def _pre_logits(self, features: jax.Array) -> jax.Array:
        """Hook: features ``[B, h, w, num_features]`` -> ``[B, num_features]``; default "avg" or
        "max" pooling over h, w (``global_pool``)."""
        self._check_feature_map(features)
        return pool_map(features, self.global_pool)

    def _classifier_input(self) -> tuple[int, str]:
        """Hook: width and logical axis name of the classifier's input."""
        return self.num_features, "embed"

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, *, rngs: nnx.Rngs | None = None) -> None:
        """Replaces the classifier (the head's last Dense) by a fresh one with ``num_classes``
        outputs; 0 = none (the model returns its pooled, pre-logits features). ``global_pool``
        optionally switches the pooling among the model's choices (``_set_global_pool``)."""
        owner = f"{self._owner}.reset_classifier"
        if self.features_only:
            raise ValueError(f"{owner}: a features_only model has no classifier")
        num_classes = check_int(owner, "num_classes", num_classes, minimum=0)
        if global_pool is not None:
            self._set_global_pool(owner, global_pool)
        self.num_classes = num_classes
        rngs = nnx.Rngs(0) if rngs is None else rngs
        width, axis = self._classifier_input()
        self.head = nnx.data(
            Dense(width, num_classes, logical_axes=(axis, None), use_bias=True, dtype=self.dtype,
                  param_dtype=self.param_dtype, rngs=rngs)
            if num_classes
            else None
        )

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """features (``forward_features``' output) -> logits ``[B, num_classes]`` in ``logits_dtype``
        (the pooled, pre-logits features ``[B, width]`` when ``pre_logits`` or without a classifier)."""
        pooled = self._pre_logits(features)
        if pre_logits or self.head is None:
            return pooled
        return classifier_logits(self.head, pooled, self.dtype, self.param_dtype, self.logits_dtype)

    def __call__(self, images: jax.Array) -> jax.Array | list[jax.Array]:
        """images ``[B,H,W,C]`` (NHWC, floating) -> logits ``[B, num_classes]`` in ``logits_dtype``
        (with ``features_only``: the list of feature maps, one per ``feature_info`` entry, NHWC)."""
        if self.features_only:
            return self.forward_intermediates(images, output_fmt="NHWC")
        return self.forward_head(self.forward_features(images))

    # ------------------------------------------------------------------------------------------
    # Intermediate features
    # ------------------------------------------------------------------------------------------

    def _final_norm(self, x: jax.Array) -> jax.Array:
        """Hook: the norm ``forward_features`` applies after the last feature map (default none)."""
        return x

    def _intermediate_norm(self, owner: str, norm) -> Callable[[int, jax.Array], jax.Array] | None:
        """Hook: what ``norm`` does, ``fn(index, feature_map)`` or None (the default: nothing)."""
        return None

    def _check_output_fmt(self, owner: str, output_fmt) -> None:
        if output_fmt not in self.output_fmts:
            raise ValueError(f"{owner}: output_fmt must be {' or '.join(map(repr, self.output_fmts))}, got {output_fmt!r}")

    def _to_output_fmt(self, x: jax.Array, output_fmt: str) -> jax.Array:
        """Hook: a feature map ``[B, h, w, C]`` in ``output_fmt`` ("NHWC" or "NCHW")."""
        return jnp.transpose(x, (0, 3, 1, 2)) if output_fmt == "NCHW" else x

    def forward_intermediates(
        self,
        images: jax.Array,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NHWC",
        intermediates_only: bool = True,
    ):
        """Selected feature maps, ``feature_info[i]`` for index ``i`` (timm's ``forward_intermediates``).

        Args:
          images: ``[B,H,W,C]``.
          indices: feature indices (negative count from the end), an int ``n`` = the last ``n``,
            or None = all (as ``feature_info``).
          norm: apply the model's final norm where timm does (the model's ``_intermediate_norm``).
          output_fmt: one of the model's ``output_fmts``: ``"NHWC"`` (``[B, h_i, w_i, C_i]``) or
            ``"NCHW"``.
          intermediates_only: return only the list (maps after the last requested one may not be
            computed); else ``(forward_features(images), list)``.

        Returns a list (in the order of ``indices``) of arrays in the compute dtype.
        """
        owner = f"{self._owner}.forward_intermediates"
        self._check_output_fmt(owner, output_fmt)
        norm_fn = self._intermediate_norm(owner, norm)
        count = len(self.feature_info)
        chosen = feature_indices(owner, count, indices)
        features = self._feature_maps(images, max(chosen) if intermediates_only else count - 1)
        maps = []
        for index in chosen:
            out = features[index] if norm_fn is None else norm_fn(index, features[index])
            maps.append(self._to_output_fmt(out, output_fmt))
        if intermediates_only:
            return maps
        return self._final_norm(features[-1]), maps


# ----------------------------------------------------------------------------------------------
# Hierarchical vision backbones: option checks and stage assembly
# ----------------------------------------------------------------------------------------------


def is_int(value) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float (Python or numpy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int_or_pair(value) -> bool:
    """An int, or a list / tuple of two ints."""
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(is_int(v) for v in value)
    return is_int(value)


def per_stage(owner: str, name: str, value, num_stages: int, is_item: Callable[[Any], bool]) -> list:
    """``value`` repeated for every stage when ``is_item(value)``, else a list / tuple of
    ``num_stages`` items (each ``is_item``) as a list; anything else raises ``ValueError`` naming
    ``owner`` and the argument ``name``."""
    if is_item(value):
        return [value] * num_stages
    if not isinstance(value, (list, tuple)) or len(value) != num_stages or not all(is_item(v) for v in value):
        raise ValueError(f"{owner}: {name} must be one value or a sequence of {num_stages} (one per stage), got {value!r}")
    return list(value)


def check_depths(owner: str, depths) -> tuple[int, ...]:
    """``depths``: a non-empty list / tuple of ints >= 1 (blocks per stage)."""
    if not isinstance(depths, (list, tuple)) or not depths:
        raise ValueError(f"{owner}: depths must be a non-empty sequence of ints, got {depths!r}")
    return tuple(check_int(owner, f"depths[{i}]", d) for i, d in enumerate(depths))


def check_widths_and_depths(owner: str, embed_dims, depths) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(embed_dims, depths)``: two lists / tuples of ints >= 1 of the same non-zero length."""
    if not isinstance(embed_dims, (tuple, list)) or not isinstance(depths, (tuple, list)) or not embed_dims \
            or len(embed_dims) != len(depths):
        raise ValueError(
            f"{owner}: embed_dims and depths must be sequences of the same (non-zero) length, "
            f"got {embed_dims!r} and {depths!r}"
        )
    return (tuple(check_int(owner, f"embed_dims[{i}]", d) for i, d in enumerate(embed_dims)),
            tuple(check_int(owner, f"depths[{i}]", d) for i, d in enumerate(depths)))


def ints_per_stage(owner: str, name: str, value, num_stages: int) -> tuple[int, ...]:
    """An int >= 1 for every stage, or one per stage (:func:`per_stage`, then ``check_int`` each)."""
    return tuple(check_int(owner, f"{name}[{i}]", v) for i, v in enumerate(per_stage(owner, name, value, num_stages, is_int)))


def stage_widths(owner: str, name: str, value, num_stages: int) -> tuple[int, ...]:
    """Stage widths: an int ``C`` is ``C * 2**i`` for stage ``i``; else one int per stage."""
    if is_int(value):
        value = [check_int(owner, name, value) * 2**i for i in range(num_stages)]
    return ints_per_stage(owner, name, value, num_stages)


def ratios_per_stage(owner: str, name: str, value, num_stages: int) -> tuple[float, ...]:
    """A positive finite number for every stage, or one per stage, as floats."""
    ratios = per_stage(owner, name, value, num_stages, is_number)
    return tuple(check_float(owner, f"{name}[{i}]", r, positive=True, allow_none=False) for i, r in enumerate(ratios))


def check_block_options(owner: str, block_options, num_stages: int) -> list[list[dict] | None]:
    """Per-block mixer options, one entry per stage: None (the backbone's default cycle), or a
    list of dicts cycled over the stage's blocks. ``block_options`` is None, a non-empty sequence
    of dicts (every stage), or ``num_stages`` such sequences (or None), one per stage."""
    if block_options is None:
        return [None] * num_stages
    if not isinstance(block_options, (list, tuple)) or not block_options:
        raise ValueError(f"{owner}: block_options must be a non-empty sequence of dicts, or one per stage, got {block_options!r}")
    if all(isinstance(o, dict) for o in block_options):
        return [list(block_options)] * num_stages
    if len(block_options) != num_stages or not all(
        o is None or (isinstance(o, (list, tuple)) and o and all(isinstance(d, dict) for d in o)) for o in block_options
    ):
        raise ValueError(
            f"{owner}: block_options must be a sequence of dicts (cycled over every stage's blocks) or "
            f"{num_stages} such sequences (or None), one per stage; got {block_options!r}"
        )
    return [None if o is None else list(o) for o in block_options]


def check_drop_path_rate(owner: str, drop_path_rate) -> float:
    """A float in ``[0, 1)``."""
    drop_path_rate = check_float(owner, "drop_path_rate", drop_path_rate, allow_none=False)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"{owner}: drop_path_rate must be in [0, 1), got {drop_path_rate}")
    return drop_path_rate


def drop_path_rates(drop_path_rate: float, count: int) -> np.ndarray:
    """The stochastic depth schedule of ``count`` blocks: rising linearly from 0 to ``drop_path_rate``
    (``[0.0]`` for one block)."""
    return np.linspace(0.0, drop_path_rate, count) if count > 1 else np.zeros(1)


def check_logits_dtype(owner: str, logits_dtype) -> jnp.dtype:
    """``logits_dtype`` as a floating ``jnp.dtype``."""
    logits_dtype = jnp.dtype(logits_dtype)
    if not jnp.issubdtype(logits_dtype, jnp.floating):
        raise TypeError(f"{owner}: logits_dtype must be a floating dtype, got {logits_dtype}")
    return logits_dtype


def takes_option(cls, option: str, *, var_keyword: bool = True) -> bool:
    """Whether ``cls``'s constructor names ``option``, or (with ``var_keyword``) takes ``**kwargs``."""
    parameters = inspect.signature(cls.__init__).parameters
    return option in parameters or (
        var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()))


def mixer_defaults(cls, name: str, qkv_bias: bool, *, resolution=None, num_prefix_tokens: int | None = None,
                   var_keyword: bool = True) -> dict[str, Any]:
    """A backbone's default options of mixer ``name`` (class ``cls``): for ``"attention"``
    bidirectional, no RoPE, an output bias; ``qkv_bias`` when the mixer takes
    it (:func:`takes_option`); ``resolution = (h, w)`` of the stage's map when ``resolution`` is given
    and the constructor names a ``resolution`` argument (mixers with parameters sized to the map);
    likewise ``num_prefix_tokens`` (class tokens before a ViT's patch tokens)."""
    options: dict[str, Any] = {}
    if name == "attention":
        options.update(causal=False, use_rope=False, out_bias=True)
    if takes_option(cls, "qkv_bias", var_keyword=var_keyword):
        options["qkv_bias"] = qkv_bias
    if resolution is not None and isinstance(cls, type) and "resolution" in inspect.signature(cls.__init__).parameters:
        options["resolution"] = tuple(resolution)
    if num_prefix_tokens is not None and isinstance(cls, type) and "num_prefix_tokens" in inspect.signature(
            cls.__init__).parameters:
        options["num_prefix_tokens"] = num_prefix_tokens
    return options


def is_spatial_mixer(name: str) -> bool:
    """Whether the registered mixer ``name`` is a 2-D mixer (``spatial_ndim == 2``: called on
    ``[B, h, w, C]``) rather than one on tokens ``[B, T, C]`` (unknown names raise ``ValueError``)."""
    return getattr(get_mixer_class(name), "spatial_ndim", 1) == 2


def apply_mixer(mixer: nnx.Module, spatial: bool, x: jax.Array) -> jax.Array:
    """``x [B, h, w, C] -> [B, h, w, C]``: ``mixer(x)`` for a 2-D mixer, else the mixer on the
    flattened tokens ``[B, h * w, C]``, reshaped back."""
    if spatial:
        return mixer(x)
    batch, height, width, channels = x.shape
    return mixer(x.reshape(batch, height * width, channels)).reshape(batch, height, width, channels)


def map_mixer_flops(mixer: nnx.Module, spatial: bool, height: int, width: int, owner: str) -> int:
    """FLOPs of a mixer on an ``height x width`` map: ``flops(height, width)`` of a 2-D mixer,
    ``flops(height * width)`` of a 1-D one; a mixer without a ``flops`` method raises ``TypeError``."""
    if not spatial:
        return mixer_flops(mixer, height * width, owner)
    flops = getattr(mixer, "flops", None)
    if not callable(flops):
        raise TypeError(
            f"{owner}.forward_flops: mixer {type(mixer).__module__}.{type(mixer).__qualname__} has "
            "no flops(height, width) method, so its cost cannot be counted; add one to the mixer"
        )
    return int(flops(height, width))


def _call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


def block_caller(remat: str) -> Callable[[nnx.Module, jax.Array], jax.Array]:
    """``call(block, x) = block(x)``, under ``nnx.remat`` with the policy ``remat`` names (unless
    ``"none"``). For stateless blocks (no BatchNorm statistics written at call time)."""
    use_remat, policy = remat_policy(remat)
    return nnx.remat(_call_block, policy=policy) if use_remat else _call_block


class BlockStage(nnx.Module):
    """An optional downsample, then ``blocks`` in order, each under the remat policy ``remat``
    (:func:`block_caller`). ``x [B, H, W, C] -> [B, h, w, C']``."""

    def __init__(self, downsample: nnx.Module | None, blocks: list[nnx.Module], *, remat: str):
        self.downsample = downsample
        self.blocks = nnx.List(blocks)
        remat_policy(remat)  # ValueError listing the policies
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        call = block_caller(self.remat)
        for block in self.blocks:
            x = call(block, x)
        return x
