"""The Visual Attention Network (VAN, Guo et al. 2022) with swappable 2-D mixers and optional gates.

>>> from attnzoo import zoo
>>> m = zoo.create_model("van_b0", rngs=nnx.Rngs(0))
>>> m.eval()                                   # BatchNorm: running statistics (m.train() for batch statistics)
>>> logits = m(images)                         # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)         # [B, 7, 7, 256] after the last stage's LayerNorm
>>> maps = m.forward_intermediates(images)     # [B,56,56,32], [B,28,28,64], [B,14,14,160], [B,7,7,256]
>>> ge = zoo.create_model("van_b1", gate="eca", rngs=nnx.Rngs(0))          # + an ECA gate per block
>>> sw = zoo.create_model("van_b0", mixer=("van_attention",) * 3 + ("swin_window",), rngs=nnx.Rngs(0))

Architecture (the official Visual-Attention-Network/VAN-Classification ``VAN``), NHWC:

* 4 stages; stage ``i`` starts with an overlapping patch embedding (``OverlapPatchEmbed``): a
  convolution ``7 x 7`` stride 4 padding 3 (stage 0) or ``3 x 3`` stride 2 padding 1 (bias), then
  BatchNorm; then ``depths[i]`` blocks and a LayerNorm (eps 1e-6) of the stage's output;
* block (official ``Block``)::

      x = x + drop_path(layer_scale_1 * mixer(BN(x)))
      x = x + drop_path(layer_scale_2 * gate(mlp(BN(x))))

  the mixer by default ``van_attention`` (:class:`attnzoo.layers.van.VANAttention`: 1x1, GELU,
  large kernel attention, 1x1, its own shortcut); the MLP (official ``Mlp``) 1x1 ``C -> F`` ->
  depthwise ``3 x 3`` (padding 1, bias) -> GELU -> 1x1 ``F -> C``, ``F = int(C * mlp_ratio)``;
  layer scales start at 1e-2; ``gate`` is none in the paper (see ``gate`` below);
* head: mean over H, W of the last stage's normed output -> Dense (classes).

BatchNorm makes the model stateful: its running statistics are ``nnx.BatchStat`` variables, used
after ``model.eval()``; in training mode (``model.train()``, the initial mode) every call
normalises with batch statistics and updates them in place (torch momentum 0.1 = Flax 0.9).

Parameters (logical axes): ``stages[i].patch_embed.proj.kernel [k, k, I, C]`` (None, None, None,
embed) + bias, ``.patch_embed.norm``; ``stages[i].blocks[j].{norm1, mixer, layer_scale_1, norm2,
mlp.fc1, mlp.dwconv, mlp.fc2, gate, layer_scale_2}`` (1x1 convolutions as Dense kernels
``[I, O]``); ``stages[i].norm``; ``head.kernel [C, classes]`` (embed, None).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import Dense, LayerNorm, create_mixer, get_mixer_class
from attnzoo.layers import van as _van  # noqa: F401  (registers van_lka / van_attention)
from attnzoo.layers.common import DType, as_pair, check_bool, gelu, partitioned
from attnzoo.layers.conv import BatchNorm, Conv2d
from attnzoo.layers.gates import list_gates, make_gate
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import (
    TimmVisionModel,
    apply_mixer,
    build_from_preset,
    check_drop_path_rate,
    check_widths_and_depths,
    drop_path_rates,
    ints_per_stage,
    is_spatial_mixer,
    map_mixer_flops,
    per_stage,
    ratios_per_stage,
    remat_policy,
)
from attnzoo.zoo.registry import register_model

__all__ = ["VAN", "VANBlock", "VANStage", "VANMlp", "OverlapPatchEmbed"]

_OWNER = "VAN"


class OverlapPatchEmbed(nnx.Module):
    """Convolution ``k x k``, stride ``s``, padding ``k // 2`` (bias) then BatchNorm:
    ``[B, H, W, I] -> [B, (H + 2 (k // 2) - k) // s + 1, ..., C]``."""

    def __init__(self, in_features: int, dim: int, kernel_size: int, stride: int, *, norm_eps: float,
                 norm_momentum: float, dtype: DType | None, param_dtype: DType, rngs: nnx.Rngs):
        self.proj = Conv2d(in_features, dim, kernel_size, stride=stride, padding=kernel_size // 2, use_bias=True,
                           scan_taps=kernel_size > 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = BatchNorm(dim, epsilon=norm_eps, momentum=norm_momentum, dtype=dtype, param_dtype=param_dtype)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.proj.output_size(height, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class VANMlp(nnx.Module):
    """VAN's convolutional MLP: 1x1 ``C -> F`` -> depthwise ``3 x 3`` (padding 1) -> GELU -> 1x1
    ``F -> C``, all with biases. ``x [B, H, W, C] -> [B, H, W, C]``."""

    def __init__(self, dim: int, hidden: int, *, dtype: DType | None, param_dtype: DType, rngs: nnx.Rngs):
        self.dim, self.hidden = dim, hidden
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(dim, hidden, logical_axes=("embed", "mlp"), use_bias=True, **common)
        self.dwconv = Conv2d(hidden, hidden, 3, padding=1, groups=hidden, use_bias=True,
                             logical_axes=(None, None, None, "mlp"), **common)
        self.fc2 = Dense(hidden, dim, logical_axes=("mlp", "embed"), use_bias=True, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.dwconv(self.fc1(x))))

    def flops(self, height: int, width: int) -> int:
        """``2 H W C F * 2`` (the 1x1s) ``+ 2 H W 9 F`` (the depthwise convolution)."""
        return 4 * height * width * self.dim * self.hidden + self.dwconv.flops(height, width)


class VANBlock(nnx.Module):
    """``x + drop_path(ls1 * mixer(BN(x)))``, then ``x + drop_path(ls2 * gate(mlp(BN(x))))``, on
    ``x [B, h, w, C]``. The mixer is ``create_mixer(mixer, dim=C, num_heads=..., **mixer_options)``,
    called on the map for a 2-D mixer and on the tokens ``[B, h * w, C]`` otherwise."""

    def __init__(self, dim: int, num_heads: int, *, mixer: str, mixer_options: dict[str, Any], mlp_ratio: float,
                 gate: str | None, gate_options: dict[str, Any], layer_scale_init: float | None, drop_path: float,
                 norm_eps: float, norm_momentum: float, dtype: DType | None, param_dtype: DType, rngs: nnx.Rngs):
        norm = dict(epsilon=norm_eps, momentum=norm_momentum, dtype=dtype, param_dtype=param_dtype)
        self.spatial = is_spatial_mixer(mixer)
        self.norm1 = BatchNorm(dim, **norm)
        self.mixer = create_mixer(mixer, dim=dim, num_heads=num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                  **mixer_options)
        self.norm2 = BatchNorm(dim, **norm)
        self.mlp = VANMlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = make_gate(gate, dim, rngs=rngs, **{"channel_axis": "embed", "dtype": dtype,
                                                        "param_dtype": param_dtype, **gate_options})
        if layer_scale_init is None:
            self.layer_scale_1 = self.layer_scale_2 = None
        else:
            init = partitioned(nnx.initializers.constant(layer_scale_init), ("norm",))
            self.layer_scale_1 = nnx.Param(init(None, (dim,), param_dtype))
            self.layer_scale_2 = nnx.Param(init(None, (dim,), param_dtype))
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None

    def _residual(self, x: jax.Array, branch: jax.Array, scale) -> jax.Array:
        if scale is not None:
            branch = branch * scale[...].astype(branch.dtype)
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        return x + branch.astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, h, w, C]`` -> ``[B, h, w, C]``."""
        x = self._residual(x, apply_mixer(self.mixer, self.spatial, self.norm1(x)), self.layer_scale_1)
        branch = self.mlp(self.norm2(x))
        if self.gate is not None:
            branch = self.gate(branch)
        return self._residual(x, branch, self.layer_scale_2)

    def flops(self, height: int, width: int) -> int:
        """The mixer's (``flops(h, w)`` of a 2-D mixer, ``flops(h * w)`` of a 1-D one), the MLP's and
        the gate's FLOPs."""
        total = map_mixer_flops(self.mixer, self.spatial, height, width, _OWNER)
        total += self.mlp.flops(height, width)
        if self.gate is not None:
            total += int(self.gate.flops(height, width))
        return total


def _apply_block(block: VANBlock, x: jax.Array, policy) -> jax.Array:
    """``block(x)`` under ``jax.checkpoint(policy=policy)``, a functional split / merge that writes
    back what a training-mode call updates (BatchNorm statistics, the drop-path rng count); in
    evaluation mode nothing is written, so the block also works under a plain ``jax.grad`` of a
    model built outside it."""
    training = any(
        (isinstance(node, BatchNorm) and not node.use_running_average)
        or (isinstance(node, nnx.Dropout) and not node.deterministic)
        for _, node in nnx.iter_graph(block)
    )
    graphdef, state = nnx.split(block)
    updated = (nnx.BatchStat, nnx.RngState)

    def pure(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), (nnx.state(module, updated) if training else None)

    y, new_state = jax.checkpoint(pure, policy=policy)(state, x)
    if training:
        nnx.update(block, new_state)
    return y


class VANStage(nnx.Module):
    """Overlapping patch embedding, ``len(blocks)`` blocks (each under the remat policy), LayerNorm."""

    def __init__(self, patch_embed: OverlapPatchEmbed, blocks: list[VANBlock], norm: LayerNorm, *, remat: str):
        self.patch_embed = patch_embed
        self.blocks = nnx.List(blocks)
        self.norm = norm
        self.use_remat, self.policy = remat_policy(remat)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = _apply_block(block, x, self.policy) if self.use_remat else block(x)
        return self.norm(x)


class VAN(TimmVisionModel):
    """The Visual Attention Network with a pluggable mixer per stage and an optional gate per block.
    NHWC images of a fixed ``img_size``.

    Args:
      img_size: input ``(H, W)`` or an int.
      in_chans: input channels. num_classes: classes of the head; 0 = none (pooled features).
      global_pool: ``"avg"`` (the paper) or ``"max"`` over H, W before the head.
      embed_dims: width of each stage. depths: blocks per stage (as many as ``embed_dims``).
      mlp_ratios: MLP hidden width ``int(C * ratio)``; one value or one per stage.
      mixer: registered mixer name, or one per stage (default ``"van_attention"``); a 2-D mixer
        (``spatial_ndim == 2``) gets the map, any other the flattened tokens.
      mixer_options: options of every block's mixer (dict), or one dict per stage.
      num_heads: ``num_heads`` given to the mixers (LKA ignores it), one value or one per stage;
        default ``max(1, C // 32)``.
      gate: a gate on every block's MLP branch, by name (:func:`attnzoo.layers.gates.make_gate`:
        "se", "eca", "cbam"), or None (the paper). gate_options: its options (a dict).
      layer_scale_init: initial layer scale (1e-2 in the official code), or None for none.
      norm_eps: epsilon of the stage LayerNorms (1e-6). bn_eps / bn_momentum: BatchNorm epsilon
        (1e-5) and running-average decay (Flax convention: torch's momentum 0.1 is 0.9).
      drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all blocks
        (the official schedule); active in training mode only, needs a ``dropout`` rng stream.
      features_only: a feature extractor (timm's ``features_only``): no head; calling the model
        returns every stage's output ``[B, h_i, w_i, C_i]`` (after the stage's LayerNorm).
      remat: remat policy name applied per block.
      dtype: compute dtype (default: promotion of inputs and parameters); param_dtype: parameters;
        logits_dtype: logits (default float32).
      rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for stochastic depth).
    """

    _owner = _OWNER

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        mlp_ratios: float | Sequence[float] = (8.0, 8.0, 4.0, 4.0),
        mixer: str | Sequence[str] = "van_attention",
        mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        num_heads: int | Sequence[int] | None = None,
        gate: str | None = None,
        gate_options: dict[str, Any] | None = None,
        layer_scale_init: float | None = 1e-2,
        norm_eps: float = 1e-6,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.9,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        remat: str = "none",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logits_dtype: DType = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        owner = _OWNER
        self.img_size = as_pair(owner, "img_size", img_size)
        self.in_chans = check_int(owner, "in_chans", in_chans)
        self.embed_dims, self.depths = check_widths_and_depths(owner, embed_dims, depths)
        count = self.num_stages = len(self.depths)
        self.mlp_ratios = ratios_per_stage(owner, "mlp_ratios", mlp_ratios, count)
        self.mixer_names = tuple(per_stage(owner, "mixer", mixer, count, lambda v: isinstance(v, str)))
        for name in self.mixer_names:
            get_mixer_class(name)  # ValueError listing the known mixers
        stage_options = per_stage(owner, "mixer_options", {} if mixer_options is None else mixer_options, count,
                                  lambda v: isinstance(v, dict))
        if num_heads is None:
            num_heads = [max(1, d // 32) for d in self.embed_dims]
        self.num_heads = ints_per_stage(owner, "num_heads", num_heads, count)
        if gate is not None and gate not in list_gates():
            raise ValueError(f"{owner}: gate must be None or one of {list_gates()}, got {gate!r}")
        if gate_options is not None and not isinstance(gate_options, dict):
            raise TypeError(f"{owner}: gate_options must be a dict or None, got {type(gate_options).__name__}")
        self.gate = gate
        self.layer_scale_init = check_float(owner, "layer_scale_init", layer_scale_init)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        bn_eps = check_float(owner, "bn_eps", bn_eps, positive=True, allow_none=False)
        drop_path_rate = self.drop_path_rate = check_drop_path_rate(owner, drop_path_rate)
        self._set_common_options(owner, features_only=features_only, remat=remat, dtype=dtype, param_dtype=param_dtype,
                                 logits_dtype=logits_dtype)
        self._set_global_pool(owner, global_pool)
        self.num_features = self.embed_dims[-1]

        common = dict(dtype=dtype, param_dtype=param_dtype)
        bn = dict(norm_eps=bn_eps, norm_momentum=bn_momentum)
        rates = drop_path_rates(drop_path_rate, sum(self.depths))
        stages, sizes, resolution, index = [], [], self.img_size, 0
        in_features = self.in_chans
        for s in range(count):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            embed = OverlapPatchEmbed(in_features, self.embed_dims[s], kernel, stride, rngs=rngs, **bn, **common)
            resolution = embed.output_size(*resolution)  # >= 1: every embedding pads by kernel_size // 2
            sizes.append(tuple(resolution))
            blocks = []
            for _ in range(self.depths[s]):
                blocks.append(VANBlock(
                    self.embed_dims[s], self.num_heads[s], mixer=self.mixer_names[s], mixer_options=stage_options[s],
                    mlp_ratio=self.mlp_ratios[s], gate=gate, gate_options=dict(gate_options or {}),
                    layer_scale_init=self.layer_scale_init, drop_path=float(rates[index]), rngs=rngs, **bn, **common,
                ))
                index += 1
            norm = LayerNorm(self.embed_dims[s], epsilon=self.norm_eps, **common)
            stages.append(VANStage(embed, blocks, norm, remat=remat))
            in_features = self.embed_dims[s]
        self.stages = nnx.List(stages)
        self.feature_sizes = tuple(sizes)
        self.head = nnx.data(None)
        self.num_classes = 0
        if not self.features_only:
            self.reset_classifier(check_int(owner, "num_classes", num_classes, minimum=0), rngs=rngs)

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage (after its LayerNorm): ``num_chs``, ``reduction`` (4, 8, 16, 32),
        ``module`` (``"stages.i"``)."""
        return [dict(num_chs=dim, reduction=4 * 2**s, module=f"stages.{s}") for s, dim in enumerate(self.embed_dims)]

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages ``0 .. last`` (later stages are not run)."""
        self._check_images(images)
        x, outputs = images, []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> the last stage's normed output ``[B, h, w, num_features]``."""
        return self._feature_maps(images, self.num_stages - 1)[-1]

    def _intermediate_norm(self, owner: str, norm):
        """``norm`` is accepted for timm's signature; every stage's output is already normed (the
        stage LayerNorms are part of the stages), so it changes nothing."""
        check_bool(owner, "norm", norm)
        return None

    # ------------------------------------------------------------------------------------------
    # Cost model
    # ------------------------------------------------------------------------------------------

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Per stage: the patch embedding's ``Conv2d.flops``, and per block on the stage's ``h x w``
        map the mixer's ``flops(h, w)`` (``flops(h * w)`` for a 1-D mixer), the MLP's
        ``2 h w C F * 2 + 2 h w 9 F`` and the gate's ``flops(h, w)``; head ``2 C K``. Norms,
        activations, products, biases and pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        total, previous = 0, self.img_size
        for stage, (height, width) in zip(self.stages, self.feature_sizes, strict=True):
            total += stage.patch_embed.proj.flops(*previous)
            total += sum(block.flops(height, width) for block in stage.blocks)
            previous = (height, width)
        if self.head is not None:
            total += 2 * self.num_features * self.num_classes
        return int(total)


# ----------------------------------------------------------------------------------------------
# Presets (the official names; timm has no VAN)
# ----------------------------------------------------------------------------------------------

_VAN = dict(img_size=224, in_chans=3, num_classes=1000, mlp_ratios=(8, 8, 4, 4))


@register_model("van_b0")
def van_b0(*, rngs: nnx.Rngs, **overrides) -> VAN:
    """VAN-B0 (official ``van_b0``, formerly ``van_tiny``): widths (32, 64, 160, 256), depths (3, 3, 5, 2),
    MLP ratios (8, 8, 4, 4); 4,105,800 parameters (paper: 4.1M). Officially trained with drop_path_rate 0.1."""
    preset = dict(_VAN, embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2))
    return build_from_preset(VAN, "van_b0", preset, overrides, rngs)


@register_model("van_b1")
def van_b1(*, rngs: nnx.Rngs, **overrides) -> VAN:
    """VAN-B1 (official ``van_b1``, formerly ``van_small``): widths (64, 128, 320, 512), depths (2, 2, 4, 2);
    13,861,800 parameters (paper: 13.9M). Officially trained with drop_path_rate 0.1."""
    preset = dict(_VAN, embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2))
    return build_from_preset(VAN, "van_b1", preset, overrides, rngs)


@register_model("van_b2")
def van_b2(*, rngs: nnx.Rngs, **overrides) -> VAN:
    """VAN-B2 (official ``van_b2``, formerly ``van_base``): widths (64, 128, 320, 512), depths (3, 3, 12, 3);
    26,578,472 parameters (paper: 26.6M). Officially trained with drop_path_rate 0.1."""
    preset = dict(_VAN, embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3))
    return build_from_preset(VAN, "van_b2", preset, overrides, rngs)


@register_model("van_b3")
def van_b3(*, rngs: nnx.Rngs, **overrides) -> VAN:
    """VAN-B3 (official ``van_b3``, formerly ``van_large``): widths (64, 128, 320, 512), depths (3, 5, 27, 3);
    44,765,608 parameters (paper: 44.8M). Officially trained with drop_path_rate 0.2."""
    preset = dict(_VAN, embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3))
    return build_from_preset(VAN, "van_b3", preset, overrides, rngs)
