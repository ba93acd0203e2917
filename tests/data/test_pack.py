"""Packing (producer side) and iter_blocks (consumer side): pure, no Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from llmos_ray.data import iter_blocks, pack_blocks, pack_documents
from llmos_ray.errors import DataError

EOS = 0


def random_docs(rng, n, max_len=40):
    return [list(rng.integers(1, 1000, size=int(rng.integers(0, max_len)))) for _ in range(n)]


def stream(docs):
    return np.array([t for d in docs for t in [*d, EOS]], dtype=np.int32)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block_len", [1, 7, 33])
def test_rows_concatenate_to_documents_each_followed_by_eos(seed, block_len):
    docs = random_docs(np.random.default_rng(seed), 20)
    rows = pack_blocks(docs, EOS, block_len)
    assert all(r.dtype == np.int32 for r in rows)
    assert all(len(r) == block_len for r in rows[:-1]) and 0 < len(rows[-1]) <= block_len
    np.testing.assert_array_equal(np.concatenate(rows), stream(docs))


def test_pack_documents_offsets_and_empty_input():
    values, offsets = pack_documents([[5, 6, 7], [8]], EOS, 4)
    assert values.tolist() == [5, 6, 7, 0, 8, 0] and offsets.tolist() == [0, 4, 6]
    values, offsets = pack_documents([[1, 2, 3]], EOS, 4)
    assert offsets.tolist() == [0, 4]  # exactly one full row, no empty tail
    values, offsets = pack_documents([], EOS, 4)
    assert len(values) == 0 and offsets.tolist() == [0]
    assert pack_blocks([], EOS, 4) == []


def test_iter_blocks_joins_tails_and_reports_leftover():
    n = 4
    batches = [
        {"input_ids": np.array([np.arange(4), np.arange(10, 12)], dtype=object)},   # full, tail(2)
        {"input_ids": np.array([np.arange(20, 23)], dtype=object)},                 # tail(3): joins -> full
        np.arange(30, 38).reshape(2, 4),                                             # 2-D array of full rows
        [np.array([40])],                                                            # tail(1)
    ]
    blocks = iter_blocks(batches, n)
    got = [b.tolist() for b in blocks]
    assert got == [[0, 1, 2, 3], [10, 11, 20, 21], [30, 31, 32, 33], [34, 35, 36, 37]]
    assert (blocks.blocks, blocks.tokens, blocks.leftover) == (4, 18, 2)  # 22 and 40 stay in the carry


@pytest.mark.parametrize("seed", range(3))
def test_iter_blocks_loses_nothing_over_many_packed_batches(seed):
    rng = np.random.default_rng(seed)
    n = 16
    batches, everything = [], []
    for _ in range(12):
        docs = random_docs(rng, int(rng.integers(1, 6)))
        values, offsets = pack_documents(docs, EOS, n)
        batches.append(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}))
        everything.append(values)
    blocks = iter_blocks(batches, n)  # pyarrow tables, as iter_batches(batch_format="pyarrow") gives
    out = list(blocks)
    assert all(len(b) == n for b in out)
    total = sum(len(v) for v in everything)
    assert len(out) * n + blocks.leftover == total and blocks.leftover < n
    # As multisets: the blocks hold packed tokens only, and miss exactly `leftover` of them.
    produced = Counter(np.concatenate(out).tolist()) if out else Counter()
    packed = Counter(np.concatenate(everything).tolist())
    assert not produced - packed
    assert sum((packed - produced).values()) == blocks.leftover


def test_iter_blocks_skip_and_errors():
    rows = [np.arange(i * 3, i * 3 + 3) for i in range(5)]
    blocks = iter_blocks([rows], 3, skip=2)
    assert [b.tolist() for b in blocks] == [[6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert blocks.blocks == 5
    with pytest.raises(DataError, match="more than block_len=3.*data.seq_len"):
        list(iter_blocks([[np.arange(4)]], 3))
