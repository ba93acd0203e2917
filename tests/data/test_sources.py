"""Listing and reading corpus sources: formats, compression, globs, bad records (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmos_ray.config import DataConfig
from llmos_ray.data import list_sources, resolve_corpus
from llmos_ray.data.records import read_records
from llmos_ray.data.sources import Corpus, Source, expand_sources
from llmos_ray.errors import DataError
from tests.data.conftest import jsonl, sample_docs, write


def records(uri: str, fmt: str, **options) -> list[tuple]:
    corpus = Corpus([Source(uri, fmt)], **options)
    return list(read_records(corpus, corpus.sources[0]))


def texts(uri: str, fmt: str, **options) -> list[str]:
    return [t for _, t, _ in records(uri, fmt, **options)]


DOCS = sample_docs(5)


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".zst"])
def test_every_format_under_every_compression(tmp_path, suffix):
    table = pa.table({"body": DOCS})
    pq.write_table(table, tmp_path / "plain.parquet")
    files = {
        "txt_file": write(tmp_path / f"a.txt{suffix}", DOCS[0].encode()),
        "txt_line": write(tmp_path / f"b.txt{suffix}", ("\n".join(DOCS) + "\n").encode()),
        "jsonl": write(tmp_path / f"c.jsonl{suffix}", jsonl(DOCS, "body")),
        "json_array": write(tmp_path / f"d.json{suffix}", json.dumps([{"body": d} for d in DOCS]).encode()),
        "parquet": write(tmp_path / f"e.parquet{suffix}", (tmp_path / "plain.parquet").read_bytes()),
    }
    sources = expand_sources([str(tmp_path / f"*{suffix}" if suffix else tmp_path / "[a-e].*")])
    assert [s.format for s in sources] == ["txt", "txt", "jsonl", "json", "parquet"]
    uris = {name: s.uri for name, s in zip(files, sources)}
    assert texts(uris["txt_file"], "txt") == [DOCS[0]]
    assert texts(uris["txt_line"], "txt", txt_mode="line") == DOCS
    assert texts(uris["jsonl"], "jsonl", text_field="body") == DOCS
    assert texts(uris["json_array"], "json", text_field="body") == DOCS
    assert texts(uris["parquet"], "parquet", text_field="body") == DOCS


def test_json_extension_also_reads_json_lines(tmp_path):
    path = write(tmp_path / "lines.json", jsonl(DOCS))
    assert texts(list_sources([path])[0], "json") == DOCS


def test_globs_and_directories_expand_sorted_and_deduplicated(tmp_path):
    for name in ["b/2.jsonl", "b/1.txt", "a.jsonl.gz", "b/.hidden.txt", "b/_SUCCESS", "b/notes.md"]:
        write(tmp_path / name, b'{"text": "x"}\n')
    root = tmp_path.as_uri()  # file:///...
    listed = list_sources([str(tmp_path / "b"), str(tmp_path / "*.gz"), str(tmp_path / "b" / "1.txt")])
    assert listed == [f"{root}/b/1.txt", f"{root}/b/2.jsonl", f"{root}/a.jsonl.gz"]  # given order, each sorted
    assert list_sources([str(tmp_path)]) == [f"{root}/a.jsonl.gz", f"{root}/b/1.txt", f"{root}/b/2.jsonl"]
    assert list_sources([f"file://{tmp_path}/b/*.txt"]) == [f"{root}/b/1.txt"]


def test_listing_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no files match .*nothing-\\*"):
        list_sources([str(tmp_path / "nothing-*")])
    with pytest.raises(DataError, match="does not exist"):
        list_sources([str(tmp_path / "missing.txt")])
    write(tmp_path / "data.xml", b"<a/>\n")  # .csv is a format now (classification records)
    with pytest.raises(DataError, match="cannot infer the format of .*data.xml.*data.format"):
        list_sources([str(tmp_path / "data.xml")])
    assert list_sources([str(tmp_path / "data.xml")], "txt") == [f"{tmp_path.as_uri()}/data.xml"]
    with pytest.raises(DataError, match="no corpus files .* under"):
        list_sources([str(tmp_path)])
    with pytest.raises(DataError, match="data.format='xml'"):
        list_sources([str(tmp_path)], "xml")


def test_memory_filesystem(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/llmos-test/corpus/a.jsonl", jsonl(DOCS[:2]))
    fs.pipe("/llmos-test/corpus/b.txt", DOCS[2].encode())
    uris = list_sources(["memory://llmos-test/corpus"])
    assert uris == ["memory:///llmos-test/corpus/a.jsonl", "memory:///llmos-test/corpus/b.txt"]
    assert texts(uris[0], "jsonl") == DOCS[:2]


def test_bad_records_are_counted_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"text": "good one"}),
        '{"text": "truncated',                               # 2 malformed JSON
        "",                                                  # blank: not a record
        json.dumps({"body": "wrong field"}),                 # 4 missing field
        json.dumps({"text": 42}),                            # 5 not a string
        json.dumps(["not", "an", "object"]),                 # 6 not an object
        '{"text": "\\ud800 lone surrogate"}',               # 7 unpaired surrogate
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n'   # 8 invalid UTF-8
    data += json.dumps({"text": "good two"}).encode()
    uri = list_sources([write(tmp_path / "bad.jsonl", data)])[0]
    got = records(uri, "jsonl", max_bad_fraction=1.0)
    assert [(line, text) for line, text, _ in got if text is not None] == [(1, "good one"), (9, "good two")]
    bad = {line: reason for line, text, reason in got if text is None}
    assert sorted(bad) == [2, 4, 5, 6, 7, 8]
    assert "malformed JSON" in bad[2]
    assert "missing field 'text' (fields: body)" in bad[4]
    assert "int, not a string" in bad[5]
    assert "not a JSON object" in bad[6]
    assert "surrogate" in bad[7]
    assert "invalid UTF-8" in bad[8]


def test_undecodable_text_is_a_bad_record_at_its_line(tmp_path):
    uri = list_sources([write(tmp_path / "t.txt", b"fine\nstill fine\nbroken \xc3\x28 here\n")])[0]
    [(line, text, reason)] = records(uri, "txt", max_bad_fraction=1.0)
    assert (line, text) == (3, None) and "invalid UTF-8" in reason
    got = records(uri, "txt", txt_mode="line", max_bad_fraction=1.0)
    assert [(n, t) for n, t, _ in got] == [(1, "fine"), (2, "still fine"), (3, None)]


def test_too_many_bad_records_fail_naming_file_and_first_line(tmp_path):
    docs = [json.dumps({"text": d}) for d in sample_docs(10)]
    docs[3] = "{oops"
    docs[7] = "{again"
    uri = list_sources([write(tmp_path / "mostly.jsonl", "\n".join(docs).encode())])[0]
    with pytest.raises(DataError, match=r"mostly\.jsonl: 2 of 10 records are bad .* first at line 4: malformed JSON"):
        records(uri, "jsonl", max_bad_fraction=0.1)
    assert len(records(uri, "jsonl", max_bad_fraction=0.2)) == 10  # at the limit: allowed


def test_parquet_nulls_are_bad_rows_and_schema_errors_are_clear(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), tmp_path / "p.parquet", row_group_size=2)
    uri = list_sources([str(tmp_path / "p.parquet")])[0]
    got = records(uri, "parquet", max_bad_fraction=1.0)
    assert [(line, t) for line, t, _ in got] == [(1, "a"), (2, None), (3, "c")]
    with pytest.raises(DataError, match="no column 'body' \\(columns: text, n\\)"):
        records(uri, "parquet", text_field="body")
    with pytest.raises(DataError, match="column 'n' has type int64, not a string"):
        records(uri, "parquet", text_field="n")
    write(tmp_path / "junk.parquet", b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        records(list_sources([str(tmp_path / "junk.parquet")])[0], "parquet")


def test_truncated_compressed_file_fails_naming_it(tmp_path):
    import gzip

    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(sample_docs(200)))[:-40])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot read the file"):
        records(list_sources([str(path)])[0], "jsonl")


def test_saved_hugging_face_datasets_are_one_source_each(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS[:3]}).save_to_disk(str(tmp_path / "corpus" / "saved"))
    splits = {"train": datasets.Dataset.from_dict({"text": DOCS[3:]}),
              "test": datasets.Dataset.from_dict({"text": ["held out"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    write(tmp_path / "corpus" / "extra.jsonl", jsonl(["extra"]))
    sources = expand_sources([str(tmp_path / "corpus"), str(tmp_path / "dd")])
    assert [(s.uri.rsplit("/", 1)[-1], s.format) for s in sources] == [("extra.jsonl", "jsonl"), ("saved", "hf"),
                                                                        ("dd", "hf")]
    assert texts(sources[1].uri, "hf") == DOCS[:3]
    assert texts(sources[2].uri, "hf") == DOCS[3:]
    assert texts(sources[2].uri, "hf", hf_split="test") == ["held out"]
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\)"):
        texts(sources[2].uri, "hf", hf_split="validation")
    assert list_sources(["someone/some-dataset"], "hf") == ["hf://datasets/someone/some-dataset"]


def test_default_corpus_is_the_standard_library_in_a_stable_mixed_order():
    from llmos_ray.data.default_corpus import corpus_order_key, stdlib_root

    corpus = resolve_corpus(DataConfig())
    uris = [s.uri for s in corpus.sources]
    assert len(uris) > 300 and uris == sorted(uris, key=lambda u: corpus_order_key(u, stdlib_root()))
    assert uris != sorted(uris)  # mixed: not one package after another
    assert all(u.startswith("file://") and u.endswith(".py") for u in uris)
    assert not any(f"/{d}/" in u for u in uris for d in ("test", "tests", "idle_test", "site-packages"))
    assert corpus.txt_mode == "file" and {s.format for s in corpus.sources} == {"txt"}
    assert [s.uri for s in resolve_corpus(DataConfig()).sources] == uris


def test_storage_options_must_be_keyed_by_protocol():
    with pytest.raises(DataError, match="keyed by protocol.*'endpoint_url'"):
        resolve_corpus(DataConfig(paths=["s3://b/x.txt"], storage_options={"endpoint_url": "http://x"}))


def test_fine_tuning_records_are_read_by_the_corpus_readers(tmp_path, monkeypatch):
    """JSONL (zstd), a JSON array and parquet rows, from a file, a glob and memory://: parsed objects
    with file and line, and the reason for a line that does not parse. A single file keeps the name
    it was given (the held-out split's key), a glob's files their paths."""
    import fsspec

    from llmos_ray.data.sft import read_sft_records

    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    (tmp_path / "sft").mkdir()
    lines = [json.dumps(chat[0]), json.dumps(chat[1]), "{broken", "[1, 2]"]
    write(tmp_path / "chat.jsonl.zst", "".join(f"{line}\n" for line in lines).encode())
    write(tmp_path / "sft" / "list.json", json.dumps([{"prompt": "p", "completion": "c"}]).encode())
    pq.write_table(pa.table({"instruction": ["i1", "i2"], "output": ["o1", "o2"], "n": [1, 2]}),
                   tmp_path / "sft" / "rows.parquet", row_group_size=1)
    fsspec.filesystem("memory").pipe("/llmos-sft/one.jsonl", (json.dumps(chat[2]) + "\n").encode())
    monkeypatch.chdir(tmp_path)

    got = list(read_sft_records(["chat.jsonl.zst", str(tmp_path / "sft" / "*"), "memory://llmos-sft/one.jsonl"]))
    lines = [(name.rsplit("/", 1)[-1] if name.startswith("/") else name, line) for name, line, _ in got]
    assert lines == [("chat.jsonl.zst", 1), ("chat.jsonl.zst", 2), ("chat.jsonl.zst", 3),
                     ("chat.jsonl.zst", 4), ("list.json", 1), ("rows.parquet", 1), ("rows.parquet", 2),
                     ("memory://llmos-sft/one.jsonl", 1)]
    records = [r for _, _, r in got]
    assert records[:2] == chat[:2] and records[4] == {"prompt": "p", "completion": "c"} and records[7] == chat[2]
    assert isinstance(records[2], ValueError) and "malformed JSON" in str(records[2]) and records[3] == [1, 2]
    assert records[5:7] == [{"instruction": f"i{i}", "output": f"o{i}", "n": i} for i in (1, 2)]
    assert got[4][0] == str(tmp_path / "sft" / "list.json")  # a glob's files: their paths, without file://

    with pytest.raises(DataError, match="finetune.paths: .*missing.jsonl.* does not exist"):
        list(read_sft_records([str(tmp_path / "missing.jsonl")]))
    write(tmp_path / "notes.txt", b"plain text")
    with pytest.raises(DataError, match="notes.txt is txt; fine-tuning records are JSONL, JSON, parquet or CSV"):
        list(read_sft_records([str(tmp_path / "notes.txt")]))
