"""Hierarchical (Swin-like) vision backbones whose stages take any registered token mixer: Swin, NAT, DiNAT.

>>> from attnzoo import zoo
>>> m = zoo.create_model("swin_tiny_patch4_window7_224", rngs=nnx.Rngs(0))
>>> logits = m(images)                          # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)          # [B,7,7,768] after the final norm
>>> maps = m.forward_intermediates(images)      # 4 x [B,h_i,w_i,C_i], one per stage (feature_info)
>>> na = zoo.create_model("swin_tiny_patch4_window7_224", mixer="neighborhood_attention",
...                       mixer_options={"kernel_size": 7}, rngs=nnx.Rngs(0))
>>> dinat = zoo.create_model("dinat_tiny", rngs=nnx.Rngs(0))

Architecture (timm 1.0.31 ``SwinTransformer``): stem -> 4 stages -> final LayerNorm -> pool over
H, W -> linear head, all NHWC. Stage ``i`` is an optional downsample (stages ``i > 0``) followed by
pre-norm blocks ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` (GELU MLP, biases), optionally with layer
scale (NAT's ``gamma1`` / ``gamma2``) and stochastic depth.

* ``stem="patch"`` (Swin): a ``p x p`` stride-``p`` patch convolution computed as reshape + Dense,
  then LayerNorm. ``stem="conv"`` (NAT's ``ConvTokenizer``): two 3x3 stride-2 convolutions
  (``D/2`` then ``D`` channels, padding 1, biases) then LayerNorm.
* ``downsample="merge"`` (Swin's ``PatchMerging``): odd sizes zero-padded to even, each 2x2
  neighbourhood concatenated in timm's order (``(0,0), (1,0), (0,1), (1,1)`` as (row, col) offsets),
  LayerNorm over ``4C``, Dense ``4C -> 2C`` without bias. ``downsample="conv"`` (NAT's
  ``ConvDownsampler``): a 3x3 stride-2 convolution ``C -> 2C`` (padding 1, no bias) then LayerNorm.
  NAT downsamples at the end of a level; here (as timm's Swin) at the start of the next stage:
  the same computation, with each stage's features taken after its blocks.

Mixers: a 2-D mixer (``spatial_ndim = 2``) is called on ``[B, h, w, C]``; any other registered
mixer on the flattened tokens ``[B, h * w, C]``. Each block's options are
``{**backbone defaults, **mixer_options[stage], **block_options[stage][block % period]}``.
For window-partition mixers (``swin_window``, ``maxvit_block``) the stage applies timm's
``_calc_window_shift`` unless ``always_partition``: along an axis where the stage's resolution is
at most the window, the window shrinks to the resolution and the shift becomes 0. A mixer class
whose constructor names a ``resolution`` argument (``agent_attention``, ``focused_linear_attention``)
gets the stage's ``(h, w)`` as its default.

Parameters (logical axes as in :mod:`attnzoo.layers`): ``patch_embed.proj.kernel [p*p*C_in, D]``
(None, embed) with the patch pixels in (row, column, channel) order; ``layers[i].downsample``,
``layers[i].blocks[j].{norm1, mixer, norm2, mlp, gamma1, gamma2}``, ``norm``,
``head.kernel [C, num_classes]`` (embed, None).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import MLP, Dense, LayerNorm, create_mixer, get_mixer_class
from attnzoo.layers.common import DType, as_pair, check_bool, check_choice, partitioned
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.window import WindowAttention
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import (
    BlockStage,
    TimmVisionModel,
    apply_mixer,
    build_from_preset,
    check_block_options,
    check_depths,
    check_drop_path_rate,
    drop_path_rates,
    ints_per_stage,
    is_int_or_pair,
    is_spatial_mixer,
    map_mixer_flops,
    mixer_defaults,
    mlp_flops,
    per_stage,
    ratios_per_stage,
    stage_widths,
)
from attnzoo.zoo.convert import assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.timm_convert import load_dense, load_layer_norm, register_timm_converter

__all__ = ["SwinTransformer", "SwinBlock", "SwinStage", "PatchEmbed", "ConvTokenizer", "PatchMerging", "ConvDownsample",
           "calc_window_shift"]

_OWNER = "SwinTransformer"


# ----------------------------------------------------------------------------------------------
# Stems and downsamplers
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Swin's stem: non-overlapping ``p x p`` patches -> Dense -> LayerNorm.

    ``images [B, H, W, C_in] -> [B, H/p, W/p, D]``; ``proj.kernel [p*p*C_in, D]`` holds the pixels of
    a patch in (row, column, channel) order (``kernel[(i*p + j)*C_in + c, d]`` is torch's
    ``proj.weight[d, c, i, j]``).
    """

    def __init__(self, in_chans: int, dim: int, patch_size: tuple[int, int], *, norm_eps: float,
                 dtype: DType | None, param_dtype: DType, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.in_chans = in_chans
        pixels = patch_size[0] * patch_size[1] * in_chans
        self.proj = Dense(pixels, dim, logical_axes=(None, "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def __call__(self, images: jax.Array) -> jax.Array:
        batch, height, width, channels = images.shape
        (ph, pw), (gh, gw) = self.patch_size, self.output_size(height, width)
        patches = images.reshape(batch, gh, ph, gw, pw, channels).transpose(0, 1, 3, 2, 4, 5)
        return self.norm(self.proj(patches.reshape(batch, gh, gw, ph * pw * channels)))


class ConvTokenizer(nnx.Module):
    """NAT's stem: 3x3 stride-2 conv ``C_in -> D/2``, 3x3 stride-2 conv ``D/2 -> D`` (padding 1, biases,
    no activation between), LayerNorm. ``[B, H, W, C_in] -> [B, ceil(ceil(H/2)/2), ..., D]``."""

    def __init__(self, in_chans: int, dim: int, *, norm_eps: float, dtype: DType | None, param_dtype: DType,
                 rngs: nnx.Rngs):
        conv = dict(stride=2, padding=1, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(in_chans, dim // 2, 3, **conv)
        self.conv2 = Conv2d(dim // 2, dim, 3, **conv)
        self.norm = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.conv2.output_size(*self.conv1.output_size(height, width))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.norm(self.conv2(self.conv1(images)))


class PatchMerging(nnx.Module):
    """Swin's downsample: ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim]``.

    Odd sizes are zero-padded at the bottom / right; the 2x2 neighbourhood of output ``(y, x)`` is
    concatenated as ``[x[2y, 2x], x[2y+1, 2x], x[2y, 2x+1], x[2y+1, 2x+1]]`` (timm's order), then
    LayerNorm ``[4C]`` and ``reduction.kernel [4C, out_dim]`` (no bias).
    """

    def __init__(self, dim: int, out_dim: int, *, norm_eps: float, dtype: DType | None, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.norm = LayerNorm(4 * dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.reduction = Dense(4 * dim, out_dim, logical_axes=(None, "embed"), use_bias=False, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def output_size(height: int, width: int) -> tuple[int, int]:
        return -(-height // 2), -(-width // 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        rows, cols = self.output_size(height, width)
        x = x.reshape(batch, rows, 2, cols, 2, channels).transpose(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(batch, rows, cols, 4 * channels)))


class ConvDownsample(nnx.Module):
    """NAT's downsample: 3x3 stride-2 conv ``C -> out_dim`` (padding 1, no bias), then LayerNorm.
    ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim]``."""

    def __init__(self, dim: int, out_dim: int, *, norm_eps: float, dtype: DType | None, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.reduction = Conv2d(dim, out_dim, 3, stride=2, padding=1, use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(out_dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)

    @staticmethod
    def output_size(height: int, width: int) -> tuple[int, int]:
        return -(-height // 2), -(-width // 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.reduction(x))


# ----------------------------------------------------------------------------------------------
# Blocks and stages
# ----------------------------------------------------------------------------------------------


def calc_window_shift(resolution: Sequence[int], window_size, shift_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's ``SwinTransformerBlock._calc_window_shift`` (without ``always_partition``): per axis,
    a window at least as large as the resolution shrinks to it and its shift becomes 0."""
    window = as_pair(_OWNER, "window_size", window_size)
    shift = as_pair(_OWNER, "shift_size", shift_size, minimum=0)
    window = tuple(min(r, w) for r, w in zip(resolution, window, strict=True))
    shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, shift, strict=True))
    return window, shift


class SwinBlock(nnx.Module):
    """Pre-norm block on a ``[B, h, w, C]`` map: ``x + drop_path(gamma1 * mixer(LN(x)))`` then
    ``x + drop_path(gamma2 * MLP(LN(x)))`` (``gamma`` only with layer scale).

    The mixer is ``create_mixer(mixer, dim=C, num_heads=..., dtype=..., param_dtype=..., **mixer_options)``,
    called on the map for a 2-D mixer and on ``[B, h*w, C]`` tokens otherwise. Stochastic depth
    (``drop_path > 0``) drops each sample's residual branch with that probability (scaling kept ones
    by ``1 / (1 - drop_path)``) in training mode (``model.train()``), using the ``dropout`` rng
    stream; it is the identity after ``model.eval()``.
    """

    def __init__(self, dim: int, num_heads: int, *, mixer: str, mixer_options: dict[str, Any], mlp_ratio: float,
                 norm_eps: float, layer_scale_init: float | None, drop_path: float, dtype: DType | None,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.spatial = is_spatial_mixer(mixer)
        self.norm1 = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mixer = create_mixer(mixer, dim=dim, num_heads=num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                  **mixer_options)
        self.norm2 = LayerNorm(dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(dim, int(dim * mlp_ratio), kind="gelu", use_bias=True, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        if layer_scale_init is None:
            self.gamma1 = self.gamma2 = None
        else:
            init = nnx.initializers.constant(layer_scale_init)
            self.gamma1 = nnx.Param(partitioned(init, ("norm",))(None, (dim,), param_dtype))
            self.gamma2 = nnx.Param(partitioned(init, ("norm",))(None, (dim,), param_dtype))
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None
        )

    def _residual(self, x: jax.Array, branch: jax.Array, gamma) -> jax.Array:
        if gamma is not None:
            branch = branch * gamma[...].astype(branch.dtype)
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        return x + branch.astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, h, w, C]`` -> ``[B, h, w, C]``."""
        x = self._residual(x, apply_mixer(self.mixer, self.spatial, self.norm1(x)), self.gamma1)
        return self._residual(x, self.mlp(self.norm2(x)), self.gamma2)


def _block_flops(block: SwinBlock, height: int, width: int) -> int:
    """Matmul FLOPs of one block on an ``height x width`` map: the mixer's (``flops(height, width)``
    of a 2-D mixer, ``flops(height * width)`` of a 1-D one) plus the MLP's."""
    mixer = map_mixer_flops(block.mixer, block.spatial, height, width, _OWNER)
    return mixer + mlp_flops(block.mlp, height * width)


class SwinStage(BlockStage):
    """An optional downsample then ``len(blocks)`` :class:`SwinBlock` s, each applied under the remat
    policy (:class:`attnzoo.zoo.common.BlockStage`)."""


# ----------------------------------------------------------------------------------------------
# The backbone
# ----------------------------------------------------------------------------------------------


class SwinTransformer(TimmVisionModel):
    """timm's SwinTransformer with a pluggable mixer per stage; NAT / DiNAT through ``stem``,
    ``downsample``, ``layer_scale_init`` and the mixer. NHWC images of a fixed ``img_size``.

    Args:
      img_size: input ``(H, W)`` or an int (the attention masks and window sizes are built for it).
      patch_size: patch size of ``stem="patch"`` (H and W must divide by it).
      in_chans: input channels. num_classes: head width; 0 = no head (pooled features).
      global_pool: ``"avg"`` or ``"max"`` over H, W before the head.
      embed_dim: width of stage 0 (stage ``i`` has ``embed_dim * 2**i``), or one width per stage.
      depths / num_heads: blocks and heads per stage.
      mlp_ratio: MLP hidden width ``int(C * mlp_ratio)``; one value or one per stage.
      window_size: default ``window_size`` option of mixers that take one (``swin_window``,
        ``maxvit_*``): an int or ``(h, w)``, or one per stage.
      always_partition: keep the configured windows and shifts even where a stage's map is not
        larger than the window (timm's ``always_partition``).
      mixer: a registered mixer name, or one per stage.
      mixer_options: options of every block's mixer (dict), or one dict per stage.
      block_options: per-block options cycled over each stage's blocks: a sequence of dicts (every
        stage), or one such sequence (or None) per stage. Default (None): for ``swin_window``
        Swin's alternation ``[{"shift_size": 0}, {"shift_size": window // 2}]``, else ``[{}]``.
      qkv_bias: the ``qkv_bias`` option of mixers that take one.
      stem: ``"patch"`` (Swin) or ``"conv"`` (NAT's ConvTokenizer, stride 4).
      downsample: ``"merge"`` (Swin's PatchMerging) or ``"conv"`` (NAT's ConvDownsampler).
      layer_scale_init: initial value of the per-channel layer scales (NAT-S/B: 1e-5), or None.
      norm_eps: LayerNorm epsilon (timm / NAT: 1e-5).
      drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over all blocks
        (timm's and NAT's schedule); active only in training mode, needs a ``dropout`` rng stream.
      features_only: a feature extractor (timm's ``features_only``): no final norm and no head;
        calling the model returns every stage's output ``[B, h_i, w_i, C_i]``.
      remat: remat policy name applied per block.
      dtype: compute dtype (default: promotion of inputs and parameters); param_dtype: parameters;
        logits_dtype: logits (default float32).
      rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for stochastic depth).
    """

    _owner = _OWNER

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int | Sequence[int] = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float | Sequence[float] = 4.0,
        window_size=7,
        always_partition: bool = False,
        mixer: str | Sequence[str] = "swin_window",
        mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        block_options: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]] | None] | None = None,
        qkv_bias: bool = True,
        stem: str = "patch",
        downsample: str = "merge",
        layer_scale_init: float | None = None,
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
        self.patch_size = as_pair(owner, "patch_size", patch_size)
        self.in_chans = check_int(owner, "in_chans", in_chans)
        self.stem = check_choice(owner, "stem", stem, ("patch", "conv"))
        self.downsample_kind = check_choice(owner, "downsample", downsample, ("merge", "conv"))
        self.depths = check_depths(owner, depths)
        num_stages = self.num_stages = len(self.depths)
        self.num_heads = ints_per_stage(owner, "num_heads", num_heads, num_stages)
        self.dims = stage_widths(owner, "embed_dim", embed_dim, num_stages)
        ratios = ratios_per_stage(owner, "mlp_ratio", mlp_ratio, num_stages)
        windows = [as_pair(owner, "window_size", w) for w in per_stage(owner, "window_size", window_size, num_stages, is_int_or_pair)]
        self.always_partition = check_bool(owner, "always_partition", always_partition)
        mixers = per_stage(owner, "mixer", mixer, num_stages, lambda v: isinstance(v, str))
        mixer_classes = [get_mixer_class(name) for name in mixers]  # ValueError listing the known mixers
        self.mixer_names = tuple(mixers)
        stage_options = per_stage(owner, "mixer_options", {} if mixer_options is None else mixer_options, num_stages,
                                  lambda v: isinstance(v, dict))
        per_block = check_block_options(owner, block_options, num_stages)
        self.qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        self.layer_scale_init = check_float(owner, "layer_scale_init", layer_scale_init)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        drop_path_rate = self.drop_path_rate = check_drop_path_rate(owner, drop_path_rate)
        self._set_common_options(owner, features_only=features_only, remat=remat, dtype=dtype, param_dtype=param_dtype,
                                 logits_dtype=logits_dtype)
        self._set_global_pool(owner, global_pool)
        self.num_features = self.dims[-1]

        common = dict(norm_eps=self.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self.stem == "patch":
            for axis, (size, patch) in enumerate(zip(self.img_size, self.patch_size, strict=True)):
                if size % patch:
                    raise ValueError(
                        f"{owner}: img_size {self.img_size} must be divisible by patch_size {self.patch_size} "
                        f"(axis {axis}: {size} % {patch} = {size % patch})"
                    )
            self.patch_embed = PatchEmbed(self.in_chans, self.dims[0], self.patch_size, **common)
            stem_reduction = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else self.patch_size
        else:
            if self.dims[0] % 2:
                raise ValueError(f"{owner}: stem='conv' needs an even embed_dim[0], got {self.dims[0]}")
            self.patch_embed = ConvTokenizer(self.in_chans, self.dims[0], **common)
            stem_reduction = 4
        resolution = self.patch_embed.output_size(*self.img_size)
        if min(resolution) < 1:
            raise ValueError(f"{owner}: img_size {self.img_size} is too small for the stem")

        rates = drop_path_rates(drop_path_rate, sum(self.depths))
        stages, resolutions, block_index = [], [], 0
        for s in range(num_stages):
            down = None
            if s > 0:
                kind = PatchMerging if self.downsample_kind == "merge" else ConvDownsample
                down = kind(self.dims[s - 1], self.dims[s], **common)
                resolution = down.output_size(*resolution)
            resolutions.append(tuple(resolution))
            blocks = []
            options_cycle = per_block[s] if per_block[s] is not None else self._default_cycle(
                mixers[s], stage_options[s], windows[s])
            for j in range(self.depths[s]):
                options = self._mixer_options(mixer_classes[s], mixers[s], windows[s], stage_options[s],
                                              options_cycle[j % len(options_cycle)], resolution)
                blocks.append(SwinBlock(
                    self.dims[s], self.num_heads[s], mixer=mixers[s], mixer_options=options, mlp_ratio=ratios[s],
                    norm_eps=self.norm_eps, layer_scale_init=self.layer_scale_init,
                    drop_path=float(rates[block_index]), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                ))
                block_index += 1
            stages.append(SwinStage(down, blocks, remat=remat))
        self.layers = nnx.List(stages)
        self.resolutions = tuple(resolutions)
        self.stem_reduction = stem_reduction
        self.norm = None if self.features_only else LayerNorm(self.num_features, epsilon=self.norm_eps, dtype=dtype,
                                                              param_dtype=param_dtype)
        self._init_head(num_classes, rngs)

    # ------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _default_cycle(name: str, stage_options: dict, window) -> list[dict]:
        """Swin's shift alternation for ``swin_window``, else one empty dict."""
        if name != "swin_window":
            return [{}]
        wh, ww = as_pair(_OWNER, "window_size", stage_options.get("window_size", window))
        return [{"shift_size": 0}, {"shift_size": (wh // 2, ww // 2)}]

    def _mixer_options(self, cls, name: str, window, stage_options: dict, block: dict, resolution) -> dict:
        # resolution: for mixers with parameters sized to the map (agent, FLatten)
        options = mixer_defaults(cls, name, self.qkv_bias, resolution=resolution)
        windowed = isinstance(cls, type) and issubclass(cls, WindowAttention)
        if windowed:
            options["window_size"] = window
        options.update(stage_options)
        options.update(block)
        if windowed and not self.always_partition:
            partition = options.get("partition", inspect.signature(cls.__init__).parameters["partition"].default)
            if partition == "window":
                options["window_size"], options["shift_size"] = calc_window_shift(
                    resolution, options["window_size"], options.get("shift_size", 0))
        return options

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage: ``num_chs``, ``reduction`` (stride w.r.t. the image; an int, or an
        ``(h, w)`` pair for a non-square patch) and ``module`` (``"layers.i"``, as timm)."""
        info = []
        for s in range(self.num_stages):
            scale = 2**s
            reduction = (self.stem_reduction * scale if isinstance(self.stem_reduction, int)
                         else tuple(r * scale for r in self.stem_reduction))
            info.append(dict(num_chs=self.dims[s], reduction=reduction, module=f"layers.{s}"))
        return info

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> ``[B, h, w, num_features]`` after the last stage and the final norm
        (no norm with ``features_only``)."""
        return self._final_norm(self._feature_maps(images, self.num_stages - 1)[-1])

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return x if self.norm is None else self.norm(x)

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages ``0 .. last`` (later stages are not run); ``forward_intermediates``
        returns stage ``i`` as ``feature_info[i]``."""
        self._check_images(images)
        x = self.patch_embed(images)
        outputs = []
        for stage in self.layers[: last + 1]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def _intermediate_norm(self, owner: str, norm):
        """``norm`` applies the final norm to the last stage's output (as timm; others are never normed)."""
        if not norm or self.norm is None:
            return None
        return lambda index, x: self.norm(x) if index == self.num_stages - 1 else x

    def _check_output_fmt(self, owner: str, output_fmt) -> None:
        check_choice(owner, "output_fmt", output_fmt, self.output_fmts)

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Stem: the patch Dense ``2 * (H/p)(W/p) * p^2 C_in * D`` or the two convolutions'
        ``Conv2d.flops``; per stage: the downsample (merging ``2 * h w * 4C * C'``, or its
        convolution) and every block on the stage's ``h x w`` map (``mixer.flops(h, w)`` for 2-D
        mixers, ``mixer.flops(h * w)`` for 1-D ones, plus ``2 * h w * C * F * 2`` for the MLP);
        head ``2 * C * K``. Norms, softmax, GELU, biases and pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        if isinstance(self.patch_embed, PatchEmbed):
            height, width = self.patch_embed.output_size(*self.img_size)
            total = 2 * height * width * self.patch_embed.proj.in_features[0] * self.dims[0]
        else:
            stem = self.patch_embed
            total = stem.conv1.flops(*self.img_size) + stem.conv2.flops(*stem.conv1.output_size(*self.img_size))
        previous = self.patch_embed.output_size(*self.img_size)
        for s, stage in enumerate(self.layers):
            height, width = self.resolutions[s]
            if isinstance(stage.downsample, PatchMerging):
                total += 2 * height * width * 4 * self.dims[s - 1] * self.dims[s]
            elif stage.downsample is not None:
                total += stage.downsample.reduction.flops(*previous)
            total += sum(_block_flops(block, height, width) for block in stage.blocks)
            previous = (height, width)
        return int(total + 2 * self.num_features * self.num_classes)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

_SWIN = dict(img_size=224, patch_size=4, in_chans=3, num_classes=1000, window_size=7, mixer="swin_window")


@register_model("swin_tiny_patch4_window7_224")
def swin_tiny_patch4_window7_224(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``): C 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24),
    window 7; 28,288,354 parameters. Trained with drop_path_rate 0.2 in the paper (default here 0)."""
    preset = dict(_SWIN, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return build_from_preset(SwinTransformer, "swin_tiny_patch4_window7_224", preset, overrides, rngs)


@register_model("swin_small_patch4_window7_224")
def swin_small_patch4_window7_224(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """Swin-S (timm ``swin_small_patch4_window7_224``): C 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24);
    49,606,258 parameters."""
    preset = dict(_SWIN, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return build_from_preset(SwinTransformer, "swin_small_patch4_window7_224", preset, overrides, rngs)


@register_model("swin_base_patch4_window7_224")
def swin_base_patch4_window7_224(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """Swin-B (timm ``swin_base_patch4_window7_224``): C 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32);
    87,768,224 parameters."""
    preset = dict(_SWIN, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return build_from_preset(SwinTransformer, "swin_base_patch4_window7_224", preset, overrides, rngs)


_NAT = dict(img_size=224, in_chans=3, num_classes=1000, embed_dim=64, num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
            stem="conv", downsample="conv", mixer="neighborhood_attention", mixer_options={"kernel_size": 7})
# DiNAT's dilations per stage (official dinat.py, 224 px), cycled over each stage's blocks.
_DINAT_DILATIONS = [[{"dilation": 1}, {"dilation": 8}], [{"dilation": 1}, {"dilation": 4}],
                    [{"dilation": 1}, {"dilation": 2}], [{"dilation": 1}]]


@register_model("nat_mini")
def nat_mini(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """NAT-Mini (SHI-Labs ``nat_mini``): C 64, depths (3, 4, 6, 5), heads (2, 4, 8, 16), MLP ratio 3,
    7x7 neighbourhoods, conv stem and downsamplers; 19,984,174 parameters (the official model's count).
    Officially trained with drop_path_rate 0.2 (default here 0)."""
    preset = dict(_NAT, depths=(3, 4, 6, 5))
    return build_from_preset(SwinTransformer, "nat_mini", preset, overrides, rngs)


@register_model("nat_tiny")
def nat_tiny(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """NAT-Tiny (SHI-Labs ``nat_tiny``): as NAT-Mini with depths (3, 4, 18, 5); 27,901,582 parameters."""
    preset = dict(_NAT, depths=(3, 4, 18, 5))
    return build_from_preset(SwinTransformer, "nat_tiny", preset, overrides, rngs)


@register_model("dinat_mini")
def dinat_mini(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """DiNAT-Mini (SHI-Labs ``dinat_mini``): NAT-Mini whose blocks alternate dilations
    (1, 8 | 1, 4 | 1, 2 | 1 per stage); 19,984,174 parameters."""
    preset = dict(_NAT, depths=(3, 4, 6, 5), block_options=_DINAT_DILATIONS)
    return build_from_preset(SwinTransformer, "dinat_mini", preset, overrides, rngs)


@register_model("dinat_tiny")
def dinat_tiny(*, rngs: nnx.Rngs, **overrides) -> SwinTransformer:
    """DiNAT-Tiny (SHI-Labs ``dinat_tiny``): NAT-Tiny with DiNAT's dilations; 27,901,582 parameters."""
    preset = dict(_NAT, depths=(3, 4, 18, 5), block_options=_DINAT_DILATIONS)
    return build_from_preset(SwinTransformer, "dinat_tiny", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# timm checkpoints
# ----------------------------------------------------------------------------------------------


@register_timm_converter(SwinTransformer)
def _load_timm_swin(model: SwinTransformer, read) -> None:
    """timm ``SwinTransformer`` -> :class:`SwinTransformer` (``stem="patch"``, ``downsample="merge"``,
    ``swin_window`` mixers).

    ``patch_embed.proj.weight [D, C, p, p]`` -> ``patch_embed.proj.kernel [(i*p + j)*C + c, D]``;
    ``layers.{s}.downsample.reduction.weight [2C, 4C]`` -> ``reduction.kernel [4C, 2C]`` (the same
    concatenation order as timm's); ``attn.qkv.weight [3A, C]`` (rows q | k | v, each head-major)
    -> ``mixer.qkv.kernel [C, 3, Hd, Dh]``; ``attn.proj.weight [C, A]`` -> ``mixer.proj.kernel
    [Hd, Dh, C]``; ``attn.relative_position_bias_table`` as is (the same layout); ``mlp.fc1`` /
    ``fc2`` -> ``mlp.up`` / ``down``; ``head.fc`` -> ``head``.
    """
    owner = read.owner
    if model.stem != "patch" or model.downsample_kind != "merge" or any(n != "swin_window" for n in model.mixer_names):
        raise TypeError(
            f"{owner}: a timm Swin has a patch stem, patch merging and swin_window mixers; this model has "
            f"stem={model.stem!r}, downsample={model.downsample_kind!r}, mixers {model.mixer_names}"
        )
    (ph, pw), channels, dim = model.patch_size, model.in_chans, model.dims[0]
    weight = read("patch_embed.proj.weight", (dim, channels, ph, pw))
    assign(model.patch_embed.proj.kernel, weight.transpose(2, 3, 1, 0).reshape(ph * pw * channels, dim),
           "patch_embed.proj.kernel", owner)
    assign(model.patch_embed.proj.bias, read("patch_embed.proj.bias", (dim,)), "patch_embed.proj.bias", owner)
    load_layer_norm(read, model.patch_embed.norm, "patch_embed.norm")
    for s, stage in enumerate(model.layers):
        if stage.downsample is not None:
            load_layer_norm(read, stage.downsample.norm, f"layers.{s}.downsample.norm")
            load_dense(read, stage.downsample.reduction, f"layers.{s}.downsample.reduction")
        for j, block in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{j}"
            load_layer_norm(read, block.norm1, f"{name}.norm1")
            load_layer_norm(read, block.norm2, f"{name}.norm2")
            attn = block.mixer
            load_dense(read, attn.qkv, f"{name}.attn.qkv", f"{name}.mixer.qkv")
            load_dense(read, attn.proj, f"{name}.attn.proj", f"{name}.mixer.proj")
            if attn.relative_position_bias_table is not None:
                table = attn.relative_position_bias_table
                assign(table, read(f"{name}.attn.relative_position_bias_table", table.get_value().shape),
                       f"{name}.mixer.relative_position_bias_table", owner)
            load_dense(read, block.mlp.up, f"{name}.mlp.fc1", f"{name}.mlp.up")
            load_dense(read, block.mlp.down, f"{name}.mlp.fc2", f"{name}.mlp.down")
    if model.norm is not None:
        load_layer_norm(read, model.norm, "norm")
    if model.head is not None:
        load_dense(read, model.head, "head.fc", "head")
