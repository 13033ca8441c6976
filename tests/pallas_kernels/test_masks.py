"""Masks: composition, and their compilation to block metadata (which tiles are skipped)."""

from __future__ import annotations

import numpy as np
import pytest

from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels.attention import masks


def dense(mask, q_len, kv_len):
    q = np.arange(q_len)[:, None]
    k = np.arange(kv_len)[None, :]
    return np.broadcast_to(np.asarray(mask(q, k), bool), (q_len, kv_len))


def kinds_from_dense(visible, block_q, block_kv):
    """Independent tile classification from a dense boolean matrix (padding invisible)."""
    q_len, kv_len = visible.shape
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    padded = np.zeros((nq * block_q, nk * block_kv), bool)
    padded[:q_len, :kv_len] = visible
    # Padded query rows are classified like real rows by the library: extend rows by the mask.
    kinds = np.zeros((nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = padded[i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
            kinds[i, j] = masks.FULL if tile.all() else masks.PARTIAL if tile.any() else masks.EMPTY
    return kinds


INTERVAL_MASKS = [
    pk.FullMask(),
    pk.CausalMask(),
    pk.CausalMask(offset=13),
    pk.LocalMask(5, 0),
    pk.LocalMask(None, 9),
    pk.LocalMask(17, 4, offset=-3),
    pk.ChunkedCausalMask(16),
    pk.ChunkedCausalMask(7, offset=5),
    pk.PrefixLMMask(11),
    pk.CausalMask() & pk.LocalMask(30, None),
]


@pytest.mark.parametrize("mask", INTERVAL_MASKS, ids=repr)
@pytest.mark.parametrize("shape", [(64, 64, 16, 16), (70, 70, 16, 32), (37, 90, 8, 16), (1, 5, 8, 8)])
def test_interval_classification_matches_dense(mask, shape):
    q_len, kv_len, bq, bk = shape
    # Classify on the padded query grid like the library does.
    nq = -(-q_len // bq)
    visible = dense(mask, nq * bq, kv_len)
    expected = kinds_from_dense(visible, bq, bk)
    assert mask.row_interval(np.arange(4), kv_len) is not None
    np.testing.assert_array_equal(masks.block_kinds(mask, q_len, kv_len, bq, bk), expected)
    # The dense fallback path gives the same answer.
    np.testing.assert_array_equal(
        masks.block_kinds(pk.FunctionMask(mask), q_len, kv_len, bq, bk), expected
    )


def test_mask_algebra():
    causal = pk.CausalMask()
    local = pk.LocalMask(2, 0)
    q, k = np.arange(10)[:, None], np.arange(10)[None, :]
    np.testing.assert_array_equal((causal & ~local)(q, k), (k <= q) & ~((k >= q - 2) & (k <= q)))
    np.testing.assert_array_equal((local | (lambda i, j: j == 0))(q, k), ((k >= q - 2) & (k <= q)) | (k == 0))
    assert (causal | local).row_interval(np.arange(3), 10) is None
    assert (causal & local).row_interval(np.arange(3), 10) is not None


def test_metadata_lists_every_visible_tile_once_in_both_orders():
    mask = pk.LocalMask(40, 0) | pk.ChunkedCausalMask(64)
    meta = masks.block_metadata(mask, 300, 300, 32, 64)
    kinds = meta.kinds
    visible = {tuple(p) for p in np.argwhere(kinds > 0)}
    row_major = {(i, int(meta.kv_index[i, s])) for i in range(kinds.shape[0]) for s in range(meta.kv_index.shape[1]) if meta.kv_kind[i, s]}
    col_major = {(int(meta.q_index[j, s]), j) for j in range(kinds.shape[1]) for s in range(meta.q_index.shape[1]) if meta.q_kind[j, s]}
    pairs = {tuple(p) for p in np.concatenate([meta.full_pairs, meta.partial_pairs])}
    assert row_major == visible == col_major == pairs
    for i in range(kinds.shape[0]):
        for s in range(meta.kv_index.shape[1]):
            if meta.kv_kind[i, s]:
                assert meta.kv_kind[i, s] == kinds[i, meta.kv_index[i, s]]
            elif s > 0:  # padded steps repeat the previous index: no new copy is issued
                assert meta.kv_index[i, s] == meta.kv_index[i, s - 1]


def test_causal_skips_upper_triangle_and_full_tiles_skip_mask():
    meta = masks.block_metadata(pk.CausalMask(), 512, 512, 128, 128)
    assert meta.num_visible_tiles == 4 * 5 // 2
    assert len(meta.partial_pairs) == 4  # only the diagonal needs the element mask
    assert len(meta.full_pairs) == 6
    local = masks.block_metadata(pk.LocalMask(100, 0), 1024, 1024, 128, 128)
    assert local.kv_index.shape[1] == 2  # each query block visits at most 2 key blocks


def test_segments_make_every_tile_masked():
    meta = masks.block_metadata(pk.CausalMask(), 256, 256, 128, 128, dense=True)
    assert len(meta.full_pairs) == 0 and len(meta.partial_pairs) == 3


def test_padding_keys_never_full():
    kinds = masks.block_kinds(pk.FullMask(), 16, 130, 16, 128)
    np.testing.assert_array_equal(kinds, [[masks.FULL, masks.PARTIAL]])


def test_bad_mask_arguments():
    with pytest.raises(TypeError, match="mask must be an attnzoo Mask or a callable"):
        masks.as_mask(3)
    with pytest.raises(ValueError, match="chunk_size"):
        pk.ChunkedCausalMask(0)
    with pytest.raises(ValueError, match="prefix_len"):
        pk.PrefixLMMask(-1)


def test_key_range_mask_is_a_band_of_keys_for_every_query():
    mask = pk.KeyRangeMask(2, 5)
    q, kv = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(np.asarray(mask(q, kv)), (kv >= 2) & (kv < 5))
    lo, hi = mask.row_interval(np.arange(6), 8)
    assert (lo == 2).all() and (hi == 4).all()
    with pytest.raises(ValueError, match="KeyRangeMask"):
        pk.KeyRangeMask(3, 1)
