"""Twins (Chu et al. 2021): Twins-PCPVT and Twins-SVT with timm's architecture and swappable mixers.

>>> from attnzoo import zoo
>>> m = zoo.create_model("twins_svt_small", rngs=nnx.Rngs(0))
>>> logits = m(images)                          # images [B,224,224,3] NHWC -> [B,1000] float32
>>> feats = m.forward_features(images)          # [B,7,7,512] after the final norm
>>> maps = m.forward_intermediates(images)      # [B,56,56,64], [B,28,28,128], [B,14,14,256], [B,7,7,512]
>>> pvt_na = zoo.create_model("twins_pcpvt_small", mixer=("neighborhood_attention",) * 3 + ("attention",),
...                           mixer_options=[{"kernel_size": 7}] * 3 + [{}], rngs=nnx.Rngs(0))

Architecture (timm 1.0.31 ``Twins``, from the official Meituan-AutoML/Twins ``gvt.py``), all NHWC:
4 stages, each

* a patch embedding: ``p x p`` stride-``p`` convolution (``p = patch_size`` in stage 0, 2 after;
  computed as reshape + Dense) then LayerNorm (epsilon 1e-5);
* ``depths[i]`` pre-norm blocks ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` (GELU MLP of width
  ``int(C * mlp_ratios[i])``, biases, LayerNorm epsilon ``norm_eps`` = 1e-6; the block is
  :class:`attnzoo.zoo.swin.SwinBlock`), with the PEG
  (:class:`attnzoo.layers.twins.PositionalEncodingGenerator`, ``x + DepthwiseConv3x3(x)``) applied
  after the first block;

then LayerNorm (``norm_eps``) on the last stage's output, mean over H, W, linear head.

Mixers. By default (``mixer=None``) Twins' own: every block of a stage is GSA
(``twins_global_subsampled`` with ``sr_ratio = sr_ratios[i]``) when ``wss`` is None (PCPVT); with
``wss`` (SVT) even blocks are LSA (``twins_locally_grouped`` with ``window_size = wss[i]``) and odd
blocks GSA, except where ``wss[i] == 1`` (all GSA, as timm). ``mixer`` replaces this with a
registered mixer name for every block, or one entry per stage: a name, or a sequence of names
cycled over the stage's blocks. A 2-D mixer (``spatial_ndim = 2``) is called on ``[B, h, w, C]``,
any other on the tokens ``[B, h * w, C]``. Each block's options are
``{**defaults, **mixer_options[stage], **block_options[stage][block % period]}``; the defaults give
a mixer that takes them ``sr_ratio = sr_ratios[stage]``, ``window_size = wss[stage]`` (with wss),
``resolution = (h, w)`` of the stage's map and ``qkv_bias``; ``"attention"`` is made bidirectional without RoPE, with an output bias.

Parameters (logical axes as in :mod:`attnzoo.layers`): ``stages[i].patch_embed.proj.kernel
[p*p*C_in, C]`` (None, embed; patch pixels in (row, column, channel) order) and ``.norm``;
``stages[i].blocks[j].{norm1, mixer, norm2, mlp}``; ``stages[i].pos_block.proj`` (depthwise
``[3, 3, 1, C]``); ``norm``; ``head.kernel [C, num_classes]`` (embed, None).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import LayerNorm, get_mixer_class
from attnzoo.layers.common import DType, as_pair, check_bool
from attnzoo.layers.twins import GlobalSubsampledAttention, LocallyGroupedAttention, PositionalEncodingGenerator
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.common import (
    TimmVisionModel,
    block_caller,
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
    remat_policy,
    takes_option,
)
from attnzoo.zoo.convert import assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.swin import PatchEmbed, SwinBlock
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm, register_timm_converter

__all__ = ["Twins", "TwinsStage"]

_OWNER = "Twins"
LSA, GSA = "twins_locally_grouped", "twins_global_subsampled"
PATCH_EMBED_EPS = 1e-5  # timm's PatchEmbed LayerNorm keeps torch's default epsilon


class TwinsStage(nnx.Module):
    """Patch embedding, then the blocks (each under the remat policy) with the PEG after the first.

    ``x [B, H, W, C_in] -> [B, H / p, W / p, C]``."""

    def __init__(self, patch_embed: PatchEmbed, blocks: list[SwinBlock], pos_block: PositionalEncodingGenerator, *,
                 remat: str):
        self.patch_embed = patch_embed
        self.blocks = nnx.List(blocks)
        self.pos_block = pos_block
        remat_policy(remat)  # ValueError listing the policies
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.patch_embed(x)
        call = block_caller(self.remat)
        for index, block in enumerate(self.blocks):
            x = call(block, x)
            if index == 0:
                x = self.pos_block(x)
        return x


class Twins(TimmVisionModel):
    """timm's Twins (PCPVT without ``wss``, SVT with it) with swappable mixers. NHWC images of a
    fixed ``img_size``.

    Args:
      img_size: input ``(H, W)`` or an int; divisible by ``patch_size`` and then by 2 at every
        later stage (as timm's patch embeddings require).
      patch_size: patch size of stage 0 (later stages: 2).
      in_chans: input channels. num_classes: head width; 0 = no head (pooled features).
      global_pool: ``"avg"`` (timm's) or ``"max"`` over H, W before the head.
      embed_dims: width per stage. depths, num_heads: blocks and heads per stage.
      mlp_ratios: MLP hidden width ``int(C * ratio)``, one value or one per stage.
      sr_ratios: GSA sub-sampling per stage (an int or a pair each).
      wss: LSA window per stage (an int or a pair each), or None (PCPVT: no LSA).
      mixer: None (Twins' pattern, see the module docstring), a registered mixer name for every
        block, or one entry per stage: a name or a sequence of names cycled over its blocks.
      mixer_options: options of every block's mixer (dict), or one dict per stage.
      block_options: per-block options cycled over each stage's blocks: a sequence of dicts (every
        stage), or one such sequence (or None) per stage.
      qkv_bias: the ``qkv_bias`` option of mixers that take one (timm: True).
      norm_eps: epsilon of the blocks' and the final LayerNorm (timm: 1e-6).
      drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over all
        blocks (timm's schedule); active only in training mode, needs a ``dropout`` rng stream.
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
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: float | Sequence[float] = 4.0,
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        wss: Sequence[int] | None = None,
        mixer: str | Sequence[str | Sequence[str]] | None = None,
        mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        block_options: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]] | None] | None = None,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
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
        self.depths = check_depths(owner, depths)
        num_stages = self.num_stages = len(self.depths)
        self.dims = ints_per_stage(owner, "embed_dims", embed_dims, num_stages)
        self.num_heads = ints_per_stage(owner, "num_heads", num_heads, num_stages)
        self.mlp_ratios = ratios_per_stage(owner, "mlp_ratios", mlp_ratios, num_stages)
        self.sr_ratios = self._pairs_per_stage("sr_ratios", sr_ratios)
        self.wss = None if wss is None else self._pairs_per_stage("wss", wss)
        mixers = self._mixer_cycles(mixer)
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

        rates = drop_path_rates(drop_path_rate, sum(self.depths))
        stages, resolutions, block_index = [], [], 0
        resolution, channels, patch = self.img_size, self.in_chans, self.patch_size
        for s in range(num_stages):
            for axis in range(2):
                if resolution[axis] % patch[axis]:
                    raise ValueError(
                        f"{owner}: img_size {self.img_size} gives stage {s} a {resolution[0]} x {resolution[1]} input, "
                        f"not divisible by its patch size {patch}"
                    )
            resolution = (resolution[0] // patch[0], resolution[1] // patch[1])
            resolutions.append(resolution)
            embed = PatchEmbed(channels, self.dims[s], patch, norm_eps=PATCH_EMBED_EPS, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
            blocks = []
            for j in range(self.depths[s]):
                name = mixers[s][j % len(mixers[s])]
                options = self._mixer_options(name, s, resolution, stage_options[s],
                                              {} if per_block[s] is None else per_block[s][j % len(per_block[s])])
                blocks.append(SwinBlock(
                    self.dims[s], self.num_heads[s], mixer=name, mixer_options=options, mlp_ratio=self.mlp_ratios[s],
                    norm_eps=self.norm_eps, layer_scale_init=None, drop_path=float(rates[block_index]), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                ))
                block_index += 1
            peg = PositionalEncodingGenerator(self.dims[s], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            stages.append(TwinsStage(embed, blocks, peg, remat=remat))
            channels, patch = self.dims[s], (2, 2)
        self.stages = nnx.List(stages)
        self.resolutions = tuple(resolutions)
        self.norm = None if self.features_only else LayerNorm(self.num_features, epsilon=self.norm_eps, dtype=dtype,
                                                              param_dtype=param_dtype)
        self._init_head(num_classes, rngs)

    # ------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------

    def _pairs_per_stage(self, name: str, value) -> tuple[tuple[int, int], ...]:
        """An int for every stage, or one entry (an int or an ``(h, w)`` pair) per stage."""
        if is_int(value):
            value = [value] * self.num_stages
        if not isinstance(value, (list, tuple)) or len(value) != self.num_stages:
            raise ValueError(
                f"{_OWNER}: {name} must be an int or a sequence of {self.num_stages} (one int or (h, w) pair per "
                f"stage), got {value!r}"
            )
        return tuple(as_pair(_OWNER, f"{name}[{i}]", item) for i, item in enumerate(value))

    def _mixer_cycles(self, mixer) -> list[tuple[str, ...]]:
        """The mixer names cycled over each stage's blocks (unknown names raise, listing the known)."""
        if mixer is None:
            cycles = []
            for s in range(self.num_stages):
                local = self.wss is not None and self.wss[s] != (1, 1)
                cycles.append((LSA, GSA) if local else (GSA,))
        else:
            # A name for every block, else one entry per stage (never a bare cycle: ("a", "b") for a
            # 2-stage model means "a" in stage 0 and "b" in stage 1).
            entries = [mixer] * self.num_stages if isinstance(mixer, str) else mixer
            is_entry = lambda v: isinstance(v, str) or (  # noqa: E731
                isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(n, str) for n in v))
            if not isinstance(entries, (list, tuple)) or len(entries) != self.num_stages or not all(
                    is_entry(e) for e in entries):
                raise ValueError(
                    f"{_OWNER}: mixer must be None, a mixer name, or a sequence of {self.num_stages} entries (one per "
                    f"stage: a name or a non-empty sequence of names cycled over the stage's blocks), got {mixer!r}"
                )
            cycles = [(entry,) if isinstance(entry, str) else tuple(entry) for entry in entries]
        for cycle in cycles:
            for name in cycle:
                get_mixer_class(name)  # ValueError listing the known mixers
        return cycles

    def _mixer_options(self, name: str, stage: int, resolution, stage_options: dict, block: dict) -> dict:
        cls = get_mixer_class(name)
        # qkv_bias only where the constructor names it (a **kwargs catch-all does not count); resolution
        # for mixers with parameters sized to the map (as the Swin backbone does)
        options = mixer_defaults(cls, name, self.qkv_bias, resolution=resolution, var_keyword=False)
        if takes_option(cls, "sr_ratio", var_keyword=False):
            options["sr_ratio"] = self.sr_ratios[stage]
        if self.wss is not None and takes_option(cls, "window_size", var_keyword=False):
            options["window_size"] = self.wss[stage]
        options.update(stage_options)
        options.update(block)
        return options

    # ------------------------------------------------------------------------------------------
    # timm's contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage: ``num_chs``, ``reduction`` (stride w.r.t. the image: ``patch_size *
        2**i``, an int, or an ``(h, w)`` pair for a non-square patch) and ``module`` (``"stages.i"``)."""
        info = []
        for s in range(self.num_stages):
            reduction = tuple(p * 2**s for p in self.patch_size)
            info.append(dict(num_chs=self.dims[s], reduction=reduction[0] if reduction[0] == reduction[1] else reduction,
                             module=f"stages.{s}"))
        return info

    def _feature_maps(self, images: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages ``0 .. last`` (later stages are not run)."""
        self._check_images(images)
        x, outputs = images, []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> ``[B, h, w, num_features]`` after the last stage and the final norm
        (no norm with ``features_only``)."""
        return self._final_norm(self._feature_maps(images, self.num_stages - 1)[-1])

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return x if self.norm is None else self.norm(x)

    def _intermediate_norm(self, owner: str, norm):
        """``norm`` applies the final norm to the last stage's output (as timm; others are never normed)."""
        if not check_bool(owner, "norm", norm) or self.norm is None:
            return None
        return lambda index, x: self.norm(x) if index == self.num_stages - 1 else x

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls and convolutions, 2 per multiply-add).

        Per stage on its ``h x w`` output: the patch embedding ``2 * h w * p^2 C_in * C``; every block's
        mixer (``mixer.flops(h, w)`` for 2-D mixers, ``mixer.flops(h * w)`` for 1-D ones) and MLP
        (``2 * h w * C * F * 2``); the PEG's depthwise convolution ``2 * h w * 9 * C``; head
        ``2 * C * K``. Norms, softmax, GELU, biases and pooling are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if a mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        total = 0
        for stage, (height, width) in zip(self.stages, self.resolutions, strict=True):
            tokens = height * width
            total += 2 * tokens * stage.patch_embed.proj.in_features[0] * stage.patch_embed.proj.out_features[0]
            for block in stage.blocks:
                total += map_mixer_flops(block.mixer, block.spatial, height, width, _OWNER)
                total += mlp_flops(block.mlp, tokens)
            total += stage.pos_block.flops(height, width)
        return int(total + 2 * self.num_features * self.num_classes)


# ----------------------------------------------------------------------------------------------
# Presets (timm's names and configurations; 224 px, 1000 classes)
# ----------------------------------------------------------------------------------------------

_PCPVT = dict(img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dims=(64, 128, 320, 512),
              num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
_SVT = dict(img_size=224, patch_size=4, in_chans=3, num_classes=1000, mlp_ratios=4.0, sr_ratios=(8, 4, 2, 1),
            wss=(7, 7, 7, 7))


@register_model("twins_pcpvt_small")
def twins_pcpvt_small(*, rngs: nnx.Rngs, **overrides) -> Twins:
    """Twins-PCPVT-S (timm ``twins_pcpvt_small``): C (64, 128, 320, 512), depths (3, 4, 6, 3), heads
    (1, 2, 5, 8), MLP ratios (8, 8, 4, 4), GSA sub-sampling (8, 4, 2, 1); 24,106,216 parameters."""
    preset = dict(_PCPVT, depths=(3, 4, 6, 3))
    return build_from_preset(Twins, "twins_pcpvt_small", preset, overrides, rngs)


@register_model("twins_pcpvt_base")
def twins_pcpvt_base(*, rngs: nnx.Rngs, **overrides) -> Twins:
    """Twins-PCPVT-B (timm ``twins_pcpvt_base``): as PCPVT-S with depths (3, 4, 18, 3); 43,828,456 parameters."""
    preset = dict(_PCPVT, depths=(3, 4, 18, 3))
    return build_from_preset(Twins, "twins_pcpvt_base", preset, overrides, rngs)


@register_model("twins_pcpvt_large")
def twins_pcpvt_large(*, rngs: nnx.Rngs, **overrides) -> Twins:
    """Twins-PCPVT-L (timm ``twins_pcpvt_large``): as PCPVT-S with depths (3, 8, 27, 3); 60,989,672 parameters."""
    preset = dict(_PCPVT, depths=(3, 8, 27, 3))
    return build_from_preset(Twins, "twins_pcpvt_large", preset, overrides, rngs)


@register_model("twins_svt_small")
def twins_svt_small(*, rngs: nnx.Rngs, **overrides) -> Twins:
    """Twins-SVT-S (timm ``twins_svt_small``): C (64, 128, 256, 512), depths (2, 2, 10, 4), heads
    (2, 4, 8, 16), LSA windows 7 alternating with GSA (8, 4, 2, 1); 24,060,776 parameters."""
    preset = dict(_SVT, embed_dims=(64, 128, 256, 512), depths=(2, 2, 10, 4), num_heads=(2, 4, 8, 16))
    return build_from_preset(Twins, "twins_svt_small", preset, overrides, rngs)


@register_model("twins_svt_base")
def twins_svt_base(*, rngs: nnx.Rngs, **overrides) -> Twins:
    """Twins-SVT-B (timm ``twins_svt_base``): C (96, 192, 384, 768), depths (2, 2, 18, 2), heads
    (3, 6, 12, 24); 56,070,952 parameters."""
    preset = dict(_SVT, embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return build_from_preset(Twins, "twins_svt_base", preset, overrides, rngs)


@register_model("twins_svt_large")
def twins_svt_large(*, rngs: nnx.Rngs, **overrides) -> Twins:
    """Twins-SVT-L (timm ``twins_svt_large``): C (128, 256, 512, 1024), depths (2, 2, 18, 2), heads
    (4, 8, 16, 32); 99,271,400 parameters."""
    preset = dict(_SVT, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return build_from_preset(Twins, "twins_svt_large", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# timm checkpoints
# ----------------------------------------------------------------------------------------------


def _load_mixer(read, mixer, name: str, what: str) -> None:
    owner = read.owner
    if isinstance(mixer, LocallyGroupedAttention):
        load_dense(read, mixer.qkv, f"{name}.qkv", f"{what}.qkv")
    else:
        load_dense(read, mixer.q, f"{name}.q", f"{what}.q")
        load_dense(read, mixer.kv, f"{name}.kv", f"{what}.kv")
        if mixer.sr is not None:
            rh, rw, fan_in, fan_out = mixer.sr.kernel.get_value().shape
            weight = read(f"{name}.sr.weight", (fan_out, fan_in, rh, rw))
            assign(mixer.sr.kernel, conv_kernel(weight), f"{what}.sr.kernel", owner)
            assign(mixer.sr.bias, read(f"{name}.sr.bias", (mixer.dim,)), f"{what}.sr.bias", owner)
            load_layer_norm(read, mixer.norm, f"{name}.norm", f"{what}.norm")
    load_dense(read, mixer.proj, f"{name}.proj", f"{what}.proj")


@register_timm_converter(Twins)
def _load_timm_twins(model: Twins, read) -> None:
    """timm ``Twins`` -> :class:`Twins` (Twins' own mixers: ``twins_locally_grouped`` /
    ``twins_global_subsampled``, timm's ``LocallyGroupedAttn`` / ``GlobalSubSampleAttn``).

    ``patch_embeds.{s}.proj.weight [C, C_in, p, p]`` -> ``stages[s].patch_embed.proj.kernel
    [(i*p + j)*C_in + c, C]``, ``patch_embeds.{s}.norm`` -> ``.norm``; ``blocks.{s}.{j}.attn.qkv``
    (LSA; rows q | k | v, each head-major) -> ``mixer.qkv.kernel [C, 3, Hd, Dh]``; ``attn.q`` /
    ``attn.kv`` (GSA; kv rows k | v) -> ``mixer.q.kernel [C, Hd, Dh]`` / ``mixer.kv.kernel
    [C, 2, Hd, Dh]``; ``attn.sr.weight [C, C, r, r]`` (OIHW) -> ``mixer.sr.kernel [r, r, C, C]``
    (HWIO), ``attn.norm`` -> ``mixer.norm``; ``attn.proj`` -> ``mixer.proj.kernel [Hd, Dh, C]``;
    ``mlp.fc1`` / ``fc2`` -> ``mlp.up`` / ``down``; ``pos_block.{s}.proj.0.weight [C, 1, 3, 3]`` ->
    ``stages[s].pos_block.proj.kernel [3, 3, 1, C]``; ``norm``; ``head`` -> ``head``.
    """
    owner = read.owner
    kinds = (LocallyGroupedAttention, GlobalSubsampledAttention)
    mixers = [type(block.mixer) for stage in model.stages for block in stage.blocks]
    if any(cls not in kinds for cls in mixers):
        raise TypeError(
            f"{owner}: a timm Twins has only {LSA} and {GSA} mixers; this model has mixers {model.mixer_names}"
        )
    for s, stage in enumerate(model.stages):
        embed = stage.patch_embed
        (ph, pw), channels, dim = embed.patch_size, embed.in_chans, model.dims[s]
        weight = read(f"patch_embeds.{s}.proj.weight", (dim, channels, ph, pw))
        assign(embed.proj.kernel, weight.transpose(2, 3, 1, 0).reshape(ph * pw * channels, dim),
               f"stages.{s}.patch_embed.proj.kernel", owner)
        assign(embed.proj.bias, read(f"patch_embeds.{s}.proj.bias", (dim,)), f"stages.{s}.patch_embed.proj.bias", owner)
        load_layer_norm(read, embed.norm, f"patch_embeds.{s}.norm", f"stages.{s}.patch_embed.norm")
        for j, block in enumerate(stage.blocks):
            name, what = f"blocks.{s}.{j}", f"stages.{s}.blocks.{j}"
            load_layer_norm(read, block.norm1, f"{name}.norm1", f"{what}.norm1")
            _load_mixer(read, block.mixer, f"{name}.attn", f"{what}.mixer")
            load_layer_norm(read, block.norm2, f"{name}.norm2", f"{what}.norm2")
            load_dense(read, block.mlp.up, f"{name}.mlp.fc1", f"{what}.mlp.up")
            load_dense(read, block.mlp.down, f"{name}.mlp.fc2", f"{what}.mlp.down")
        peg, k = stage.pos_block.proj, stage.pos_block.kernel_size
        assign(peg.kernel, conv_kernel(read(f"pos_block.{s}.proj.0.weight", (dim, 1, k, k))),
               f"stages.{s}.pos_block.proj.kernel", owner)
        assign(peg.bias, read(f"pos_block.{s}.proj.0.bias", (dim,)), f"stages.{s}.pos_block.proj.bias", owner)
    if model.norm is not None:
        load_layer_norm(read, model.norm, "norm")
    if model.head is not None:
        load_dense(read, model.head, "head", "head")
