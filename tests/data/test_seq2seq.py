"""Source → target pairs for seq2seq fine-tuning: the three record shapes, the tokenizer's EOS
framing, separate source/target bounds with truncation counted, bad records by file and line,
the held-out split by source, and the Seq2SeqLM task's loss against transformers' own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmos_ray.config import load_config
from llmos_ray.data.seq2seq import IGNORE, encode_pairs, frame_for_seq2seq, pair_of, pair_records
from llmos_ray.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from llmos_ray.data.tokenizer import load_tokenizer

    t = load_tokenizer(tiny_tokenizer_dir)
    frame_for_seq2seq(t)
    return t


def test_pair_of_reads_the_three_shapes_and_names_what_is_wrong():
    assert pair_of({"source": "Open", "target": "Ouvrir"}) == ("Open", "Ouvrir")
    assert pair_of({"translation": {"en": "Open", "fr": "Ouvrir", "de": "Öffnen"}}, "en", "de") == ("Open", "Öffnen")
    assert pair_of({"text": "a long text", "summary": "short"}) == ("a long text", "short")
    with pytest.raises(ValueError, match="'translation' has no 'fr'.*target_lang"):
        pair_of({"translation": {"en": "Open", "de": "Öffnen"}})
    with pytest.raises(ValueError, match="empty 'target'"):
        pair_of({"source": "Open", "target": "  "})
    with pytest.raises(ValueError, match="'summary' is int"):
        pair_of({"text": "x", "summary": 3})
    with pytest.raises(ValueError, match="no 'source'/'target'"):
        pair_of({"prompt": "x"})


def test_tokenizer_ends_every_text_with_eos_and_keeps_it_through_save(tok, tmp_path):
    from transformers import AutoTokenizer

    ids = tok("Open the file")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("Open the file")["input_ids"] == ids
    frame_for_seq2seq(again)  # already framed: left alone (no second EOS)
    assert again("Open the file")["input_ids"] == ids


def test_pairs_are_bounded_per_side_truncation_counted_bad_records_listed(tok):
    records = [("a.jsonl", 1, {"source": "short", "target": "court"}),
               ("a.jsonl", 2, {"source": "def main(): return open(path).read() " * 4, "target": "x"}),
               ("a.jsonl", 3, {"source": "y", "target": "import os, sys, json; print(sys.argv) " * 4}),
               ("a.jsonl", 4, ValueError("invalid JSON")),
               ("b.jsonl", 1, {"source": "only a source"})]
    src_bound, tgt_bound = 12, 10
    pairs = encode_pairs(records, tok, src_bound, tgt_bound, prefix="translate: ")
    c = pairs.counts
    assert (c["records"], c["examples"], c["bad_records"]) == (5, 3, 2)
    assert c["bad_by_file"] == {"a.jsonl": [{"line": 4, "reason": "invalid JSON"}],
                                "b.jsonl": [{"line": 1, "reason": "missing 'target'"}]}
    full_src = [len(tok("translate: " + r[2]["source"])["input_ids"]) for r in records[:3]]
    full_tgt = [len(tok(r[2]["target"])["input_ids"]) for r in records[:3]]
    assert c["truncated_source"] == sum(n > src_bound for n in full_src) == 1
    assert c["truncated_target"] == sum(n > tgt_bound for n in full_tgt) == 1
    a = pairs.array
    assert a["input_ids"].shape[1] == src_bound and a["labels"].shape[1] == tgt_bound
    for row, (ns, nt) in enumerate(zip(full_src, full_tgt)):
        ns, nt = min(ns, src_bound), min(nt, tgt_bound)
        assert a["attention_mask"][row].sum() == ns and a["input_ids"][row, ns - 1] == tok.eos_token_id
        assert (a["labels"][row] != IGNORE).sum() == nt and a["labels"][row, nt - 1] == tok.eos_token_id
    assert tok.decode(a["input_ids"][0][a["attention_mask"][0] == 1], skip_special_tokens=True) == \
        "translate: short"
    assert c["source_tokens"] == int(a["attention_mask"].sum())
    assert c["target_tokens"] == int((a["labels"] != IGNORE).sum())
    with pytest.raises(DataError, match="b.jsonl: 1 of 1 seq2seq records are bad"):
        encode_pairs(records, tok, 12, 10, max_bad_fraction=0.5)


def test_user_pairs_are_held_out_by_source_so_a_source_never_lands_in_both(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"translation": {"en": f"message {i % 50}", "fr": f"message {i} fr"}} for i in range(400)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["finetune.task=seq2seq", f"finetune.paths=[{path}]", "data.val_fraction=0.2"])
    splits = pair_records(cfg.resolved("finetune"))
    sources = [{r["translation"]["en"] for _, _, r in s} for s in (splits.train, splits.val)]
    assert sources[0] and sources[1] and not sources[0] & sources[1]
    assert len(splits.train) + len(splits.val) == 400


def test_embedded_pairs_hold_out_by_source_and_cap_the_training_pairs(tmp_path):
    empty = tmp_path / "no-catalogs"
    empty.mkdir()
    cfg = load_config(None, ["finetune.task=seq2seq", f"finetune.locale_root={empty}", "finetune.max_pairs=100"])
    splits = pair_records(cfg.resolved("finetune"))
    assert len(splits.train) == 100 and splits.source["source"].startswith("sample:")
    train_src = {r["source"] for _, _, r in splits.train}
    assert splits.val and not train_src & {r["source"] for _, _, r in splits.val}


def test_seq2seq_config_defaults_and_checks():
    cfg = load_config(None, ["finetune.task=seq2seq"]).resolved("finetune")
    assert (cfg.model.family, cfg.run.name) == ("t5", "seq2seq")
    with pytest.raises(ConfigError, match="source_lang and finetune.target_lang are both 'en'"):
        load_config(None, ["finetune.task=seq2seq", "finetune.target_lang=en"])
    with pytest.raises(ConfigError, match="max_target_len must be null or >= 2"):
        load_config(None, ["finetune.task=seq2seq", "finetune.max_target_len=1"])


def test_seq2seq_task_loss_is_transformers_own_and_cuts_batches_to_their_longest(tok):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from llmos_ray.models import preset_config
    from llmos_ray.train.tasks import Seq2SeqLM

    records = [("f", i, {"source": s, "target": t}) for i, (s, t) in
               enumerate([("Open the file", "Ouvrir le fichier"), ("Save", "Enregistrer sous un autre nom"),
                          ("Quit now please", "Quitter")])]
    pairs = encode_pairs(records, tok, 64, 64)
    torch.manual_seed(0)
    config = preset_config("t5", "tiny", len(tok), 64, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                           pad_id=tok.pad_token_id)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    task = Seq2SeqLM(decoder_start_id=config.decoder_start_token_id, pad_id=tok.pad_token_id)
    padded = np.zeros(len(pairs.array), dtype=np.dtype([(n, pairs.array.dtype[n].base, (80,))
                                                        for n in pairs.array.dtype.names]))
    for n in pairs.array.dtype.names:  # wider than needed: the batch must cut it back
        padded[n] = IGNORE if n == "labels" else tok.pad_token_id if n == "input_ids" else 0
        padded[n][:, :pairs.array[n].shape[1]] = pairs.array[n]
    batch = task.batch(padded, "cpu")
    assert batch["input_ids"].shape[1] == pairs.array["input_ids"].shape[1]
    assert batch["labels"].shape[1] == pairs.array["labels"].shape[1]
    with torch.no_grad():
        ours = task.loss(model, batch)[0]
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss  # shifts the labels itself (T5's _shift_right)
        nll, counted = task.nll(model, batch)
    assert counted == int((pairs.array["labels"] != IGNORE).sum())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert nll / counted == pytest.approx(theirs.item(), rel=1e-6)


def test_span_corruption_task_batches_undo_to_the_block_and_repeat_for_the_same_block(tiny_tokenizer_dir):
    from llmos_ray.data.masking import add_sentinel_tokens
    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.train.tasks import SpanCorruption

    tok = load_tokenizer(tiny_tokenizer_dir)
    sentinels = add_sentinel_tokens(tok, 100)
    rng = np.random.default_rng(3)
    blocks = rng.integers(3, 400, size=(4, 65))
    task = SpanCorruption(decoder_start_id=tok.pad_token_id, pad_id=tok.pad_token_id, sentinel_ids=tuple(sentinels),
                          eos_id=tok.eos_token_id, seed=7)
    batch = task.batch(blocks, "cpu")
    again = task.batch(blocks.copy(), "cpu")  # a resumed run, or the next evaluation: the same spans
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    other = SpanCorruption(**{**task.__dict__, "seed": 8}).batch(blocks, "cpu")
    assert not np.array_equal(batch["input_ids"], other["input_ids"])  # run.seed decides the spans
    for row, block in enumerate(blocks):
        inputs, targets = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert inputs[-1] == targets[-1] == tok.eos_token_id
        spans, current = {}, None  # sentinel -> the tokens after it in the targets
        for t in targets[:-1]:
            if t in sentinels:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        assert list(spans) == sentinels[:len(spans)]  # in order, from <extra_id_0>
        rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in spans else [t])]
        assert rebuilt == block[:-1].tolist()  # the block's first T tokens, exactly
        assert batch["decoder_input_ids"][row].tolist() == [tok.pad_token_id] + targets[:-1]
