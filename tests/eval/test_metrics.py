"""Metrics against the libraries they stand for: perplexity against `transformers`' own loss
(model(input_ids, labels=...)), BLEU against sacrebleu, ROUGE against rouge_score."""

from __future__ import annotations

import math

import pytest
import torch

from llmos_ray.eval.metrics import bleu, document_nll, perplexity, rouge, sliding_windows


def prefixed_ids(tokenizer, text: str) -> list[int]:
    """What a document is scored as: BOS, then its tokens."""
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def hf_sliding_window_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """(NLL sum, tokens scored) by Hugging Face's "perplexity of fixed-length models" recipe, written
    directly: each window's labels are the inputs with the already-scored overlap set to -100, and
    transformers computes the (shifted) mean loss; the sum is loss x tokens that carry a label."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            input_ids = torch.tensor([ids[begin:end]])
            labels = input_ids.clone()
            labels[:, :-(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll += model(input_ids, labels=labels).loss.item() * n
            count += n
            prev_end = end
            if end == len(ids):
                break
    return nll, count


def test_perplexity_of_short_documents_is_transformers_loss(tiny, long_text):
    model, tok = tiny
    texts = ["def add(a, b):\n    return a + b\n", long_text[:600], "import os\nprint(os.getcwd())\n"]
    got = perplexity(model, tok, texts, batch_size=4)
    nll = count = 0
    with torch.no_grad():
        for text in texts:  # each fits the 512-token context: one forward pass over the whole document
            ids = torch.tensor([prefixed_ids(tok, text)])
            assert ids.shape[1] <= model.config.n_positions
            n = ids.shape[1] - 1
            nll += model(ids, labels=ids).loss.item() * n
            count += n
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=0.01)
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"] / got["tokens"]), rel=1e-9)


@pytest.mark.parametrize("max_length,stride", [(None, None), (128, 32), (64, 64)])
def test_sliding_window_over_a_document_longer_than_the_context(tiny, long_text, max_length, stride):
    model, tok = tiny
    text = long_text[:2400]
    ids = prefixed_ids(tok, text)
    context = model.config.n_positions
    assert len(ids) > 2 * context  # the document does not fit: windows are required
    window = max_length or context
    step = stride or window // 2
    got = perplexity(model, tok, [text], max_length=max_length, stride=stride, batch_size=8)
    assert (got["max_length"], got["stride"]) == (window, step)
    assert got["tokens"] == len(ids) - 1  # every token of the document scored exactly once
    if step < window:
        nll, count = hf_sliding_window_nll(model, ids, window, step)
    else:  # stride == window: windows still overlap by one token, so no token loses its label
        nll, count = hf_sliding_window_nll(model, ids, window, window - 1)
    assert count == got["tokens"]
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=0.01)
    assert got["nll"] == pytest.approx(nll, rel=1e-4)


def test_padding_and_batching_do_not_change_scores(tiny, long_text):
    model, tok = tiny
    texts = [long_text, "x = 1\n", long_text[:700], "class A:\n    pass\n"]
    one = document_nll(model, tok, texts, max_length=128, stride=64, batch_size=1)
    many = document_nll(model, tok, texts, max_length=128, stride=64, batch_size=16)
    for a, b in zip(one, many):
        assert a["tokens"] == b["tokens"]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    assert [r["bytes"] for r in one] == [len(t.encode()) for t in texts]


@pytest.mark.parametrize("n,max_length,stride", [(1, 4, 2), (2, 4, 2), (10, 4, 2), (10, 4, 4), (10, 4, 1),
                                                  (100, 16, 5), (17, 16, 16), (16, 16, 8)])
def test_sliding_windows_score_each_token_once_with_context(n, max_length, stride):
    windows = sliding_windows(n, max_length, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n))
    for k, (begin, end, first) in enumerate(windows):
        assert 0 <= begin < first <= end <= n and end - begin <= max_length
        if k and end - begin == max_length:
            assert first - begin >= min(max_length - stride, max_length - 1) and first - begin >= 1


def test_sliding_windows_reject_bad_settings():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="max_length"):
        sliding_windows(10, 1, 1)


HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "running runners ran quickly",
        "nothing in common here"]
REFS = ["the cat is sitting on the mat", "the quick brown fox jumped over the lazy dog",
        "the runner runs quick", "completely different words"]


def test_bleu_is_sacrebleu_corpus_bleu():
    import sacrebleu

    got = bleu(HYPS, REFS)
    want = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert got["bleu"] == pytest.approx(want.score, abs=1e-9)
    assert got["precisions"] == pytest.approx(want.precisions)
    assert (got["sys_len"], got["ref_len"]) == (want.sys_len, want.ref_len)
    assert 0 < got["bleu"] < 100
    assert bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)


def test_rouge_is_rouge_score_mean_f1_with_stemming():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    got = rouge(HYPS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(sum(s[key].fmeasure for s in per_pair) / len(HYPS), abs=1e-12)
    assert 0 < got["rouge2"] < got["rouge1"] < 1
    # Stemming: "running runners ran quickly" vs "the runner runs quick" shares run/runner stems.
    assert scorer.score(REFS[2], HYPS[2])["rouge1"].fmeasure > 0
    assert rouge(REFS, REFS) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_metrics_reject_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        rouge([], [])


def test_classification_scores_are_scikit_learns_and_name_the_labels():
    from llmos_ray.eval.metrics import classification_scores

    y_true, y_pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0]
    s = classification_scores(y_true, y_pred, ["de", "en", "fr"])
    assert s["accuracy"] == pytest.approx(4 / 6) and s["majority_baseline"] == pytest.approx(3 / 6)
    assert s["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows: reference, columns: predicted
    assert s["per_class"]["de"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                    "f1": pytest.approx(2 / 3), "support": 3}
    assert s["per_class"]["fr"]["precision"] == 0.0  # never predicted: 0, not an error
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    multi = classification_scores([[1, 0], [1, 1]], [[1, 0], [1, 0]], ["a", "b"], multi_label=True)
    assert multi["accuracy"] == 0.5 and multi["confusion_matrix"][1] == [[1, 0], [1, 0]]
