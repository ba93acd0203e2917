"""get_tokenizer: train on the run's training documents, save, reuse; loads with AutoTokenizer."""

from __future__ import annotations

import json
import os

import pytest

from llmos_ray.data import get_tokenizer, iter_documents, tokenizer_dir
from llmos_ray.data import tokenizer as tokenizer_module
from tests.data.conftest import jsonl, sample_docs, write


def test_trains_on_train_documents_saves_and_reuses(make_cfg, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    path = write(tmp_path / "c.jsonl", jsonl(sample_docs(120)))
    cfg = make_cfg(paths=[path], tokenizer=None, vocab_size=300, val_fraction=0.2, tokenizer_sample_bytes=4000)
    seen = []
    train = tokenizer_module.train_tokenizer

    def recording(texts, *args, **kwargs):
        return train((seen.append(t) or t for t in texts), *args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", recording)
    tok = get_tokenizer(cfg)
    out = tokenizer_dir(cfg)
    assert out == os.path.join(cfg.run.output_dir, "tokenizer") and os.path.isdir(out)
    # The first ~4000 bytes of training documents, in corpus order, whole documents (no val ones).
    train_docs = list(iter_documents(cfg.data, "train"))
    assert seen == train_docs[:len(seen)] and len(seen) < len(train_docs)
    assert sum(len(d.encode()) for d in seen[:-1]) < 4000 <= sum(len(d.encode()) for d in seen)
    with open(os.path.join(out, tokenizer_module.TRAINING_FILE)) as f:
        assert json.load(f)["sample_documents"] == len(seen)

    hf = AutoTokenizer.from_pretrained(out)
    text = "The river froze early that winter. Ünïcödé and tabs\tsurvive a round trip."
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token is not None and len(hf) == len(tok)

    # A resumed run loads the saved tokenizer instead of training again.
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    again = get_tokenizer(cfg)
    assert again.get_vocab() == tok.get_vocab()


def test_configured_tokenizer_is_loaded(make_cfg, tiny_tokenizer_dir):
    tok = get_tokenizer(make_cfg(tokenizer=tiny_tokenizer_dir))
    assert len(tok) == 512 and not os.path.exists(tokenizer_dir(make_cfg()))
