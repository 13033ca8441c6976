"""Vision Transformer (Dosovitskiy et al. 2021) with timm's architecture and any 1-D token mixer.

>>> from attnzoo import zoo
>>> m = zoo.create_model("vit_tiny_patch16_224", rngs=nnx.Rngs(0), num_classes=10)
>>> logits = m(images)                        # images [B,224,224,3] NHWC -> [B,10] float32
>>> feats = m.forward_features(images)        # [B, 197, 192] after the final norm
>>> maps = m.forward_intermediates(images, indices=[3, 7, 11], output_fmt="NHWC")  # 3 x [B,14,14,192]

Architecture (timm ``VisionTransformer``): patch embedding (a stride-``p`` ``p x p`` convolution,
computed as reshape + dense) -> prepend class token -> add learned position embedding (class
token included) -> ``depth`` pre-norm blocks ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` (GELU MLP,
biases everywhere) -> final LayerNorm -> pool (class token or mean of patch tokens) -> linear head.
With ``global_pool="avg"`` timm applies the final norm after pooling (``fc_norm``); so does this.

Parameters (logical axes): ``patch_embed.kernel [ph*pw*C, D]`` (None, embed) with the patch
pixels in (row, column, channel) order, i.e. ``kernel[(i * pw + j) * C + c, d]`` is timm's
``patch_embed.proj.weight[d, c, i, j]``; ``patch_embed.bias [D]``; ``cls_token [1, 1, D]`` and
``pos_embed [1, N, D]`` (None, None, embed); ``blocks.layers.*`` stacked ``[depth, ...]``
(layers, ...); ``norm`` / ``fc_norm`` (norm); ``head.kernel [D, num_classes]`` (embed, None).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers import MLP, Dense, LayerNorm, create_mixer, get_mixer_class
from attnzoo.layers.common import DType, as_pair, partitioned
from attnzoo.pallas_kernels.common import check_int
from attnzoo.zoo.common import (
    LayerRuns,
    LayerStack,
    TimmVisionModel,
    build_from_preset,
    check_logits_dtype,
    mixer_defaults,
    mixer_flops,
    mlp_flops,
)
from attnzoo.zoo.convert import assign, linear_kernel, load_stacked
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.timm_convert import load_dense, load_layer_norm, register_timm_converter

__all__ = ["VisionTransformer", "ViTBlock"]


def _per_block(owner: str, argument: str, value, depth: int, kinds, what: str) -> tuple:
    """``value`` for every block: one value repeated, or a sequence of exactly ``depth`` values."""
    if isinstance(value, kinds):
        return (value,) * depth
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}: {argument} must be {what} or a sequence of {depth} of them, got {type(value).__name__}")
    if len(value) != depth:
        raise ValueError(f"{owner}: {argument} must have one entry per block ({depth}), got {len(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, kinds):
            raise TypeError(f"{owner}: {argument}[{index}] must be {what}, got {type(item).__name__}")
    return tuple(value)


class ViTBlock(nnx.Module):
    """Pre-norm transformer block: ``x + mixer(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP).

    ``x [B, N, D] -> [B, N, D]`` in the compute dtype. The mixer is built with
    ``create_mixer(mixer, dim=D, num_heads=num_heads, dtype=..., param_dtype=..., **mixer_options)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_dim: int,
        mixer: str,
        mixer_options: dict[str, Any],
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
        self.mlp = MLP(dim, mlp_dim, kind="gelu", use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, N, D]`` -> ``[B, N, D]``."""
        x = x + self.mixer(self.norm1(x)).astype(x.dtype)
        return x + self.mlp(self.norm2(x)).astype(x.dtype)


class VisionTransformer(TimmVisionModel):
    """timm's ViT with a pluggable token mixer, NHWC images.

    Args:
      img_size: input height and width (an int or ``(H, W)``); each must divide by ``patch_size``.
      patch_size: patch height and width (an int or ``(ph, pw)``).
      in_chans: input channels ``C``.
      num_classes: classes of the head; 0 = no head (``forward_head`` returns pooled features).
      dim: width ``D``. depth: number of blocks. num_heads: heads of the mixer.
      mlp_ratio: MLP hidden width is ``int(D * mlp_ratio)``.
      mixer: any registered 1-D mixer name (``attnzoo.layers.list_mixers()``), or a sequence of
        ``depth`` names, one per block (e.g. Agent-DeiT-B: 4 ``"agent_attention_tokens"`` blocks, then
        8 ``"attention"``). Consecutive blocks with the same mixer and options share one stacked
        :class:`~attnzoo.zoo.common.LayerStack` (``blocks`` is then a
        :class:`~attnzoo.zoo.common.LayerRuns` of them when there is more than one run).
      mixer_options: extra keyword arguments of the mixer(s): one dict for every block, or a sequence
        of ``depth`` dicts (or None), one per block. Defaults: for ``"attention"``
        ``causal=False, use_rope=False, out_bias=True`` (timm's attention); ``qkv_bias`` for a mixer
        whose constructor names it; ``resolution`` (the patch grid) and ``num_prefix_tokens`` for a
        mixer whose constructor names them (``agent_attention_tokens``,
        ``focused_linear_attention_tokens``).
      class_token: prepend a learned class token.
      global_pool: ``"token"`` (class token; needs ``class_token``) or ``"avg"`` (mean of patch tokens).
      fc_norm: apply the final norm after pooling instead of before; default (None) is timm's:
        True exactly for ``global_pool="avg"``.
      qkv_bias: bias on q/k/v projections (attention mixer).
      norm_eps: LayerNorm epsilon (timm: 1e-6).
      features_only: build a feature extractor (timm's ``features_only``): no head and no final
        norm; calling the model returns every block's output as ``[B, H/p, W/p, D]`` maps (NHWC),
        one per ``feature_info`` entry.
      remat: remat policy name per block ("none", "full", "dots", "dots_no_batch", "save_nothing").
      scan_layers: apply the blocks with ``nnx.scan`` (True) or a Python loop (False, the default
        as in big_vision); the same parameters either way. The loop compiles ~2.5x slower and runs
        faster: a scanned forward stacks every block's residuals into zero-initialised buffers
        (ViT-Ti train step on the 2-core CPU: 0.72 s scanned, 0.67 s looped). Scan pays off for
        deep models and long compiles.
      dtype: compute dtype (default: promotion of input and parameter dtypes).
      param_dtype: parameter dtype. logits_dtype: dtype of the logits (default float32).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    _owner = "VisionTransformer"
    output_fmts = ("NLC", "NHWC")

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mixer: str | Sequence[str] = "attention",
        mixer_options: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None,
        class_token: bool = True,
        global_pool: str = "token",
        fc_norm: bool | None = None,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        features_only: bool = False,
        remat: str = "none",
        scan_layers: bool = False,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        logits_dtype: DType = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        owner = "VisionTransformer"
        self.img_size = as_pair(owner, "img_size", img_size)
        self.patch_size = as_pair(owner, "patch_size", patch_size)
        for axis, (size, patch) in enumerate(zip(self.img_size, self.patch_size)):
            if size % patch:
                raise ValueError(
                    f"{owner}: img_size {self.img_size} must be divisible by patch_size {self.patch_size} "
                    f"(axis {axis}: {size} % {patch} = {size % patch})"
                )
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = check_int(owner, "in_chans", in_chans)
        self.num_classes = check_int(owner, "num_classes", num_classes, minimum=0)
        self.dim = check_int(owner, "dim", dim)
        self.depth = check_int(owner, "depth", depth)
        self.num_heads = check_int(owner, "num_heads", num_heads)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"{owner}: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.mlp_dim = int(dim * mlp_ratio)
        names = _per_block(owner, "mixer", mixer, self.depth, str, "a registered mixer name (str)")
        for name in names:
            get_mixer_class(name)  # ValueError listing the known mixers
        extra = _per_block(owner, "mixer_options", {} if mixer_options is None else mixer_options, self.depth,
                           (dict, type(None)), "a dict (or None)")
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"{owner}: qkv_bias must be a bool, got {type(qkv_bias).__name__}")
        if not isinstance(class_token, bool):
            raise TypeError(f"{owner}: class_token must be a bool, got {type(class_token).__name__}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"{owner}: global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError(f"{owner}: global_pool='token' needs class_token=True (or use global_pool='avg')")
        self.class_token = class_token
        self.num_prefix_tokens = int(class_token)
        self.num_tokens = self.num_patches + self.num_prefix_tokens
        block_options = []
        for name, options in zip(names, extra, strict=True):
            defaults = mixer_defaults(get_mixer_class(name), name, qkv_bias, resolution=self.grid_size,
                                      num_prefix_tokens=self.num_prefix_tokens, var_keyword=False)
            block_options.append(dict(defaults, **(options or {})))
        self.mixer_names = names
        self.mixer_name = names[0] if len(set(names)) == 1 else names
        self.global_pool = global_pool
        use_fc_norm = global_pool == "avg" if fc_norm is None else bool(fc_norm)
        if not isinstance(features_only, bool):
            raise TypeError(f"{owner}: features_only must be a bool, got {type(features_only).__name__}")
        self.features_only = features_only
        self.num_features = self.dim
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.logits_dtype = check_logits_dtype(owner, logits_dtype)

        patch_pixels = self.patch_size[0] * self.patch_size[1] * self.in_chans
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = Dense(patch_pixels, dim, logical_axes=(None, "embed"), use_bias=True, **dense)
        embed_init = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = (
            nnx.Param(partitioned(nnx.initializers.normal(1e-6), (None, None, "embed"))(rngs.params(), (1, 1, dim), param_dtype))
            if class_token
            else None
        )
        self.pos_embed = nnx.Param(
            partitioned(embed_init, (None, None, "embed"))(rngs.params(), (1, self.num_tokens, dim), param_dtype)
        )

        def make_run(name: str, options: dict[str, Any], count: int) -> LayerStack:
            def make_block(block_rngs: nnx.Rngs) -> ViTBlock:
                return ViTBlock(
                    dim, num_heads, mlp_dim=self.mlp_dim, mixer=name, mixer_options=options,
                    norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=block_rngs,
                )

            return LayerStack(make_block, count, remat=remat, scan_layers=scan_layers, rngs=rngs)

        runs = []  # [(mixer name, options, blocks)] of consecutive equal blocks
        for name, options in zip(names, block_options, strict=True):
            if runs and tuple(runs[-1][:2]) == (name, options):
                runs[-1][2] += 1
            else:
                runs.append([name, options, 1])
        stacks = [make_run(*run) for run in runs]
        self.blocks = stacks[0] if len(stacks) == 1 else LayerRuns(stacks)
        norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.norm = None if use_fc_norm or features_only else LayerNorm(dim, **norm)
        self.fc_norm = LayerNorm(dim, **norm) if use_fc_norm and not features_only else None
        self.head = nnx.data(None)
        if not features_only:
            self.reset_classifier(num_classes, rngs=rngs)

    def _set_global_pool(self, owner: str, global_pool: str) -> None:
        """``reset_classifier``'s ``global_pool``: "token" (needs a class token) or "avg"."""
        if global_pool not in ("token", "avg") or (global_pool == "token" and not self.class_token):
            raise ValueError(f"{owner}: global_pool must be 'avg' or (with a class token) 'token', got {global_pool!r}")
        self.global_pool = global_pool

    # ------------------------------------------------------------------------------------------
    # timm's feature contract
    # ------------------------------------------------------------------------------------------

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per block: ``num_chs`` (D), ``reduction`` (patch stride), ``module`` (name)."""
        reduction = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else self.patch_size
        return [dict(num_chs=self.dim, reduction=reduction, module=f"blocks.{i}") for i in range(self.depth)]

    def _embed(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> tokens ``[B, num_tokens, D]`` (patches, class token, positions)."""
        self._check_images(images)
        batch = images.shape[0]
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        patches = images.reshape(batch, gh, ph, gw, pw, self.in_chans).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(patches.reshape(batch, gh * gw, ph * pw * self.in_chans))
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (batch, 1, self.dim))
            x = jnp.concatenate([cls, x], axis=1)
        return x + self.pos_embed[...].astype(x.dtype)

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images ``[B,H,W,C]`` -> tokens ``[B, num_tokens, D]`` after the final norm (class token
        first when present); with ``fc_norm`` the norm comes after pooling instead."""
        return self._final_norm(self.blocks(self._embed(images)))

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return x if self.norm is None else self.norm(x)

    def _pre_logits(self, features: jax.Array) -> jax.Array:
        """features ``[B, num_tokens, D]`` -> ``[B, D]``: the class token or the mean of the patch
        tokens (``global_pool``), then ``fc_norm`` if any (``forward_head``)."""
        if not hasattr(features, "shape") or features.ndim != 3 or tuple(features.shape[1:]) != (self.num_tokens, self.dim):
            raise ValueError(
                f"VisionTransformer.forward_head: features must have shape [B, {self.num_tokens}, {self.dim}], "
                f"got {getattr(features, 'shape', type(features).__name__)}"
            )
        if self.global_pool == "token":
            pooled = features[:, 0]
        else:
            pooled = jnp.mean(features[:, self.num_prefix_tokens :], axis=1)
        return pooled if self.fc_norm is None else self.fc_norm(pooled)

    def forward_intermediates(self, images: jax.Array, indices: int | Sequence[int] | None = None, *,
                              norm: bool = False, output_fmt: str = "NLC", intermediates_only: bool = True):
        """Outputs of selected blocks (timm's ``forward_intermediates``).

        Args:
          images: ``[B,H,W,C]``.
          indices: block indices (negative count from the end), or an int ``n`` = the last ``n``
            blocks, or None = all blocks.
          norm: apply the final norm to each intermediate.
          output_fmt: ``"NLC"`` -> ``[B, num_tokens, D]`` (class token first, if any);
            ``"NHWC"`` -> patch tokens as a grid ``[B, H/p, W/p, D]``.
          intermediates_only: return only the list; else ``(final features, list)`` where final
            features are :meth:`forward_features`'s.

        Returns a list (in the order of ``indices``) of arrays in the compute dtype.
        """
        return super().forward_intermediates(images, indices, norm=norm, output_fmt=output_fmt,
                                             intermediates_only=intermediates_only)

    def _feature_maps(self, images: jax.Array, last: int) -> jax.Array:
        """Every block's output ``[depth, B, num_tokens, D]`` (all blocks run, whatever ``last``)."""
        return self.blocks(self._embed(images), return_all=True)[1]

    def _intermediate_norm(self, owner: str, norm):
        normed = self.norm if self.norm is not None else self.fc_norm
        return (lambda index, x: normed(x)) if norm and normed is not None else None

    def _to_output_fmt(self, x: jax.Array, output_fmt: str) -> jax.Array:
        if output_fmt == "NLC":
            return x
        return x[:, self.num_prefix_tokens :].reshape(x.shape[0], *self.grid_size, self.dim)

    # ------------------------------------------------------------------------------------------
    # Cost model
    # ------------------------------------------------------------------------------------------

    def forward_flops(self, example_shape: Sequence[int] | None = None) -> int:
        """Analytic forward FLOPs for ONE image (matmuls only, 2 FLOPs per multiply-add).

        With ``Np`` patches of ``P = ph * pw * C`` pixels, ``N = Np + prefix`` tokens, width
        ``D``, MLP width ``F`` and ``K`` classes::

            patch embedding:  2 * Np * P * D
            per block:        mixer.flops(N)        (attention: q/k/v/o projections 8 N D^2 at
                                                     full width, scores and values 4 N^2 D)
                              + 2 * N * D * F * 2   (MLP fc1, fc2)
            head:             2 * D * K

        Norms, GELU, softmax, biases, pooling and the position embedding are not counted.

        Args:
          example_shape: ``(H, W, C)`` of one image; must equal the model's (default).
        Raises ``TypeError`` if the mixer has no ``flops`` method.
        """
        self._check_example_shape(example_shape)
        patch_pixels = self.patch_size[0] * self.patch_size[1] * self.in_chans
        blocks = 0
        for run in getattr(self.blocks, "runs", [self.blocks]):
            per_block = mixer_flops(run.layers.mixer, self.num_tokens, "VisionTransformer") + mlp_flops(
                run.layers.mlp, self.num_tokens)
            blocks += run.num_layers * per_block
        head = 2 * self.dim * self.num_classes
        return int(2 * self.num_patches * patch_pixels * self.dim + blocks + head)


# ----------------------------------------------------------------------------------------------
# Presets (timm names)
# ----------------------------------------------------------------------------------------------

_VIT_BASE = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000)


@register_model("vit_tiny_patch16_224")
def vit_tiny_patch16_224(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """ViT-Ti/16 at 224 (timm ``vit_tiny_patch16_224``): D 192, 12 blocks, 3 heads; 5,717,416 params."""
    preset = dict(_VIT_BASE, dim=192, depth=12, num_heads=3)
    return build_from_preset(VisionTransformer, "vit_tiny_patch16_224", preset, overrides, rngs)


@register_model("vit_small_patch16_224")
def vit_small_patch16_224(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """ViT-S/16 at 224 (timm ``vit_small_patch16_224``): D 384, 12 blocks, 6 heads; 22,050,664 params."""
    preset = dict(_VIT_BASE, dim=384, depth=12, num_heads=6)
    return build_from_preset(VisionTransformer, "vit_small_patch16_224", preset, overrides, rngs)


@register_model("vit_base_patch16_224")
def vit_base_patch16_224(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    """ViT-B/16 at 224 (timm ``vit_base_patch16_224``): D 768, 12 blocks, 12 heads; 86,567,656 params."""
    preset = dict(_VIT_BASE, dim=768, depth=12, num_heads=12)
    return build_from_preset(VisionTransformer, "vit_base_patch16_224", preset, overrides, rngs)


# ----------------------------------------------------------------------------------------------
# timm checkpoints
# ----------------------------------------------------------------------------------------------


@register_timm_converter(VisionTransformer)
def _load_timm_vit(model: VisionTransformer, read) -> None:
    """timm ``VisionTransformer`` (attention mixer) -> :class:`VisionTransformer`.

    ``patch_embed.proj.weight [D, C, ph, pw]`` becomes the patch kernel ``[(i*pw + j)*C + c, D]``;
    ``blocks.{i}.attn.qkv.weight [3D, D]`` splits by rows into q, k, v (each head-major, ``[H, hd]``);
    ``attn.proj`` -> ``o_proj``; ``mlp.fc1`` / ``fc2`` -> ``mlp.up`` / ``down``.
    """
    if model.mixer_name != "attention":
        raise TypeError(f"load_timm_weights: a timm ViT has attention blocks; this model's mixer is {model.mixer_name!r}")
    owner, dim = read.owner, model.dim
    (ph, pw), channels = model.patch_size, model.in_chans
    weight = read("patch_embed.proj.weight", (dim, channels, ph, pw))
    assign(model.patch_embed.kernel, weight.transpose(2, 3, 1, 0).reshape(ph * pw * channels, dim), "patch_embed.kernel", owner)
    assign(model.patch_embed.bias, read("patch_embed.proj.bias", (dim,)), "patch_embed.bias", owner)
    if model.cls_token is not None:
        assign(model.cls_token, read("cls_token", (1, 1, dim)), "cls_token", owner)
    assign(model.pos_embed, read("pos_embed", (1, model.num_tokens, dim)), "pos_embed", owner)

    def load_block(index: int, block: ViTBlock) -> None:
        name = f"blocks.{index}"
        load_layer_norm(read, block.norm1, f"{name}.norm1")
        load_layer_norm(read, block.norm2, f"{name}.norm2")
        attn = block.mixer
        qkv_weight = read(f"{name}.attn.qkv.weight", (3 * dim, dim))
        qkv_bias = read(f"{name}.attn.qkv.bias", (3 * dim,)) if attn.q_proj.bias is not None else None
        for part, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            rows = slice(part * dim, (part + 1) * dim)
            what = f"{name}.mixer.{('q', 'k', 'v')[part]}_proj"
            assign(proj.kernel, linear_kernel(qkv_weight[rows], proj.in_features, proj.out_features), f"{what}.kernel", owner)
            if qkv_bias is not None:
                assign(proj.bias, qkv_bias[rows].reshape(proj.out_features), f"{what}.bias", owner)
        load_dense(read, attn.o_proj, f"{name}.attn.proj", f"{name}.mixer.o_proj")
        load_dense(read, block.mlp.up, f"{name}.mlp.fc1", f"{name}.mlp.up")
        load_dense(read, block.mlp.down, f"{name}.mlp.fc2", f"{name}.mlp.down")

    load_stacked(model.blocks, load_block)
    if model.norm is not None:
        load_layer_norm(read, model.norm, "norm")
    if model.fc_norm is not None:
        load_layer_norm(read, model.fc_norm, "fc_norm")
    if model.head is not None:
        load_dense(read, model.head, "head")
