"""A tiny super-resolution stand-in for the trainer tests: conv 3x3 -> GELU -> conv 3x3 -> pixel
shuffle, plus the nearest-neighbour upsampling of the input (so a fresh model starts at the
nearest-neighbour baseline). Maps float32 [B, h, w, C] in [0, 1] to [B, s*h, s*w, C].

:func:`register` adds ``test_sr_standin_x2`` to the zoo registry; only the trainer's subprocesses
call it (trainer_run.py's ``imports``), so the pytest process's registry, which tests/zoo walk, never
holds it. Importing the module registers nothing; :class:`PixelShuffleSR` can be built anywhere.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.conv import Conv2d
from attnzoo.zoo.registry import register_model


class PixelShuffleSR(nnx.Module):
    """``[B, h, w, in_chans]`` -> ``[B, upscale*h, upscale*w, in_chans]`` (see the module docstring)."""

    def __init__(self, *, in_chans: int = 1, upscale: int = 2, width: int = 16, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_chans, self.upscale, self.width = in_chans, upscale, width
        self.conv1 = Conv2d(in_chans, width, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = Conv2d(width, in_chans * upscale * upscale, 3, padding=1, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        s = self.upscale
        y = self.conv2(jax.nn.gelu(self.conv1(x)))
        y = y.reshape(b, h, w, s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return y + jnp.repeat(jnp.repeat(x, s, axis=1), s, axis=2).astype(y.dtype)

    def forward_flops(self, input_shape) -> int:
        h, w, c = input_shape
        return 2 * h * w * 9 * (c * self.width + self.width * c * self.upscale**2)


def _standin_x2(*, rngs: nnx.Rngs, **overrides) -> PixelShuffleSR:
    return PixelShuffleSR(rngs=rngs, **{"upscale": 2, **overrides})


def register() -> None:
    """Registers ``test_sr_standin_x2`` (call only in a trainer subprocess)."""
    register_model("test_sr_standin_x2")(_standin_x2)
