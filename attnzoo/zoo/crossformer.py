"""CrossFormer (Wang et al. 2021/2023, "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale
Attention"; official code cheerss/CrossFormer ``models/crossformer.py``). timm has no CrossFormer.

>>> from attnzoo import zoo
>>> m = zoo.create_model("crossformer_tiny", rngs=nnx.Rngs(0))
>>> logits = m(images)                          # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)          # [B,7,7,512] after the final norm
>>> maps = m.forward_intermediates(images)      # 4 x [B,h_i,w_i,C_i] (feature_info)
>>> swapped = zoo.create_model("crossformer_tiny", mixer=("crossformer_lsda",) * 3 + ("attention",),
...                            rngs=nnx.Rngs(0))   # any registered mixer per stage

Architecture (official ``CrossFormer``, all NHWC): a cross-scale embedding stem (CEL: convolutions
with kernels 4, 8, 16, 32 and stride 4, concatenated, then LayerNorm) -> 4 stages -> final
LayerNorm -> average pool over H, W -> linear head. Stage ``i > 0`` starts with a CEL downsampler
(LayerNorm, then convolutions with kernels 2, 4 and stride 2, ``C -> 2C``; the official code runs it
at the end of stage ``i - 1``: the same computation, with each stage's features taken after its
blocks, as the official detection backbone does). Blocks are pre-norm, ``x + LSDA(LN(x))`` then
``x + MLP(LN(x))`` (GELU MLP with biases; :class:`attnzoo.zoo.swin.SwinBlock`), alternating SDA
(even blocks) and LDA (odd blocks) with group size ``G`` and the stage's interval ``I``
(:mod:`attnzoo.layers.crossformer`). Layer names follow the CEL's and the official model's
(``patch_embed.projs[i]``, ``layers[s].blocks[j].mixer.pos``).

Mixers: each stage's mixer is any registered name (default ``crossformer_lsda``). Each block's
options are ``{**backbone defaults, **mixer_options[stage], **block_options[stage][block % period]}``;
for ``crossformer_lsda`` (and subclasses) the defaults are ``group_size``, the stage's ``interval``
and ``qkv_bias``, and the default block cycle is ``[{"mode": "sda"}, {"mode": "lda"}]``.
A 2-D mixer is called on ``[B, h, w, C]``, any other on ``[B, h * w, C]``.

Sizes: any ``img_size`` of at least 4 x 4 (outputs ``floor(H / 4)``, then halved with ``floor``
per stage; the official model needs sizes divisible by 32). ``feature_info`` reductions are
4, 8, 16, 32.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers import get_mixer_class
from attnzoo.layers.common import DType, as_pair, check_bool
from attnzoo.layers.crossformer import CrossFormerAttention, CrossScaleEmbedding
from attnzoo.layers import LayerNorm
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import (
    TimmVisionModel,
    build_from_preset,
    check_block_options,
    check_depths,
    check_drop_path_rate,
    drop_path_rates,
    ints_per_stage,
    is_int,
    map_mixer_flops,
    mixer_defaults,
    mlp_flops,
    per_stage,
    ratios_per_stage,
    stage_widths,
)
from attnzoo.zoo.convert import StateDictReader, assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.swin import SwinBlock, SwinStage
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm

__all__ = ["CrossFormer", "load_official_crossformer_weights"]

_OWNER = "CrossFormer"


def _kernel_list(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value or not all(map(is_int, value)):
        raise ValueError(f"{_OWNER}: {name} must be a non-empty sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _block_flops(block: SwinBlock, height: int, width: int) -> int:
    return map_mixer_flops(block.mixer, block.spatial, height, width, _OWNER) + mlp_flops(block.mlp, height * width)


class CrossFormer(TimmVisionModel):
    """The CrossFormer backbone (see the module docstring) on timm's contract. NHWC images of a fixed
    ``img_size``.

    Args:
      img_size: input ``(H, W)`` or an int.
      in_chans: input channels. num_classes: head width; 0 = no head (pooled features).
      global_pool: ``"avg"`` or ``"max"`` over H, W before the head.
      embed_dim: width of stage 0 (stage ``i`` has ``embed_dim * 2**i``), or one width per stage.
      depths / num_heads: blocks and heads per stage.
      mlp_ratio: MLP hidden width ``int(C * mlp_ratio)``; one value or one per stage.
      stem_kernels: the stem CEL's kernel sizes (official ``PATCH_SIZE`` (4, 8, 16, 32)); stride 4.
      merge_kernels: the downsampling CELs' kernel sizes (official ``MERGE_SIZE`` (2, 4)); stride 2.
        One sequence, or one per downsampler.
      group_size: ``G`` of the LSDA mixers (paper: 7), an int or one per stage.
      intervals: LDA interval ``I`` per stage (paper at 224 px: (8, 4, 2, 1)), an int or one per stage.
      mixer: a registered mixer name, or one per stage.
      mixer_options: options of every block's mixer (dict), or one dict per stage.
      block_options: per-block options cycled over each stage's blocks: a sequence of dicts (every
        stage), or one such sequence (or None) per stage. Default: SDA / LDA alternation for
        ``crossformer_lsda``, else ``[{}]``.
      qkv_bias: the ``qkv_bias`` option of mixers that take one.
      norm_eps: LayerNorm epsilon (torch's default 1e-5).
      drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over all
        blocks (official schedule; the paper trains T/S/B/L with 0.1/0.2/0.3/0.5; default here 0).
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
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int | Sequence[int] = 64,
        depths: Sequence[int] = (1, 1, 8, 6),
        num_heads: int | Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float | Sequence[float] = 4.0,
        stem_kernels: Sequence[int] = (4, 8, 16, 32),
        merge_kernels: Sequence[int] | Sequence[Sequence[int]] = (2, 4),
        group_size: int | Sequence[int] = 7,
        intervals: int | Sequence[int] = (8, 4, 2, 1),
        mixer: str | Sequence[str] = "crossformer_lsda",
        mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        block_options: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]] | None] | None = None,
        qkv_bias: bool = True,
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
        self.num_heads = ints_per_stage(owner, "num_heads", num_heads, num_stages)
        self.dims = stage_widths(owner, "embed_dim", embed_dim, num_stages)
        ratios = ratios_per_stage(owner, "mlp_ratio", mlp_ratio, num_stages)
        self.stem_kernels = _kernel_list("stem_kernels", stem_kernels)
        if num_stages > 1 and isinstance(merge_kernels, (list, tuple)) and merge_kernels and all(
                isinstance(m, (list, tuple)) for m in merge_kernels):
            if len(merge_kernels) != num_stages - 1:
                raise ValueError(f"{owner}: merge_kernels needs one sequence per downsampler ({num_stages - 1}), "
                                 f"got {merge_kernels!r}")
            merges = [_kernel_list(f"merge_kernels[{i}]", m) for i, m in enumerate(merge_kernels)]
        else:
            merges = [_kernel_list("merge_kernels", merge_kernels)] * (num_stages - 1)
        self.merge_kernels = tuple(merges)
        groups = [check_int(owner, "group_size", g) for g in per_stage(owner, "group_size", group_size, num_stages, is_int)]
        intervals = [check_int(owner, "intervals", i) for i in per_stage(owner, "intervals", intervals, num_stages, is_int)]
        self.group_sizes, self.intervals = tuple(groups), tuple(intervals)
        mixers = per_stage(owner, "mixer", mixer, num_stages, lambda v: isinstance(v, str))
        mixer_classes = [get_mixer_class(name) for name in mixers]  # ValueError listing the known mixers
        self.mixer_names = tuple(mixers)
        stage_options = per_stage(owner, "mixer_options", {} if mixer_options is None else mixer_options, num_stages,
                                  lambda v: isinstance(v, dict))
        per_block = check_block_options(owner, block_options, num_stages)
        self.qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        drop_path_rate = self.drop_path_rate = check_drop_path_rate(owner, drop_path_rate)
        self._set_common_options(owner, features_only=features_only, remat=remat, dtype=dtype, param_dtype=param_dtype,
                                 logits_dtype=logits_dtype)
        self._set_global_pool(owner, global_pool)
        self.num_features = self.dims[-1]

        common = dict(norm_eps=self.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = CrossScaleEmbedding(self.in_chans, self.dims[0], kernel_sizes=self.stem_kernels, stride=4,
                                               norm="after", **common)
        resolution = self.patch_embed.output_size(*self.img_size)
        if min(resolution) < 1:
            raise ValueError(f"{owner}: img_size {self.img_size} is smaller than the stem's stride 4")

        rates = drop_path_rates(drop_path_rate, sum(self.depths))
        stages, resolutions, block_index = [], [], 0
        for s in range(num_stages):
            down = None
            if s > 0:
                if min(resolution) < 2:
                    raise ValueError(f"{owner}: img_size {self.img_size} is too small: stage {s} would get a "
                                     f"{resolution} map to downsample by 2")
                down = CrossScaleEmbedding(self.dims[s - 1], self.dims[s], kernel_sizes=merges[s - 1], stride=2,
                                           norm="before", **common)
                resolution = down.output_size(*resolution)
            resolutions.append(tuple(resolution))
            lsda = isinstance(mixer_classes[s], type) and issubclass(mixer_classes[s], CrossFormerAttention)
            cycle = per_block[s] if per_block[s] is not None else (
                [{"mode": "sda"}, {"mode": "lda"}] if lsda else [{}])
            blocks = []
            for j in range(self.depths[s]):
                # (no bidirectional defaults for "attention" here, unlike the other backbones)
                options = mixer_defaults(mixer_classes[s], mixers[s], self.qkv_bias)
                if lsda:
                    options.update(group_size=groups[s], interval=intervals[s])
                options.update(stage_options[s])
                options.update(cycle[j % len(cycle)])
                blocks.append(SwinBlock(
                    self.dims[s], self.num_heads[s], mixer=mixers[s], mixer_options=options, mlp_ratio=ratios[s],
                    norm_eps=self.norm_eps, layer_scale_init=None, drop_path=float(rates[block_index]), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                ))
                block_index += 1
            stages.append(SwinStage(down, blocks, remat=remat))
        self.layers = nnx.List(stages)
        self.resolutions = tuple(resolutions)
        self.norm = None if self.features_only else LayerNorm(self.num_features, epsilon=self.norm_eps, dtype=dtype,
                                                              param_dtype=param_dtype)
        self._init_head(num_classes, rngs)

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage: ``num_chs``, ``reduction`` (4 * 2**i) and ``module`` (``"layers.i"``)."""
        return [dict(num_chs=self.dims[s], reduction=4 * 2**s, module=f"layers.{s}") for s in range(self.num_stages)]

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> ``[B, h, w, num_features]`` after the last stage and the final norm
        (no norm with ``features_only``)."""
        return self._final_norm(self._feature_maps(images, self.num_stages - 1)[-1])

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return x if self.norm is None else self.norm(x)

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages ``0 .. last`` (later stages are not run)."""
        self._check_images(images)
        x = self.patch_embed(images)
        outputs = []
        for stage in self.layers[: last + 1]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def _intermediate_norm(self, owner: str, norm):
        """``norm`` applies the final norm to the last stage's output (others are never normed)."""
        if not norm or self.norm is None:
            return None
        return lambda index, x: self.norm(x) if index == self.num_stages - 1 else x

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Stem and downsamplers: their convolutions (``CrossScaleEmbedding.flops``); per block the
        mixer's ``flops(h, w)`` (``flops(h * w)`` for a 1-D mixer) and the MLP's ``2 * h w * C * F * 2``;
        head ``2 * C * K``. Norms, softmax, GELU, biases and pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        total = self.patch_embed.flops(*self.img_size)
        previous = self.patch_embed.output_size(*self.img_size)
        for s, stage in enumerate(self.layers):
            height, width = self.resolutions[s]
            if stage.downsample is not None:
                total += stage.downsample.flops(*previous)
            total += sum(_block_flops(block, height, width) for block in stage.blocks)
            previous = (height, width)
        return int(total + 2 * self.num_features * self.num_classes)


# ----------------------------------------------------------------------------------------------
# Presets (official configs/crossformer/*_patch4_group7_224.yaml)
# ----------------------------------------------------------------------------------------------

_CROSSFORMER = dict(img_size=224, in_chans=3, num_classes=1000, stem_kernels=(4, 8, 16, 32), merge_kernels=(2, 4),
                    group_size=7, intervals=(8, 4, 2, 1), mlp_ratio=4.0, mixer="crossformer_lsda")


@register_model("crossformer_tiny")
def crossformer_tiny(*, rngs: nnx.Rngs, **overrides) -> CrossFormer:
    """CrossFormer-T: C 64, depths (1, 1, 8, 6), heads (2, 4, 8, 16), G 7, I (8, 4, 2, 1);
    27,758,344 parameters (paper: 27.8M). Trained with drop_path_rate 0.1 (default here 0)."""
    preset = dict(_CROSSFORMER, embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))
    return build_from_preset(CrossFormer, "crossformer_tiny", preset, overrides, rngs)


@register_model("crossformer_small")
def crossformer_small(*, rngs: nnx.Rngs, **overrides) -> CrossFormer:
    """CrossFormer-S: C 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24); 30,695,300 parameters (paper: 30.7M).
    Trained with drop_path_rate 0.2."""
    preset = dict(_CROSSFORMER, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return build_from_preset(CrossFormer, "crossformer_small", preset, overrides, rngs)


@register_model("crossformer_base")
def crossformer_base(*, rngs: nnx.Rngs, **overrides) -> CrossFormer:
    """CrossFormer-B: C 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24); 52,034,744 parameters (paper: 52.0M).
    Trained with drop_path_rate 0.3."""
    preset = dict(_CROSSFORMER, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return build_from_preset(CrossFormer, "crossformer_base", preset, overrides, rngs)


@register_model("crossformer_large")
def crossformer_large(*, rngs: nnx.Rngs, **overrides) -> CrossFormer:
    """CrossFormer-L: C 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32); 91,996,992 parameters (paper: 92.0M).
    Trained with drop_path_rate 0.5."""
    preset = dict(_CROSSFORMER, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return build_from_preset(CrossFormer, "crossformer_large", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------

# Buffers of the official model that are derived constants, not weights.
_OFFICIAL_BUFFERS = ("relative_position_index", "attn_mask", "biases")


def load_official_crossformer_weights(model: CrossFormer, state_dict: Mapping[str, np.ndarray], *,
                                      strict: bool = True) -> list[str]:
    """Loads an official cheerss/CrossFormer ``state_dict`` (numpy arrays, e.g.
    ``{k: v.float().numpy() for k, v in torch.load(path)["model"].items()}``) into ``model`` in place.

    The model must have the official architecture (``crossformer_lsda`` mixers with the default
    options). Names: ``patch_embed.projs.{i}`` (``Conv2d.weight [O, I, k, k]`` -> ``kernel [k, k, I, O]``),
    ``patch_embed.norm``; ``layers.{s}.downsample.{norm, reductions.{i}}`` -> ``layers[s + 1].downsample``
    (the official model downsamples at the end of a stage); ``layers.{s}.blocks.{j}.{norm1, norm2}``;
    ``attn.qkv.weight [3D, D]`` -> ``mixer.qkv.kernel [D, 3, Hd, Dh]``; ``attn.proj`` ->
    ``mixer.proj``; ``attn.pos.pos_proj`` -> ``mixer.pos.pos_proj``; ``attn.pos.pos{n}.0`` (LayerNorm) /
    ``pos{n}.2`` (Linear) -> ``mixer.pos.norm{n}`` / ``fc{n}``; ``mlp.fc1`` / ``fc2`` -> ``mlp.up`` /
    ``down``; ``norm``; ``head``.

    Returns the unused keys; with ``strict`` a key that is neither used nor a known buffer
    (``relative_position_index``, ``attn_mask``, ``biases``) raises ``ValueError``.
    """
    owner = "load_official_crossformer_weights"
    if not isinstance(model, CrossFormer):
        raise TypeError(f"{owner}: model must be a CrossFormer, got {type(model).__name__}")
    if any(not issubclass(get_mixer_class(n), CrossFormerAttention) for n in model.mixer_names):
        raise TypeError(f"{owner}: the official model has crossformer_lsda mixers; this model has {model.mixer_names}")
    read = StateDictReader(state_dict, "", owner)

    def load_cel(cel: CrossScaleEmbedding, name: str) -> None:
        convs = "projs" if cel.norm_position == "after" else "reductions"  # official PatchEmbed / PatchMerging
        for i, conv in enumerate(cel.projs):
            kernel = conv.kernel.get_value()
            prefix = f"{name}.{convs}.{i}"
            weight = read(f"{prefix}.weight", (kernel.shape[3], kernel.shape[2], kernel.shape[0], kernel.shape[1]))
            assign(conv.kernel, conv_kernel(weight), f"{prefix}.kernel", owner)
            assign(conv.bias, read(f"{prefix}.bias", (kernel.shape[3],)), f"{prefix}.bias", owner)
        if cel.norm is not None:
            load_layer_norm(read, cel.norm, f"{name}.norm")

    load_cel(model.patch_embed, "patch_embed")
    for s, stage in enumerate(model.layers):
        if stage.downsample is not None:
            load_cel(stage.downsample, f"layers.{s - 1}.downsample")
        for j, block in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{j}"
            load_layer_norm(read, block.norm1, f"{name}.norm1")
            load_layer_norm(read, block.norm2, f"{name}.norm2")
            attn = block.mixer
            load_dense(read, attn.qkv, f"{name}.attn.qkv", f"{name}.mixer.qkv")
            load_dense(read, attn.proj, f"{name}.attn.proj", f"{name}.mixer.proj")
            if attn.pos is not None:
                load_dense(read, attn.pos.pos_proj, f"{name}.attn.pos.pos_proj")
                for n in (1, 2, 3):
                    load_layer_norm(read, getattr(attn.pos, f"norm{n}"), f"{name}.attn.pos.pos{n}.0")
                    load_dense(read, getattr(attn.pos, f"fc{n}"), f"{name}.attn.pos.pos{n}.2")
            load_dense(read, block.mlp.up, f"{name}.mlp.fc1", f"{name}.mlp.up")
            load_dense(read, block.mlp.down, f"{name}.mlp.fc2", f"{name}.mlp.down")
    if model.norm is not None:
        load_layer_norm(read, model.norm, "norm")
    if model.head is not None:
        load_dense(read, model.head, "head")
    unused = read.unused()
    leftover = [key for key in unused if not key.endswith(_OFFICIAL_BUFFERS)]
    if strict and leftover:
        raise ValueError(f"{owner}: state_dict keys not converted: {leftover}")
    return unused
