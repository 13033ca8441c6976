"""Functional ops with ``reference``, ``xla`` and ``pallas`` implementations (see ``common``)."""

from attnzoo.pallas_kernels.attention import (
    AndMask,
    BlockMetadata,
    BlockSizes,
    CausalMask,
    ChunkedCausalMask,
    DecodeBlockSizes,
    FullMask,
    FunctionMask,
    LocalMask,
    Mask,
    NotMask,
    OrMask,
    PrefixLMMask,
    XlaBlockSizes,
    attention,
    block_metadata,
)

__all__ = [
    "attention",
    "BlockSizes",
    "XlaBlockSizes",
    "DecodeBlockSizes",
    "Mask",
    "FullMask",
    "CausalMask",
    "LocalMask",
    "ChunkedCausalMask",
    "PrefixLMMask",
    "FunctionMask",
    "AndMask",
    "OrMask",
    "NotMask",
    "BlockMetadata",
    "block_metadata",
]
