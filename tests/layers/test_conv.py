"""Conv2d (NHWC, HWIO) against a float64 numpy loop over output pixels and kernel taps: strides,
padding modes, dilation, groups, bias, gradients of the kernel, bias and input, and errors.

The MBConv pieces (TF 'SAME' padding, average pooling, BatchNorm in training and evaluation mode,
squeeze-excitation, MBConv) against the float64 numpy references of tests/layers/conv_reference.py,
with gradients of every parameter and the input against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.layers import BatchNorm, Conv2d, MBConv, SqueezeExcite
from attnzoo.layers.conv import avg_pool_same, make_divisible, tf_same_padding
from attnzoo.pallas_kernels.testing import assert_close, float64
from tests.layers import conv_reference as ref
from tests.layers.numpy_layers import param64
from tests.zoo.helpers import build, fast_jit, randomize


def numpy_conv(conv, x):
    """Every output pixel as an explicit sum over taps and the input channels of its group."""
    x = np.asarray(x, np.float64)
    kernel = param64(conv.kernel)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    batch, height, width, channels = x.shape
    if conv.padding == "VALID":
        pads = ((0, 0), (0, 0))
    elif conv.padding == "SAME":  # XLA's SAME: total padding split with the extra row/column at the end
        pads = []
        for size, k, s, d in ((height, kh, sh, dh), (width, kw, sw, dw)):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = conv.padding
    x = np.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    group_in, group_out = channels // conv.groups, conv.out_features // conv.groups
    y = np.zeros((batch, out_h, out_w, conv.out_features))
    for oy in range(out_h):
        for ox in range(out_w):
            for i in range(kh):
                for j in range(kw):
                    pixel = x[:, oy * sh + i * dh, ox * sw + j * dw]
                    for g in range(conv.groups):
                        ins, outs = slice(g * group_in, (g + 1) * group_in), slice(g * group_out, (g + 1) * group_out)
                        y[:, oy, ox, outs] += pixel[:, ins] @ kernel[i, j, :, outs]
    return y if conv.bias is None else y + param64(conv.bias)


CASES = [
    (7, 9, dict(in_features=3, out_features=4, kernel_size=3, stride=2, padding=1)),
    (6, 5, dict(in_features=4, out_features=6, kernel_size=(2, 3), padding="SAME", dilation=(2, 1), use_bias=False)),
    (8, 8, dict(in_features=6, out_features=6, kernel_size=3, padding=((0, 2), (1, 0)), groups=6, stride=(1, 2))),
    (5, 7, dict(in_features=4, out_features=2, kernel_size=3, padding="VALID", groups=2)),
    # depthwise (groups == in_features: the shifted-sum path), with a channel multiplier, TF
    # 'SAME' at stride 2 on odd sizes, dilation and a 5x5 kernel
    (9, 7, dict(in_features=3, out_features=6, kernel_size=3, padding="SAME", groups=3, stride=2)),
    (11, 10, dict(in_features=5, out_features=5, kernel_size=(3, 5), padding=2, groups=5, dilation=(2, 1), use_bias=False)),
    (6, 9, dict(in_features=4, out_features=4, kernel_size=5, padding="VALID", groups=4, stride=(2, 3))),
    (5, 6, dict(in_features=3, out_features=7, kernel_size=1, stride=2)),  # 1x1: jax.lax
    (8, 12, dict(in_features=3, out_features=5, kernel_size=4, stride=4)),  # patchify
]

apply = fast_jit(lambda conv, x: conv(x))


@pytest.mark.parametrize("height, width, options", CASES)
def test_matches_numpy_loop(height, width, options):
    conv = build(lambda: Conv2d(**options, rngs=nnx.Rngs(0)), seed=height)
    x = jnp.asarray(np.random.default_rng(width).normal(size=(2, height, width, options["in_features"])), jnp.float32)
    y = apply(conv, x)
    assert y.shape == (2, *conv.output_size(height, width), conv.out_features)
    assert_close(y, numpy_conv(conv, x), str(options), dtype=jnp.float32)


@pytest.mark.parametrize("groups, out_features", [(1, 5), (2, 4), (4, 4), (4, 8)])
def test_gradients_match_finite_differences(groups, out_features):
    """Dense (shifted sums of matmuls), grouped (lax), depthwise and depthwise with a multiplier
    (shifted sums of products)."""
    with float64():
        conv = build(lambda: Conv2d(4, out_features, 3, stride=2, padding=1, groups=groups, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
        x = np.random.default_rng(1).normal(size=(1, 5, 6, 4))
        cotangent = np.random.default_rng(2).normal(size=(1, 3, 3, out_features))
        loss = lambda c, x: jnp.sum(c(x) * cotangent)
        grads, x_grad = fast_jit(lambda c, x: nnx.grad(loss, argnums=(0, 1))(c, x))(conv, jnp.asarray(x))
        rng = np.random.default_rng(3)
        for name in ("kernel", "bias"):
            variable, grad = getattr(conv, name), np.asarray(getattr(grads, name)[...])
            value, direction = np.asarray(variable.get_value()), rng.normal(size=grad.shape)
            sums = []
            for sign in (1, -1):
                variable.set_value(jnp.asarray(value + sign * 1e-6 * direction))
                sums.append(np.sum(numpy_conv(conv, x) * cotangent))
            variable.set_value(jnp.asarray(value))
            np.testing.assert_allclose(np.sum(grad * direction), (sums[0] - sums[1]) / 2e-6, rtol=1e-6)
        direction = rng.normal(size=x.shape)
        numeric = (np.sum(numpy_conv(conv, x + 1e-6 * direction) * cotangent)
                   - np.sum(numpy_conv(conv, x - 1e-6 * direction) * cotangent)) / 2e-6
        np.testing.assert_allclose(np.sum(np.asarray(x_grad) * direction), numeric, rtol=1e-6)


def test_logical_axes_and_errors():
    conv = build(lambda: Conv2d(4, 8, 3, logical_axes=(None, None, "embed", "mlp"), rngs=nnx.Rngs(0)))
    assert conv.kernel.get_metadata()["out_sharding"] == (None, None, "embed", "mlp")
    assert conv.bias.get_metadata()["out_sharding"] == ("mlp",)
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"Conv2d: groups \(3\) must divide in_features \(4\) and out_features \(6\)"):
        Conv2d(4, 6, 3, groups=3, rngs=rngs)
    with pytest.raises(ValueError, match=r"padding must be 'SAME', 'VALID', an int or pairs of ints, got 'FULL'"):
        Conv2d(4, 4, 3, padding="FULL", rngs=rngs)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a \(height, width\) pair"):
        Conv2d(4, 4, (3, 3, 3), rngs=rngs)
    with pytest.raises(ValueError, match=r"Conv2d: x must have shape \[B,H,W,C\] with last axis 4, got \(1, 5, 5, 3\)"):
        conv(jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"a 2 x 2 input is smaller than the kernel \(3, 3\)"):
        conv(jnp.zeros((1, 2, 2, 4)))


# ----------------------------------------------------------------------------------------------
# MBConv pieces: TF 'SAME' padding, average pooling, BatchNorm, squeeze-excitation, MBConv
# against the float64 numpy references of tests/layers/conv_reference.py
# ----------------------------------------------------------------------------------------------


def test_tf_same_padding_is_tensorflows_rule():
    for size in range(1, 12):
        for kernel in (1, 2, 3, 5):
            for stride in (1, 2, 3):
                for dilation in (1, 2):
                    pads = tf_same_padding(size, kernel, stride, dilation)
                    assert pads == ref.tf_same_pads(size, kernel, stride, dilation)
                    extent = (kernel - 1) * dilation + 1
                    assert pads == tuple(jax.lax.padtype_to_pads((size,), (extent,), (stride,), "SAME")[0])
    # timm's *_tf models: a stride-2 3x3 conv of an even map pads only after, of an odd map both sides.
    assert tf_same_padding(112, 3, 2) == (0, 1) and tf_same_padding(7, 3, 2) == (1, 1)


@pytest.mark.parametrize("height, width, window", [(5, 7, 2), (6, 4, 2), (7, 8, 3)])
def test_avg_pool_same_counts_the_padding(height, width, window):
    x = np.random.default_rng(height).normal(size=(2, height, width, 3))
    with float64():
        out = avg_pool_same(jnp.asarray(x), window)
    assert out.shape == (2, -(-height // window), -(-width // window), 3)
    assert_close(out, ref.avg_pool_same(x, window), "avg_pool_same", dtype=jnp.float64)


def _randomized(factory, seed):
    """``factory()`` built abstractly (no initializer runs), every parameter and running statistic random."""
    return ref.randomize_batch_stats(randomize(nnx.eval_shape(factory), seed=seed), seed + 1)


class _Holder(nnx.Module):
    def __init__(self, norm):
        self.norm = norm


def test_batch_norm_train_and_eval_match_numpy():
    with float64():
        norm = _randomized(lambda: BatchNorm(5, epsilon=1e-3, momentum=0.9, param_dtype=jnp.float64), seed=0)
        holder = _Holder(norm)
        x = np.random.default_rng(1).normal(size=(3, 4, 6, 5)) * 2.0 + 1.0
        scale, bias = param64(norm.scale), param64(norm.bias)
        mean0, var0 = param64(norm.mean), param64(norm.var)

        # Training (the initial mode): batch statistics over B, H, W; running averages updated.
        assert norm.use_running_average is False
        batch_mean, batch_var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        y = norm(jnp.asarray(x))
        assert_close(y, (x - batch_mean) / np.sqrt(batch_var + 1e-3) * scale + bias, "train", dtype=jnp.float64)
        assert_close(norm.mean[...], 0.9 * mean0 + 0.1 * batch_mean, "running mean", dtype=jnp.float64)
        assert_close(norm.var[...], 0.9 * var0 + 0.1 * batch_var, "running var", dtype=jnp.float64)

        # model.eval(): running statistics, nothing updated; the call argument overrides the mode.
        holder.eval()
        assert norm.use_running_average is True
        mean1 = param64(norm.mean)
        assert_close(norm(jnp.asarray(x)), ref.batch_norm_eval(norm, x), "eval", dtype=jnp.float64)
        np.testing.assert_array_equal(param64(norm.mean), mean1)
        norm(jnp.asarray(x), use_running_average=False)
        assert not np.allclose(param64(norm.mean), mean1)
        holder.train()
        assert norm.use_running_average is False
        assert nnx.view(holder, use_running_average=True).norm.use_running_average is True

        # Gradients in training mode flow through the batch statistics: directional derivatives of
        # x, scale and bias vs finite differences of the numpy formula.
        cotangent = np.random.default_rng(2).normal(size=x.shape)

        def numpy_loss(x, scale, bias):
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            return np.sum(((x - mean) / np.sqrt(var + 1e-3) * scale + bias) * cotangent)

        grads, x_grad = nnx.grad(lambda m, x: jnp.sum(m(x) * cotangent), argnums=(0, 1))(norm, jnp.asarray(x))
        scale, bias = param64(norm.scale), param64(norm.bias)
        rng = np.random.default_rng(3)
        for index, analytic in enumerate((x_grad, grads.scale[...], grads.bias[...])):
            direction = rng.normal(size=np.shape(analytic))
            args = [x, scale, bias]
            plus, minus = list(args), list(args)
            plus[index], minus[index] = args[index] + 1e-6 * direction, args[index] - 1e-6 * direction
            numeric = (numpy_loss(*plus) - numpy_loss(*minus)) / 2e-6
            np.testing.assert_allclose(np.sum(np.asarray(analytic) * direction), numeric, rtol=1e-6)


def test_batch_norm_low_precision_keeps_float32_statistics():
    norm = BatchNorm(4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert norm.mean[...].dtype == jnp.float32 and norm.scale[...].dtype == jnp.bfloat16
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)) + 100.0, jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16 and norm.mean[...].dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32).mean(axis=(0, 1, 2))))) < 0.05


def test_squeeze_excite_matches_numpy():
    with float64():
        se = _randomized(lambda: SqueezeExcite(6, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), seed=4)
        x = np.random.default_rng(5).normal(size=(2, 3, 5, 6))
        assert_close(se(jnp.asarray(x)), ref.squeeze_excite(se, x), "se", dtype=jnp.float64)


MBCONV_CASES = [
    # in, out, stride, H, W, extra options
    (6, 6, 1, 5, 7, {}),                                      # identity shortcut
    (4, 8, 2, 7, 9, dict(expand_ratio=2.0)),                  # odd map: padding both sides, pool pads too
    (8, 8, 2, 6, 4, dict(se_ratio=0.5, kernel_size=5)),       # even map: TF 'SAME' pads only after
]


@pytest.mark.parametrize("in_features, out_features, stride, height, width, options", MBCONV_CASES)
def test_mbconv_matches_numpy(in_features, out_features, stride, height, width, options):
    with float64():
        block = _randomized(
            lambda: MBConv(in_features, out_features, stride=stride, param_dtype=jnp.float64, rngs=nnx.Rngs(0),
                           **options),
            seed=height,
        )
        block.eval()
        x = np.random.default_rng(width).normal(size=(2, height, width, in_features))
        y = apply(block, jnp.asarray(x))
        assert y.shape == (2, -(-height // stride), -(-width // stride), out_features)
        assert (y.shape[1], y.shape[2]) == block.output_size(height, width)
        assert_close(y, ref.mbconv(block, x), str(options), dtype=jnp.float64)
    assert block.hidden_features == make_divisible(out_features * options.get("expand_ratio", 4.0))
    assert (block.shortcut_proj is None) == (in_features == out_features)


def test_mbconv_gradients_match_finite_differences():
    with float64():
        block = _randomized(lambda: MBConv(4, 6, stride=2, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), seed=7)
        block.eval()
        x = np.random.default_rng(8).normal(size=(1, 5, 6, 4))
        cotangent = np.random.default_rng(9).normal(size=(1, 3, 3, 6))
        loss = lambda m, x: jnp.sum(m(x) * cotangent)  # noqa: E731
        grads, x_grad = fast_jit(lambda m, x: nnx.grad(loss, argnums=(0, 1))(m, x))(block, jnp.asarray(x))
        rng = np.random.default_rng(10)
        params = dict(nnx.to_flat_state(nnx.state(block, nnx.Param)))
        grad_values = dict(nnx.to_flat_state(nnx.state(grads, nnx.Param)))
        assert len(params) == 16  # 3 norms x 2, expand, depthwise, SE 2 x 2, project 2, shortcut 2
        for path, variable in params.items():
            value, grad = np.asarray(variable.get_value()), np.asarray(grad_values[path][...])
            direction = rng.normal(size=value.shape)
            sums = []
            for sign in (1, -1):
                variable.set_value(jnp.asarray(value + sign * 1e-6 * direction))
                sums.append(np.sum(ref.mbconv(block, x) * cotangent))
            variable.set_value(jnp.asarray(value))
            np.testing.assert_allclose(np.sum(grad * direction), (sums[0] - sums[1]) / 2e-6, rtol=1e-5, err_msg=str(path))
        direction = rng.normal(size=x.shape)
        numeric = (np.sum(ref.mbconv(block, x + 1e-6 * direction) * cotangent)
                   - np.sum(ref.mbconv(block, x - 1e-6 * direction) * cotangent)) / 2e-6
        np.testing.assert_allclose(np.sum(np.asarray(x_grad) * direction), numeric, rtol=1e-5)


def test_mbconv_logical_axes_flops_and_errors():
    block = nnx.eval_shape(lambda: MBConv(8, 16, stride=2, rngs=nnx.Rngs(0)))
    axes = {name: getattr(block, name).kernel.get_metadata()["out_sharding"]
            for name in ("expand", "depthwise", "project", "shortcut_proj")}
    assert axes == dict(expand=("embed", "mlp"), depthwise=(None, None, None, "mlp"), project=("mlp", "embed"),
                        shortcut_proj=(None, "embed"))
    assert block.pre_norm.mean.get_metadata()["out_sharding"] == ("norm",)
    # Matmul + conv FLOPs: 1x1 expand on 7x9, depthwise stride 2 -> 4x5, SE, project, shortcut.
    hidden, reduced = block.hidden_features, block.se.reduced_channels
    assert (hidden, reduced) == (64, 4)
    want = 2 * 63 * 8 * hidden + 2 * 20 * 9 * hidden + 4 * hidden * reduced + 2 * 20 * hidden * 16 + 2 * 20 * 8 * 16
    assert block.flops(7, 9) == want
    assert make_divisible(24.0) == 24 and make_divisible(12.0) == 16 and make_divisible(9.0) == 16

    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"BatchNorm: momentum must be a number in \[0, 1\), got 1.0"):
        BatchNorm(4, momentum=1.0)
    with pytest.raises(ValueError, match=r"BatchNorm: x must have shape \[\.\.\., C\] \(channels last\) with last axis 4"):
        BatchNorm(4)(jnp.zeros((2, 3, 3, 5)))
    with pytest.raises(ValueError, match=r"MBConv: stride must be one of \(1, 2\), got 3"):
        MBConv(4, 8, stride=3, rngs=rngs)
    with pytest.raises(ValueError, match=r"MBConv: kernel_size must be odd, got 4"):
        MBConv(4, 8, kernel_size=4, rngs=rngs)
    with pytest.raises(ValueError, match=r"MBConv: activation must be one of \[.*\], got 'tanh'"):
        MBConv(4, 8, activation="tanh", rngs=rngs)
    with pytest.raises(ValueError, match=r"MBConv: x must have shape \[B,H,W,C\] with last axis 8, got \(1, 4, 4, 4\)"):
        block(jnp.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"SqueezeExcite: x must have shape \[B,H,W,C\]"):
        SqueezeExcite(8, 2, rngs=rngs)(jnp.zeros((2, 3, 8)))
