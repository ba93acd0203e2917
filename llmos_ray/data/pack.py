"""Packing tokenized documents into fixed-length blocks, and joining them back on the consumer.

Producer side (`pack_documents`, run once per batch of documents): the documents' token ids,
each followed by EOS, are concatenated and cut into rows of `block_len` (= seq_len + 1) tokens;
the batch's leftover becomes one shorter "tail" row. Nothing is lost or duplicated: the rows of
all batches, in order, concatenate to exactly the tokenized documents each followed by EOS.

Consumer side (`iter_blocks`, run in a training worker on its shard): full rows pass straight
through; tail rows are joined in a carry buffer and come out as full blocks as soon as enough
tokens have arrived. A joined block may start mid-document, right after another batch's EOS.
Whatever is left in the carry at the end (< block_len tokens) is counted in `.leftover`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from llmos_ray.errors import DataError


def pack_documents(token_ids: Sequence[Sequence[int]], eos_id: int, block_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Join documents (each + `eos_id`) and cut them into rows of `block_len` tokens.

    Returns `(values, offsets)`: all tokens as one int32 array, and int32 row boundaries
    (row i is `values[offsets[i]:offsets[i + 1]]`). Every row has `block_len` tokens except a
    shorter last one when the total is not a multiple of it."""
    if block_len <= 0:
        raise ValueError(f"block_len must be > 0, got {block_len}")
    lengths = np.fromiter((len(ids) + 1 for ids in token_ids), dtype=np.int64, count=len(token_ids))
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total >= 2**31:
        raise DataError(f"a batch of {total} tokens is too large for int32 offsets; lower data.batch_docs")
    values = np.empty(total, dtype=np.int32)
    starts = ends - lengths
    for start, ids in zip(starts.tolist(), token_ids):
        values[start:start + len(ids)] = ids
    values[ends - 1] = eos_id
    offsets = np.arange(0, total, block_len, dtype=np.int32)
    offsets = np.append(offsets, np.int32(total)) if total else np.zeros(1, dtype=np.int32)
    return values, offsets


def pack_blocks(token_ids: Sequence[Sequence[int]], eos_id: int, block_len: int) -> list[np.ndarray]:
    """`pack_documents` as a list of rows."""
    values, offsets = pack_documents(token_ids, eos_id, block_len)
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


class BlockStream:
    """Iterator of full `block_len` int32 blocks from batches of packed rows (see `iter_blocks`).

    After exhaustion: `.blocks` blocks were produced (including `skip`ped ones), `.tokens` tokens
    arrived, and `.leftover` tokens remained in the carry buffer (fewer than `block_len`)."""

    def __init__(self, batches: Iterable[Any], block_len: int, skip: int = 0):
        if block_len <= 0:
            raise ValueError(f"block_len must be > 0, got {block_len}")
        self.block_len, self.skip = block_len, skip
        self.blocks = self.tokens = self.leftover = 0
        self._it = self._generate(iter(batches))

    def __iter__(self) -> "BlockStream":
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def _generate(self, batches: Iterator[Any]) -> Iterator[np.ndarray]:
        n = self.block_len
        carry: list[np.ndarray] = []
        carried = 0
        for batch in batches:
            for row in _rows(batch):
                size = len(row)
                self.tokens += size
                if size == n:
                    block = row
                elif size > n:
                    raise DataError(f"a packed row has {size} tokens, more than block_len={n}: the data was "
                                     f"packed with another data.seq_len")
                else:
                    carry.append(row)
                    carried += size
                    self.leftover = carried
                    if carried < n:
                        continue
                    joined = np.concatenate(carry)
                    block, rest = joined[:n], joined[n:]
                    carry, carried = ([rest], len(rest)) if len(rest) else ([], 0)
                    self.leftover = carried
                self.blocks += 1
                if self.blocks > self.skip:
                    yield block
        self.leftover = carried


def iter_blocks(batches: Iterable[Any], block_len: int, *, skip: int = 0) -> BlockStream:
    """Full blocks of `block_len` int32 tokens from packed batches, in order.

    `batches` is what `DataIterator.iter_batches(batch_format="numpy")` yields (dicts with an
    "input_ids" column of rows), or any iterable of such dicts, 2-D arrays or lists of rows.
    The first `skip` blocks are dropped (a resumed reader skips what it consumed before).
    The returned `BlockStream` exposes `.leftover` (tokens in the carry at the end)."""
    return BlockStream(batches, block_len, skip)


def _rows(batch: Any) -> Iterable[np.ndarray]:
    if type(batch).__module__.startswith("pyarrow"):
        return _arrow_rows(batch)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        batch = batch["input_ids"]
    if isinstance(batch, np.ndarray) and batch.dtype != object:
        return batch.astype(np.int32, copy=False) if batch.ndim == 2 else [batch.astype(np.int32, copy=False)]
    return (np.asarray(row, dtype=np.int32) for row in batch)


def _arrow_rows(batch: Any) -> Iterator[np.ndarray]:
    """Rows of a pyarrow Table / (Chunked)ListArray without a Python object per token."""
    import pyarrow as pa

    column = batch.column("input_ids") if isinstance(batch, (pa.Table, pa.RecordBatch)) else batch
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        offsets = chunk.offsets.to_numpy()
        offsets = offsets - offsets[0]
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            yield values[a:b]
