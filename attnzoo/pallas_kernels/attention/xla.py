"""Blockwise softmax attention in pure JAX with O(T) memory in forward and backward.

The score matrix is cut into ``block_q x block_kv`` tiles; the mask's block metadata lists the
visible tiles as (query block, key block) pairs, FULL tiles apart from PARTIAL ones. A
``lax.scan`` walks each list a few tiles per step (``_schedule``):

* forward: the online softmax of "Self-attention does not need O(n^2) memory" and
  FlashAttention-2 over an arbitrary tile list. Each tile's softmax statistics (row max, row
  sum, unnormalised output) are merged into per-query-block running statistics, which are
  gathered for the step's tiles and written back. The schedule puts distinct query blocks in
  every step, so the write-back is a plain unique-index update (no scatter-max, and blocks the
  step does not touch are not rescaled).
* backward (custom VJP): tiles are recomputed from q, k and the saved log-sum-exp, and dq, dk,
  dv are scatter-added per tile, so nothing of size T x S is ever stored.

Empty tiles are never visited and FULL tiles skip the element mask. PARTIAL tiles read their
element mask from a small table of the distinct tile patterns, built with numpy at trace time
(segment ids, being data, are compared in the step).

Performance notes (XLA:CPU, whose dots go to YNNPACK; measured on a 2-core AVX-512 CPU):
* Tiles are 3-D batched products ``[tiles * batch * kv_heads, rows, cols]``: unit batch or
  group dimensions make XLA copy whole score tiles to fix their layout.
* A dot that contracts the leading (non-minor) dimension of a score tile, like ``dS^T Q`` or
  ``P^T dO`` with ``dS``/``P`` stored ``[q, k]``, makes XLA transpose the tile in a slow loop
  fusion or fall back to a slow dot (3-4x slower). The backward therefore computes the
  transposed tile ``S^T = K Q^T`` directly: ``dV = P^T dO`` and ``dK = dS^T Q`` contract its
  minor dimension, and ``dQ^T = K^T dS^T`` takes a pre-transposed ``K^T``, so no score tile is
  ever transposed (dq is accumulated transposed and transposed once at the end).
* A loop over scores that compares runtime positions is not vectorized (~3x slower per score
  than one that loads a mask), hence the pattern table.
* The logit scale is folded into q (O(T D) once instead of one multiply per score) when that
  is exact to the input precision, and into the final dq / dk otherwise.
* bfloat16 / float16 inputs feed the dots as they are, with float32 accumulation
  (``preferred_element_type``, which is what lets XLA:CPU use AMX); probabilities and dS are
  cast to the input dtype for the second-stage dots.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.pallas_kernels.attention.masks import FULL, Mask, block_kinds, block_metadata
from attnzoo.pallas_kernels.common import fit_block, pad_axis

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class XlaBlockSizes:
    """Tiles of the blockwise XLA path.

    ``block_q``/``block_kv`` are shrunk to the sequence lengths (rounded up to 8).
    ``scores_per_step`` sets how many tiles one scan step processes: as many as fit
    (``tiles * batch * heads * block_q * block_kv <= scores_per_step``), at least one.

    The defaults are the fastest measured on a 2-core AVX-512 CPU for head dim 64 (see
    ``benchmarks/attention.py``): 512 x 512 tiles keep XLA:CPU's dots efficient and
    multithreaded (256 x 256 tiles run single-threaded, ~1.7x slower at T = 4096), and about
    one million scores per step keeps a step's score tiles near the caches.
    """

    block_q: int = 512
    block_kv: int = 512
    scores_per_step: int = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    q_len: int
    kv_len: int
    scale: float
    softcap: float | None
    block_q: int
    block_kv: int
    scores_per_step: int
    use_segments: bool
    acc: jnp.dtype = jnp.float32  # float32, or float64 for float64 inputs
    prescale: bool = True  # multiply q by the scale up front (exact enough for this dtype)


def _blocks(x, block):
    """[B, L, H, D] -> [L/block, B, H, block, D] (L already padded)."""
    batch, length, heads, dim = x.shape
    x = x.reshape(batch, length // block, block, heads, dim)
    return x.transpose(1, 0, 3, 2, 4)


def _q_blocks(x, block, kv_heads):
    """[B, T, Hq, D] -> [T/block, B, Hkv, G * block, D]: a KV head's query rows, (group, row) order."""
    xb = _blocks(pad_axis(x, 1, block), block)  # [nq, B, Hq, bq, D]
    n, batch, q_heads, _, dim = xb.shape
    return xb.reshape(n, batch, kv_heads, (q_heads // kv_heads) * block, dim)


def _q_rows(x, block, kv_heads):
    """[B, Hq, T] -> [T/block, B, Hkv, G * block] (the row order of :func:`_q_blocks`)."""
    batch, q_heads, _ = x.shape
    x = pad_axis(x, 2, block)
    n = x.shape[2] // block
    x = x.reshape(batch, q_heads, n, block).transpose(2, 0, 1, 3)
    return x.reshape(n, batch, kv_heads, (q_heads // kv_heads) * block)


def _segment_blocks(ids, block, pad_value):
    """[B, L] -> [L/block, B, block]."""
    ids = pad_axis(ids, 1, block, pad_value)
    return ids.reshape(ids.shape[0], -1, block).transpose(1, 0, 2)


# Partial tiles read their element mask from a table of distinct tile patterns computed at
# trace time when it stays below this many elements; otherwise (masks with many distinct tile
# patterns) it is evaluated per step from positions. Both give the same result; the table is
# faster because XLA:CPU does not vectorize a score loop that compares runtime positions
# (~3x slower per score than one that loads a mask).
_PATTERN_BUDGET = 1 << 24


@functools.lru_cache(maxsize=256)
def _schedule_np(pairs_bytes: bytes, count: int, num_q: int, per_step: int):
    pairs = np.frombuffer(pairs_bytes, np.int32).reshape(count, 3)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # by query block, then key block
    longest = int(np.bincount(pairs[:, 0], minlength=num_q).max())
    per_step = max(1, min(per_step, count))
    steps = max(-(-count // per_step), longest)
    slots = -(-count // steps)
    # McNaughton's wrap-around rule: the row-sorted list fills slot 0 for steps 0..steps-1,
    # then slot 1, ... A query block has at most ``steps`` tiles, so its tiles land on distinct
    # steps even when they wrap from one slot to the next: no step sees a query block twice.
    position = np.arange(count)
    step, slot = position % steps, position // steps
    q_index = np.zeros((steps, slots), np.int32)
    kv_index = np.zeros((steps, slots), np.int32)
    pattern = np.zeros((steps, slots), np.int32)
    q_row = np.broadcast_to(num_q + np.arange(slots, dtype=np.int32), (steps, slots)).copy()
    kv_row = np.full((steps, slots), -1, np.int32)  # -1: padding (becomes the dummy kv block)
    q_index[step, slot] = pairs[:, 0]
    kv_index[step, slot] = pairs[:, 1]
    pattern[step, slot] = pairs[:, 2]
    q_row[step, slot] = pairs[:, 0]
    kv_row[step, slot] = pairs[:, 1]
    return q_index, kv_index, pattern, q_row, kv_row


def _schedule(pairs: np.ndarray, num_q: int, num_kv: int, per_step: int, patterns=None):
    """Tiles ``[P, 2]`` -> per-step arrays ``[steps, slots]`` for a scan.

    Returns ``(q_index, kv_index, pattern, q_row, kv_row)``: the blocks a slot reads, its
    tile's index in the pattern table (``patterns [P]``, or 0), and the rows it writes. Query
    blocks are distinct within a step. Padding slots read block 0 and write dummy rows:
    ``q_row = num_q + slot`` (distinct per slot) and ``kv_row = num_kv``.
    """
    patterns = np.zeros(pairs.shape[0], np.int32) if patterns is None else patterns
    table = np.ascontiguousarray(np.concatenate([pairs, patterns[:, None]], axis=1), np.int32)
    arrays = _schedule_np(table.tobytes(), table.shape[0], num_q, per_step)
    kv_row = arrays[-1]
    arrays = arrays[:-1] + (np.where(kv_row < 0, num_kv, kv_row),)
    return tuple(jnp.asarray(x) for x in arrays)


@functools.lru_cache(maxsize=64)
def _tile_patterns(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int, pairs_bytes: bytes):
    """Distinct element masks of the given tiles: ``(table [U, bq, bk] bool, index [P])``, or None.

    None when the table would exceed ``_PATTERN_BUDGET`` elements.
    """
    pairs = np.frombuffer(pairs_bytes, np.int32).reshape(-1, 2)
    rows = np.arange(block_q, dtype=np.int64)[:, None]
    cols = np.arange(block_kv, dtype=np.int64)[None, :]
    # Tiles FULL under the mask are listed as partial only with segment ids: all visible.
    kinds = block_kinds(mask, q_len, kv_len, block_q, block_kv)
    full = np.ones((block_q, block_kv), bool)
    found: dict[bytes, int] = {}
    table, index = [], np.zeros(pairs.shape[0], np.int32)
    for n, (qi, kj) in enumerate(pairs):
        if kinds[qi, kj] == FULL:
            tile, key = full, b"full"
        else:
            q_abs, k_abs = qi * block_q + rows, kj * block_kv + cols
            tile = np.asarray(mask(q_abs, k_abs), bool) & (k_abs < kv_len)
            tile = np.broadcast_to(tile, (block_q, block_kv))
            key = np.packbits(tile).tobytes()
        if key not in found:
            if (len(table) + 1) * block_q * block_kv > _PATTERN_BUDGET:
                return None
            found[key] = len(table)
            table.append(tile)
        index[n] = found[key]
    return np.stack(table), index


def _partial_patterns(st: _Static, pairs: np.ndarray):
    """Pattern table and per-tile index for the partial tiles, or (None, None)."""
    if not pairs.shape[0]:
        return None, None
    pairs = np.ascontiguousarray(pairs, np.int32)
    found = _tile_patterns(st.mask, st.q_len, st.kv_len, st.block_q, st.block_kv, pairs.tobytes())
    return (None, None) if found is None else found


def _visibility(qi, kj, pattern, table, qs, ks, st: _Static, heads, group, transposed: bool):
    """Element visibility of C tiles as ``[C * B * Hkv, G * bq, bk]`` (``[.., bk, G * bq]`` if transposed).

    ``table``: the pattern table (``[U, bq, bk]``, or ``[U, bk, bq]`` if transposed) that
    ``pattern`` indexes, or None to evaluate the mask from positions.
    """
    if table is not None:
        element = table[pattern][:, None]  # [C, 1, bq, bk] or [C, 1, bk, bq]
    else:
        q_abs = qi[:, None] * st.block_q + jnp.arange(st.block_q, dtype=jnp.int32)[None, :]
        k_abs = kj[:, None] * st.block_kv + jnp.arange(st.block_kv, dtype=jnp.int32)[None, :]
        if transposed:
            qa, ka = q_abs[:, None, :], k_abs[:, :, None]
        else:
            qa, ka = q_abs[:, :, None], k_abs[:, None, :]
        element = (st.mask(qa, ka) & (ka < st.kv_len))[:, None]
    if st.use_segments:
        q_ids, kv_ids = qs[qi], ks[kj]  # [C, B, bq], [C, B, bk]
        if transposed:
            element = element & (q_ids[:, :, None, :] == kv_ids[:, :, :, None])
        else:
            element = element & (q_ids[:, :, :, None] == kv_ids[:, :, None, :])
    count, batch = qi.shape[0], qs.shape[1]
    bq, bk = st.block_q, st.block_kv
    if transposed:
        element = jnp.broadcast_to(element[:, :, None, :, None, :], (count, batch, heads, bk, group, bq))
        return element.reshape(count * batch * heads, bk, group * bq)
    element = jnp.broadcast_to(element[:, :, None, None], (count, batch, heads, group, bq, bk))
    return element.reshape(count * batch * heads, group * bq, bk)


def _softcap(s, st: _Static):
    """Soft-capped logits and ``tanh`` (for the backward), or ``(s, None)``."""
    if st.softcap is None:
        return s, None
    t = jnp.tanh(s / st.softcap)
    return st.softcap * t, t


def _per_step(st: _Static, batch, heads):
    return max(1, st.scores_per_step // (batch * heads * st.block_q * st.block_kv))


def _flat(x):
    """[C, B, Hkv, ...] -> [C * B * Hkv, ...]: tiles are 3-D batched products without unit dims
    (unit batch or group dims make XLA:CPU copy whole score tiles to fix their layout)."""
    return x.reshape((-1,) + x.shape[3:])


def _prescaled(q, st: _Static):
    """q times the logit scale when that is folded into q (``st.prescale``), else q."""
    return (q.astype(st.acc) * st.scale).astype(q.dtype) if st.prescale else q


def _forward(q, k, v, q_seg, kv_seg, st: _Static):
    batch, _, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q = _prescaled(q, st)
    qb = _q_blocks(q, st.block_q, kv_heads)  # [nq, B, Hkv, R = G * bq, D]
    kb = _blocks(pad_axis(k, 1, st.block_kv), st.block_kv)  # [nk, B, Hkv, bk, D]
    vb = _blocks(pad_axis(v, 1, st.block_kv), st.block_kv)
    qs = _segment_blocks(q_seg, st.block_q, -1)
    ks = _segment_blocks(kv_seg, st.block_kv, -2)
    nq, _, _, rows_per_block, _ = qb.shape
    nk = kb.shape[0]
    dv = vb.shape[-1]
    meta = block_metadata(st.mask, st.q_len, st.kv_len, st.block_q, st.block_kv, st.use_segments)
    per_step = _per_step(st, batch, q_heads)
    patterns, pattern_index = _partial_patterns(st, meta.partial_pairs)
    table = None if patterns is None else jnp.asarray(patterns)

    # Running statistics per query block, plus one dummy row per slot for padding tiles.
    m = jnp.full((nq + per_step, batch, kv_heads, rows_per_block), MASK_VALUE, st.acc)
    l = jnp.zeros_like(m)
    acc = jnp.zeros(m.shape + (dv,), st.acc)

    def step(carry, chunk, masked):
        m, l, acc = carry
        qi, kj, pattern, q_row, _ = chunk
        vt = _flat(vb[kj])
        s = jnp.einsum("nqd,nkd->nqk", _flat(qb[qi]), _flat(kb[kj]), preferred_element_type=st.acc)
        if not st.prescale:
            s = s * st.scale
        s, _ = _softcap(s, st)
        if masked:
            visible = _visibility(qi, kj, pattern, table, qs, ks, st, kv_heads, group, False)
            s = jnp.where(visible, s, MASK_VALUE)
        # Tile-local softmax first, merged into the running statistics afterwards: the big
        # elementwise pass then reads only s and the tile's row max (a reduction output). Using
        # the running max here instead makes XLA fuse the gather of the carried rows into the
        # per-score loop, several times slower.
        m_tile = jnp.max(s, axis=-1)
        if masked:  # a row with no visible key in this tile: m_tile == MASK_VALUE, p == 0
            tile_any = m_tile != MASK_VALUE
            m_tile = jnp.where(tile_any, m_tile, 0.0)
        p = jnp.exp(s - m_tile[..., None])
        l_tile = jnp.sum(p, axis=-1)
        o_tile = jnp.einsum("nqk,nkd->nqd", p.astype(vt.dtype), vt, preferred_element_type=st.acc)
        m_old, l_old, acc_old = _flat(m[q_row]), _flat(l[q_row]), _flat(acc[q_row])
        if masked:
            m_new = jnp.maximum(m_old, jnp.where(tile_any, m_tile, MASK_VALUE))
            # Rows that have seen no visible key keep MASK_VALUE (and l == 0).
            m_ref = jnp.where(m_new == MASK_VALUE, 0.0, m_new)
            beta = jnp.where(tile_any, jnp.exp(m_tile - m_ref), 0.0)
        else:
            m_new = m_ref = jnp.maximum(m_old, m_tile)
            beta = jnp.exp(m_tile - m_ref)
        alpha = jnp.exp(m_old - m_ref)
        l_new = l_old * alpha + l_tile * beta
        acc_new = acc_old * alpha[..., None] + o_tile * beta[..., None]
        shape = q_row.shape + m.shape[1:]
        m = m.at[q_row].set(m_new.reshape(shape), unique_indices=True)
        l = l.at[q_row].set(l_new.reshape(shape), unique_indices=True)
        acc = acc.at[q_row].set(acc_new.reshape(shape + (dv,)), unique_indices=True)
        return (m, l, acc), None

    carry = (m, l, acc)
    for pairs, masked in ((meta.full_pairs, False), (meta.partial_pairs, True)):
        if pairs.shape[0]:
            schedule = _schedule(pairs, nq, nk, per_step, pattern_index if masked else None)
            carry, _ = jax.lax.scan(functools.partial(step, masked=masked), carry, schedule)
    m, l, acc = (x[:nq] for x in carry)
    has_any = l > 0
    safe_l = jnp.where(has_any, l, 1.0)
    out = acc / safe_l[..., None]
    lse = jnp.where(has_any, m + jnp.log(safe_l), -jnp.inf)
    # [nq, B, Hkv, G * bq, Dv] -> [B, T, Hq, Dv]; lse [nq, B, Hkv, G * bq] -> [B, Hq, T]
    bq = st.block_q
    out = out.reshape(nq, batch, kv_heads, group, bq, dv).transpose(1, 0, 4, 2, 3, 5)
    out = out.reshape(batch, nq * bq, q_heads, dv)
    lse = lse.reshape(nq, batch, kv_heads, group, bq).transpose(1, 2, 3, 0, 4)
    lse = lse.reshape(batch, q_heads, nq * bq)
    return out[:, : st.q_len].astype(q.dtype), lse[:, :, : st.q_len]


def _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, st: _Static):
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q = _prescaled(q, st)
    # Rows that see no key (lse = -inf) have p = 0 and contribute nothing; zeroing their q and
    # dO changes no result but makes every backward dot depend on the forward's lse. Otherwise
    # XLA:CPU runs the backward's recomputed products concurrently with the forward (whose
    # loops it unrolls at short lengths), and two multithreaded dots at once oversubscribe the
    # cores (~1.3x slower at T = 1024).
    seen = jnp.isfinite(lse).transpose(0, 2, 1)[..., None]  # [B, T, Hq, 1]
    q = jnp.where(seen, q, jnp.zeros((), q.dtype))
    d_out = jnp.where(seen, d_out, jnp.zeros((), d_out.dtype))
    qb = _q_blocks(q, st.block_q, kv_heads)  # [nq, B, Hkv, R = G * bq, D]
    dob = _q_blocks(d_out, st.block_q, kv_heads)
    kb = _blocks(pad_axis(k, 1, st.block_kv), st.block_kv)  # [nk, B, Hkv, bk, D]
    vb = _blocks(pad_axis(v, 1, st.block_kv), st.block_kv)
    kbt = kb.transpose(0, 1, 2, 4, 3)  # [nk, B, Hkv, D, bk]
    qs = _segment_blocks(q_seg, st.block_q, -1)
    ks = _segment_blocks(kv_seg, st.block_kv, -2)
    nq, _, _, rows_per_block, _ = qb.shape
    nk = kb.shape[0]
    meta = block_metadata(st.mask, st.q_len, st.kv_len, st.block_q, st.block_kv, st.use_segments)
    per_step = _per_step(st, batch, q_heads)
    patterns, pattern_index = _partial_patterns(st, meta.partial_pairs)
    table_t = None if patterns is None else jnp.asarray(patterns.transpose(0, 2, 1))

    # [B, T, Hq]; an einsum (a dot) rather than a sum over D: XLA:CPU's reduction of a short
    # minor axis is ~20x slower.
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(st.acc), out.astype(st.acc))
    delta = delta.transpose(0, 2, 1) - d_lse  # [B, Hq, T]
    lse_b = _q_rows(jnp.where(jnp.isfinite(lse), lse, 0.0).astype(st.acc), st.block_q, kv_heads)
    delta_b = _q_rows(delta.astype(st.acc), st.block_q, kv_heads)

    # Accumulators with a dummy last row that padding tiles write to; dq is kept transposed.
    dq = jnp.zeros((nq + 1, batch, kv_heads, head_dim, rows_per_block), st.acc)
    dk = jnp.zeros((nk + 1,) + kb.shape[1:], st.acc)
    dv = jnp.zeros((nk + 1,) + vb.shape[1:], st.acc)

    def step(carry, chunk, masked):
        dq, dk, dv = carry
        qi, kj, pattern, q_row, kv_row = chunk
        q_row = jnp.minimum(q_row, nq)  # every padding slot writes the one dummy row
        qc, doc = _flat(qb[qi]), _flat(dob[qi])  # [N, R, D]
        kc, vc = _flat(kb[kj]), _flat(vb[kj])  # [N, bk, D]
        # Transposed tiles [N, bk, R] (see the module docstring).
        s = jnp.einsum("nkd,nqd->nkq", kc, qc, preferred_element_type=st.acc)
        if not st.prescale:
            s = s * st.scale
        s, tanh = _softcap(s, st)
        p = jnp.exp(s - _flat(lse_b[qi])[:, None, :])
        if masked:
            visible = _visibility(qi, kj, pattern, table_t, qs, ks, st, kv_heads, group, True)
            p = jnp.where(visible, p, 0.0)
        dp = jnp.einsum("nkd,nqd->nkq", vc, doc, preferred_element_type=st.acc)
        ds = p * (dp - _flat(delta_b[qi])[:, None, :])
        if tanh is not None:
            ds = ds * (1.0 - jnp.square(tanh))
        dv_tile = jnp.einsum("nkq,nqd->nkd", p.astype(doc.dtype), doc, preferred_element_type=st.acc)
        dk_tile = jnp.einsum("nkq,nqd->nkd", ds.astype(qc.dtype), qc, preferred_element_type=st.acc)
        # dq^T = K^T dS^T: K^T is pre-transposed, so this dot contracts dS^T's leading dimension
        # as an ordinary [D, bk] x [bk, R] product and no score tile is ever transposed.
        dq_tile = jnp.einsum(
            "ndk,nkq->ndq", _flat(kbt[kj]), ds.astype(kc.dtype), preferred_element_type=st.acc
        )
        lead = qi.shape + (batch, kv_heads)
        dq = dq.at[q_row].add(dq_tile.reshape(lead + dq_tile.shape[1:]))
        dk = dk.at[kv_row].add(dk_tile.reshape(lead + dk_tile.shape[1:]))
        dv = dv.at[kv_row].add(dv_tile.reshape(lead + dv_tile.shape[1:]))
        return (dq, dk, dv), None

    carry = (dq, dk, dv)
    for pairs, masked in ((meta.full_pairs, False), (meta.partial_pairs, True)):
        if pairs.shape[0]:
            schedule = _schedule(pairs, nq, nk, per_step, pattern_index if masked else None)
            carry, _ = jax.lax.scan(functools.partial(step, masked=masked), carry, schedule)
    dq, dk, dv = (x[:-1] for x in carry)
    # dq = scale * dS K always; dk = scale * dS^T q, where q already carries the scale if prescaled.
    dq = dq * st.scale
    if not st.prescale:
        dk = dk * st.scale
    # dq [nq, B, Hkv, D, G * bq] -> [B, T, Hq, D]
    bq = st.block_q
    dq = dq.reshape(nq, batch, kv_heads, head_dim, group, bq).transpose(1, 0, 5, 2, 4, 3)
    dq = dq.reshape(batch, nq * bq, q_heads, head_dim)[:, : st.q_len].astype(q.dtype)

    def unblock(x, length, dtype):  # [n, B, H, blk, D] -> [B, length, H, D]
        n, b, h, blk, d = x.shape
        return x.transpose(1, 0, 3, 2, 4).reshape(b, n * blk, h, d)[:, :length].astype(dtype)

    return dq, unblock(dk, st.kv_len, k.dtype), unblock(dv, st.kv_len, v.dtype)


def _with_recomputing_vjp(forward, backward):
    """``f(q, k, v, q_seg, kv_seg, st) -> (out, lse)`` whose VJP is ``backward``: residuals are
    the inputs, the output and the log-sum-exp, so the backward recomputes the probabilities."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def run(q, k, v, q_seg, kv_seg, st: _Static):
        return forward(q, k, v, q_seg, kv_seg, st)

    def run_fwd(q, k, v, q_seg, kv_seg, st: _Static):
        out, lse = forward(q, k, v, q_seg, kv_seg, st)
        return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)

    def run_bwd(st: _Static, residuals, cotangents):
        dq, dk, dv = backward(*residuals, *cotangents, st)
        return dq, dk, dv, None, None

    run.defvjp(run_fwd, run_bwd)
    return run


_attention = _with_recomputing_vjp(_forward, _backward)


def _prescale_exact(dtype, scale: float) -> bool:
    """Whether ``q * scale`` rounded to ``dtype`` is as good as scaling float32 scores."""
    if math.frexp(scale)[0] == 0.5:  # a power of two: exact in any float dtype
        return True
    return jnp.finfo(dtype).eps <= jnp.finfo(jnp.float32).eps


# ------------------------------------------------------------------------------------------------
# One tile: the whole score matrix fits in ``block_q x block_kv``.
# ------------------------------------------------------------------------------------------------
#
# Short sequences (a ViT's 197 tokens, a Swin window's 49) make the score matrix a single tile.
# The tile is then computed directly: no padding to the alignment, no scan and no running
# statistics to gather and write back. The backward still recomputes the probabilities from the
# saved log-sum-exp (residuals stay O(T)), in the natural [q, k] orientation: for one tile the
# YNNPACK dots that contract the query axis measured as fast as the transposed formulation
# (ViT-Ti attention, B=8, T=197: forward + backward 16.6 ms blockwise, 9.5 ms here).


def _is_single_tile(st: _Static) -> bool:
    return st.q_len <= st.block_q and st.kv_len <= st.block_kv


def _tile_visibility(q_seg, kv_seg, st: _Static):
    """Visible scores ``[B | 1, 1, 1, T, S]`` bool, or None when every score is visible."""
    kinds = block_kinds(st.mask, st.q_len, st.kv_len, st.q_len, st.kv_len)
    visible = None
    if kinds[0, 0] != FULL:
        rows = np.arange(st.q_len, dtype=np.int64)[:, None]
        cols = np.arange(st.kv_len, dtype=np.int64)[None, :]
        table = np.broadcast_to(np.asarray(st.mask(rows, cols), bool), (st.q_len, st.kv_len))
        visible = jnp.asarray(table)[None, None, None]
    if st.use_segments:
        same = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
        visible = same if visible is None else visible & same
    return visible


def _heads_major(x, kv_heads):
    """[B, L, H, D] -> [B * Hkv, (H / Hkv) * L, D]: a KV head's rows in (group, position) order."""
    batch, length, heads, dim = x.shape
    x = x.reshape(batch, length, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)
    return x.reshape(batch * kv_heads, (heads // kv_heads) * length, dim)


def _tokens_major(x, batch, heads):
    """Inverse of :func:`_heads_major`: [B * Hkv, G * L, D] -> [B, L, H, D]."""
    kv_heads = x.shape[0] // batch
    group = heads // kv_heads
    x = x.reshape(batch, kv_heads, group, x.shape[1] // group, x.shape[2]).transpose(0, 3, 1, 2, 4)
    return x.reshape(batch, x.shape[1], heads, x.shape[-1])


def _tile_scores(qg, kg, visible, shape, st: _Static):
    """Masked (soft-capped) logits ``[B * Hkv, G * T, S]`` and ``tanh`` for the backward."""
    s = jnp.einsum("nqd,nkd->nqk", qg, kg, preferred_element_type=st.acc)
    if not st.prescale:
        s = s * st.scale
    s, tanh = _softcap(s, st)
    if visible is not None:
        s = jnp.where(visible, s.reshape(shape), MASK_VALUE).reshape(s.shape)
    return s, tanh


def _single_forward(q, k, v, q_seg, kv_seg, st: _Static):
    batch, q_len, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q = _prescaled(q, st)
    qg, kg, vg = _heads_major(q, kv_heads), _heads_major(k, kv_heads), _heads_major(v, kv_heads)
    visible = _tile_visibility(q_seg, kv_seg, st)
    shape = (batch, kv_heads, group, q_len, st.kv_len)
    s, _ = _tile_scores(qg, kg, visible, shape, st)
    m = jnp.max(s, axis=-1)
    if visible is not None:  # rows that see no key: m == MASK_VALUE, p == 0, l == 0
        m = jnp.where(m == MASK_VALUE, 0.0, m)
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    has_any = l > 0
    safe_l = jnp.where(has_any, l, 1.0)
    out = jnp.einsum("nqk,nkd->nqd", p.astype(vg.dtype), vg, preferred_element_type=st.acc)
    out = _tokens_major(out / safe_l[..., None], batch, q_heads).astype(q.dtype)
    lse = jnp.where(has_any, m + jnp.log(safe_l), -jnp.inf)
    return out, lse.reshape(batch, q_heads, q_len)


def _single_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, st: _Static):
    batch, q_len, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q = _prescaled(q, st)
    qg, kg, vg = _heads_major(q, kv_heads), _heads_major(k, kv_heads), _heads_major(v, kv_heads)
    dog = _heads_major(d_out, kv_heads)
    visible = _tile_visibility(q_seg, kv_seg, st)
    shape = (batch, kv_heads, group, q_len, st.kv_len)
    s, tanh = _tile_scores(qg, kg, visible, shape, st)
    rows = (batch * kv_heads, group * q_len)
    # Rows that see no key (lse = -inf) have every score masked: p = exp(MASK_VALUE) = 0.
    lse_rows = jnp.where(jnp.isfinite(lse), lse, 0.0).astype(st.acc).reshape(rows)
    p = jnp.exp(s - lse_rows[..., None])
    # [B, T, Hq] as an einsum (a dot): XLA:CPU's reduction of a short minor axis is much slower.
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(st.acc), out.astype(st.acc))
    delta = (delta.transpose(0, 2, 1) - d_lse).reshape(rows)
    dp = jnp.einsum("nqd,nkd->nqk", dog, vg, preferred_element_type=st.acc)
    ds = p * (dp - delta[..., None])
    if tanh is not None:
        ds = ds * (1.0 - jnp.square(tanh))
    dv = jnp.einsum("nqk,nqd->nkd", p.astype(dog.dtype), dog, preferred_element_type=st.acc)
    dk = jnp.einsum("nqk,nqd->nkd", ds.astype(qg.dtype), qg, preferred_element_type=st.acc)
    dq = jnp.einsum("nqk,nkd->nqd", ds.astype(kg.dtype), kg, preferred_element_type=st.acc) * st.scale
    if not st.prescale:
        dk = dk * st.scale
    return (
        _tokens_major(dq, batch, q_heads).astype(q.dtype),
        _tokens_major(dk, batch, kv_heads).astype(k.dtype),
        _tokens_major(dv, batch, kv_heads).astype(v.dtype),
    )


_single_attention = _with_recomputing_vjp(_single_forward, _single_backward)


def attention(q, k, v, *, mask: Mask, segment_ids, scale, softcap, block_sizes: XlaBlockSizes):
    """Blockwise attention; same contract as the reference: ``(out [B,T,Hq,Dv], lse [B,Hq,T])``.

    When the sequences fit in one ``block_q x block_kv`` tile the tile is computed directly
    (see :func:`_single_forward`).
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    st = _Static(
        mask=mask,
        q_len=q_len,
        kv_len=kv_len,
        scale=float(scale),
        softcap=softcap,
        block_q=fit_block(block_sizes.block_q, q_len, 8),
        block_kv=fit_block(block_sizes.block_kv, kv_len, 8),
        scores_per_step=block_sizes.scores_per_step,
        use_segments=segment_ids is not None,
        acc=jnp.promote_types(q.dtype, jnp.float32),
        prescale=_prescale_exact(q.dtype, float(scale)),
    )
    if segment_ids is None:
        q_seg = jnp.zeros((q.shape[0], q_len), jnp.int32)
        kv_seg = jnp.zeros((q.shape[0], kv_len), jnp.int32)
    else:
        q_seg, kv_seg = (s.astype(jnp.int32) for s in segment_ids)
    if _is_single_tile(st):
        return _single_attention(q, k, v, q_seg, kv_seg, st)
    return _attention(q, k, v, q_seg, kv_seg, st)
