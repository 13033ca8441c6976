"""MaxViT (Tu et al. 2022) with timm's ``maxvit_*_tf`` architecture and swappable 2-D mixers.

>>> from attnzoo import zoo
>>> m = zoo.create_model("maxvit_tiny_tf_224", rngs=nnx.Rngs(0))
>>> m.eval()                                   # BatchNorm: running statistics (m.train() for batch statistics)
>>> logits = m(images)                         # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)         # [B, 7, 7, 512]
>>> maps = m.forward_intermediates(images)     # stem [B,112,112,64], stages [B,56,56,64] ... [B,7,7,512]

Architecture (timm ``MaxxVit`` with the ``maxvit_*_tf`` configs, the official TF MaxViT):

* stem: 3x3 conv stride 2 (bias) -> BatchNorm -> GELU(tanh) -> 3x3 conv (bias), TF 'SAME' padding;
* 4 stages of ``depths[i]`` MaxViT blocks; the first block of every stage has stride 2. A block is
  :class:`attnzoo.layers.conv.MBConv` (with squeeze-excitation) followed by one
  :class:`PartitionAttention` per mixer, by default ``("maxvit_block", "maxvit_grid")``: block
  attention in ``window_size`` windows, then grid attention over a ``grid_size`` grid of strided
  tokens (both ``img_size // 32`` by default, timm's ``partition_ratio``), heads of 32 channels;
* head (timm ``NormMlpClassifierHead``): mean over H, W -> LayerNorm -> Dense + tanh (pre-logits,
  ``head_hidden_size``) -> Dense (classes). There is no norm between the stages and the head.

Any registered 2-D mixer (class attribute ``spatial_ndim == 2``) can replace the block and grid
attention: ``mixers=("swin_window",)`` or ``mixers=("neighborhood_attention", "maxvit_grid"),
mixer_options=({"kernel_size": 7}, {})``; each mixer is built with ``dim`` and
``num_heads = dim // head_dim``.

BatchNorm makes the model stateful: its running statistics are ``nnx.BatchStat`` variables, used
after ``model.eval()``; in training mode (``model.train()``, the initial mode) every call
normalises with batch statistics and updates them in place.

Parameters (logical axes): ``stem.conv1/conv2.kernel [3, 3, I, O]`` (None, None, None, embed);
``stages[i].blocks[j].mbconv`` (:class:`attnzoo.layers.conv.MBConv`), ``.attentions[k]`` (norms,
``mixer``, ``mlp``); ``head_norm``, ``pre_logits.kernel [C, hidden]`` (embed, mlp),
``head.kernel [hidden, classes]`` (mlp, None).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers import MLP, Dense, LayerNorm, create_mixer, get_mixer_class
from attnzoo.layers.common import DType, as_pair, check_bool
from attnzoo.layers.conv import ACTIVATIONS, BatchNorm, Conv2d, MBConv
from attnzoo.pallas_kernels.common import check_int
from attnzoo.zoo.common import (
    TimmVisionModel,
    build_from_preset,
    check_widths_and_depths,
    global_avg_pool,
    map_mixer_flops,
    mlp_flops,
    remat_policy,
)
from attnzoo.zoo.convert import assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm, register_timm_converter

__all__ = ["MaxViT", "MaxViTBlock", "MaxViTStage", "MaxViTStem", "PartitionAttention"]

MAXVIT_MIXERS = ("maxvit_block", "maxvit_grid")


class MaxViTStem(nnx.Module):
    """3x3 conv stride 2 -> BatchNorm -> activation -> 3x3 conv (both with bias, TF 'SAME' padding).

    ``x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), widths[1]]`` in the compute dtype.
    """

    def __init__(
        self,
        in_chans: int,
        widths: tuple[int, int],
        *,
        activation: str,
        norm_eps: float,
        norm_momentum: float,
        dtype: DType | None,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        conv = dict(padding="SAME", use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.conv1 = Conv2d(in_chans, widths[0], 3, stride=2, **conv)
        self.norm1 = BatchNorm(
            widths[0], epsilon=norm_eps, momentum=norm_momentum, dtype=dtype, param_dtype=param_dtype
        )
        self.conv2 = Conv2d(widths[0], widths[1], 3, stride=1, **conv)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), widths[1]]``."""
        return self.conv2(ACTIVATIONS[self.activation](self.norm1(self.conv1(x))))


class PartitionAttention(nnx.Module):
    """Pre-norm transformer block on a 2-D map: ``x + mixer(LN(x))``, then ``x + MLP(LN(x))``
    (timm maxxvit ``PartitionAttentionCl``; no layer scale). ``x [B, H, W, C] -> [B, H, W, C]``.

    The mixer is ``create_mixer(mixer, dim=C, num_heads=num_heads, dtype=..., param_dtype=...,
    **mixer_options)``; the MLP is ``C -> mlp_dim -> C`` with biases and GELU (tanh approximation if
    ``approximate_gelu``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mixer: str,
        mixer_options: dict[str, Any],
        mlp_dim: int,
        approximate_gelu: bool,
        norm_eps: float,
        dtype: DType | None,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mixer = create_mixer(
            mixer, dim=dim, num_heads=num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **mixer_options
        )
        self.norm2 = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(
            dim, mlp_dim, kind="gelu", use_bias=True, approximate_gelu=approximate_gelu,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        x = x + self.mixer(self.norm1(x)).astype(x.dtype)
        return x + self.mlp(self.norm2(x)).astype(x.dtype)


class MaxViTBlock(nnx.Module):
    """:class:`attnzoo.layers.conv.MBConv` (``in_features -> dim``, ``stride``) followed by one
    :class:`PartitionAttention` per mixer (timm ``MaxxVitBlock``: block, then grid attention).

    ``x [B, H, W, in_features] -> [B, ceil(H / stride), ceil(W / stride), dim]``.
    """

    def __init__(
        self,
        in_features: int,
        dim: int,
        *,
        stride: int,
        mbconv_options: dict[str, Any],
        attention_options: Sequence[dict[str, Any]],
        rngs: nnx.Rngs,
    ):
        self.mbconv = MBConv(in_features, dim, stride=stride, rngs=rngs, **mbconv_options)
        self.attentions = nnx.List([PartitionAttention(dim, rngs=rngs, **options) for options in attention_options])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, in_features]`` -> ``[B, ceil(H / stride), ceil(W / stride), dim]``."""
        x = self.mbconv(x)
        for attention in self.attentions:
            x = attention(x)
        return x


class MaxViTStage(nnx.Module):
    """``depth`` :class:`MaxViTBlock` s; the first has stride 2 and changes the width."""

    def __init__(self, in_features: int, dim: int, depth: int, *, rngs: nnx.Rngs, **block_options):
        self.blocks = nnx.List([
            MaxViTBlock(
                in_features if index == 0 else dim, dim, stride=2 if index == 0 else 1, rngs=rngs, **block_options
            )
            for index in range(depth)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, H, W, in_features]`` -> ``[B, ceil(H/2), ceil(W/2), dim]``."""
        for block in self.blocks:
            x = block(x)
        return x


def _apply_rematerialised(block: nnx.Module, x: jax.Array, policy) -> jax.Array:
    """``block(x)`` under ``jax.checkpoint(policy=policy)``, writing back the BatchNorm statistics the
    call updates when some BatchNorm is in training mode. A functional split / merge rather than
    ``nnx.remat``, which writes every ``BatchStat`` back (so fails under a plain ``jax.grad`` of a
    model merged inside it, even in evaluation mode)."""
    training = any(
        isinstance(node, BatchNorm) and not node.use_running_average for _, node in nnx.iter_graph(block)
    )
    graphdef, state = nnx.split(block)

    def pure(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), (nnx.state(module, nnx.BatchStat) if training else None)

    y, stats = jax.checkpoint(pure, policy=policy)(state, x)
    if training:
        nnx.update(block, stats)
    return y


def _per_mixer(owner: str, name: str, value, count: int) -> list[dict[str, Any]]:
    """``mixer_options``: None, one dict for every mixer, or one dict per mixer."""
    if value is None:
        return [{} for _ in range(count)]
    if isinstance(value, dict):
        return [dict(value) for _ in range(count)]
    if isinstance(value, (tuple, list)) and len(value) == count and all(isinstance(v, dict) for v in value):
        return [dict(v) for v in value]
    raise TypeError(
        f"{owner}: {name} must be None, a dict or a sequence of {count} dicts (one per mixer), got {value!r}"
    )


class MaxViT(TimmVisionModel):
    """timm's MaxViT (``maxvit_*_tf``) with swappable 2-D mixers, NHWC images.

    Args:
      img_size: input height and width (an int or ``(H, W)``).
      in_chans: input channels. num_classes: classes of the head (0 = no classifier: the model
        returns the pre-logits features).
      embed_dims: width of each stage. depths: blocks per stage.
      stem_width: the stem's two conv widths (an int is both).
      head_dim: channels per attention head (``num_heads = dim // head_dim`` per stage).
      window_size / grid_size: block-attention window and grid-attention grid (an int or a pair);
        default ``img_size // 32`` (timm's partition ratio). Every stage's feature map must divide
        by both.
      mixers: the 2-D mixer names applied after the MBConv of every block, in order.
      mixer_options: extra options of the mixers: a dict for all of them or one dict per mixer.
        ``"maxvit_block"`` / ``"maxvit_grid"`` get ``window_size`` / ``grid_size`` and ``head_dim``.
      mlp_ratio: MLP hidden width ``int(dim * mlp_ratio)``.
      expand_ratio: MBConv expansion (of the output width). se_ratio: MBConv squeeze-excitation width.
      mbconv_gate: the gate inside every MBConv, by name (:func:`attnzoo.layers.gates.make_gate`):
        "se" (MaxViT's squeeze-excitation, the default), "eca", "cbam" or None (no gate).
        mbconv_gate_options: options of that gate (a dict), e.g. ``{"reduction_ratio": 8}``.
      activation: activation of stem, MBConv and MLPs: "gelu_tanh" (TF MaxViT) or "gelu".
      conv_norm_eps / conv_norm_momentum: BatchNorm epsilon and running-average decay (Flax
        convention: timm's torch ``momentum=0.1`` is 0.9; TF MaxViT trains with 0.99).
      attn_norm_eps: LayerNorm epsilon of the attention blocks and the head (1e-5).
      head_hidden_size: width of the pre-logits Dense + tanh of the head; None = no pre-logits layer.
      features_only: build a feature extractor (timm's ``features_only``): no head; calling the
        model returns the stem's and every stage's output (NHWC), one per ``feature_info`` entry.
      remat: remat policy name per MaxViT block (``attnzoo.zoo.remat_policy``).
      dtype: compute dtype (default: promotion of input and parameter dtypes).
      param_dtype: parameter dtype. logits_dtype: dtype of the logits (default float32).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    _owner = "MaxViT"

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 5, 2),
        stem_width: int | Sequence[int] = 64,
        head_dim: int = 32,
        window_size: int | Sequence[int] | None = None,
        grid_size: int | Sequence[int] | None = None,
        mixers: Sequence[str] = MAXVIT_MIXERS,
        mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        mlp_ratio: float = 4.0,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        mbconv_gate: str | None = "se",
        mbconv_gate_options: dict[str, Any] | None = None,
        activation: str = "gelu_tanh",
        conv_norm_eps: float = 1e-3,
        conv_norm_momentum: float = 0.99,
        attn_norm_eps: float = 1e-5,
        head_hidden_size: int | None = 512,
        features_only: bool = False,
        remat: str = "none",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logits_dtype: DType = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        owner = "MaxViT"
        self.img_size = as_pair(owner, "img_size", img_size)
        self.in_chans = check_int(owner, "in_chans", in_chans)
        self.num_classes = check_int(owner, "num_classes", num_classes, minimum=0)
        self.embed_dims, self.depths = check_widths_and_depths(owner, embed_dims, depths)
        self.stem_width = as_pair(owner, "stem_width", stem_width)
        self.head_dim = check_int(owner, "head_dim", head_dim)
        for index, dim in enumerate(self.embed_dims):
            if dim % self.head_dim:
                raise ValueError(f"{owner}: embed_dims[{index}] = {dim} must be divisible by head_dim {self.head_dim}")
        if window_size is None:  # timm's partition ratio
            window_size = (self.img_size[0] // 32, self.img_size[1] // 32)
            if min(window_size) < 1:
                raise ValueError(f"{owner}: img_size {self.img_size} is below 32, so window_size must be given")
        self.window_size = as_pair(owner, "window_size", window_size)
        self.grid_size = self.window_size if grid_size is None else as_pair(owner, "grid_size", grid_size)
        for name, value in (("mlp_ratio", mlp_ratio), ("expand_ratio", expand_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}")
        if activation not in ("gelu_tanh", "gelu"):
            raise ValueError(f"{owner}: activation must be 'gelu_tanh' or 'gelu', got {activation!r}")
        self.activation = activation
        self.mbconv_gate = mbconv_gate
        self._set_common_options(owner, features_only=features_only, remat=remat, dtype=dtype, param_dtype=param_dtype,
                                 logits_dtype=logits_dtype)
        self.use_remat, self.remat_policy = remat_policy(remat)

        # Feature map sizes: stem stride 2, then every stage stride 2 (TF 'SAME': ceil).
        sizes = [tuple(-(-s // 2) for s in self.img_size)]
        for _ in self.depths:
            sizes.append(tuple(-(-s // 2) for s in sizes[-1]))
        self.feature_sizes = tuple(sizes)
        self.mixers, options = self._mixer_options(mixers, mixer_options)

        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.stem = MaxViTStem(
            self.in_chans, self.stem_width, activation=activation, norm_eps=conv_norm_eps,
            norm_momentum=conv_norm_momentum, rngs=rngs, **common,
        )
        mbconv_options = dict(
            expand_ratio=expand_ratio, se_ratio=se_ratio, gate=mbconv_gate, gate_options=mbconv_gate_options,
            activation=activation, norm_eps=conv_norm_eps, norm_momentum=conv_norm_momentum, **common,
        )
        stages = []
        in_features = self.stem_width[1]
        for dim, depth in zip(self.embed_dims, self.depths):
            attention_options = [
                dict(num_heads=dim // self.head_dim, mixer=name, mixer_options=option, mlp_dim=int(dim * mlp_ratio),
                     approximate_gelu=activation == "gelu_tanh", norm_eps=attn_norm_eps, **common)
                for name, option in zip(self.mixers, options)
            ]
            stages.append(MaxViTStage(
                in_features, dim, depth, mbconv_options=mbconv_options, attention_options=attention_options, rngs=rngs,
            ))
            in_features = dim
        self.stages = nnx.List(stages)
        self.num_features = self.embed_dims[-1]
        self.head_hidden_size = (
            None if head_hidden_size is None else check_int(owner, "head_hidden_size", head_hidden_size)
        )
        self.head_norm = nnx.data(None)
        self.pre_logits = nnx.data(None)
        self.head = nnx.data(None)
        if not self.features_only:
            self.head_norm = LayerNorm(self.num_features, epsilon=attn_norm_eps, **common)
            if self.head_hidden_size is not None:
                self.pre_logits = Dense(
                    self.num_features, self.head_hidden_size, logical_axes=("embed", "mlp"), use_bias=True,
                    rngs=rngs, **common,
                )
            self.reset_classifier(num_classes, rngs=rngs)

    def _mixer_options(self, mixers, mixer_options) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
        """Checks the mixer names (registered, 2-D) and returns them with one options dict each;
        block / grid attention get the window / grid and ``head_dim``, and every stage's map must
        divide by them (timm's rule; partitions are never padded here)."""
        owner = "MaxViT"
        if isinstance(mixers, str) or not isinstance(mixers, (tuple, list)) or not mixers:
            raise TypeError(
                f"{owner}: mixers must be a non-empty sequence of registered 2-D mixer names, got {mixers!r}"
            )
        for name in mixers:
            if not isinstance(name, str):
                raise TypeError(f"{owner}: mixers must be mixer names (str), got {name!r}")
            if getattr(get_mixer_class(name), "spatial_ndim", None) != 2:
                raise ValueError(
                    f"{owner}: mixer {name!r} is not a 2-D mixer (spatial_ndim == 2); MaxViT blocks need one"
                )
        options = _per_mixer(owner, "mixer_options", mixer_options, len(mixers))
        for name, option in zip(mixers, options):
            if name not in MAXVIT_MIXERS:
                continue
            what = "window_size" if name == "maxvit_block" else "grid_size"
            partition = as_pair(owner, f"{name} {what}", option.get("window_size", getattr(self, what)))
            option.update(window_size=partition, head_dim=option.get("head_dim", self.head_dim))
            for index, (height, width) in enumerate(self.feature_sizes[1:]):
                if height % partition[0] or width % partition[1]:
                    raise ValueError(
                        f"{owner}: stage {index} has a {height} x {width} feature map (img_size {self.img_size}), "
                        f"not divisible by the {name} {what} {partition}"
                    )
        return tuple(mixers), options

    def _set_global_pool(self, owner: str, global_pool: str) -> None:
        """``reset_classifier``'s ``global_pool`` may only be "avg" (the only pooling of this head)."""
        if global_pool != "avg":
            raise ValueError(f"{owner}: global_pool must be None or 'avg', got {global_pool!r}")

    def _classifier_input(self) -> tuple[int, str]:
        """The classifier reads the pre-logits features; ``reset_classifier`` keeps the head's norm
        and pre-logits layer."""
        return self.head_width, "mlp" if self.pre_logits is not None else "embed"

    @property
    def head_width(self) -> int:
        """Width of the pre-logits features: ``head_hidden_size``, or ``num_features`` without it."""
        return self.num_features if self.head_hidden_size is None else self.head_hidden_size

    # ------------------------------------------------------------------------------------------
    # timm's feature contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The stem's and each stage's output: ``num_chs``, ``reduction`` (2, 4, 8, ...), ``module``."""
        info = [dict(num_chs=self.stem_width[1], reduction=2, module="stem")]
        for index, dim in enumerate(self.embed_dims):
            info.append(dict(num_chs=dim, reduction=2 ** (index + 2), module=f"stages.{index}"))
        return info

    def _run_blocks(self, x: jax.Array, stage: MaxViTStage) -> jax.Array:
        for block in stage.blocks:
            x = _apply_rematerialised(block, x, self.remat_policy) if self.use_remat else block(x)
        return x

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """Outputs of the stem (index 0) and the stages (1..) up to index ``last`` (later stages are
        not run), as ``feature_info``."""
        self._check_images(images)
        x = self.stem(images)
        outputs = [x]
        for stage in self.stages[:last]:
            x = self._run_blocks(x, stage)
            outputs.append(x)
        return outputs

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> the last stage's output ``[B, H/32, W/32, num_features]`` (NHWC)."""
        return self._feature_maps(images, len(self.stages))[-1]

    def _pre_logits(self, features: jax.Array) -> jax.Array:
        """features ``[B, h, w, num_features]`` -> ``[B, head_width]``: mean over h, w -> ``head_norm``
        -> ``tanh(pre_logits(.))`` when there is a pre-logits layer (``forward_head``)."""
        if self.features_only:
            raise ValueError(f"{self._owner}.forward_head: a features_only model has no head")
        self._check_feature_map(features)
        x = self.head_norm(global_avg_pool(features))
        return x if self.pre_logits is None else jnp.tanh(self.pre_logits(x))

    def _intermediate_norm(self, owner: str, norm):
        """``norm`` is accepted for timm's signature; MaxViT has no norm between the stages and the
        head (timm's ``norm`` is an identity for these models), so it changes nothing."""
        check_bool(owner, "norm", norm)
        return None

    # ------------------------------------------------------------------------------------------
    # Cost model
    # ------------------------------------------------------------------------------------------

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Stem: its two convolutions (``Conv2d.flops``); per block on the stage's ``h x w`` map:
        ``MBConv.flops`` (on the block's input size), and per attention ``mixer.flops(h, w)`` plus
        ``2 * h w * C * F * 2`` for the MLP; head: ``2 * C * hidden + 2 * hidden * K``. Norms,
        activations, softmax, biases and pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        stem = self.stem
        total = stem.conv1.flops(*self.img_size) + stem.conv2.flops(*self.feature_sizes[0])
        previous = self.feature_sizes[0]
        for stage, (height, width) in zip(self.stages, self.feature_sizes[1:]):
            for block in stage.blocks:
                total += block.mbconv.flops(*previous)
                for attention in block.attentions:
                    total += map_mixer_flops(attention.mixer, True, height, width, self._owner)
                    total += mlp_flops(attention.mlp, height * width)
                previous = (height, width)
        if not self.features_only:
            if self.pre_logits is not None:
                total += 2 * self.num_features * self.head_hidden_size
            total += 2 * self.head_width * self.num_classes
        return int(total)


# ----------------------------------------------------------------------------------------------
# Presets (timm names)
# ----------------------------------------------------------------------------------------------

_MAXVIT_TF = dict(img_size=224, in_chans=3, num_classes=1000, depths=(2, 2, 5, 2), stem_width=64)


@register_model("maxvit_tiny_tf_224")
def maxvit_tiny_tf_224(*, rngs: nnx.Rngs, **overrides) -> MaxViT:
    """MaxViT-T at 224 (timm ``maxvit_tiny_tf_224``): widths 64..512, depths 2-2-5-2; 30,916,528 params."""
    preset = dict(_MAXVIT_TF, embed_dims=(64, 128, 256, 512), head_hidden_size=512)
    return build_from_preset(MaxViT, "maxvit_tiny_tf_224", preset, overrides, rngs)


@register_model("maxvit_small_tf_224")
def maxvit_small_tf_224(*, rngs: nnx.Rngs, **overrides) -> MaxViT:
    """MaxViT-S at 224 (timm ``maxvit_small_tf_224``): widths 96..768, depths 2-2-5-2; 68,927,956 params."""
    preset = dict(_MAXVIT_TF, embed_dims=(96, 192, 384, 768), head_hidden_size=768)
    return build_from_preset(MaxViT, "maxvit_small_tf_224", preset, overrides, rngs)


@register_model("maxvit_base_tf_224")
def maxvit_base_tf_224(*, rngs: nnx.Rngs, **overrides) -> MaxViT:
    """MaxViT-B at 224 (timm ``maxvit_base_tf_224``): widths 96..768, depths 2-6-14-2; 119,467,708 params."""
    preset = dict(_MAXVIT_TF, embed_dims=(96, 192, 384, 768), depths=(2, 6, 14, 2), head_hidden_size=768)
    return build_from_preset(MaxViT, "maxvit_base_tf_224", preset, overrides, rngs)


@register_model("maxvit_large_tf_224")
def maxvit_large_tf_224(*, rngs: nnx.Rngs, **overrides) -> MaxViT:
    """MaxViT-L at 224 (timm ``maxvit_large_tf_224``): widths 128..1024, depths 2-6-14-2, stem 128;
    211,785,560 params."""
    preset = dict(_MAXVIT_TF, embed_dims=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128,
                  head_hidden_size=1024)
    return build_from_preset(MaxViT, "maxvit_large_tf_224", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# timm checkpoints
# ----------------------------------------------------------------------------------------------


def _load_batch_norm(read, norm: BatchNorm, name: str, what: str) -> None:
    """torch ``BatchNorm2d`` (timm ``BatchNormAct2d``) ``weight`` / ``bias`` / ``running_mean`` /
    ``running_var`` -> :class:`BatchNorm` ``scale`` / ``bias`` / ``mean`` / ``var``."""
    owner = read.owner
    assign(norm.scale, read(f"{name}.weight"), f"{what}.scale", owner)
    assign(norm.bias, read(f"{name}.bias"), f"{what}.bias", owner)
    assign(norm.mean, read(f"{name}.running_mean"), f"{what}.mean", owner)
    assign(norm.var, read(f"{name}.running_var"), f"{what}.var", owner)


def _load_conv(read, conv: Conv2d, name: str, what: str) -> None:
    assign(conv.kernel, conv_kernel(read(f"{name}.weight")), f"{what}.kernel", read.owner)
    if conv.bias is not None:
        assign(conv.bias, read(f"{name}.bias"), f"{what}.bias", read.owner)


def _load_pointwise(read, dense: Dense, name: str, what: str) -> None:
    """torch 1x1 ``Conv2d.weight [O, I, 1, 1]`` / ``bias [O]`` -> a Dense kernel ``[I, O]`` / bias."""
    fan_in, fan_out = dense.in_features[0], dense.out_features[0]
    assign(dense.kernel, read(f"{name}.weight", (fan_out, fan_in, 1, 1))[:, :, 0, 0].T, f"{what}.kernel", read.owner)
    if dense.bias is not None:
        assign(dense.bias, read(f"{name}.bias", (fan_out,)), f"{what}.bias", read.owner)


def timm_relative_bias_table(table: np.ndarray) -> np.ndarray:
    """timm ``RelPosBiasTf.relative_position_bias_table [Hd, 2ph-1, 2pw-1]`` -> the
    :class:`attnzoo.layers.window.WindowAttention` table ``[(2ph-1)(2pw-1), Hd]``.

    timm (and TF MaxViT) index by key minus query, ``tf[h, yk - yq + ph - 1, xk - xq + pw - 1]``;
    attnzoo by query minus key, ``ours[(yq - yk + ph - 1) * (2pw - 1) + xq - xk + pw - 1, h]``: both
    offset axes are reversed, then flattened row-major with heads last.
    """
    if table.ndim != 3:
        raise ValueError(f"timm_relative_bias_table: expected a [heads, 2ph-1, 2pw-1] table, got shape {table.shape}")
    heads = table.shape[0]
    return np.ascontiguousarray(table[:, ::-1, ::-1].transpose(1, 2, 0)).reshape(-1, heads)


@register_timm_converter(MaxViT)
def _load_timm_maxvit(model: MaxViT, read) -> None:
    """timm ``MaxxVit`` (``maxvit_*_tf``) -> :class:`MaxViT`.

    Conv weights OIHW -> HWIO; 1x1 convs (``conv1_1x1``, ``conv3_1x1``, squeeze-excite ``fc1`` /
    ``fc2``, ``shortcut.expand``) -> Dense kernels ``[in, out]``; ``BatchNormAct2d`` -> BatchNorm
    with running statistics; ``attn.qkv [3 Hd Dh, D]`` rows ordered (q/k/v, head, channel)
    (timm's ``head_first=False``) -> ``qkv.kernel [D, 3, Hd, Dh]``; ``attn.proj`` -> ``proj``;
    relative bias tables by :func:`timm_relative_bias_table`; ``head.norm`` / ``head.pre_logits.fc``
    / ``head.fc`` -> ``head_norm`` / ``pre_logits`` / ``head`` (a ``features_only`` model skips them).
    """
    if model.mixers != MAXVIT_MIXERS:
        raise TypeError(
            f"load_timm_weights: a timm MaxViT has block and grid attention {MAXVIT_MIXERS}; "
            f"this model's mixers are {model.mixers!r}"
        )
    if model.mbconv_gate != "se":
        raise TypeError(
            f"load_timm_weights: a timm MaxViT has squeeze-excitation in its MBConv blocks; this model's "
            f"mbconv_gate is {model.mbconv_gate!r}"
        )
    owner = read.owner
    _load_conv(read, model.stem.conv1, "stem.conv1", "stem.conv1")
    _load_batch_norm(read, model.stem.norm1, "stem.norm1", "stem.norm1")
    _load_conv(read, model.stem.conv2, "stem.conv2", "stem.conv2")
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            source, target = f"stages.{i}.blocks.{j}", f"stages[{i}].blocks[{j}]"
            conv = block.mbconv
            _load_batch_norm(read, conv.pre_norm, f"{source}.conv.pre_norm", f"{target}.mbconv.pre_norm")
            _load_pointwise(read, conv.expand, f"{source}.conv.conv1_1x1", f"{target}.mbconv.expand")
            _load_batch_norm(read, conv.norm1, f"{source}.conv.norm1", f"{target}.mbconv.norm1")
            _load_conv(read, conv.depthwise, f"{source}.conv.conv2_kxk", f"{target}.mbconv.depthwise")
            _load_batch_norm(read, conv.norm2, f"{source}.conv.norm2", f"{target}.mbconv.norm2")
            if conv.se is not None:
                _load_pointwise(read, conv.se.fc1, f"{source}.conv.se.fc1", f"{target}.mbconv.se.fc1")
                _load_pointwise(read, conv.se.fc2, f"{source}.conv.se.fc2", f"{target}.mbconv.se.fc2")
            _load_pointwise(read, conv.project, f"{source}.conv.conv3_1x1", f"{target}.mbconv.project")
            if conv.shortcut_proj is not None:
                _load_pointwise(
                    read, conv.shortcut_proj, f"{source}.conv.shortcut.expand", f"{target}.mbconv.shortcut_proj"
                )
            for k, part in enumerate(("attn_block", "attn_grid")):
                attention, name, what = block.attentions[k], f"{source}.{part}", f"{target}.attentions[{k}]"
                load_layer_norm(read, attention.norm1, f"{name}.norm1", f"{what}.norm1")
                load_layer_norm(read, attention.norm2, f"{name}.norm2", f"{what}.norm2")
                mixer = attention.mixer
                load_dense(read, mixer.qkv, f"{name}.attn.qkv", f"{what}.mixer.qkv")
                load_dense(read, mixer.proj, f"{name}.attn.proj", f"{what}.mixer.proj")
                if mixer.relative_position_bias_table is not None:
                    ph, pw = mixer.window_size
                    table = read(
                        f"{name}.attn.rel_pos.relative_position_bias_table", (mixer.num_heads, 2 * ph - 1, 2 * pw - 1)
                    )
                    assign(mixer.relative_position_bias_table, timm_relative_bias_table(table),
                           f"{what}.mixer.relative_position_bias_table", owner)
                load_dense(read, attention.mlp.up, f"{name}.mlp.fc1", f"{what}.mlp.up")
                load_dense(read, attention.mlp.down, f"{name}.mlp.fc2", f"{what}.mlp.down")
    if model.features_only:  # a classifier checkpoint loads into a backbone: its head is not needed
        read.used.update(key for key in read.state_dict if key.startswith("head."))
        return
    load_layer_norm(read, model.head_norm, "head.norm", "head_norm")
    if model.pre_logits is not None:
        load_dense(read, model.pre_logits, "head.pre_logits.fc", "pre_logits")
    if model.head is not None:
        load_dense(read, model.head, "head.fc", "head")
