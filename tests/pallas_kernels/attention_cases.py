"""Attention test cases: a fixed list covering every mask kind and a seeded random sweep."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo import pallas_kernels as pk


@dataclasses.dataclass
class Case:
    name: str
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    options: dict = dataclasses.field(default_factory=dict)
    segments: str | None = None  # None | "self" | "cross"

    def __str__(self):
        return self.name

    def inputs(self, seed: int, dtype=jnp.float32):
        """``(q, k, v, options)`` with fresh random values; options include segment ids if any."""
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.batch, self.q_len, self.q_heads, self.head_dim))
        k = rng.standard_normal((self.batch, self.kv_len, self.kv_heads, self.head_dim))
        v = rng.standard_normal((self.batch, self.kv_len, self.kv_heads, self.v_dim))
        options = dict(self.options)
        if self.segments == "self":
            options["segment_ids"] = jnp.asarray(random_segments(rng, self.batch, self.q_len))
        elif self.segments == "cross":
            q_ids = random_segments(rng, self.batch, self.q_len, num=3)
            kv_ids = random_segments(rng, self.batch, self.kv_len, num=3)
            options["segment_ids"] = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
        return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)), options


def random_segments(rng, batch: int, length: int, num: int | None = None) -> np.ndarray:
    """Sorted packed-document ids ``[B, L]`` with random boundaries (``num`` documents at most)."""
    rows = []
    for _ in range(batch):
        count = num if num is not None else int(rng.integers(1, 5))
        cuts = np.sort(rng.choice(np.arange(1, max(length, 2)), size=min(count - 1, max(length - 1, 0)), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return np.stack(rows).astype(np.int32)


def _empty_first_rows(q_idx, kv_idx):
    return (q_idx >= 5) & (kv_idx <= q_idx)


def _strided(q_idx, kv_idx):
    return ((q_idx + kv_idx) % 3 == 0) | (q_idx == kv_idx)


CASES = [
    Case("full_mha", 2, 63, 63, 2, 2, 16, 16),
    Case("causal_gqa2_dv", 1, 129, 129, 4, 2, 32, 16, {"causal": True}),
    Case("causal_t1", 2, 1, 1, 2, 1, 8, 8, {"causal": True}),
    Case("decode_shape_t1_s40", 1, 1, 40, 4, 2, 16, 16, {"causal": True}),
    Case("window_left_gqa4", 1, 150, 150, 4, 1, 16, 16, {"window": (7, 0)}),
    Case("window_both_sides", 1, 100, 100, 2, 2, 16, 8, {"window": (5, 3)}),
    Case("causal_window", 1, 140, 140, 2, 1, 16, 16, {"causal": True, "window": (20, None)}),
    Case("chunked_causal", 1, 70, 70, 2, 2, 16, 16, {"mask": pk.ChunkedCausalMask(16)}),
    Case("prefix_lm", 2, 50, 50, 2, 2, 16, 16, {"mask": pk.PrefixLMMask(10)}),
    Case("packed_causal", 2, 90, 90, 2, 1, 16, 16, {"causal": True}, segments="self"),
    Case("segments_cross", 2, 20, 45, 2, 2, 16, 16, {}, segments="cross"),
    Case("mask_mod_or", 1, 64, 64, 2, 2, 16, 16, {"mask": _strided}),
    Case("composed_and_not", 1, 80, 80, 2, 2, 16, 16, {"mask": pk.CausalMask() & ~pk.LocalMask(3, 0)}),
    Case("softcap_causal", 1, 77, 77, 2, 2, 16, 16, {"causal": True, "softcap": 2.0}),
    Case("causal_t_lt_s", 1, 17, 80, 2, 2, 16, 16, {"causal": True}),
    Case("mqa_8", 1, 33, 33, 8, 1, 16, 16, {"causal": True}),
    Case("empty_rows", 1, 40, 40, 2, 2, 16, 16, {"mask": _empty_first_rows}),
    Case("scale", 1, 30, 30, 2, 2, 24, 24, {"scale": 0.37}),
    Case("odd_head_dim", 1, 45, 45, 2, 2, 13, 7, {"causal": True}),
]


def random_case(seed: int) -> Case:
    """A random shape, GQA ratio and mask (seeded) for sweeps."""
    rng = np.random.default_rng(1000 + seed)
    kv_heads = int(rng.choice([1, 2]))
    group = int(rng.choice([1, 2, 4]))
    q_len = int(rng.integers(1, 200))
    self_attn = rng.random() < 0.7
    kv_len = q_len if self_attn else int(rng.integers(1, 200))
    kind = rng.choice(["none", "causal", "window", "chunked", "prefix", "causal_window", "or"])
    options: dict = {}
    if kind == "causal":
        options["causal"] = True
    elif kind == "window":
        options["window"] = (int(rng.integers(0, 40)), int(rng.integers(0, 40)))
    elif kind == "chunked":
        options["mask"] = pk.ChunkedCausalMask(int(rng.integers(1, 50)))
    elif kind == "prefix":
        options["mask"] = pk.PrefixLMMask(int(rng.integers(0, 30)))
    elif kind == "causal_window":
        options.update(causal=True, window=(int(rng.integers(0, 60)), None))
    elif kind == "or":
        options["mask"] = pk.LocalMask(int(rng.integers(0, 10)), 0) | pk.ChunkedCausalMask(int(rng.integers(1, 40)))
    if rng.random() < 0.3:
        options["softcap"] = float(rng.uniform(1.0, 10.0))
    segments = "self" if (self_attn and rng.random() < 0.3) else None
    head_dim = int(rng.choice([8, 16, 24]))
    return Case(
        f"random{seed}_{kind}", int(rng.integers(1, 3)), q_len, kv_len, kv_heads * group, kv_heads,
        head_dim, int(rng.choice([head_dim, 8])), options, segments,
    )


def op(impl: str, options: dict, **extra):
    """``f(q, k, v) -> (out, lse)`` for one implementation."""

    def f(q, k, v):
        return pk.attention(q, k, v, impl=impl, return_lse=True, **options, **extra)

    return f


def split_key(seed: int):
    return jax.random.PRNGKey(seed)
