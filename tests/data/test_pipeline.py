"""The Ray Data pipeline end to end on CPU: exact packing, determinism, shards, accounting, storage."""

from __future__ import annotations

import gzip
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from llmos_ray.data import corpus_stats, documents_dataset, iter_blocks, iter_documents, packed_dataset
from llmos_ray.errors import DataError, reraise_ours
from tests.data.conftest import jsonl, rows, sample_docs, token_stream, write

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def corpus_dir(tmp_path):
    """Mixed formats in one directory: 3 jsonl.gz + a txt + a parquet, 70 documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = sample_docs(70)
    for i in range(3):
        write(tmp_path / "corpus" / f"part-{i}.jsonl.gz", jsonl(docs[i * 20:(i + 1) * 20]))
    write(tmp_path / "corpus" / "single.txt", docs[60].encode())
    pq.write_table(pa.table({"text": docs[61:]}), tmp_path / "corpus" / "rest.parquet")
    return tmp_path / "corpus"


def test_packed_rows_are_exactly_the_tokenized_documents(make_cfg, tiny_tokenizer, corpus_dir):
    cfg = make_cfg(paths=[str(corpus_dir)])
    docs = list(iter_documents(cfg.data))
    assert len(docs) == 70
    got = rows(packed_dataset(cfg, tiny_tokenizer, "train"))
    block_len = cfg.data.seq_len + 1
    assert all(r.dtype == np.int32 for r in got)
    # Every row is a full block except at most one tail per batch of data.batch_docs documents.
    batches = -(-len(docs) // cfg.data.batch_docs)
    assert sum(len(r) < block_len for r in got) <= batches and all(len(r) <= block_len for r in got)
    np.testing.assert_array_equal(np.concatenate(got), token_stream(tiny_tokenizer, docs))
    stats = corpus_stats(cfg, "train")
    assert (stats["records"], stats["documents"], stats["bad_records"]) == (70, 70, 0)
    # The documents dataset yields the same cleaned documents.
    assert [r["text"] for r in documents_dataset(cfg).iter_rows()] == docs


def test_stream_is_deterministic_whatever_the_read_tasks(make_cfg, tiny_tokenizer, corpus_dir, monkeypatch):
    import llmos_ray.data.pipeline as pipeline

    cfg = make_cfg(paths=[str(corpus_dir)], batch_docs=16)
    first = rows(packed_dataset(cfg, tiny_tokenizer))
    monkeypatch.setattr(pipeline, "READ_UNIT_BYTES", (1, 1))  # one read task per file instead of one in all
    assert len(pipeline.read_units(pipeline.resolve_corpus(cfg.data).sources)) == 5
    second = rows(packed_dataset(cfg, tiny_tokenizer))
    assert len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))


def test_streaming_shards_are_disjoint_and_cover_the_stream(make_cfg, tiny_tokenizer, corpus_dir, monkeypatch):
    import llmos_ray.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "READ_UNIT_BYTES", (1, 1))  # one read task per file: several blocks
    cfg = make_cfg(paths=[str(corpus_dir)])
    block_len = cfg.data.seq_len + 1
    ds = packed_dataset(cfg, tiny_tokenizer)
    everything = rows(ds)
    shards = ds.streaming_split(2, equal=False)
    seen: list[list] = [[], []]
    blocks: list[list] = [[], []]
    leftovers = [0, 0]

    def consume(i):  # what each training worker does with its shard
        def recorded(batches):
            for batch in batches:
                seen[i] += [r.tolist() for r in batch["input_ids"]]
                time.sleep(0.05)  # a slow consumer: the other shard gets blocks meanwhile
                yield batch

        stream = iter_blocks(recorded(shards[i].iter_batches(batch_format="numpy", batch_size=8)), block_len)
        blocks[i] = list(stream)
        leftovers[i] = stream.leftover

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == sorted(r.tolist() for r in everything)  # disjoint and covering
    for i in range(2):
        assert len(blocks[i]) * block_len + leftovers[i] == sum(map(len, seen[i])) and leftovers[i] < block_len


def test_bad_line_in_gzip_jsonl_with_another_field_loses_no_good_document(make_cfg, tiny_tokenizer, tmp_path):
    # The "done when": a gzip JSONL with a different text field and one corrupted line.
    docs = sample_docs(150)
    lines = [json.dumps({"content": d}) for d in docs]
    lines.insert(77, '{"content": "a corrupted line cut in the midd')
    path = tmp_path / "web.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    cfg = make_cfg(paths=[str(path)], text_field="content")
    got = rows(packed_dataset(cfg, tiny_tokenizer))
    np.testing.assert_array_equal(np.concatenate(got), token_stream(tiny_tokenizer, docs))
    stats = corpus_stats(cfg, "train")
    uri = path.as_uri()
    assert (stats["records"], stats["documents"], stats["bad_records"]) == (151, 150, 1)
    assert stats["bad_count_by_file"] == {uri: 1}
    [bad] = stats["bad_by_file"][uri]
    assert bad["line"] == 78 and bad["reason"].startswith("malformed JSON")


def test_too_many_bad_records_fail_the_job_naming_file_and_line(make_cfg, tiny_tokenizer, tmp_path):
    lines = [json.dumps({"text": d}) for d in sample_docs(20)]
    lines[4] = json.dumps({"txt": "wrong field"})
    write(tmp_path / "c" / "a.jsonl", jsonl(sample_docs(30)))
    write(tmp_path / "c" / "b.jsonl", "\n".join(lines).encode())
    cfg = make_cfg(paths=[str(tmp_path / "c")], max_bad_fraction=0.01)
    with pytest.raises(DataError, match=r"b\.jsonl: 1 of 20 records are bad .*first at line 5: missing field 'text'"):
        with reraise_ours():
            rows(packed_dataset(cfg, tiny_tokenizer))


def test_cleaning_dedup_cap_and_validation_split(make_cfg, tiny_tokenizer, tmp_path):
    docs = sample_docs(80)
    extra = [json.dumps({"text": "too short"}), json.dumps({"text": docs[3]}), ""]
    write(tmp_path / "c.jsonl", jsonl(docs[:40]) + "\n".join(extra).encode() + b"\n" + jsonl(docs[40:]))
    cfg = make_cfg(paths=[str(tmp_path / "c.jsonl")], dedup=True, val_fraction=0.2, max_documents=60,
                   val_max_blocks=3)
    train = rows(packed_dataset(cfg, tiny_tokenizer, "train"))
    val = rows(packed_dataset(cfg, tiny_tokenizer, "val"))
    kept = docs[:58]  # 60 records read: 40 docs, a short one, a duplicate, 18 more docs
    train_docs, val_docs = list(iter_documents(cfg.data, "train")), list(iter_documents(cfg.data, "val"))
    assert sorted(train_docs + val_docs) == sorted(kept) and val_docs and not set(train_docs) & set(val_docs)
    np.testing.assert_array_equal(np.concatenate(train), token_stream(tiny_tokenizer, train_docs))
    assert 0 < len(val) <= 3
    np.testing.assert_array_equal(np.concatenate(val), token_stream(tiny_tokenizer, val_docs)[:sum(map(len, val))])
    stats = corpus_stats(cfg, "train")
    assert {k: stats[k] for k in ("records", "documents", "dropped_short", "duplicates", "bad_records")} == \
        {"records": 60, "documents": 58, "dropped_short": 1, "duplicates": 1, "bad_records": 0}
    assert (stats["train_documents"], stats["val_documents"]) == (len(train_docs), len(val_docs))

    # Both splits in one pass (what `llmos data prepare` streams): each split's rows are exactly its own
    # pipeline's, boundaries included (validation uncapped: the consumer caps it); the same counts.
    both = [b for b in packed_dataset(cfg, tiny_tokenizer, "both").iter_batches(batch_format="numpy", batch_size=None)]
    split_rows = [[r.tolist() for b in both for r, s in zip(b["input_ids"], b["split"]) if s == code]
                  for code in (0, 1)]
    assert split_rows[0] == [r.tolist() for r in train]
    assert split_rows[1][:len(val)] == [r.tolist() for r in val] and len(split_rows[1]) >= len(val)
    np.testing.assert_array_equal(np.concatenate(split_rows[1]), token_stream(tiny_tokenizer, val_docs))
    assert corpus_stats(cfg, "both") == stats


def test_both_splits_in_one_pass_need_a_held_out_share(make_cfg, tiny_tokenizer, tmp_path):
    cfg = make_cfg(paths=[write(tmp_path / "t.jsonl", jsonl(sample_docs(4)))],
                   val_paths=[write(tmp_path / "v.jsonl", jsonl(sample_docs(2)))])
    with pytest.raises(DataError, match="one pass only when data.val_fraction"):
        packed_dataset(cfg, tiny_tokenizer, "both")


def test_memory_filesystem_through_ray(make_cfg, tiny_tokenizer):
    import fsspec

    docs = sample_docs(12)
    fsspec.filesystem("memory").pipe("/llmos-pipeline/a.jsonl", jsonl(docs))
    cfg = make_cfg(paths=["memory://llmos-pipeline/*.jsonl"])
    np.testing.assert_array_equal(np.concatenate(rows(packed_dataset(cfg, tiny_tokenizer))),
                                  token_stream(tiny_tokenizer, docs))


@pytest.fixture
def s3_endpoint():
    """A local S3 (moto) with bucket 'corpus'; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="corpus")
    yield url
    server.stop()


def test_s3_corpus_through_a_configured_endpoint(make_cfg, tiny_tokenizer, s3_endpoint, tmp_path):
    import fsspec

    docs = sample_docs(30)
    options = {"s3": {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing",
                      "client_kwargs": {"region_name": "us-east-1"}}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options["s3"])
    fs.pipe("corpus/web/a.jsonl.gz", gzip.compress(jsonl(docs[:20])))
    fs.pipe("corpus/web/b.txt", docs[20].encode())
    fs.pipe("corpus/web/c.jsonl", jsonl(docs[21:]))
    cfg = make_cfg(paths=["s3://corpus/web/"], storage_options=options)
    np.testing.assert_array_equal(np.concatenate(rows(packed_dataset(cfg, tiny_tokenizer))),
                                  token_stream(tiny_tokenizer, docs))
    assert corpus_stats(cfg)["documents"] == 30


def test_default_corpus_streams_the_standard_library(make_cfg, tiny_tokenizer):
    cfg = make_cfg(max_documents=12, seq_len=127)
    got = rows(packed_dataset(cfg, tiny_tokenizer))
    docs = list(iter_documents(cfg.data))
    assert docs[0].startswith('"""') or docs[0]  # real source files, one document each
    np.testing.assert_array_equal(np.concatenate(got), token_stream(tiny_tokenizer, docs))
    assert corpus_stats(cfg)["records"] == 12


def test_no_validation_split_is_a_clear_error(make_cfg, tiny_tokenizer):
    with pytest.raises(DataError, match="no validation split"):
        packed_dataset(make_cfg(val_fraction=0.0), tiny_tokenizer, "val")


def test_counts_outlive_the_dataset_and_later_pipelines_reuse_the_board(make_cfg, tiny_tokenizer, tmp_path):
    import gc

    cfg = make_cfg(paths=[write(tmp_path / "c.jsonl", jsonl(sample_docs(10)))])
    ds = packed_dataset(cfg, tiny_tokenizer)
    rows(ds)
    del ds
    gc.collect()
    time.sleep(1)  # a board owned only by the dataset would be gone by now
    assert corpus_stats(cfg)["documents"] == 10
    assert len(rows(packed_dataset(cfg, tiny_tokenizer))) > 0 and corpus_stats(cfg)["documents"] == 10


def test_mixture_interleaves_by_weight_the_same_whatever_the_read_tasks(make_cfg, tiny_tokenizer, tmp_path,
                                                                         monkeypatch):
    """data.mix through Ray Data: each component read by its own tasks, the ledger interleaves the
    documents by weight (2:1:1) exactly as the in-process Interleaver does, with one read task per
    file too; the stats hold the realized shares; the packed rows are those documents, in order."""
    import llmos_ray.data.pipeline as pipeline
    from llmos_ray.data.mix import Interleaver

    docs = sample_docs(300)
    parts = {"a": docs[:150], "b": docs[150:220], "c": docs[220:]}
    write(tmp_path / "a" / "1.jsonl", jsonl(parts["a"][:90]))
    write(tmp_path / "a" / "2.jsonl.gz", jsonl(parts["a"][90:]))
    write(tmp_path / "b.jsonl", jsonl(parts["b"]))
    write(tmp_path / "c" / "1.jsonl", jsonl(parts["c"][:30]))
    write(tmp_path / "c" / "2.jsonl", jsonl(parts["c"][30:]))
    mix = [{"name": "a", "paths": [str(tmp_path / "a")], "weight": 2},
           {"name": "b", "paths": [str(tmp_path / "b.jsonl")], "weight": 1},
           {"name": "c", "paths": [str(tmp_path / "c")], "weight": 1}]
    mixer = Interleaver(list(parts), [2, 1, 1])
    want = []
    for c, name in enumerate(parts):
        want += mixer.push(c, pa.array(parts[name])).to_pylist()
    for c in range(3):
        want += mixer.close(c).to_pylist()
    planned = mixer.counts()
    assert planned["b"]["exhausted"] and planned["b"]["documents"] == 70  # b runs out first: the pass ends there
    assert 275 <= len(want) <= 285

    cfg = make_cfg(mix=mix)
    assert [r["text"] for r in documents_dataset(cfg).iter_rows()] == want
    stats = corpus_stats(cfg, "train")
    assert stats["records"] == 300 and stats["mixed_documents"] == len(want)
    assert stats["mix"] == planned and stats["mix"]["a"]["share"] == pytest.approx(0.5, abs=0.01)
    monkeypatch.setattr(pipeline, "READ_UNIT_BYTES", (1, 1))  # one read task per file
    assert len(pipeline.mix_units(pipeline.resolve_corpus(cfg.data))[0]) == 5
    np.testing.assert_array_equal(np.concatenate(rows(packed_dataset(cfg, tiny_tokenizer))),
                                  token_stream(tiny_tokenizer, want))
