"""Flax NNX layers: token mixers (registered by name) and the pieces they share.

>>> from attnzoo import layers
>>> layers.list_mixers()
['attention']
>>> m = layers.create_mixer("attention", dim=256, num_heads=4, rngs=nnx.Rngs(0), num_kv_heads=2)
>>> y = m(x)                                   # x [B,T,D] -> [B,T,D]
"""

from attnzoo.layers.attention import Attention, KVCache
from attnzoo.layers.common import (
    MLP,
    Dense,
    LayerNorm,
    MeshAxes,
    RMSNorm,
    RotaryEmbedding,
    GatedRMSNorm,
    RecurrentCache,
    RecurrentMixer,
    ShortConvolution,
    apply_rope,
    partitioned,
    shard_map_batch_heads,
)
from attnzoo.layers.registry import create_mixer, get_mixer_class, list_mixers, register_mixer

__all__ = [
    "Attention",
    "KVCache",
    "Dense",
    "MLP",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
    "ShortConvolution",
    "GatedRMSNorm",
    "RecurrentCache",
    "RecurrentMixer",
    "MeshAxes",
    "partitioned",
    "shard_map_batch_heads",
    "create_mixer",
    "get_mixer_class",
    "list_mixers",
    "register_mixer",
]
from attnzoo.layers import linear as _linear  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import delta as _delta  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import ssm as _ssm  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import hybrid as _hybrid  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import mega as _mega  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import window as _window  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import neighborhood as _neighborhood  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import crossformer as _crossformer  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import twins as _twins  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import davit as _davit  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import vision_linear as _vision_linear  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import van as _van  # noqa: E402,F401  (registers the mixers; van imports the gates)
from attnzoo.layers import hat as _hat  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers import biformer as _biformer  # noqa: E402,F401  (registers the mixers)
from attnzoo.layers.conv import Conv2d  # noqa: E402,F401
from attnzoo.layers.conv import BatchNorm, MBConv, SqueezeExcite  # noqa: E402,F401
