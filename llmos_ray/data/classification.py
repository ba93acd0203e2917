"""Labelled text for sequence classification: records → label names → token arrays with labels.

A record is `{"text": str, "label": str | int}` (one label), `{"text", "labels": [...]}` (multi-label:
any number of labels per text, finetune.multi_label), optionally with `text_pair` (pair tasks:
entailment, duplicate questions). An int label is named by its decimal string, so 0/1 records and
"neg"/"pos" records work alike, and the names are what the model's config.json (id2label) and
serving report. Label names come from the training split only, in sorted order (numerically
when all are integers): `label_names`.

`encode_examples` turns `(source, line, record)` triples into an `Examples` array. Bad records are
counted with file and line, never dropped silently: a record that does not parse, has no text or
an empty one, a non-string text or pair, no label, or (held-out and evaluation splits) a label the
training split never had. Texts longer than data.seq_len tokens are truncated (counted).

Text is framed by the tokenizer itself (`frame_for_classification`): a tokenizer with [CLS]/[SEP]
(a hub BERT) keeps its own template; ours gets `<bos> text <eos>` (pairs: `<bos> a <eos> b <eos>`,
token types 0 then 1) as its post-processor, saved with the tokenizer, so `pipeline(
"text-classification")` and serving frame a text exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from llmos_ray.data.sft import RecordSplits, embedded_splits, split_records
from llmos_ray.errors import DataError

MAX_BAD_LISTED = 100


def label_of(record: Any, multi_label: bool) -> list[str]:
    """The label names of a record (one, or several with `multi_label`); ValueError saying what is wrong."""
    key = "labels" if multi_label else "label"
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object ({type(record).__name__})")
    if key not in record or record[key] is None or record[key] == "":
        raise ValueError(f"missing {key!r}" + ("" if multi_label or "labels" not in record
                                               else " (a list under 'labels': set finetune.multi_label=true)"))
    values = record[key]
    if multi_label:
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list):
            raise ValueError(f"'labels' is {type(values).__name__}, not a list")
    else:
        values = [values]
    names = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"label {v!r} is {type(v).__name__}, not a string or an int")
        names.append(str(v).strip())
    if any(not n for n in names):
        raise ValueError("empty label")
    return sorted(set(names))


def texts_of(record: dict) -> tuple[str, Optional[str]]:
    """(text, text_pair or None) of a record; ValueError when the text is missing, empty or not a string."""
    text = record.get("text")
    if text is None:
        raise ValueError("missing 'text'")
    if not isinstance(text, str):
        raise ValueError(f"'text' is {type(text).__name__}, not a string")
    if not text.strip():
        raise ValueError("empty 'text'")
    pair = record.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise ValueError(f"'text_pair' is {type(pair).__name__}, not a string")
    return text, pair or None


def label_names(records: Iterable[tuple[str, int, Any]], multi_label: bool = False) -> list[str]:
    """Every label name of the (training) records that have one, sorted (numerically when all are ints)."""
    names: set[str] = set()
    for _, _, record in records:
        try:
            names.update(label_of(record, multi_label))
        except ValueError:
            continue
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def frame_for_classification(tokenizer) -> None:
    """Make `tokenizer(text[, pair])` produce the classification framing (module doc). A tokenizer
    with cls and sep tokens keeps its own; one without (ours, GPT-2's) gets a template
    post-processor around its bos (else eos) and eos tokens."""
    from tokenizers import processors

    if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        return
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("classification needs a fast (Rust) tokenizer to frame texts")
    bos, eos = tokenizer.bos_token or tokenizer.eos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0", pair=f"{bos}:0 $A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in dict.fromkeys((bos, eos))])


@dataclass
class Examples:
    """Encoded classification examples: one structured row per example."""

    array: np.ndarray
    """Fields input_ids int32[T], attention_mask int8[T] (1 = a token), token_type_ids int8[T] (when
    the model uses them), labels int64 (or float32[labels] with multi-label). T is the longest
    example (at most data.seq_len); shorter rows are padded with the pad id."""
    counts: dict = field(default_factory=dict)
    """records, examples, bad_records, truncated, per_label, bad_by_file ({file: [{line, reason}]})."""


def parse_labelled(record: Any, index: dict[str, int], multi_label: bool) -> tuple[list[str], str, Optional[str]]:
    """(label names, text, text_pair) of one record, or ValueError saying what is wrong with it: a line
    that did not parse (`record` the Exception), no usable label or text, or a label not in `index`."""
    if isinstance(record, Exception):
        raise ValueError(str(record))
    names = label_of(record, multi_label)
    text, pair = texts_of(record)
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not one the model was trained on ({_few(list(index))})")
    return names, text, pair


def encode_examples(records: Iterable[tuple[str, int, Any]], tokenizer, labels: Sequence[str], seq_len: int,
                    multi_label: bool = False, token_types: bool = False,
                    max_bad_fraction: float = 1.0) -> Examples:
    """Encode `(source, line, record)` triples (`record` an object, or an Exception for a line that did
    not parse) against the label names `labels`; DataError when a file's bad share exceeds
    `max_bad_fraction`, or nothing usable is left."""
    index = {name: i for i, name in enumerate(labels)}
    counts: dict[str, Any] = {"records": 0, "examples": 0, "bad_records": 0, "truncated": 0,
                              "per_label": dict.fromkeys(labels, 0), "bad_by_file": {}}
    per_file: dict[str, list[int]] = {}
    texts, pairs, targets = [], [], []
    for source, line, record in records:
        counts["records"] += 1
        seen = per_file.setdefault(source, [0, 0])
        seen[0] += 1
        try:
            names, text, pair = parse_labelled(record, index, multi_label)
        except ValueError as e:
            seen[1] += 1
            counts["bad_records"] += 1
            bad = counts["bad_by_file"].setdefault(source, [])
            if len(bad) < MAX_BAD_LISTED:
                bad.append({"line": line, "reason": str(e)})
            continue
        for n in names:
            counts["per_label"][n] += 1
        texts.append(text)
        pairs.append(pair)
        targets.append([index[n] for n in names])
    _check_bad(per_file, counts, max_bad_fraction)
    if not texts:
        raise DataError(f"no usable classification records in {sorted(per_file) or 'the input'} "
                        f"({ {k: v for k, v in counts.items() if k != 'bad_by_file'} })")
    array, counts["truncated"] = _encode(tokenizer, texts, pairs, seq_len, token_types)
    counts["examples"] = len(texts)
    out = np.zeros(len(texts), dtype=_dtype(array["input_ids"].shape[1], len(labels), multi_label, token_types))
    for name in ("input_ids", "attention_mask") + (("token_type_ids",) if token_types else ()):
        out[name] = array[name]
    if multi_label:
        for row, ids in enumerate(targets):
            out["labels"][row, ids] = 1.0
    else:
        out["labels"] = [ids[0] for ids in targets]
    return Examples(out, counts)


def _encode(tokenizer, texts: list[str], pairs: list[Optional[str]], seq_len: int,
            token_types: bool) -> tuple[dict[str, np.ndarray], int]:
    """Padded arrays of the texts (pairs where given), and how many were truncated to seq_len."""
    rows, truncated = [], 0
    for text, pair in zip(texts, pairs):
        enc = tokenizer(text, pair, truncation=False)
        if len(enc["input_ids"]) > seq_len:
            truncated += 1
            enc = tokenizer(text, pair, truncation=True, max_length=seq_len)
        rows.append((enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = np.full((len(rows), width), pad, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int8)
    types_arr = np.zeros((len(rows), width), dtype=np.int8)
    for i, (ids, types) in enumerate(rows):
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        if token_types:
            types_arr[i, :len(types)] = types
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types_arr}, truncated


def _dtype(width: int, n_labels: int, multi_label: bool, token_types: bool) -> np.dtype:
    fields = [("input_ids", np.int32, (width,)), ("attention_mask", np.int8, (width,))]
    if token_types:
        fields.append(("token_type_ids", np.int8, (width,)))
    fields.append(("labels", np.float32, (n_labels,)) if multi_label else ("labels", np.int64))
    return np.dtype(fields)


def _check_bad(per_file: dict[str, list[int]], counts: dict, max_bad_fraction: float) -> None:
    for source, (n, bad) in per_file.items():
        if n and bad / n > max_bad_fraction:
            first = counts["bad_by_file"][source][0]
            raise DataError(f"{source}: {bad} of {n} records are bad (more than data.max_bad_fraction="
                            f"{max_bad_fraction}); first at line {first['line']}: {first['reason']}")


def _few(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def class_weights(counts: dict[str, int], labels: Sequence[str], multi_label: bool = False,
                  examples: int = 0) -> list[float]:
    """'balanced' weights per label, scikit-learn's rule n / (labels · count) for one label per
    text; with multi-label, BCE's positive weight negatives / positives per label."""
    from sklearn.utils.class_weight import compute_class_weight

    if multi_label:
        return [float((examples - counts[n]) / max(counts[n], 1)) for n in labels]
    y = np.repeat(np.arange(len(labels)), [counts[n] for n in labels])
    present = np.unique(y)
    weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y).tolist()))
    return [float(weights.get(i, 0.0)) for i in range(len(labels))]


EMBEDDED_VAL_FRACTION = 0.1
"""Held-out share of the embedded language-ID set (its own split, not data.val_fraction)."""


def labelled_records(cfg) -> RecordSplits:
    """The labelled records of a classification run (a resolved Config): finetune.paths split by a
    hash of each record's file and line (data.val_fraction), or — no paths — the embedded
    language-ID set over the gettext catalogs (finetune.languages, finetune.examples_per_label,
    finetune.locale_root), with its own held-out split."""
    ft = cfg.finetune
    if not ft.paths:
        from llmos_ray.data.catalog_tasks import language_id_dataset

        d = language_id_dataset(ft.languages, root=ft.locale_root, per_label=ft.examples_per_label,
                                val_fraction=EMBEDDED_VAL_FRACTION)
        return embedded_splits("llmos:language-id", d.train, d.val,
                               {"embedded": "language identification over gettext catalogs", **d.ledger})
    return split_records(cfg)
