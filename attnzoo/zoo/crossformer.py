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

import inspect
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers import get_mixer_class
from attnzoo.layers.common import DType, as_pair, check_bool, check_choice
from attnzoo.layers.crossformer import CrossFormerAttention, CrossScaleEmbedding
from attnzoo.layers import LayerNorm
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import TimmVisionModel, build_from_preset, global_avg_pool, mixer_flops, mlp_flops, remat_policy
from attnzoo.zoo.convert import StateDictReader, assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.swin import SwinBlock, SwinStage
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm

__all__ = ["CrossFormer", "load_official_crossformer_weights"]

_OWNER = "CrossFormer"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _per_stage(name: str, value, num_stages: int, is_item) -> list:
    """``value`` repeated for every stage, or a sequence with one entry per stage."""
    if is_item(value):
        return [value] * num_stages
    if not isinstance(value, (list, tuple)) or len(value) != num_stages or not all(is_item(v) for v in value):
        raise ValueError(f"{_OWNER}: {name} must be one value or a sequence of {num_stages} (one per stage), got {value!r}")
    return list(value)


def _kernel_list(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value or not all(map(_is_int, value)):
        raise ValueError(f"{_OWNER}: {name} must be a non-empty sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _accepts(cls, option: str) -> bool:
    parameters = inspect.signature(cls.__init__).parameters
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _block_flops(block: SwinBlock, height: int, width: int) -> int:
    if block.spatial:
        flops = getattr(block.mixer, "flops", None)
        if not callable(flops):
            raise TypeError(
                f"{_OWNER}.forward_flops: mixer {type(block.mixer).__module__}.{type(block.mixer).__qualname__} has "
                "no flops(height, width) method, so its cost cannot be counted; add one to the mixer"
            )
        mixer = int(flops(height, width))
    else:
        mixer = mixer_flops(block.mixer, height * width, _OWNER)
    return mixer + mlp_flops(block.mlp, height * width)


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
        if not isinstance(depths, (list, tuple)) or not depths:
            raise ValueError(f"{owner}: depths must be a non-empty sequence of ints, got {depths!r}")
        self.depths = tuple(check_int(owner, f"depths[{i}]", d) for i, d in enumerate(depths))
        num_stages = self.num_stages = len(self.depths)
        heads = _per_stage("num_heads", num_heads, num_stages, _is_int)
        self.num_heads = tuple(check_int(owner, f"num_heads[{i}]", h) for i, h in enumerate(heads))
        if _is_int(embed_dim):
            embed_dim = [check_int(owner, "embed_dim", embed_dim) * 2**i for i in range(num_stages)]
        dims = _per_stage("embed_dim", embed_dim, num_stages, _is_int)
        self.dims = tuple(check_int(owner, f"embed_dim[{i}]", d) for i, d in enumerate(dims))
        is_number = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)  # noqa: E731
        ratios = _per_stage("mlp_ratio", mlp_ratio, num_stages, is_number)
        for i, ratio in enumerate(ratios):
            check_float(owner, f"mlp_ratio[{i}]", ratio, positive=True, allow_none=False)
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
        groups = [check_int(owner, "group_size", g) for g in _per_stage("group_size", group_size, num_stages, _is_int)]
        intervals = [check_int(owner, "intervals", i) for i in _per_stage("intervals", intervals, num_stages, _is_int)]
        self.group_sizes, self.intervals = tuple(groups), tuple(intervals)
        mixers = _per_stage("mixer", mixer, num_stages, lambda v: isinstance(v, str))
        mixer_classes = [get_mixer_class(name) for name in mixers]  # ValueError listing the known mixers
        self.mixer_names = tuple(mixers)
        stage_options = _per_stage("mixer_options", {} if mixer_options is None else mixer_options, num_stages,
                                   lambda v: isinstance(v, dict))
        per_block = self._block_options(block_options, num_stages)
        self.qkv_bias = check_bool(owner, "qkv_bias", qkv_bias)
        self.norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        drop_path_rate = check_float(owner, "drop_path_rate", drop_path_rate, allow_none=False)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{owner}: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.drop_path_rate = drop_path_rate
        self.features_only = check_bool(owner, "features_only", features_only)
        self.remat = remat
        remat_policy(remat)  # ValueError listing the policies
        self.global_pool = check_choice(owner, "global_pool", global_pool, ("avg", "max"))
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.logits_dtype = jnp.dtype(logits_dtype)
        if not jnp.issubdtype(self.logits_dtype, jnp.floating):
            raise TypeError(f"{owner}: logits_dtype must be a floating dtype, got {self.logits_dtype}")
        self.num_features = self.dims[-1]

        common = dict(norm_eps=self.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = CrossScaleEmbedding(self.in_chans, self.dims[0], kernel_sizes=self.stem_kernels, stride=4,
                                               norm="after", **common)
        resolution = self.patch_embed.output_size(*self.img_size)
        if min(resolution) < 1:
            raise ValueError(f"{owner}: img_size {self.img_size} is smaller than the stem's stride 4")

        total_blocks = sum(self.depths)
        rates = np.linspace(0.0, drop_path_rate, total_blocks) if total_blocks > 1 else np.zeros(1)
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
                options = {}
                if _accepts(mixer_classes[s], "qkv_bias"):
                    options["qkv_bias"] = self.qkv_bias
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
        self.head = nnx.data(None)
        self.num_classes = 0
        if not self.features_only:
            self.reset_classifier(num_classes, rngs=rngs)

    @staticmethod
    def _block_options(block_options, num_stages: int) -> list[list[dict] | None]:
        if block_options is None:
            return [None] * num_stages
        if not isinstance(block_options, (list, tuple)) or not block_options:
            raise ValueError(f"{_OWNER}: block_options must be a non-empty sequence of dicts, or one per stage, got {block_options!r}")
        if all(isinstance(o, dict) for o in block_options):
            return [list(block_options)] * num_stages
        if len(block_options) != num_stages or not all(
            o is None or (isinstance(o, (list, tuple)) and o and all(isinstance(d, dict) for d in o)) for o in block_options
        ):
            raise ValueError(
                f"{_OWNER}: block_options must be a sequence of dicts (cycled over every stage's blocks) or "
                f"{num_stages} such sequences (or None), one per stage; got {block_options!r}"
            )
        return [None if o is None else list(o) for o in block_options]

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    def _set_global_pool(self, owner: str, global_pool: str) -> None:
        """``reset_classifier``'s ``global_pool``: "avg" or "max" over H, W."""
        self.global_pool = check_choice(owner, "global_pool", global_pool, ("avg", "max"))

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

    def _pre_logits(self, features: jax.Array) -> jax.Array:
        """features ``[B, h, w, num_features]`` -> ``[B, num_features]`` ("avg" or "max" over h, w)."""
        self._check_feature_map(features)
        return global_avg_pool(features) if self.global_pool == "avg" else jnp.max(features, axis=(1, 2))

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
        want = (*self.img_size, self.in_chans)
        if example_shape is not None and tuple(example_shape) != want:
            raise ValueError(f"{_OWNER}.forward_flops: example_shape must be (H, W, C) = {want}, got {tuple(example_shape)!r}")
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
