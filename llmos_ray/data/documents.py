"""Documents: records read from a corpus, cleaned, counted and split, in corpus order.

Two steps, both pure (no Ray), used by the Ray pipeline and by in-process reading alike:

1. `read_blocks` turns the records of some sources into Arrow blocks (`READ_SCHEMA`): text
   stripped, a 128-bit BLAKE2b key of the text, and for a bad record its file, line and reason.
   Many of these run in parallel.
2. `Ledger.add` sees every block once, in corpus order, and accounts for every record exactly
   once: `bad_records` (with file and line), `dropped_short` (empty or shorter than
   data.min_chars after stripping), `duplicates` (data.dedup: the same text seen earlier) or kept
   (`documents`). Kept documents are split by their key: a document is held out for validation
   when the first 8 bytes of its key, read as an integer, fall below data.val_fraction * 2**64,
   so the split is the same on every machine and run. Invariant:
       records == documents + dropped_short + duplicates + bad_records
       documents == train_documents + val_documents

`data.max_documents` caps the records *read* (bad, short and duplicate ones included), so the
documents kept are at most that many and always the same ones.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from llmos_ray.data.corpus import resolve_corpus
from llmos_ray.data.records import read_records
from llmos_ray.data.sources import Corpus

READ_SCHEMA = pa.schema([
    ("file", pa.int32()),        # index into Corpus.sources
    ("line", pa.int64()),        # 1-based line / row / record number in that file
    ("text", pa.string()),       # stripped text; null for a bad record
    ("reason", pa.string()),     # why a record is bad; null for a good one
    ("key", pa.binary(16)),      # BLAKE2b-128 of the stripped text (dedup)
    ("bucket", pa.uint64()),     # first 8 bytes of key (train/val split)
])
BLOCK_ROWS = 4096
BLOCK_CHARS = 4 << 20
MAX_BAD_LISTED = 100  # bad-record locations kept per file (the count is always complete)


def text_key(text: str) -> bytes:
    """A stable 128-bit key of a document's text (not Python's per-process `hash`)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the record with `key` is held out, for a share `fraction` of all keys: the first 8
    bytes of `text_key(key)` as an integer fall below fraction * 2**64. The one split rule of the
    project: a document's key is its stripped text (data.val_fraction), an instruction example's
    its function's qualified name or its file and line."""
    return int.from_bytes(text_key(key)[:8], "big") < _threshold(fraction)


def _threshold(val_fraction: float) -> int:
    return min(int(val_fraction * 2**64), 2**64 - 1)


def read_blocks(corpus: Corpus, indices: Iterable[int], *, limit: Optional[int] = None,
                block_rows: int = BLOCK_ROWS, block_chars: int = BLOCK_CHARS) -> Iterator[pa.Table]:
    """Blocks of `READ_SCHEMA` rows for the records of `corpus.sources[i]` for i in `indices`, in
    order; at most `limit` records. Block boundaries depend only on the data (deterministic)."""
    cols: dict[str, list] = {name: [] for name in READ_SCHEMA.names}
    chars = count = 0
    if limit is not None and limit <= 0:
        return
    for i in indices:
        for line, text, reason in read_records(corpus, corpus.sources[i]):
            if text is not None:
                text = text.strip()
                key = text_key(text)
                chars += len(text)
            else:
                key = bytes(16)
            cols["file"].append(i)
            cols["line"].append(line)
            cols["text"].append(text)
            cols["reason"].append(reason)
            cols["key"].append(key)
            cols["bucket"].append(int.from_bytes(key[:8], "big"))
            count += 1
            if limit is not None and count >= limit:
                yield pa.table(cols, schema=READ_SCHEMA)
                return
            if len(cols["file"]) >= block_rows or chars >= block_chars:
                yield pa.table(cols, schema=READ_SCHEMA)
                cols = {name: [] for name in READ_SCHEMA.names}
                chars = 0
    if cols["file"]:
        yield pa.table(cols, schema=READ_SCHEMA)


class Ledger:
    """Counts, deduplicates and splits blocks of records; must see them in corpus order.

    `split` is the split this ledger emits. With `val_fraction` set, validation documents are
    held out of this corpus by key; without it (a separate data.val_paths corpus) every kept
    document belongs to `split`. Split "both" (held out by key only) emits every kept document
    with a boolean column `val`: both splits in one pass over the corpus."""

    def __init__(self, uris: list[str], split: str, *, min_chars: int, dedup: bool,
                 val_fraction: Optional[float]):
        if split == "both" and val_fraction is None:
            raise ValueError("a ledger of both splits holds documents out by key: it needs val_fraction")
        self.uris, self.split = uris, split
        self.min_chars, self.dedup = min_chars, dedup
        self.threshold = None if val_fraction is None else _threshold(val_fraction)
        self.seen: set[bytes] = set()
        self._last = (-1, 0)  # (file, line) of the last record seen
        self.records = self.documents = self.train_documents = self.val_documents = 0
        self.dropped_short = self.duplicates = self.bad_records = self.chars = 0
        self.bad_by_file: dict[str, list[dict]] = {}
        self.bad_count_by_file: dict[str, int] = {}
        self.done = False
        """The corpus has ended (`close`): nothing more comes."""

    @classmethod
    def for_config(cls, data, corpus: Corpus, split: str) -> "Ledger":
        """The ledger of one split of a DataConfig's corpus."""
        held_out = not data.val_paths
        return cls([s.uri for s in corpus.sources], split, min_chars=data.min_chars, dedup=data.dedup,
                   val_fraction=data.val_fraction if held_out else None)

    def add(self, block: pa.Table) -> pa.Table:
        """Account for `block` (READ_SCHEMA); return the documents of this ledger's split: {text}
        ({text, val} for split "both").

        Raises RuntimeError when blocks arrive out of corpus order (counts and dedup depend on it)."""
        if block.num_rows:
            first = (block.column("file")[0].as_py(), block.column("line")[0].as_py())
            if first <= self._last:
                raise RuntimeError(f"ledger got records out of corpus order: (file, line) {first} after {self._last}")
            self._last = (block.column("file")[-1].as_py(), block.column("line")[-1].as_py())
        self.records += block.num_rows
        bad = pc.is_valid(block["reason"])
        if pc.any(bad).as_py():
            for row in block.filter(bad).select(["file", "line", "reason"]).to_pylist():
                self._bad(row["file"], row["line"], row["reason"])
            block = block.filter(pc.invert(bad))
        lengths = pc.utf8_length(block["text"])
        short = pc.less(lengths, self.min_chars)
        n_short = pc.sum(short).as_py() or 0
        if n_short:
            self.dropped_short += n_short
            keep = pc.invert(short)
            block, lengths = block.filter(keep), lengths.filter(keep)
        if self.dedup and block.num_rows:
            mask = []
            for key in block["key"].to_pylist():
                mask.append(key not in self.seen)
                self.seen.add(key)
            n_dup = mask.count(False)
            if n_dup:
                self.duplicates += n_dup
                block, lengths = block.filter(pa.array(mask)), lengths.filter(pa.array(mask))
        self.documents += block.num_rows
        self.chars += pc.sum(lengths).as_py() or 0
        if self.threshold is None:
            if self.split == "val":
                self.val_documents += block.num_rows
            else:
                self.train_documents += block.num_rows
            return block.select(["text"])
        val = pc.less(block["bucket"], pa.scalar(self.threshold, pa.uint64()))
        n_val = pc.sum(val).as_py() or 0
        self.val_documents += n_val
        self.train_documents += block.num_rows - n_val
        if self.split == "both":
            return pa.table({"text": block["text"], "val": val})
        return block.filter(val if self.split == "val" else pc.invert(val)).select(["text"])

    def close(self, component: int = 0) -> pa.Table:
        """The end of the corpus (a mixture's ledger ends one component at a time): no documents follow."""
        self.done = True
        return pa.table({"text": pa.array([], pa.string())})

    def _bad(self, file: int, line: int, reason: str) -> None:
        uri = self.uris[file]
        self.bad_records += 1
        self.bad_count_by_file[uri] = self.bad_count_by_file.get(uri, 0) + 1
        listed = self.bad_by_file.setdefault(uri, [])
        if len(listed) < MAX_BAD_LISTED:
            listed.append({"line": line, "reason": reason})

    def counts(self) -> dict:
        """The counts so far (JSON-ready)."""
        return {
            "records": self.records, "documents": self.documents,
            "train_documents": self.train_documents, "val_documents": self.val_documents,
            "dropped_short": self.dropped_short, "duplicates": self.duplicates,
            "bad_records": self.bad_records, "chars": self.chars,
            "bad_by_file": {k: list(v) for k, v in self.bad_by_file.items()},
            "bad_count_by_file": dict(self.bad_count_by_file),
        }


def iter_documents(data, split: str = "train", corpus: Optional[Corpus] = None,
                   ledger: Optional[Ledger] = None) -> Iterator[str]:
    """The cleaned documents of one split, in corpus order, read in this process (no Ray).

    Used to sample tokenizer training text; the Ray pipeline yields the same documents."""
    corpus = corpus or resolve_corpus(data, split)
    ledger = ledger or Ledger.for_config(data, corpus, split)
    for block in read_blocks(corpus, range(len(corpus.sources)), limit=record_limit(data, split)):
        yield from ledger.add(block).column("text").to_pylist()


def record_limit(data, split: str) -> Optional[int]:
    """data.max_documents applies to the corpus of data.paths (not to a separate val corpus)."""
    return None if split == "val" and data.val_paths else data.max_documents
