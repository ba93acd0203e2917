"""Labelled records for classification: CSV/JSONL reading with bad records counted by file and line,
label names, the tokenizer's framing, encoded arrays, class weights, the embedded default set."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from llmos_ray.data.classification import (
    class_weights,
    encode_examples,
    frame_for_classification,
    label_names,
    labelled_records,
)
from llmos_ray.data.sft import read_sft_records
from llmos_ray.errors import DataError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from llmos_ray.data.tokenizer import load_tokenizer

    t = load_tokenizer(tiny_tokenizer_dir)
    frame_for_classification(t)
    return t


def test_csv_records_keep_quoted_newlines_and_count_bad_rows_by_line(tmp_path):
    path = tmp_path / "tickets.csv.gz"
    raw = (b'text,label\n"Printer, on fire\nsend help",urgent\nfine thanks,ok\n'
           b'too,many,fields\n\xff\xfe broken,ok\n\nlast one,ok\n')
    path.write_bytes(gzip.compress(raw))
    got = list(read_sft_records([str(path)]))
    assert [line for _, line, _ in got] == [2, 4, 5, 6, 8]  # a record's first line; the blank line 7 holds none
    assert got[0][2] == {"text": "Printer, on fire\nsend help", "label": "urgent"}
    assert str(got[2][2]) == "3 fields, the header has 2" and str(got[3][2]) == "invalid UTF-8"
    assert got[4][2] == {"text": "last one", "label": "ok"}


def test_bad_records_are_counted_with_file_and_line(tok):
    recs = [("a.jsonl", 1, {"text": "bonjour", "label": "fr"}), ("a.jsonl", 2, {"text": "hello", "label": "en"}),
            ("a.jsonl", 3, {"text": "", "label": "en"}), ("a.jsonl", 4, {"text": 7, "label": "en"}),
            ("a.jsonl", 5, {"text": "no label"}), ("b.jsonl", 1, ValueError("malformed JSON")),
            ("b.jsonl", 2, {"text": "hallo", "label": "de"}), ("b.jsonl", 3, {"text": "ok", "label": ["en"]})]
    labels = label_names(recs[:2])
    ex = encode_examples(recs, tok, labels, seq_len=64)
    c = ex.counts
    assert (c["records"], c["examples"], c["bad_records"]) == (8, 2, 6)
    assert [(b["line"], b["reason"]) for b in c["bad_by_file"]["a.jsonl"]] == [
        (3, "empty 'text'"), (4, "'text' is int, not a string"), (5, "missing 'label'")]
    assert [b["reason"] for b in c["bad_by_file"]["b.jsonl"]] == [
        "malformed JSON", "label 'de' is not one the model was trained on (en, fr)",
        "label ['en'] is list, not a string or an int"]
    assert list(ex.array["labels"]) == [1, 0] and c["per_label"] == {"en": 1, "fr": 1}
    with pytest.raises(DataError, match="a.jsonl: 3 of 5 records are bad.*first at line 3"):
        encode_examples(recs, tok, labels, seq_len=64, max_bad_fraction=0.5)


def test_framing_is_the_tokenizers_own_and_survives_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    pair = tok("a b", "c d")["input_ids"]
    assert pair.count(tok.eos_token_id) == 3  # <bos> a <eos> b <eos>, bos == eos in our tokenizer
    tok.save_pretrained(tmp_path / "t")
    assert AutoTokenizer.from_pretrained(tmp_path / "t")("hello world")["input_ids"] == ids


def test_int_labels_sort_numerically_multi_label_and_truncation(tok):
    recs = [("f", i, {"text": "word " * n, "label": lab}) for i, (n, lab) in enumerate([(3, 10), (2, 2), (90, 1)])]
    assert label_names(recs) == ["1", "2", "10"]
    ex = encode_examples(recs, tok, label_names(recs), seq_len=16)
    assert ex.counts["truncated"] == 1 and ex.array["input_ids"].shape == (3, 16)
    assert ex.array["attention_mask"][2].sum() == 16 and ex.array["input_ids"][2, -1] == tok.eos_token_id
    multi = [("f", 1, {"text": "a", "labels": ["x", "y"]}), ("f", 2, {"text": "b", "labels": "y"})]
    mx = encode_examples(multi, tok, label_names(multi, True), seq_len=8, multi_label=True)
    assert mx.array["labels"].tolist() == [[1.0, 1.0], [0.0, 1.0]]


def test_balanced_class_weights_are_scikit_learns():
    assert class_weights({"a": 30, "b": 10}, ["a", "b"]) == pytest.approx([40 / 60, 40 / 20])
    assert class_weights({"x": 1, "y": 3}, ["x", "y"], multi_label=True, examples=4) == [3.0, pytest.approx(1 / 3)]


def test_embedded_language_id_set_falls_back_to_the_shipped_sample(tmp_path):
    from llmos_ray.config import load_config

    cfg = load_config(None, ["finetune.task=classification", f"finetune.locale_root={tmp_path}"]).resolved("finetune")
    assert cfg.model.family == "bert" and cfg.run.name == "classification"
    assert load_config(None, []).resolved("finetune").model.family == "gpt2"
    splits = labelled_records(cfg)
    labels = label_names(splits.train)
    assert labels == sorted(cfg.finetune.languages) and len(splits.train) == 45 * 8 and len(splits.val) == 5 * 8
    assert not {r["text"] for _, _, r in splits.train} & {r["text"] for _, _, r in splits.val}
    assert splits.source["source"].startswith("sample:") and splits.source["records"]["train"] == 360
    by_label = np.unique([r["label"] for _, _, r in splits.train], return_counts=True)[1]
    assert set(by_label.tolist()) == {45}  # balanced


def test_user_files_split_by_file_and_line(tmp_path):
    from llmos_ray.config import load_config

    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(200)))
    cfg = load_config(None, ["finetune.task=classification", f"finetune.paths=[{path}]", "data.val_fraction=0.2"])
    splits = labelled_records(cfg.resolved("finetune"))
    assert len(splits.train) + len(splits.val) == 200 and 20 < len(splits.val) < 60
    assert labelled_records(cfg.resolved("finetune")).val == splits.val  # the same split every time
