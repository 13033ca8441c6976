"""BiFormer (Zhu et al. 2023, "BiFormer: Vision Transformer with Bi-Level Routing Attention"; official
code rayleizhu/BiFormer ``models/biformer.py``). timm has no BiFormer.

>>> from attnzoo import zoo
>>> m = zoo.create_model("biformer_tiny", rngs=nnx.Rngs(0))
>>> logits = m(images)                          # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)          # [B,7,7,512] after the final BatchNorm
>>> maps = m.forward_intermediates(images)      # 4 x [B,h_i,w_i,C_i] (feature_info)
>>> swapped = zoo.create_model("biformer_tiny", mixer=("biformer_routing",) * 3 + ("swin_window",),
...                            rngs=nnx.Rngs(0))   # any registered mixer per stage

Architecture (official ``BiFormer``, all NHWC): a convolutional stem (3x3 stride-2 conv ``C_in -> C_0/2``,
BatchNorm, GELU, 3x3 stride-2 conv ``-> C_0``, BatchNorm; padding 1, biases) -> 4 stages -> final
BatchNorm -> average pool over H, W -> linear head. Stage ``i > 0`` starts with a 3x3 stride-2 conv
(padding 1, bias) and a BatchNorm. Blocks (:class:`BiFormerBlock`) add a depthwise 3x3 convolution
position embedding first, ``x + DWConv(x)``, then are pre-norm: ``x + mixer(LN(x))`` and
``x + MLP(LN(x))`` (LayerNorm eps 1e-6, GELU MLP of ratio 3 with biases). The mixers of the released
models are bi-level routing attention (``biformer_routing``, 7 x 7 regions, top-k 1, 4, 16) in stages
0-2 and global attention with LePE (``attention_lepe``, 8 heads) in stage 3 (the official ``topks``
``[1, 4, 16, -2]``); head width 32 in the routing stages (``num_heads = C / 32``).

Mixers: each stage's mixer is any registered name. Each block's options are
``{**backbone defaults, **mixer_options[stage]}``; the defaults are, for mixers that take them,
``n_win``, the stage's ``topk`` (when not None), ``qk_dim`` (the stage's ``qk_dims`` entry),
``side_dwconv`` and ``auto_pad``. A 2-D mixer is called on ``[B, h, w, C]``, any other on
``[B, h * w, C]``.

Sizes: any ``img_size`` (each stride-2 conv gives ``ceil(H / 2)``); the routing mixers need maps
divisible by ``n_win`` (224 px gives 56, 28, 14) unless ``auto_pad=True``. ``feature_info``
reductions are 4, 8, 16, 32. BatchNorms follow ``model.train()`` / ``model.eval()``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers import get_mixer_class
from attnzoo.layers import biformer as _biformer  # noqa: F401  (registers biformer_routing / attention_lepe)
from attnzoo.layers.biformer import AttentionLePE, BiLevelRoutingAttention
from attnzoo.layers.common import DType, as_pair, check_bool, check_choice, gelu
from attnzoo.layers.conv import BatchNorm, Conv2d
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import (
    BlockStage,
    TimmVisionModel,
    build_from_preset,
    check_depths,
    check_drop_path_rate,
    check_logits_dtype,
    drop_path_rates,
    global_avg_pool,
    ints_per_stage,
    is_int,
    map_mixer_flops,
    mixer_defaults,
    mlp_flops,
    per_stage,
    ratios_per_stage,
    remat_policy,
    takes_option,
)
from attnzoo.zoo.convert import StateDictReader, assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.swin import SwinBlock
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm

__all__ = ["BiFormer", "BiFormerBlock", "BiFormerStem", "BiFormerDownsample", "load_official_biformer_weights"]

_OWNER = "BiFormer"


class BiFormerStem(nnx.Module):
    """The official stem: 3x3 stride-2 conv ``C_in -> C/2``, BatchNorm, GELU, 3x3 stride-2 conv
    ``C/2 -> C``, BatchNorm (padding 1, biases). ``[B, H, W, C_in] -> [B, ceil(ceil(H/2)/2), ..., C]``."""

    def __init__(self, in_chans: int, dim: int, *, bn_eps: float, bn_momentum: float, dtype: DType | None,
                 param_dtype: DType, rngs: nnx.Rngs):
        conv = dict(stride=2, padding=1, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(epsilon=bn_eps, momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_chans, dim // 2, 3, **conv)
        self.norm1 = BatchNorm(dim // 2, **norm)
        self.conv2 = Conv2d(dim // 2, dim, 3, **conv)
        self.norm2 = BatchNorm(dim, **norm)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.conv2.output_size(*self.conv1.output_size(height, width))

    def flops(self, height: int, width: int) -> int:
        return self.conv1.flops(height, width) + self.conv2.flops(*self.conv1.output_size(height, width))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.norm2(self.conv2(gelu(self.norm1(self.conv1(images)))))


class BiFormerDownsample(nnx.Module):
    """3x3 stride-2 conv ``C -> C'`` (padding 1, bias), then BatchNorm.
    ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C']``."""

    def __init__(self, dim: int, out_dim: int, *, bn_eps: float, bn_momentum: float, dtype: DType | None,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.conv = Conv2d(dim, out_dim, 3, stride=2, padding=1, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.norm = BatchNorm(out_dim, epsilon=bn_eps, momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.conv.output_size(height, width)

    def flops(self, height: int, width: int) -> int:
        return self.conv.flops(height, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class BiFormerBlock(SwinBlock):
    """The official ``Block``: ``x + DWConv_k(x)`` (depthwise ``k x k``, padding ``k // 2``, bias;
    none with ``pos_embed_kernel=0``), then :class:`attnzoo.zoo.swin.SwinBlock`'s pre-norm
    ``x + mixer(LN(x))``, ``x + MLP(LN(x))``. ``x [B, h, w, C] -> [B, h, w, C]``."""

    def __init__(self, dim: int, num_heads: int, *, pos_embed_kernel: int, **options):
        super().__init__(dim, num_heads, **options)
        self.pos_embed = (
            Conv2d(dim, dim, pos_embed_kernel, padding=pos_embed_kernel // 2, groups=dim, dtype=options["dtype"],
                   param_dtype=options["param_dtype"], rngs=options["rngs"])
            if pos_embed_kernel
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x).astype(x.dtype)
        return super().__call__(x)

    def flops(self, height: int, width: int) -> int:
        """Matmul / convolution FLOPs on an ``height x width`` map: position embedding, mixer, MLP."""
        pos = 0 if self.pos_embed is None else self.pos_embed.flops(height, width)
        return pos + map_mixer_flops(self.mixer, self.spatial, height, width, _OWNER) + mlp_flops(self.mlp,
                                                                                                   height * width)


class BiFormer(TimmVisionModel):
    """The BiFormer backbone (see the module docstring) on timm's contract. NHWC images of a fixed
    ``img_size``.

    Args:
      img_size: input ``(H, W)`` or an int.
      in_chans: input channels. num_classes: head width; 0 = no head (pooled features).
      global_pool: ``"avg"`` or ``"max"`` over H, W before the head.
      embed_dim: one width per stage (official ``embed_dim``).
      depths: blocks per stage.
      num_heads: heads per stage, an int or one per stage (official: ``qk_dim // 32`` in routing
        stages, 8 in the ``attention_lepe`` stage).
      mlp_ratio: MLP hidden width ``int(C * mlp_ratio)``; one value or one per stage (official 3).
      mixer: a registered mixer name, or one per stage.
      mixer_options: extra options of every block's mixer (dict), or one dict per stage.
      n_win: regions per side of the routing mixers (official 7).
      topk: routed regions per stage (ints, or None for stages whose mixer takes no ``topk``).
      qk_dims: q / k width of the routing mixers per stage; default ``embed_dim``.
      side_dwconv: LePE kernel of the mixers (official 5).
      auto_pad: zero-pad maps to multiples of ``n_win`` in the routing mixers (official: False).
      pos_embed_kernel: the blocks' depthwise position-embedding kernel (official 3; 0 = none).
      layer_scale_init: learn per-channel residual scales initialised to this (official: off).
      norm_eps: LayerNorm epsilon (official 1e-6). bn_eps / bn_momentum: BatchNorm epsilon (1e-5) and
        running-average decay (0.9 = torch's momentum 0.1).
      drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over all
        blocks (official schedule; the official training default is 0.1, 0.15 for BiFormer-S per its
        README; default here 0).
      features_only: a feature extractor (timm's ``features_only``): no head; calling the model
        returns every stage's output ``[B, h_i, w_i, C_i]`` (without the final BatchNorm, which is
        kept for ``forward_intermediates(norm=True)`` and ``forward_features``).
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
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: int | Sequence[int] = (2, 4, 8, 8),
        mlp_ratio: float | Sequence[float] = 3.0,
        mixer: str | Sequence[str] = ("biformer_routing", "biformer_routing", "biformer_routing", "attention_lepe"),
        mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        n_win: int = 7,
        topk: int | Sequence[int | None] | None = (1, 4, 16, None),
        qk_dims: Sequence[int] | None = None,
        side_dwconv: int = 5,
        auto_pad: bool = False,
        pos_embed_kernel: int = 3,
        layer_scale_init: float | None = None,
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
        self.depths = check_depths(owner, depths)
        num_stages = self.num_stages = len(self.depths)
        self.dims = ints_per_stage(owner, "embed_dim", embed_dim, num_stages)
        if self.dims[0] % 2:
            raise ValueError(f"{owner}: embed_dim[0] must be even (the stem's first conv has embed_dim[0] // 2 "
                             f"channels), got {self.dims[0]}")
        self.num_heads = ints_per_stage(owner, "num_heads", num_heads, num_stages)
        ratios = ratios_per_stage(owner, "mlp_ratio", mlp_ratio, num_stages)
        mixers = per_stage(owner, "mixer", mixer, num_stages, lambda v: isinstance(v, str))
        mixer_classes = [get_mixer_class(name) for name in mixers]  # ValueError listing the known mixers
        self.mixer_names = tuple(mixers)
        stage_options = per_stage(owner, "mixer_options", {} if mixer_options is None else mixer_options, num_stages,
                                  lambda v: isinstance(v, dict))
        self.n_win = check_int(owner, "n_win", n_win)
        topks = per_stage(owner, "topk", topk, num_stages, lambda v: v is None or is_int(v))
        self.topk = tuple(None if t is None else check_int(owner, f"topk[{i}]", t) for i, t in enumerate(topks))
        self.qk_dims = self.dims if qk_dims is None else ints_per_stage(owner, "qk_dims", qk_dims, num_stages)
        self.side_dwconv = check_int(owner, "side_dwconv", side_dwconv, minimum=0)
        self.auto_pad = check_bool(owner, "auto_pad", auto_pad)
        self.pos_embed_kernel = check_int(owner, "pos_embed_kernel", pos_embed_kernel, minimum=0)
        if self.pos_embed_kernel % 2 == 0 and self.pos_embed_kernel:
            raise ValueError(f"{owner}: pos_embed_kernel must be 0 or odd, got {self.pos_embed_kernel}")
        if layer_scale_init is not None:
            layer_scale_init = check_float(owner, "layer_scale_init", layer_scale_init, positive=True)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        bn_eps = check_float(owner, "bn_eps", bn_eps, positive=True, allow_none=False)
        self.drop_path_rate = check_drop_path_rate(owner, drop_path_rate)
        self.features_only = check_bool(owner, "features_only", features_only)
        self.remat = remat
        remat_policy(remat)  # ValueError listing the policies
        self.global_pool = check_choice(owner, "global_pool", global_pool, ("avg", "max"))
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.logits_dtype = check_logits_dtype(owner, logits_dtype)
        self.num_features = self.dims[-1]

        norm = dict(bn_eps=bn_eps, bn_momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stem = BiFormerStem(self.in_chans, self.dims[0], **norm)
        self.stem_output = stem.output_size(*self.img_size)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, resolutions, block_index, resolution = [], [], 0, self.stem_output
        for s in range(num_stages):
            down = stem if s == 0 else BiFormerDownsample(self.dims[s - 1], self.dims[s], **norm)
            if s > 0:
                resolution = down.output_size(*resolution)
            resolutions.append(tuple(resolution))
            cls = mixer_classes[s]
            options = mixer_defaults(cls, mixers[s], True)
            options.pop("qkv_bias", None)  # each BiFormer mixer's own default is the official one
            defaults = dict(n_win=self.n_win, topk=self.topk[s], qk_dim=self.qk_dims[s], side_dwconv=self.side_dwconv,
                            auto_pad=self.auto_pad)
            for option, value in defaults.items():
                if value is not None and takes_option(cls, option, var_keyword=False):
                    options[option] = value
            options.update(stage_options[s])
            blocks = []
            for _ in range(self.depths[s]):
                blocks.append(BiFormerBlock(
                    self.dims[s], self.num_heads[s], pos_embed_kernel=self.pos_embed_kernel, mixer=mixers[s],
                    mixer_options=dict(options), mlp_ratio=ratios[s], norm_eps=self.norm_eps,
                    layer_scale_init=layer_scale_init, drop_path=float(rates[block_index]), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                ))
                block_index += 1
            stages.append(BlockStage(down, blocks, remat=remat))
        self.stages = nnx.List(stages)
        self.resolutions = tuple(resolutions)
        self.norm = BatchNorm(self.num_features, epsilon=bn_eps, momentum=bn_momentum, dtype=dtype,
                              param_dtype=param_dtype)
        self.head = nnx.data(None)
        self.num_classes = 0
        if not self.features_only:
            self.reset_classifier(num_classes, rngs=rngs)

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    def _set_global_pool(self, owner: str, global_pool: str) -> None:
        """``reset_classifier``'s ``global_pool``: "avg" or "max" over H, W."""
        self.global_pool = check_choice(owner, "global_pool", global_pool, ("avg", "max"))

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage: ``num_chs``, ``reduction`` (4 * 2**i) and ``module`` (``"stages.i"``)."""
        return [dict(num_chs=self.dims[s], reduction=4 * 2**s, module=f"stages.{s}") for s in range(self.num_stages)]

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> ``[B, h, w, num_features]`` after the last stage and the final
        BatchNorm."""
        return self._final_norm(self._feature_maps(images, self.num_stages - 1)[-1])

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)

    def _pre_logits(self, features: jax.Array) -> jax.Array:
        """features ``[B, h, w, num_features]`` -> ``[B, num_features]`` ("avg" or "max" over h, w)."""
        self._check_feature_map(features)
        return global_avg_pool(features) if self.global_pool == "avg" else jnp.max(features, axis=(1, 2))

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages ``0 .. last`` (later stages are not run)."""
        self._check_images(images)
        x, outputs = images, []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def _intermediate_norm(self, owner: str, norm):
        """``norm`` applies the final BatchNorm to the last stage's output (others are never normed)."""
        if not norm:
            return None
        return lambda index, x: self.norm(x) if index == self.num_stages - 1 else x

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Stem and downsampling convolutions; per block the position embedding's depthwise conv, the
        mixer's ``flops(h, w)`` (``flops(h * w)`` for a 1-D mixer) and the MLP's ``2 * h w * C * F * 2``;
        head ``2 * C * K``. Norms, softmax, GELU, biases, top-k and pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        want = (*self.img_size, self.in_chans)
        if example_shape is not None and tuple(example_shape) != want:
            raise ValueError(f"{_OWNER}.forward_flops: example_shape must be (H, W, C) = {want}, got {tuple(example_shape)!r}")
        total, previous = 0, self.img_size
        for s, stage in enumerate(self.stages):
            total += stage.downsample.flops(*previous)
            height, width = self.resolutions[s]
            total += sum(block.flops(height, width) for block in stage.blocks)
            previous = (height, width)
        return int(total + 2 * self.num_features * self.num_classes)


# ----------------------------------------------------------------------------------------------
# Presets (official models/biformer.py)
# ----------------------------------------------------------------------------------------------

_BIFORMER = dict(img_size=224, in_chans=3, num_classes=1000, mlp_ratio=3.0, n_win=7, topk=(1, 4, 16, None),
                 mixer=("biformer_routing",) * 3 + ("attention_lepe",), side_dwconv=5, pos_embed_kernel=3)


@register_model("biformer_tiny")
def biformer_tiny(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-T: C (64, 128, 256, 512), depths (2, 2, 8, 2), heads (2, 4, 8, 8), top-k (1, 4, 16, -);
    13,142,760 parameters (paper: 13.1M). Official training default drop_path_rate 0.1 (here 0)."""
    preset = dict(_BIFORMER, embed_dim=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(2, 4, 8, 8))
    return build_from_preset(BiFormer, "biformer_tiny", preset, overrides, rngs)


@register_model("biformer_small")
def biformer_small(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-S: C (64, 128, 256, 512), depths (4, 4, 18, 4), heads (2, 4, 8, 8);
    25,536,232 parameters (paper: 25.5M). Trained with drop_path_rate 0.15 (official README)."""
    preset = dict(_BIFORMER, embed_dim=(64, 128, 256, 512), depths=(4, 4, 18, 4), num_heads=(2, 4, 8, 8))
    return build_from_preset(BiFormer, "biformer_small", preset, overrides, rngs)


@register_model("biformer_base")
def biformer_base(*, rngs: nnx.Rngs, **overrides) -> BiFormer:
    """BiFormer-B: C (96, 192, 384, 768), depths (4, 4, 18, 4), heads (3, 6, 12, 8);
    56,804,968 parameters (paper: 56.8M)."""
    preset = dict(_BIFORMER, embed_dim=(96, 192, 384, 768), depths=(4, 4, 18, 4), num_heads=(3, 6, 12, 8))
    return build_from_preset(BiFormer, "biformer_base", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------


def _load_conv(read: StateDictReader, conv: Conv2d, name: str, what: str) -> None:
    kernel = conv.kernel.get_value()
    weight = read(f"{name}.weight", (kernel.shape[3], kernel.shape[2], kernel.shape[0], kernel.shape[1]))
    assign(conv.kernel, conv_kernel(weight), f"{what}.kernel", read.owner)
    if conv.bias is not None:
        assign(conv.bias, read(f"{name}.bias", (kernel.shape[3],)), f"{what}.bias", read.owner)


def _load_batch_norm(read: StateDictReader, norm: BatchNorm, name: str, what: str) -> None:
    """torch ``BatchNorm2d`` ``weight`` / ``bias`` / ``running_mean`` / ``running_var`` -> scale / bias /
    mean / var (``num_batches_tracked`` is not a weight)."""
    shape = (norm.num_features,)
    for source, target in (("weight", norm.scale), ("bias", norm.bias), ("running_mean", norm.mean),
                           ("running_var", norm.var)):
        assign(target, read(f"{name}.{source}", shape), f"{what}.{source}", read.owner)


def load_official_biformer_weights(model: BiFormer, state_dict: Mapping[str, np.ndarray], *,
                                   strict: bool = True) -> list[str]:
    """Loads an official rayleizhu/BiFormer ``state_dict`` (numpy arrays, e.g.
    ``{k: v.float().numpy() for k, v in torch.load(path)["model"].items()}``) into ``model`` in place.

    The model must have the official mixers (``biformer_routing`` / ``attention_lepe``) and
    LayerScale off. Names: ``downsample_layers.0.{0, 1, 3, 4}`` (conv, BN, conv, BN) ->
    ``stages[0].downsample.{conv1, norm1, conv2, norm2}``; ``downsample_layers.{i}.{0, 1}`` ->
    ``stages[i].downsample.{conv, norm}``; ``stages.{s}.{j}.pos_embed`` / ``norm1`` / ``norm2`` ->
    the block's; ``attn.qkv.qkv.weight [2 Dqk + D, D]`` (rows q | k | v) -> ``mixer.qk`` / ``mixer.v``;
    ``attn.wo`` -> ``mixer.proj``; ``attn.qkv`` / ``attn.proj`` (``AttentionLePE``) -> ``mixer.qkv`` /
    ``mixer.proj``; ``attn.lepe`` -> ``mixer.lepe``; ``mlp.0`` / ``mlp.3`` -> ``mlp.up`` / ``mlp.down``;
    ``norm`` (BatchNorm); ``head``. Conv weights OIHW -> HWIO.

    Returns the unused keys; with ``strict`` a key other than BatchNorm's ``num_batches_tracked``
    that is not used raises ``ValueError``.
    """
    owner = "load_official_biformer_weights"
    if not isinstance(model, BiFormer):
        raise TypeError(f"{owner}: model must be a BiFormer, got {type(model).__name__}")
    for name in model.mixer_names:
        if not issubclass(get_mixer_class(name), (BiLevelRoutingAttention, AttentionLePE)):
            raise TypeError(f"{owner}: the official model has biformer_routing / attention_lepe mixers; this model has "
                            f"{model.mixer_names}")
    read = StateDictReader(state_dict, "", owner)
    for s, stage in enumerate(model.stages):
        down = stage.downsample
        if s == 0:
            _load_conv(read, down.conv1, "downsample_layers.0.0", "stages.0.downsample.conv1")
            _load_batch_norm(read, down.norm1, "downsample_layers.0.1", "stages.0.downsample.norm1")
            _load_conv(read, down.conv2, "downsample_layers.0.3", "stages.0.downsample.conv2")
            _load_batch_norm(read, down.norm2, "downsample_layers.0.4", "stages.0.downsample.norm2")
        else:
            _load_conv(read, down.conv, f"downsample_layers.{s}.0", f"stages.{s}.downsample.conv")
            _load_batch_norm(read, down.norm, f"downsample_layers.{s}.1", f"stages.{s}.downsample.norm")
        for j, block in enumerate(stage.blocks):
            name, what = f"stages.{s}.{j}", f"stages.{s}.blocks.{j}"
            if block.gamma1 is not None:
                raise TypeError(f"{owner}: the released models have no layer scale; {what} has one")
            if block.pos_embed is not None:
                _load_conv(read, block.pos_embed, f"{name}.pos_embed", f"{what}.pos_embed")
            load_layer_norm(read, block.norm1, f"{name}.norm1", f"{what}.norm1")
            load_layer_norm(read, block.norm2, f"{name}.norm2", f"{what}.norm2")
            attn = block.mixer
            if isinstance(attn, BiLevelRoutingAttention):
                qk, dim = attn.qk_dim, attn.dim
                weight = read(f"{name}.attn.qkv.qkv.weight", (2 * qk + dim, dim))
                assign(attn.qk.kernel, weight[: 2 * qk].T.reshape(attn.qk.kernel.get_value().shape),
                       f"{what}.mixer.qk.kernel", owner)
                assign(attn.v.kernel, weight[2 * qk :].T.reshape(attn.v.kernel.get_value().shape),
                       f"{what}.mixer.v.kernel", owner)
                if attn.qk.bias is not None:
                    bias = read(f"{name}.attn.qkv.qkv.bias", (2 * qk + dim,))
                    assign(attn.qk.bias, bias[: 2 * qk].reshape(attn.qk.bias.get_value().shape), f"{what}.mixer.qk.bias",
                           owner)
                    assign(attn.v.bias, bias[2 * qk :].reshape(attn.v.bias.get_value().shape), f"{what}.mixer.v.bias",
                           owner)
                load_dense(read, attn.proj, f"{name}.attn.wo", f"{what}.mixer.proj")
            else:
                load_dense(read, attn.qkv, f"{name}.attn.qkv", f"{what}.mixer.qkv")
                load_dense(read, attn.proj, f"{name}.attn.proj", f"{what}.mixer.proj")
            if attn.lepe is not None:
                _load_conv(read, attn.lepe, f"{name}.attn.lepe", f"{what}.mixer.lepe")
            load_dense(read, block.mlp.up, f"{name}.mlp.0", f"{what}.mlp.up")
            load_dense(read, block.mlp.down, f"{name}.mlp.3", f"{what}.mlp.down")
    _load_batch_norm(read, model.norm, "norm", "norm")
    if model.head is not None:
        load_dense(read, model.head, "head")
    unused = read.unused()
    leftover = [key for key in unused if not key.endswith("num_batches_tracked")]
    if strict and leftover:
        raise ValueError(f"{owner}: state_dict keys not converted: {leftover}")
    return unused
