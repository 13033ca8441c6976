"""DaViT (Ding et al. 2022, "DaViT: Dual Attention Vision Transformers") with timm's ``DaVit``
architecture and swappable 2-D mixers.

>>> from attnzoo import zoo
>>> m = zoo.create_model("davit_tiny", rngs=nnx.Rngs(0))
>>> logits = m(images)                          # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)          # [B,7,7,768] (no norm: DaViT normalises in its head)
>>> maps = m.forward_intermediates(images)      # [B,56,56,96], [B,28,28,192], [B,14,14,384], [B,7,7,768]
>>> na = zoo.create_model("davit_tiny", mixers=("neighborhood_attention", "davit_channel"),
...                       mixer_options={"neighborhood_attention": {"kernel_size": 7}}, rngs=nnx.Rngs(0))

Architecture (timm 1.0.31 ``davit.DaVit``, the official dingmyu/davit), all NHWC:

* stem: the image zero-padded at the bottom / right to a multiple of 4, a 7x7 stride-4 convolution
  (padding 3, bias), LayerNorm over channels;
* 4 stages; stage ``i > 0`` starts with a downsample: LayerNorm over the channels, then a
  ``down_kernel_size`` stride-2 convolution ``C_{i-1} -> C_i`` with bias (kernel 2: the map is
  first zero-padded at the bottom / right to a multiple of 2, no convolution padding; an odd
  kernel ``k``: padding ``k // 2``);
* stage ``i`` repeats ``depths[i]`` times a dual block: one :class:`DaViTBlock` per mixer of
  ``mixers`` (default ``("davit_window", "davit_channel")``: spatial window attention, then
  channel group attention, timm's ``attn_types=("spatial", "channel")``);
* head (timm ``NormMlpClassifierHead`` without hidden layer): "avg" or "max" pooling over H, W,
  LayerNorm, Dense. There is no norm between the last stage and the head.

A :class:`DaViTBlock` on a ``[B, h, w, C]`` map (timm ``SpatialBlock`` / ``ChannelBlock``)::

    x = cpe1(x)                          # x + depthwise3x3(x) (attnzoo.layers.davit.ConvPosEnc)
    x = x + drop_path(mixer(LN(x)))
    x = cpe2(x)
    x = x + drop_path(MLP(LN(x)))         # GELU MLP, hidden int(C * mlp_ratio), biases

Mixers: a 2-D mixer (``spatial_ndim = 2``) is called on ``[B, h, w, C]``, any other registered
mixer on the tokens ``[B, h * w, C]``. Each mixer gets ``dim``, ``num_heads`` (the stage's),
``dtype``, ``param_dtype``, ``qkv_bias`` and ``window_size`` where its constructor takes them, and
``mixer_options[name]``. DaViT never shrinks a window to a smaller map (unlike Swin): maps smaller
than the window are padded.

Parameters (logical axes as in :mod:`attnzoo.layers`): ``stem.conv.kernel [7, 7, C_in, C_0]``,
``stem.norm``; ``stages[i].downsample.{norm, conv}``; ``stages[i].blocks[j * M + k]`` is mixer
``k`` of dual block ``j`` (``M = len(mixers)``; timm's ``stages.i.blocks.j.k``) with ``cpe1``,
``norm1``, ``mixer``, ``cpe2``, ``norm2``, ``mlp``; ``head_norm``, ``head.kernel [C, classes]``.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import MLP, LayerNorm, create_mixer, get_mixer_class
from attnzoo.layers.common import DType, as_pair, check_bool
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.davit import ConvPosEnc, DaViTWindowAttention
from attnzoo.layers.window import WindowAttention
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import (
    BlockStage,
    TimmVisionModel,
    apply_mixer,
    build_from_preset,
    check_depths,
    check_drop_path_rate,
    drop_path_rates,
    is_spatial_mixer,
    map_mixer_flops,
    mixer_defaults,
    mlp_flops,
    pool_map,
)
from attnzoo.zoo.convert import assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm, register_timm_converter

__all__ = ["DaViT", "DaViTBlock", "DaViTStage", "DaViTStem", "DaViTDownsample"]

_OWNER = "DaViT"
DAVIT_MIXERS = ("davit_window", "davit_channel")
_TIMM_KINDS = {"davit_window": "spatial", "davit_channel": "channel"}


def _pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """``x [B, H, W, C]`` zero-padded at the bottom / right to multiples of ``multiple``."""
    height, width = x.shape[1], x.shape[2]
    return jnp.pad(x, ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0)))


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


class DaViTStem(nnx.Module):
    """Pad to a multiple of 4, 7x7 stride-4 conv (padding 3, bias), LayerNorm.
    ``images [B, H, W, C_in] -> [B, ceil(H/4), ceil(W/4), dim]``."""

    def __init__(self, in_chans: int, dim: int, *, norm_eps: float, dtype: DType | None, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.conv = Conv2d(in_chans, dim, 7, stride=4, padding=3, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.norm = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)

    @staticmethod
    def output_size(height: int, width: int) -> tuple[int, int]:
        return -(-height // 4), -(-width // 4)

    def flops(self, height: int, width: int) -> int:
        return self.conv.flops(_padded(height, 4), _padded(width, 4))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.norm(self.conv(_pad_to_multiple(images, 4)))


class DaViTDownsample(nnx.Module):
    """LayerNorm, then a ``kernel_size`` stride-2 conv ``dim -> out_dim`` with bias (an even kernel:
    the map zero-padded at the bottom / right to a multiple of it, no conv padding; an odd one:
    padding ``k // 2``). ``[B, H, W, dim] -> [B, h', w', out_dim]``."""

    def __init__(self, dim: int, out_dim: int, kernel_size: int, *, norm_eps: float, dtype: DType | None,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.kernel_size = kernel_size
        self.even = kernel_size % 2 == 0
        self.norm = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.conv = Conv2d(dim, out_dim, kernel_size, stride=2, padding=0 if self.even else kernel_size // 2,
                           use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _conv_input(self, height: int, width: int) -> tuple[int, int]:
        if not self.even:
            return height, width
        return _padded(height, self.kernel_size), _padded(width, self.kernel_size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.conv.output_size(*self._conv_input(height, width))

    def flops(self, height: int, width: int) -> int:
        return self.conv.flops(*self._conv_input(height, width))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        if self.even:
            x = _pad_to_multiple(x, self.kernel_size)
        return self.conv(x)


class DaViTBlock(nnx.Module):
    """One attention block of a DaViT stage (timm ``SpatialBlock`` / ``ChannelBlock`` for the
    ``davit_window`` / ``davit_channel`` mixers): ``x = cpe1(x)``, ``x + drop_path(mixer(LN(x)))``,
    ``x = cpe2(x)``, ``x + drop_path(MLP(LN(x)))``; ``[B, h, w, C] -> [B, h, w, C]``.

    Stochastic depth (``drop_path > 0``) drops each sample's residual branch with that probability
    (scaling kept ones by ``1 / (1 - drop_path)``) in training mode (``model.train()``), with the
    ``dropout`` rng stream; it is the identity after ``model.eval()``.
    """

    def __init__(self, dim: int, num_heads: int, *, mixer: str, mixer_options: dict[str, Any], mlp_ratio: float,
                 norm_eps: float, cpe_act: bool, drop_path: float, dtype: DType | None, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.spatial = is_spatial_mixer(mixer)
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.cpe1 = ConvPosEnc(dim, 3, act=cpe_act, rngs=rngs, **common)
        self.norm1 = LayerNorm(dim, epsilon=norm_eps, **common)
        self.mixer = create_mixer(mixer, dim=dim, num_heads=num_heads, rngs=rngs, **common, **mixer_options)
        self.cpe2 = ConvPosEnc(dim, 3, act=cpe_act, rngs=rngs, **common)
        self.norm2 = LayerNorm(dim, epsilon=norm_eps, **common)
        self.mlp = MLP(dim, int(dim * mlp_ratio), kind="gelu", use_bias=True, rngs=rngs, **common)
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None

    def _residual(self, x: jax.Array, branch: jax.Array) -> jax.Array:
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        return x + branch.astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, h, w, C]`` -> ``[B, h, w, C]``."""
        x = self.cpe1(x)
        x = self._residual(x, apply_mixer(self.mixer, self.spatial, self.norm1(x)))
        x = self.cpe2(x)
        return self._residual(x, self.mlp(self.norm2(x)))

    def flops(self, height: int, width: int) -> int:
        """Matmul and convolution FLOPs on an ``height x width`` map: both position encodings, the
        mixer (``flops(h, w)`` of a 2-D mixer, ``flops(h * w)`` of a 1-D one) and the MLP."""
        mixer = map_mixer_flops(self.mixer, self.spatial, height, width, _OWNER)
        cpe = self.cpe1.flops(height, width) + self.cpe2.flops(height, width)
        return cpe + mixer + mlp_flops(self.mlp, height * width)


class DaViTStage(BlockStage):
    """An optional :class:`DaViTDownsample`, then the :class:`DaViTBlock` s in order, each under the
    remat policy (:class:`attnzoo.zoo.common.BlockStage`)."""


def _int_tuple(name: str, value, count: int | None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or (count is not None and len(value) != count):
        want = f"{count} ints (one per stage)" if count is not None else "a non-empty sequence of ints"
        raise ValueError(f"{_OWNER}: {name} must be {want}, got {value!r}")
    return tuple(check_int(_OWNER, f"{name}[{i}]", v) for i, v in enumerate(value))


def _stage_mixers(mixers, num_stages: int) -> list[tuple[str, ...]]:
    """``mixers`` as one tuple of names per stage."""
    def is_names(value):
        return isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)

    if isinstance(mixers, str):
        return [(mixers,)] * num_stages
    if is_names(mixers):
        return [tuple(mixers)] * num_stages
    if isinstance(mixers, (list, tuple)) and len(mixers) == num_stages and all(
            isinstance(m, str) or is_names(m) for m in mixers):
        return [(m,) if isinstance(m, str) else tuple(m) for m in mixers]
    raise ValueError(
        f"{_OWNER}: mixers must be a mixer name, a sequence of names (the dual block of every stage), or "
        f"{num_stages} such sequences (one per stage), got {mixers!r}"
    )


def _stage_mixer_options(options, stage_mixers: list[tuple[str, ...]]) -> list[dict[str, dict]]:
    """``mixer_options`` as one ``{mixer name: options}`` per stage; a name no stage uses is an error."""
    num_stages = len(stage_mixers)

    def is_table(value):
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())

    if options is None:
        per_stage = [{}] * num_stages
    elif is_table(options):
        per_stage = [options] * num_stages
    elif isinstance(options, (list, tuple)) and len(options) == num_stages and all(
            o is None or is_table(o) for o in options):
        per_stage = [{} if o is None else o for o in options]
    else:
        raise ValueError(
            f"{_OWNER}: mixer_options must be a dict {{mixer name: options dict}} or {num_stages} such dicts "
            f"(one per stage), got {options!r}"
        )
    if is_table(options):
        unused = sorted(set(options) - set().union(*stage_mixers))
        if unused:
            raise ValueError(f"{_OWNER}: mixer_options names {unused}, which no stage uses (mixers {stage_mixers})")
    for s, (table, names) in enumerate(zip(per_stage, stage_mixers, strict=True)):
        unused = sorted(set(table) - set(names))
        if unused and not is_table(options):
            raise ValueError(f"{_OWNER}: mixer_options[{s}] names {unused}, which stage {s} does not use (mixers {names})")
    return per_stage


class DaViT(TimmVisionModel):
    """timm's DaViT with pluggable mixers (NHWC images of a fixed ``img_size``).

    Args:
      img_size: input ``(H, W)`` or an int; any size (the stem and the downsamples pad).
      in_chans: input channels. num_classes: head width; 0 = no classifier (pooled, normed features).
      global_pool: ``"avg"`` or ``"max"`` over H, W before the head norm.
      embed_dims / depths / num_heads: per stage width, dual blocks and heads (channel groups).
      window_size: ``window_size`` of mixers that take one (``davit_window``, ``swin_window``, ...).
      mlp_ratio: MLP hidden width ``int(C * mlp_ratio)``.
      qkv_bias: the ``qkv_bias`` option of mixers that take one (DaViT: True).
      mixers: the mixers of a dual block in order, e.g. ``("davit_window", "davit_channel")``, or one
        name, for every stage; or one such sequence per stage, e.g. ``(("davit_window",),
        ("neighborhood_attention", "davit_channel"))`` (a flat sequence of names is always one dual
        block). Any registered mixer name is allowed.
      mixer_options: ``{mixer name: options}`` for every stage, or one such dict per stage.
      cpe_act: GELU in the position encodings (timm's ``cpe_act``; DaViT: False).
      down_kernel_size: kernel of the downsample convolutions (timm: 2; Florence-2's DaViT: 3).
      norm_eps: LayerNorm epsilon (timm: 1e-5).
      drop_path_rate: stochastic depth of the last dual block, rising linearly from 0 over all dual
        blocks (timm's ``calculate_drop_path_rates(..., stagewise=True)``: the blocks of one dual
        block share a rate); active only in training mode with a ``dropout`` rng stream.
      features_only: a feature extractor (no head norm, no head); calling it returns every stage's
        output ``[B, h_i, w_i, C_i]``.
      remat: remat policy name applied per block.
      dtype / param_dtype / logits_dtype: compute, parameter and logits dtypes.
      rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for stochastic depth).
    """

    _owner = _OWNER

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (1, 1, 3, 1),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        mixers: str | Sequence[str] | Sequence[str | Sequence[str]] = DAVIT_MIXERS,
        mixer_options: dict[str, dict[str, Any]] | Sequence[dict[str, dict[str, Any]] | None] | None = None,
        cpe_act: bool = False,
        down_kernel_size: int = 2,
        norm_eps: float = 1e-5,
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
        self.dims = _int_tuple("embed_dims", embed_dims, num_stages)
        self.num_heads = _int_tuple("num_heads", num_heads, num_stages)
        self.window_size = as_pair(owner, "window_size", window_size)
        self.mlp_ratio = check_float(owner, "mlp_ratio", mlp_ratio, positive=True, allow_none=False)
        self.qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        stage_mixers = _stage_mixers(mixers, num_stages)
        classes = {name: get_mixer_class(name) for names in stage_mixers for name in names}  # ValueError if unknown
        self.mixer_names = tuple(stage_mixers)
        stage_options = _stage_mixer_options(mixer_options, stage_mixers)
        self.cpe_act = check_bool(owner, "cpe_act", cpe_act)
        self.down_kernel_size = check_int(owner, "down_kernel_size", down_kernel_size)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        drop_path_rate = self.drop_path_rate = check_drop_path_rate(owner, drop_path_rate)
        self._set_common_options(owner, features_only=features_only, remat=remat, dtype=dtype, param_dtype=param_dtype,
                                 logits_dtype=logits_dtype)
        self._set_global_pool(owner, global_pool)
        self.num_features = self.dims[-1]

        common = dict(norm_eps=self.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = DaViTStem(self.in_chans, self.dims[0], **common)
        resolution = self.stem.output_size(*self.img_size)
        rates = drop_path_rates(drop_path_rate, sum(self.depths))
        stages, resolutions, dual_index = [], [], 0
        for s in range(num_stages):
            down = None
            if s > 0:
                down = DaViTDownsample(self.dims[s - 1], self.dims[s], self.down_kernel_size, **common)
                resolution = down.output_size(*resolution)
            resolutions.append(tuple(resolution))
            blocks = []
            for _ in range(self.depths[s]):
                for name in stage_mixers[s]:
                    options = self._mixer_options(classes[name], name, stage_options[s].get(name, {}))
                    blocks.append(DaViTBlock(
                        self.dims[s], self.num_heads[s], mixer=name, mixer_options=options, mlp_ratio=self.mlp_ratio,
                        norm_eps=self.norm_eps, cpe_act=self.cpe_act, drop_path=float(rates[dual_index]),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    ))
                dual_index += 1
            stages.append(DaViTStage(down, blocks, remat=remat))
        self.stages = nnx.List(stages)
        self.resolutions = tuple(resolutions)
        self.head_norm = None if self.features_only else LayerNorm(self.num_features, epsilon=self.norm_eps,
                                                                   dtype=dtype, param_dtype=param_dtype)
        self._init_head(num_classes, rngs)

    def _mixer_options(self, cls, name: str, stage_options: dict) -> dict:
        options = mixer_defaults(cls, name, self.qkv_bias)
        if "window_size" in inspect.signature(cls.__init__).parameters or (
                isinstance(cls, type) and issubclass(cls, WindowAttention)):
            options["window_size"] = self.window_size
        options.update(stage_options)
        return options

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage: ``num_chs``, ``reduction`` (4, 8, 16, 32) and ``module``
        (``"stages.i"``, as timm)."""
        return [dict(num_chs=self.dims[s], reduction=4 * 2**s, module=f"stages.{s}") for s in range(self.num_stages)]

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> the last stage's output ``[B, h, w, num_features]`` (timm's
        ``norm_pre`` is the identity: DaViT normalises after pooling, in the head)."""
        return self._feature_maps(images, self.num_stages - 1)[-1]

    def _pre_logits(self, features: jax.Array) -> jax.Array:
        """features ``[B, h, w, C]`` -> ``[B, C]``: "avg" or "max" pooling, then the head LayerNorm
        (none with ``features_only``)."""
        self._check_feature_map(features)
        pooled = pool_map(features, self.global_pool)
        return pooled if self.head_norm is None else self.head_norm(pooled)

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages ``0 .. last`` (later stages are not run)."""
        self._check_images(images)
        x = self.stem(images)
        outputs = []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Stem convolution on the padded image; per stage the downsample convolution and every block
        (:meth:`DaViTBlock.flops`: two 3x3 depthwise position encodings ``2 * 2 h w 9 C``, the mixer,
        the MLP ``2 * h w * C * F * 2``); head ``2 * C * K``. Norms, softmax, GELU, biases and
        pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        total = self.stem.flops(*self.img_size)
        previous = self.stem.output_size(*self.img_size)
        for s, stage in enumerate(self.stages):
            if stage.downsample is not None:
                total += stage.downsample.flops(*previous)
            height, width = self.resolutions[s]
            total += sum(block.flops(height, width) for block in stage.blocks)
            previous = (height, width)
        return int(total + 2 * self.num_features * self.num_classes)


# ----------------------------------------------------------------------------------------------
# Presets (timm's names; 224 px, 1000 classes)
# ----------------------------------------------------------------------------------------------

_DAVIT = dict(img_size=224, in_chans=3, num_classes=1000, window_size=7, mlp_ratio=4.0, mixers=DAVIT_MIXERS)


@register_model("davit_tiny")
def davit_tiny(*, rngs: nnx.Rngs, **overrides) -> DaViT:
    """DaViT-Tiny (timm ``davit_tiny``): widths (96, 192, 384, 768), dual blocks (1, 1, 3, 1), heads
    (3, 6, 12, 24), window 7; 28,360,168 parameters. Trained with drop_path_rate 0.1 (default here 0)."""
    preset = dict(_DAVIT, embed_dims=(96, 192, 384, 768), depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24))
    return build_from_preset(DaViT, "davit_tiny", preset, overrides, rngs)


@register_model("davit_small")
def davit_small(*, rngs: nnx.Rngs, **overrides) -> DaViT:
    """DaViT-Small (timm ``davit_small``): as DaViT-Tiny with dual blocks (1, 1, 9, 1); 49,745,896
    parameters. Trained with drop_path_rate 0.2 (default here 0)."""
    preset = dict(_DAVIT, embed_dims=(96, 192, 384, 768), depths=(1, 1, 9, 1), num_heads=(3, 6, 12, 24))
    return build_from_preset(DaViT, "davit_small", preset, overrides, rngs)


@register_model("davit_base")
def davit_base(*, rngs: nnx.Rngs, **overrides) -> DaViT:
    """DaViT-Base (timm ``davit_base``): widths (128, 256, 512, 1024), dual blocks (1, 1, 9, 1), heads
    (4, 8, 16, 32); 87,954,408 parameters. Trained with drop_path_rate 0.4 (default here 0)."""
    preset = dict(_DAVIT, embed_dims=(128, 256, 512, 1024), depths=(1, 1, 9, 1), num_heads=(4, 8, 16, 32))
    return build_from_preset(DaViT, "davit_base", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# timm checkpoints
# ----------------------------------------------------------------------------------------------


def _load_conv(read, conv: Conv2d, name: str, what: str) -> None:
    kh, kw, fan_in, out = conv.kernel.get_value().shape
    assign(conv.kernel, conv_kernel(read(f"{name}.weight", (out, fan_in, kh, kw))), f"{what}.kernel", read.owner)
    assign(conv.bias, read(f"{name}.bias", (out,)), f"{what}.bias", read.owner)


@register_timm_converter(DaViT)
def _load_timm_davit(model: DaViT, read) -> None:
    """timm ``DaVit`` -> :class:`DaViT` (mixers ``davit_window`` / ``davit_channel`` only; timm's
    ``attn_types`` ``"spatial"`` / ``"channel"`` in the same order, ``channel_attn_v2=False``).

    ``stem.conv.weight [C, C_in, 7, 7]`` (OIHW) -> ``stem.conv.kernel [7, 7, C_in, C]`` (HWIO);
    ``stem.norm``; ``stages.i.downsample.{norm, conv}``; ``stages.i.blocks.j.k.cpe{1,2}.proj.weight
    [C, 1, 3, 3]`` -> ``stages[i].blocks[j * M + k].cpe{1,2}.proj.kernel [3, 3, 1, C]``;
    ``attn.qkv.weight [3C, C]`` (rows: slice, head, channel) -> ``mixer.qkv.kernel [C, 3, Hd, Cg]``
    and ``attn.proj.weight [C, C]`` -> ``mixer.proj.kernel [Hd, Cg, C]`` (both attentions have this
    layout); ``norm1`` / ``norm2``; ``mlp.fc1`` / ``fc2`` -> ``mlp.up`` / ``down``; ``head.norm`` ->
    ``head_norm``; ``head.fc`` -> ``head``.
    """
    owner = read.owner
    for names in model.mixer_names:
        if not names or any(n not in _TIMM_KINDS for n in names):
            raise TypeError(
                f"{owner}: a timm DaVit has only davit_window ('spatial') and davit_channel ('channel') mixers; this "
                f"model has mixers {model.mixer_names}"
            )
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            mixer = block.mixer
            window = isinstance(mixer, DaViTWindowAttention)
            differs = [
                what for what, bad in (
                    ("a relative position bias", window and mixer.relative_position_bias_table is not None),
                    ("a shift", window and any(mixer.shift_size)),
                    ("a grid partition", window and mixer.partition != "window"),
                    ("a head_dim other than dim // num_heads", mixer.head_dim * mixer.num_heads != mixer.dim),
                    ("a qk_scale other than head_dim ** -0.5", mixer.scale != mixer.head_dim**-0.5),
                    ("no output bias", mixer.proj.bias is None),
                ) if bad
            ]
            if differs:
                raise TypeError(f"{owner}: stages[{s}].blocks[{b}].mixer has {', '.join(differs)}; timm's DaViT "
                                "attention has none of these")
    _load_conv(read, model.stem.conv, "stem.conv", "stem.conv")
    load_layer_norm(read, model.stem.norm, "stem.norm")
    for s, stage in enumerate(model.stages):
        if stage.downsample is not None:
            load_layer_norm(read, stage.downsample.norm, f"stages.{s}.downsample.norm")
            _load_conv(read, stage.downsample.conv, f"stages.{s}.downsample.conv", f"stages[{s}].downsample.conv")
        per_dual = len(model.mixer_names[s])
        for b, block in enumerate(stage.blocks):
            name, what = f"stages.{s}.blocks.{b // per_dual}.{b % per_dual}", f"stages[{s}].blocks[{b}]"
            _load_conv(read, block.cpe1.proj, f"{name}.cpe1.proj", f"{what}.cpe1.proj")
            load_layer_norm(read, block.norm1, f"{name}.norm1", f"{what}.norm1")
            load_dense(read, block.mixer.qkv, f"{name}.attn.qkv", f"{what}.mixer.qkv")
            load_dense(read, block.mixer.proj, f"{name}.attn.proj", f"{what}.mixer.proj")
            _load_conv(read, block.cpe2.proj, f"{name}.cpe2.proj", f"{what}.cpe2.proj")
            load_layer_norm(read, block.norm2, f"{name}.norm2", f"{what}.norm2")
            load_dense(read, block.mlp.up, f"{name}.mlp.fc1", f"{what}.mlp.up")
            load_dense(read, block.mlp.down, f"{name}.mlp.fc2", f"{what}.mlp.down")
    if model.head_norm is not None:
        load_layer_norm(read, model.head_norm, "head.norm", "head_norm")
    if model.head is not None:
        load_dense(read, model.head, "head.fc", "head")
