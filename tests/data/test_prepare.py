"""`llmos data prepare` end to end: tokenizer, packed parquet splits, stats.json with exact counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from llmos_ray.data import load_tokenizer, prepare
from llmos_ray.data.default_corpus import sample_path
from llmos_ray.data.documents import is_held_out
from tests.data.conftest import jsonl, sample_docs, token_stream, write


def packed(directory: str) -> np.ndarray:
    parts = sorted(os.listdir(directory))
    assert parts and all(p.startswith("part-") and p.endswith(".parquet") for p in parts)
    rows = [r for p in parts for r in pq.read_table(os.path.join(directory, p)).column("input_ids").to_pylist()]
    return np.array([t for r in rows for t in r], dtype=np.int32)


@pytest.mark.slow  # the CLI starts its own Ray in a subprocess
def test_cli_prepare_writes_tokenizer_splits_and_exact_stats(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(sample_path(), corpus / "a-sample.jsonl")  # 36 documents, first in corpus order
    with open(sample_path()) as f:
        sample = [json.loads(line)["text"] for line in f]
    new = [f"An extra document number {i} about nothing in particular." for i in range(6)]
    extra = jsonl(new[:3]).decode().splitlines() + [
        json.dumps({"text": "hi"}),          # line 4: too short
        json.dumps({"text": sample[0]}),     # line 5: duplicate
        '{"text": "cut',                     # line 6: malformed
    ] + jsonl(new[3:]).decode().splitlines()
    write(corpus / "b-extra.jsonl", ("\n".join(extra) + "\n").encode())
    out = tmp_path / "run"
    args = [f"run.output_dir={out}", "run.name=prepare-cli", f"data.paths=['{corpus}']", "data.dedup=true",
            "data.vocab_size=300", "data.seq_len=31", "data.batch_docs=8", "data.val_fraction=0.1",
            "data.max_bad_fraction=0.2"]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "llmos_ray.cli", "data", "prepare", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"llmos pretrain --config {out}/config.yaml" in proc.stdout

    stats = json.loads((out / "stats.json").read_text())
    docs = sample + new
    val = [d for d in docs if is_held_out(d, 0.1)]
    train = [d for d in docs if not is_held_out(d, 0.1)]
    assert {k: stats[k] for k in ("records", "documents", "dropped_short", "duplicates", "bad_records")} == \
        {"records": 45, "documents": 42, "dropped_short": 1, "duplicates": 1, "bad_records": 1}
    assert (stats["train_documents"], stats["val_documents"]) == (len(train), len(val)) and val
    uri = (corpus / "b-extra.jsonl").as_uri()
    assert stats["bad_count_by_file"] == {uri: 1}
    assert stats["bad_by_file"][uri][0]["line"] == 6 and "malformed JSON" in stats["bad_by_file"][uri][0]["reason"]
    assert stats["seconds"] > 0 and stats["block_len"] == 32

    tok = load_tokenizer(str(out / "tokenizer"))
    assert stats["vocab_size"] == len(tok) <= 300
    train_tokens = packed(str(out / "data" / "train"))
    np.testing.assert_array_equal(train_tokens, token_stream(tok, [d for d in docs if d in set(train)]))
    assert stats["tokens"] == len(train_tokens) and stats["blocks"] == len(train_tokens) // 32
    val_tokens = packed(str(out / "data" / "val"))
    np.testing.assert_array_equal(val_tokens, token_stream(tok, val)[:len(val_tokens)])
    assert stats["val_tokens"] == len(val_tokens) > 0
    assert "dedup: true" in (out / "config.yaml").read_text()


@pytest.mark.usefixtures("ray_session")
def test_prepare_with_a_separate_validation_corpus(make_cfg, tiny_tokenizer, tmp_path):
    train_docs, val_docs = sample_docs(30), [f"Validation text {i}: {d}" for i, d in enumerate(sample_docs(5))]
    cfg = make_cfg(paths=[write(tmp_path / "t.jsonl.zst", jsonl(train_docs))],
                   val_paths=[write(tmp_path / "v.txt", "\n".join(val_docs + ["bad \xff"]).encode("latin-1"))],
                   txt_mode="line", val_fraction=0.5, max_bad_fraction=0.2)
    stats = prepare(cfg)
    assert (stats["train_documents"], stats["val_documents"], stats["bad_records"]) == (30, 5, 1)
    assert stats["records"] == 36 and list(stats["bad_count_by_file"]) == [(tmp_path / "v.txt").as_uri()]
    out = cfg.run.output_dir
    np.testing.assert_array_equal(packed(f"{out}/data/train"), token_stream(tiny_tokenizer, train_docs))
    np.testing.assert_array_equal(packed(f"{out}/data/val"), token_stream(tiny_tokenizer, val_docs))
    assert os.path.exists(f"{out}/config.yaml") and stats["tokenizer"] == cfg.data.tokenizer
