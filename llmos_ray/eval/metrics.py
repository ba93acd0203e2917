"""Evaluation metrics as plain functions of a model, a tokenizer and texts (no Ray).

Perplexity follows Hugging Face's "perplexity of fixed-length models": a document longer than
the window is scored with overlapping windows of `max_length` tokens that advance by `stride`;
each window scores only the tokens no earlier window scored (the overlap is context, labelled
-100), so every token is scored exactly once with at least `max_length - stride` tokens of
context (except near the start; windows overlap by at least one token). As in lm-eval-harness's
rolling log-likelihood, each document is prefixed with the BOS token (EOS when there is none:
what a document follows in our packed training data), so its first token is scored too.
Perplexity is exp(token-weighted mean NLL) over all documents; `bits_per_byte` and
`word_perplexity` (lm-eval's definitions) compare models whose tokenizers differ.

BLEU is sacrebleu's corpus BLEU (0-100, default 13a tokenizer); ROUGE-1/2/L are the mean F1
(0-1) of `rouge_score` with the Porter stemmer. Classification figures (accuracy, macro-F1,
per-label precision and recall, confusion matrix) are scikit-learn's.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from llmos_ray.errors import ModelError
from llmos_ray.models import context_length


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows `(begin, end, first)` over a sequence of `n_tokens`: the model sees tokens
    [begin, end) and is scored on predicting tokens [first, end). Together the windows score
    tokens 1 .. n_tokens-1 exactly once (token 0 has nothing before it)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows = []
    begin, scored_to = 0, 1
    while scored_to < n_tokens:
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, scored_to))
        scored_to = end
        begin = min(begin + stride, scored_to - 1)  # stride == max_length still overlaps by one token
    return windows


def document_nll(model, tokenizer, texts: Sequence[str], max_length: Optional[int] = None,
                 stride: Optional[int] = None, batch_size: int = 8) -> list[dict]:
    """Per document: {"nll": summed negative log-likelihood (nats), "tokens": tokens scored,
    "bytes": UTF-8 bytes, "words": whitespace-separated words}. `max_length` defaults to the
    model's context, `stride` to half of it; windows of all documents are batched together."""
    import torch

    max_length = max_length or context_length(model.config)
    stride = stride or max(1, max_length // 2)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ModelError("the tokenizer has neither a bos nor an eos token to start documents with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    results = [{"nll": 0.0, "tokens": 0, "bytes": len(t.encode("utf-8")), "words": _count_words(t)} for t in texts]
    jobs = []  # (document, ids of the window, first scored position within the window)
    for doc, ids in enumerate(encoded):
        ids = [prefix, *ids]
        for begin, end, first in sliding_windows(len(ids), max_length, stride):
            jobs.append((doc, ids[begin:end], first - begin))
    jobs.sort(key=lambda job: len(job[1]), reverse=True)  # similar lengths together: little padding
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            width = len(chunk[0][1])
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (_, ids, first) in enumerate(chunk):  # right padding: positions start at 0
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention[row, :len(ids)] = 1
                labels[row, first:len(ids)] = input_ids[row, first:len(ids)]
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            targets = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                    ignore_index=-100, reduction="none").sum(dim=1)
            counts = (targets != -100).sum(dim=1)
            for (doc, _, _), value, count in zip(chunk, nll.tolist(), counts.tolist()):
                results[doc]["nll"] += value
                results[doc]["tokens"] += count
    return results


def summarize_nll(rows: Sequence[dict]) -> dict:
    """Reduce per-document rows of `document_nll` to corpus figures (token-weighted)."""
    nll = math.fsum(r["nll"] for r in rows)
    tokens = sum(int(r["tokens"]) for r in rows)
    size = sum(int(r["bytes"]) for r in rows)
    words = sum(int(r["words"]) for r in rows)
    mean = nll / tokens if tokens else float("nan")
    return {
        "perplexity": math.exp(mean) if tokens else float("nan"),
        "mean_nll": mean,
        "nll": nll,
        "tokens": tokens,
        "documents": len(rows),
        "bytes": size,
        "words": words,
        "bits_per_byte": nll / size / math.log(2) if size else float("nan"),
        "byte_perplexity": math.exp(nll / size) if size else float("nan"),
        "word_perplexity": math.exp(nll / words) if words else float("nan"),
    }


def perplexity(model, tokenizer, texts: Sequence[str], max_length: Optional[int] = None,
               stride: Optional[int] = None, batch_size: int = 8) -> dict:
    """exp(token-weighted mean NLL) of `texts`, with sliding windows (see the module doc).

    Returns {"perplexity", "mean_nll", "nll", "tokens", "documents", "bytes", "words",
    "bits_per_byte", "byte_perplexity", "word_perplexity", "max_length", "stride"}."""
    max_length = max_length or context_length(model.config)
    stride = stride or max(1, max_length // 2)
    out = summarize_nll(document_nll(model, tokenizer, texts, max_length, stride, batch_size))
    return {**out, "max_length": max_length, "stride": stride}


def _count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval-harness's word count for word_perplexity


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu, one reference per hypothesis): {"bleu" (0-100), "precisions",
    "brevity_penalty", "sys_len", "ref_len", "signature"}."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": score.score, "precisions": list(score.precisions), "brevity_penalty": score.bp,
            "sys_len": score.sys_len, "ref_len": score.ref_len, "signature": str(metric.get_signature())}


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2, no word n-grams; 0-100):
    {"chrf", "signature"}. Kinder than BLEU to short outputs and to morphology (French endings)."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    metric = sacrebleu.metrics.CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"chrf": score.score, "signature": str(metric.get_signature())}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1) over the pairs (rouge_score, stemmed)."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: value / len(hypotheses) for key, value in totals.items()}


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")


def classification_scores(y_true, y_pred, labels: Sequence[str], multi_label: bool = False) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix of
    predicted label ids against reference ids (scikit-learn). With `multi_label`, `y_true` and
    `y_pred` are 0/1 indicator rows: accuracy is the share of texts whose label set is exactly
    right, and the confusion matrix is one [[tn, fp], [fn, tp]] per label. `majority_baseline`
    is the accuracy of always answering the most frequent reference label (the bar a classifier
    must clear)."""
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        multilabel_confusion_matrix,
        precision_recall_fscore_support,
    )

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ids = list(range(len(labels)))
    average_args = dict(labels=ids, zero_division=0)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, **average_args)
    if multi_label:
        matrix = multilabel_confusion_matrix(y_true, y_pred, labels=ids).tolist()
        counts = {}
        for row in map(tuple, y_true.astype(int)):
            counts[row] = counts.get(row, 0) + 1
        majority = max(counts.values()) / len(y_true) if len(y_true) else 0.0
    else:
        matrix = confusion_matrix(y_true, y_pred, labels=ids).tolist()
        majority = float(np.bincount(y_true, minlength=len(labels)).max() / len(y_true)) if len(y_true) else 0.0
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", **average_args)),
        "majority_baseline": majority,
        "examples": int(len(y_true)),
        "labels": list(labels),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion_matrix": matrix,
    }
