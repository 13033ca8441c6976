"""attnzoo: attention, hybrid and state-space blocks for JAX/Flax, with Pallas kernels."""

__version__ = "0.1.0"
