"""The ledger (counting, dedup, split), the batcher and in-process document reading: no Ray."""

from __future__ import annotations

import pyarrow as pa

from llmos_ray.config import DataConfig
from llmos_ray.data import iter_documents
from llmos_ray.data.corpus import resolve_corpus
from llmos_ray.data.documents import Ledger, is_held_out, read_blocks, text_key
from llmos_ray.data.pipeline import Batcher, read_units
from llmos_ray.data.sources import Corpus, Source
from tests.data.conftest import jsonl, sample_docs, write


def test_text_key_is_stable_across_processes():
    # Golden value: BLAKE2b-128 of the UTF-8 text (hashlib), not Python's salted hash().
    assert text_key("hello world").hex() == "e9a804b2e527fd3601d2ffc0bb023cd6"
    fraction = 0.3
    held = [is_held_out(d, fraction) for d in sample_docs(400)]
    assert 0.2 < sum(held) / len(held) < 0.4


def corpus_of(tmp_path, lines: list[bytes]) -> Corpus:
    path = write(tmp_path / "c.jsonl", b"\n".join(lines) + b"\n")
    return resolve_corpus(DataConfig(paths=[path], max_bad_fraction=1.0))


def test_every_record_is_accounted_once(tmp_path):
    docs = sample_docs(30)
    extra = [b'{"text": "tiny"}', b'{"text": "   "}', b"{broken", jsonl(docs[:2]).splitlines()[0]]
    lines = jsonl(docs).splitlines() + extra
    corpus = corpus_of(tmp_path, lines)
    ledger = Ledger([s.uri for s in corpus.sources], "train", min_chars=16, dedup=True, val_fraction=0.2)
    kept = []
    for block in read_blocks(corpus, [0], block_rows=7):
        kept += ledger.add(block).column("text").to_pylist()
    c = ledger.counts()
    assert c["records"] == 34
    assert (c["documents"], c["dropped_short"], c["bad_records"], c["duplicates"]) == (30, 2, 1, 1)
    assert c["records"] == c["documents"] + c["dropped_short"] + c["duplicates"] + c["bad_records"]
    assert c["documents"] == c["train_documents"] + c["val_documents"] and c["val_documents"] > 0
    assert kept == [d for d in docs if not is_held_out(d, 0.2)]
    [uri] = c["bad_by_file"]
    assert c["bad_by_file"][uri][0]["line"] == 33 and c["bad_count_by_file"] == {uri: 1}


def test_train_and_val_split_the_documents_without_overlap(tmp_path):
    docs = sample_docs(60)
    data = DataConfig(paths=[write(tmp_path / "c.jsonl", jsonl(docs))], val_fraction=0.25)
    train, val = list(iter_documents(data, "train")), list(iter_documents(data, "val"))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert val == [d for d in docs if is_held_out(d, 0.25)]
    # With a separate validation corpus nothing is held out of the training paths.
    data.val_paths = [write(tmp_path / "v.jsonl", jsonl(["a separate validation document"]))]
    assert list(iter_documents(data, "train")) == docs
    assert list(iter_documents(data, "val")) == ["a separate validation document"]


def test_max_documents_caps_records_read_in_corpus_order(tmp_path):
    docs = sample_docs(20)
    lines = jsonl(docs[:5]).splitlines() + [b'{"text": "short"}'] + jsonl(docs[5:]).splitlines()
    data = DataConfig(paths=[write(tmp_path / "c.jsonl", b"\n".join(lines))], max_documents=10, val_fraction=0)
    assert list(iter_documents(data)) == docs[:9]  # 10 records read, one of them too short


def test_batcher_cuts_whole_batches_and_flushes_the_rest():
    b = Batcher(3)
    out = []
    for n in [2, 0, 5, 1]:
        b.push(pa.table({"text": [f"{n}-{i}" for i in range(n)]}))
        out += b.pop().column("texts").to_pylist()
    out += b.pop(final=True).column("texts").to_pylist()
    assert out == [["2-0", "2-1", "5-0"], ["5-1", "5-2", "5-3"], ["5-4", "1-0"]]
    assert b.pop(final=True).num_rows == 0


def test_read_units_group_small_files_in_order():
    sources = [Source(f"file:///f{i}", "txt", size=1_500_000) for i in range(10)]
    units = read_units(sources)
    assert [i for u in units for i in u] == list(range(10))
    assert [len(u) for u in units] == [3, 3, 3, 1]  # 4 MB minimum per unit
