"""HAT (Chen et al., "Activating More Pixels in Image Super-Resolution Transformer", CVPR 2023):
image super-resolution with residual hybrid attention groups, NHWC.

>>> m = zoo.create_model("hat_s_x2", rngs=nnx.Rngs(0))
>>> y = m(x)                        # x float32 [B, h, w, 3] in [0, 1] -> [B, 2h, 2w, 3]
>>> m.forward_flops((64, 64, 3))    # forward FLOPs of one 64x64 image

Structure (the official ``hat_arch.HAT`` with ``upsampler="pixelshuffle"``, ``resi_connection="1conv"``,
``patch_size=1``, ``patch_norm=True``, ``ape=False``):

* ``x -> (x - rgb_mean) * img_range``; reflect-pad bottom/right to a multiple of ``window_size``
  (the official ``HATModel`` does this before the network and crops after);
* ``conv_first`` (3x3, ``in_chans -> embed_dim``) gives ``f``;
* body: ``patch_norm`` (LayerNorm), then per group (RHAG) ``g + conv(blocks(g))`` with ``depths[i]``
  HABs (``x + hat_hybrid(norm1(x))``, ``x + mlp(norm2(x))``; odd blocks shifted by ``window_size // 2``)
  and one OCAB (``x + hat_overlapping_cross_attention(norm1(x))``, ``x + mlp(norm2(x))``), then
  ``norm``; ``f + conv_after_body(body)``;
* ``conv_before_upsample`` (3x3 to 64, LeakyReLU 0.01), ``upsample`` (3x3 to ``4 * 64`` and
  pixel shuffle 2, ``log2(upscale)`` times, or 3x3 to ``9 * 64`` and pixel shuffle 3),
  ``conv_last`` (3x3 to ``in_chans``); crop to ``(h * upscale, w * upscale)``; ``y / img_range + rgb_mean``.

LayerNorms use epsilon 1e-5 (torch's), MLPs are ``fc2(gelu(fc1))`` with exact GELU and biases.
Presets ``hat_s_x{2,3,4}`` / ``hat_x{2,3,4}`` use the official option files
(``options/test/HAT-S_SRx*.yml``, ``HAT_SRx*.yml``). Official checkpoints load with
:func:`load_official_hat_weights`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.layers.common import MLP, DType, LayerNorm, as_pair, check_input, compute_dtype
from attnzoo.layers.conv import Conv2d
from attnzoo.layers.hat import HybridAttention, OverlappingCrossAttention
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.zoo.convert import StateDictReader, assign
from attnzoo.zoo.registry import register_model
from attnzoo.zoo.timm_convert import conv_kernel, load_dense, load_layer_norm

__all__ = ["HAT", "HybridAttentionBlock", "OverlapBlock", "ResidualHybridAttentionGroup", "load_official_hat_weights",
           "pixel_shuffle"]

DEFAULT_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # the official DIV2K mean, subtracted when in_chans == 3
NUM_FEAT = 64  # the official reconstruction width (num_feat)
NORM_EPS = 1e-5  # torch LayerNorm's default


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """torch's ``PixelShuffle`` in NHWC: ``[B, H, W, C r^2] -> [B, H r, W r, C]`` with
    ``out[b, h r + i, w r + j, c] = x[b, h, w, c r^2 + i r + j]``."""
    batch, height, width, channels = x.shape
    if channels % (factor * factor):
        raise ValueError(f"pixel_shuffle: channels ({channels}) must divide by factor**2 ({factor * factor})")
    out = channels // (factor * factor)
    x = x.reshape(batch, height, width, out, factor, factor)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))  # [B, H, i, W, j, C]
    return x.reshape(batch, height * factor, width * factor, out)


def _mlp(dim: int, mlp_ratio: float, common: dict) -> MLP:
    return MLP(dim, int(dim * mlp_ratio), kind="gelu", use_bias=True, **common)


class HybridAttentionBlock(nnx.Module):
    """HAB: ``x + mixer(norm1(x))``, then ``x + mlp(norm2(x))``; ``mixer`` is ``hat_hybrid``.
    ``x [B, H, W, D] -> [B, H, W, D]``."""

    def __init__(self, dim, num_heads, *, window_size, shift_size, compress_ratio, squeeze_factor, conv_scale,
                 mlp_ratio, qkv_bias=True, dtype=None, param_dtype=jnp.float32, rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, epsilon=NORM_EPS, **common)
        self.mixer = HybridAttention(
            dim, num_heads, window_size=window_size, shift_size=shift_size, compress_ratio=compress_ratio,
            squeeze_factor=squeeze_factor, conv_scale=conv_scale, qkv_bias=qkv_bias, **common,
        )
        self.norm2 = LayerNorm(dim, epsilon=NORM_EPS, **common)
        self.mlp = _mlp(dim, mlp_ratio, common)

    def __call__(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def flops(self, height, width):
        return self.mixer.flops(height, width) + 4 * height * width * self.mlp.dim * self.mlp.hidden_dim


class OverlapBlock(nnx.Module):
    """OCAB: ``x + mixer(norm1(x))``, then ``x + mlp(norm2(x))``; ``mixer`` is
    ``hat_overlapping_cross_attention``. ``x [B, H, W, D] -> [B, H, W, D]``."""

    def __init__(self, dim, num_heads, *, window_size, overlap_ratio, mlp_ratio, qkv_bias=True, dtype=None,
                 param_dtype=jnp.float32, rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, epsilon=NORM_EPS, **common)
        self.mixer = OverlappingCrossAttention(
            dim, num_heads, window_size=window_size, overlap_ratio=overlap_ratio, qkv_bias=qkv_bias, **common
        )
        self.norm2 = LayerNorm(dim, epsilon=NORM_EPS, **common)
        self.mlp = _mlp(dim, mlp_ratio, common)

    def __call__(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def flops(self, height, width):
        return self.mixer.flops(height, width) + 4 * height * width * self.mlp.dim * self.mlp.hidden_dim


class ResidualHybridAttentionGroup(nnx.Module):
    """RHAG: ``x + conv(ocab(habs(x)))`` with a 3x3 convolution. ``x [B, H, W, D] -> [B, H, W, D]``."""

    def __init__(self, dim, depth, num_heads, *, window_size, shift_size, compress_ratio, squeeze_factor, conv_scale,
                 overlap_ratio, mlp_ratio, qkv_bias=True, dtype=None, param_dtype=jnp.float32, rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            HybridAttentionBlock(
                dim, num_heads, window_size=window_size, shift_size=0 if i % 2 == 0 else shift_size,
                compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, conv_scale=conv_scale,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, **common,
            )
            for i in range(depth)
        ])
        self.overlap_attn = OverlapBlock(
            dim, num_heads, window_size=window_size, overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, **common,
        )
        self.conv = Conv2d(dim, dim, 3, padding=1, logical_axes=(None, None, None, "embed"), **common)

    def __call__(self, x):
        y = x
        for block in self.blocks:
            y = block(y)
        return x + self.conv(self.overlap_attn(y))

    def flops(self, height, width):
        return (sum(b.flops(height, width) for b in self.blocks) + self.overlap_attn.flops(height, width)
                + self.conv.flops(height, width))


def _build_apart(module_cls, rngs: nnx.Rngs, *args, **options):
    """``module_cls(*args, **options, rngs=rngs)`` initialised in its own ``nnx.jit`` (same random
    stream). Under an outer trace (``nnx.eval_shape``, a jitted init) every parameter initialised in
    one trace costs time linear in the trace's length, so a full HAT (365 initialisers) took ~10 s
    to build abstractly in one trace and ~1.5 s with one trace per group."""

    @nnx.jit
    def build(rngs):
        return module_cls(*args, **options, rngs=rngs)

    return build(rngs)


class HAT(nnx.Module):
    """Hybrid Attention Transformer for super-resolution (see the module docstring).

    ``x`` float ``[B, h, w, in_chans]`` (values in ``[0, 1]`` for ``img_range=1``) ->
    ``[B, h * upscale, w * upscale, in_chans]`` in the compute dtype, for any ``h, w >= 2``.

    Args:
      in_chans: image channels (input and output).
      img_size: the official nominal training size; only its rule is kept: with
        ``min(img_size) <= window_size`` the HABs do not shift (``img_size < window_size`` raises,
        the official model cannot run it).
      upscale: 2, 3, 4 or 8 (powers of two and 3, as the official ``Upsample``).
      embed_dim: width ``D``. depths: HABs per group. num_heads: heads per group (must divide ``D``).
      window_size: ``M`` (square). compress_ratio, squeeze_factor, conv_scale: the CAB's.
      overlap_ratio: OCAB's ``M_o = M + int(overlap_ratio * M)``. mlp_ratio: MLP hidden ``int(D * r)``.
      qkv_bias: biases of the qkv projections.
      img_range: input scaling after the mean subtraction (1 or 255).
      rgb_mean: per-channel mean subtracted first; default the official DIV2K mean for 3 channels,
        zeros otherwise (a tuple of ``in_chans`` floats).
      dtype, param_dtype: compute / parameter dtype. rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 64,
        upscale: int = 2,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        conv_scale: float = 0.01,
        overlap_ratio: float = 0.5,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        img_range: float = 1.0,
        rgb_mean: Sequence[float] | None = None,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "HAT"
        self.in_chans = check_int(owner, "in_chans", in_chans)
        self.img_size = as_pair(owner, "img_size", img_size)
        self.upscale = check_int(owner, "upscale", upscale)
        if self.upscale not in (3,) and self.upscale & (self.upscale - 1):
            raise ValueError(f"{owner}: upscale must be a power of two or 3 (the official Upsample), got {upscale}")
        if self.upscale == 1:
            raise ValueError(f"{owner}: upscale must be a power of two or 3 and at least 2, got {upscale}")
        self.embed_dim = check_int(owner, "embed_dim", embed_dim)
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"{owner}: depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        self.depths = tuple(check_int(owner, f"depths[{i}]", d) for i, d in enumerate(depths))
        self.num_heads = tuple(check_int(owner, f"num_heads[{i}]", h) for i, h in enumerate(num_heads))
        self.window_size = check_int(owner, "window_size", window_size)
        if min(self.img_size) < self.window_size:
            raise ValueError(f"{owner}: img_size {self.img_size} must be at least window_size ({self.window_size})")
        self.shift_size = 0 if min(self.img_size) <= self.window_size else self.window_size // 2
        self.img_range = check_float(owner, "img_range", img_range, positive=True, allow_none=False)
        if rgb_mean is None:
            rgb_mean = DEFAULT_RGB_MEAN if self.in_chans == 3 else (0.0,) * self.in_chans
        rgb_mean = tuple(rgb_mean)
        if len(rgb_mean) != self.in_chans:
            raise ValueError(f"{owner}: rgb_mean must have in_chans ({self.in_chans}) values, got {rgb_mean!r}")
        self.rgb_mean = tuple(check_float(owner, f"rgb_mean[{i}]", m, allow_none=False) for i, m in enumerate(rgb_mean))
        self.dtype = dtype
        self.param_dtype = param_dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        conv3 = dict(padding=1, **common)
        self.conv_first = Conv2d(self.in_chans, self.embed_dim, 3, **conv3)
        self.patch_norm = LayerNorm(self.embed_dim, epsilon=NORM_EPS, **common)
        group = dict(window_size=self.window_size, shift_size=self.shift_size, compress_ratio=compress_ratio,
                     squeeze_factor=squeeze_factor, conv_scale=conv_scale, overlap_ratio=overlap_ratio,
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([
            _build_apart(ResidualHybridAttentionGroup, rngs, self.embed_dim, depth, heads, **group)
            for depth, heads in zip(self.depths, self.num_heads, strict=True)
        ])
        self.norm = LayerNorm(self.embed_dim, epsilon=NORM_EPS, **common)
        self.conv_after_body = Conv2d(self.embed_dim, self.embed_dim, 3, **conv3)
        self.conv_before_upsample = Conv2d(self.embed_dim, NUM_FEAT, 3, **conv3)
        if self.upscale == 3:
            factors = (3,)
        else:
            factors = (2,) * (self.upscale.bit_length() - 1)
        self.upsample_factors = factors
        self.upsample = nnx.List([Conv2d(NUM_FEAT, f * f * NUM_FEAT, 3, **conv3) for f in factors])
        # Its outputs are image channels (1 or 3): shard the kernel along its input features instead.
        self.conv_last = Conv2d(NUM_FEAT, self.in_chans, 3, logical_axes=(None, None, "embed", None), **conv3)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` rounded up to multiples of ``window_size`` (the reflect-padded image)."""
        m = self.window_size
        return -(-height // m) * m, -(-width // m) * m

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The body on the shallow features ``[B, H, W, D]`` (H, W multiples of the window) -> same shape."""
        y = self.patch_norm(x)
        for layer in self.layers:
            y = layer(y)
        return self.norm(y)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, h, w, in_chans]`` -> ``[B, h * upscale, w * upscale, in_chans]``."""
        check_input("HAT", x, ndim=4, last=self.in_chans, layout="[B,H,W,C]")
        height, width = x.shape[1], x.shape[2]
        if min(height, width) < 2:
            raise ValueError(f"HAT: the image must be at least 2 x 2 (reflect padding), got {height} x {width}")
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        mean = jnp.asarray(self.rgb_mean, dtype)
        x = (x.astype(dtype) - mean) * jnp.asarray(self.img_range, dtype)
        padded = self.padded_size(height, width)
        if padded != (height, width):
            x = jnp.pad(x, ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0)), mode="reflect")
        f = self.conv_first(x)
        f = f + self.conv_after_body(self.forward_features(f))
        y = jax.nn.leaky_relu(self.conv_before_upsample(f), 0.01)
        for conv, factor in zip(self.upsample, self.upsample_factors, strict=True):
            y = pixel_shuffle(conv(y), factor)
        y = self.conv_last(y)
        y = y[:, : height * self.upscale, : width * self.upscale]
        return y / jnp.asarray(self.img_range, y.dtype) + mean.astype(y.dtype)

    def forward_flops(self, input_shape: Sequence[int] = (64, 64, 3)) -> int:
        """Forward matmul / convolution FLOPs (2 per multiply-add) of one ``(h, w, in_chans)`` image,
        on the reflect-padded ``(H, W)`` map: every convolution, the attention blocks' mixers
        (:meth:`HybridAttention.flops`, :meth:`OverlappingCrossAttention.flops`) and MLPs."""
        if len(tuple(input_shape)) != 3:
            raise ValueError(f"HAT.forward_flops: input_shape must be (h, w, in_chans), got {input_shape!r}")
        height, width, chans = (check_int("HAT.forward_flops", n, v) for n, v in zip(("h", "w", "in_chans"), input_shape, strict=True))
        if chans != self.in_chans:
            raise ValueError(f"HAT.forward_flops: in_chans must be {self.in_chans}, got {chans}")
        h, w = self.padded_size(height, width)
        total = self.conv_first.flops(h, w) + self.conv_after_body.flops(h, w) + self.conv_before_upsample.flops(h, w)
        total += sum(layer.flops(h, w) for layer in self.layers)
        for conv, factor in zip(self.upsample, self.upsample_factors, strict=True):
            total += conv.flops(h, w)
            h, w = h * factor, w * factor
        return total + self.conv_last.flops(h, w)


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------


def _load_conv(read: StateDictReader, conv: Conv2d, name: str) -> None:
    kh, kw = conv.kernel_size
    weight = read(f"{name}.weight", (conv.out_features, conv.in_features, kh, kw))
    assign(conv.kernel, conv_kernel(weight), f"{name}.kernel", read.owner)
    assign(conv.bias, read(f"{name}.bias", (conv.out_features,)), f"{name}.bias", read.owner)


def _load_1x1(read: StateDictReader, dense, name: str) -> None:
    """A torch 1x1 ``Conv2d [O, I, 1, 1]`` into a Dense ``[I, O]``."""
    (fan_in,), (fan_out,) = dense.in_features, dense.out_features
    weight = read(f"{name}.weight", (fan_out, fan_in, 1, 1))
    assign(dense.kernel, weight[:, :, 0, 0].T, f"{name}.kernel", read.owner)
    assign(dense.bias, read(f"{name}.bias", (fan_out,)), f"{name}.bias", read.owner)


def _load_mlp(read, mlp: MLP, name: str) -> None:
    load_dense(read, mlp.up, f"{name}.fc1")
    load_dense(read, mlp.down, f"{name}.fc2")


def _load_table(read, param, name: str) -> None:
    assign(param, read(name, tuple(param.get_value().shape)), name, read.owner)


def load_official_hat_weights(model: HAT, state_dict: Mapping[str, np.ndarray], *, strict: bool = True) -> list[str]:
    """Loads an official HAT ``state_dict`` (``hat_arch.HAT``, e.g. ``torch.load(...)["params_ema"]``,
    values as numpy arrays) into ``model`` in place; returns the unused keys (the precomputed
    ``relative_position_index_SA`` / ``_OCA`` buffers). ``strict=True`` raises on any other unused key;
    a missing key or a wrong shape always raises.

    Names: ``conv_first``, ``patch_embed.norm`` -> ``patch_norm``,
    ``layers.i.residual_group.blocks.j.{norm1, norm2, mlp.fc1, mlp.fc2}`` -> ``layers[i].blocks[j].*``
    (fc1/fc2 -> ``mlp.up`` / ``mlp.down``), ``...blocks.j.attn.{qkv, proj, relative_position_bias_table}``
    -> ``.mixer.attn.*``, ``...blocks.j.conv_block.cab.{0, 2}`` -> ``.mixer.conv_block.conv{1, 2}``,
    ``...cab.3.attention.{1, 3}`` (1x1 convs) -> ``.mixer.conv_block.attention.fc{1, 2}``,
    ``layers.i.residual_group.overlap_attn.{norm1, norm2, mlp}`` -> ``layers[i].overlap_attn.*`` and its
    ``{qkv, proj, relative_position_bias_table}`` -> ``.overlap_attn.mixer.*``, ``layers.i.conv``,
    ``norm``, ``conv_after_body``, ``conv_before_upsample.0``, ``upsample.{0, 2, ...}``, ``conv_last``.
    Linear weights ``[out, in]`` are transposed; conv weights go OIHW -> HWIO; fused qkv rows are
    ``(3, heads, head_dim)`` as in our ``qkv.kernel`` (no reordering); bias tables are used as is.
    """
    if not isinstance(model, HAT):
        raise TypeError(f"load_official_hat_weights: model must be a HAT, got {type(model).__name__}")
    read = StateDictReader(state_dict, "", "load_official_hat_weights")
    _load_conv(read, model.conv_first, "conv_first")
    load_layer_norm(read, model.patch_norm, "patch_embed.norm")
    for i, layer in enumerate(model.layers):
        group = f"layers.{i}.residual_group"
        for j, block in enumerate(layer.blocks):
            name = f"{group}.blocks.{j}"
            load_layer_norm(read, block.norm1, f"{name}.norm1")
            load_layer_norm(read, block.norm2, f"{name}.norm2")
            _load_mlp(read, block.mlp, f"{name}.mlp")
            attn = block.mixer.attn
            load_dense(read, attn.qkv, f"{name}.attn.qkv")
            load_dense(read, attn.proj, f"{name}.attn.proj")
            _load_table(read, attn.relative_position_bias_table, f"{name}.attn.relative_position_bias_table")
            cab = block.mixer.conv_block
            _load_conv(read, cab.conv1, f"{name}.conv_block.cab.0")
            _load_conv(read, cab.conv2, f"{name}.conv_block.cab.2")
            _load_1x1(read, cab.attention.fc1, f"{name}.conv_block.cab.3.attention.1")
            _load_1x1(read, cab.attention.fc2, f"{name}.conv_block.cab.3.attention.3")
        name = f"{group}.overlap_attn"
        block = layer.overlap_attn
        load_layer_norm(read, block.norm1, f"{name}.norm1")
        load_layer_norm(read, block.norm2, f"{name}.norm2")
        _load_mlp(read, block.mlp, f"{name}.mlp")
        load_dense(read, block.mixer.qkv, f"{name}.qkv")
        load_dense(read, block.mixer.proj, f"{name}.proj")
        _load_table(read, block.mixer.relative_position_bias_table, f"{name}.relative_position_bias_table")
        _load_conv(read, layer.conv, f"layers.{i}.conv")
    load_layer_norm(read, model.norm, "norm")
    _load_conv(read, model.conv_after_body, "conv_after_body")
    _load_conv(read, model.conv_before_upsample, "conv_before_upsample.0")
    for k, conv in enumerate(model.upsample):
        _load_conv(read, conv, f"upsample.{2 * k}")
    _load_conv(read, model.conv_last, "conv_last")
    unused = read.unused()
    leftover = [key for key in unused if not key.endswith(("relative_position_index_SA", "relative_position_index_OCA"))]
    if strict and leftover:
        raise ValueError(f"load_official_hat_weights: state_dict keys not converted: {leftover}")
    return unused


# ----------------------------------------------------------------------------------------------
# Presets: the official option files (options/test/HAT-S_SRx*.yml, HAT_SRx*.yml)
# ----------------------------------------------------------------------------------------------

_COMMON = dict(in_chans=3, img_size=64, window_size=16, conv_scale=0.01, overlap_ratio=0.5, img_range=1.0,
               depths=(6,) * 6, num_heads=(6,) * 6, mlp_ratio=2.0)
_HAT_S = dict(_COMMON, embed_dim=144, compress_ratio=24, squeeze_factor=24)
_HAT = dict(_COMMON, embed_dim=180, compress_ratio=3, squeeze_factor=30)


def _preset(base: dict, upscale: int, rngs: nnx.Rngs, overrides: dict) -> HAT:
    return HAT(**{**base, "upscale": upscale, **overrides}, rngs=rngs)


@register_model("hat_s_x2")
def hat_s_x2(*, rngs: nnx.Rngs, **overrides) -> HAT:
    """HAT-S, x2 (options/test/HAT-S_SRx2.yml)."""
    return _preset(_HAT_S, 2, rngs, overrides)


@register_model("hat_s_x3")
def hat_s_x3(*, rngs: nnx.Rngs, **overrides) -> HAT:
    """HAT-S, x3 (options/test/HAT-S_SRx3.yml)."""
    return _preset(_HAT_S, 3, rngs, overrides)


@register_model("hat_s_x4")
def hat_s_x4(*, rngs: nnx.Rngs, **overrides) -> HAT:
    """HAT-S, x4 (options/test/HAT-S_SRx4.yml)."""
    return _preset(_HAT_S, 4, rngs, overrides)


@register_model("hat_x2")
def hat_x2(*, rngs: nnx.Rngs, **overrides) -> HAT:
    """HAT, x2 (options/test/HAT_SRx2.yml)."""
    return _preset(_HAT, 2, rngs, overrides)


@register_model("hat_x3")
def hat_x3(*, rngs: nnx.Rngs, **overrides) -> HAT:
    """HAT, x3 (options/test/HAT_SRx3.yml)."""
    return _preset(_HAT, 3, rngs, overrides)


@register_model("hat_x4")
def hat_x4(*, rngs: nnx.Rngs, **overrides) -> HAT:
    """HAT, x4 (options/test/HAT_SRx4.yml)."""
    return _preset(_HAT, 4, rngs, overrides)
