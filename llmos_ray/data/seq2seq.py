"""Source → target pairs for encoder-decoder fine-tuning (finetune.task=seq2seq): records → pairs →
token arrays.

A record is one of three shapes (`pair_of`):

    {"source": "Open file", "target": "Ouvrir le fichier"}           our own
    {"translation": {"en": "Open file", "fr": "Ouvrir le fichier"}}   Hugging Face's (source_lang, target_lang)
    {"text": "a long article ...", "summary": "its summary"}         summarization sets

An optional task prefix ("translate English to French: ") goes before every source, as T5 was
trained. Sources and targets are bounded separately (finetune.max_source_len / max_target_len,
EOS included): a longer one is cut to its bound and counted (`truncated_source`,
`truncated_target`), never dropped silently. Bad records (not an object, a missing, empty or
non-string side) are counted with file and line.

The tokenizer frames both sides itself (`frame_for_seq2seq`): `text <eos>`, as T5's tokenizer does,
through a post-processor saved with it, so the design documents' `tokenizer.encode(text,
return_tensors="pt")` → `model.generate` on an export sees exactly what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from llmos_ray.data.sft import RecordSplits, embedded_splits, split_records
from llmos_ray.errors import DataError

MAX_BAD_LISTED = 100
IGNORE = -100
"""Label of a padded target position: no loss (as Hugging Face's DataCollatorForSeq2Seq)."""


def pair_of(record: Any, source_lang: str = "en", target_lang: str = "fr") -> tuple[str, str]:
    """(source, target) of a record in any of the three shapes; ValueError saying what is wrong."""
    if isinstance(record, Exception):
        raise ValueError(str(record))
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object ({type(record).__name__})")
    if "translation" in record:
        pair = record["translation"]
        if not isinstance(pair, dict):
            raise ValueError(f"'translation' is {type(pair).__name__}, not an object")
        missing = [lang for lang in (source_lang, target_lang) if lang not in pair]
        if missing:
            raise ValueError(f"'translation' has no {missing[0]!r} (it has {sorted(pair)}; set "
                             "finetune.source_lang / finetune.target_lang)")
        keys, values = (f"translation.{source_lang}", f"translation.{target_lang}"), (pair[source_lang],
                                                                                      pair[target_lang])
    elif "source" in record or "target" in record:
        keys, values = ("source", "target"), (record.get("source"), record.get("target"))
    elif "text" in record or "summary" in record:
        keys, values = ("text", "summary"), (record.get("text"), record.get("summary"))
    else:
        raise ValueError(f"no 'source'/'target', 'translation' or 'text'/'summary' fields (has {sorted(record)})")
    for key, value in zip(keys, values):
        if value is None:
            raise ValueError(f"missing {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"{key!r} is {type(value).__name__}, not a string")
        if not value.strip():
            raise ValueError(f"empty {key!r}")
    return values[0], values[1]


def frame_for_seq2seq(tokenizer) -> None:
    """Make `tokenizer(text)` end every text with its EOS token (T5's framing), through a template
    post-processor; a tokenizer that already does (T5's own) is left as it is."""
    from tokenizers import processors

    if tokenizer.eos_token_id is None:
        raise DataError("seq2seq needs a tokenizer with an eos token")
    probe = tokenizer("a")["input_ids"]
    if probe and probe[-1] == tokenizer.eos_token_id:
        return
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("seq2seq needs a fast (Rust) tokenizer to frame texts")
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(eos, tokenizer.eos_token_id)])


@dataclass
class Pairs:
    """Encoded seq2seq examples: one structured row per pair."""

    array: np.ndarray
    """Fields input_ids int32[S], attention_mask int8[S] (1 = a source token), labels int32[T]
    (IGNORE after the target's EOS). S and T are the longest source and target (at most their bounds)."""
    counts: dict = field(default_factory=dict)
    """records, examples, bad_records, truncated_source, truncated_target, source_tokens,
    target_tokens, bad_by_file ({file: [{line, reason}]})."""


def encode_pairs(records: Iterable[tuple[str, int, Any]], tokenizer, max_source_len: int, max_target_len: int,
                 prefix: str = "", source_lang: str = "en", target_lang: str = "fr",
                 max_bad_fraction: float = 1.0) -> Pairs:
    """Encode `(file, line, record)` triples (`record` an object, or an Exception for a line that did
    not parse) with a framed tokenizer (`frame_for_seq2seq`); DataError when a file's bad share
    exceeds `max_bad_fraction`, or nothing usable is left."""
    counts: dict[str, Any] = {"records": 0, "examples": 0, "bad_records": 0, "truncated_source": 0,
                              "truncated_target": 0, "source_tokens": 0, "target_tokens": 0, "bad_by_file": {}}
    per_file: dict[str, list[int]] = {}
    sources, targets = [], []
    for file, line, record in records:
        counts["records"] += 1
        seen = per_file.setdefault(file, [0, 0])
        seen[0] += 1
        try:
            src, tgt = pair_of(record, source_lang, target_lang)
        except ValueError as e:
            seen[1] += 1
            counts["bad_records"] += 1
            bad = counts["bad_by_file"].setdefault(file, [])
            if len(bad) < MAX_BAD_LISTED:
                bad.append({"line": line, "reason": str(e)})
            continue
        sources.append(prefix + src)
        targets.append(tgt)
    for file, (n, bad) in per_file.items():
        if n and bad / n > max_bad_fraction:
            first = counts["bad_by_file"][file][0]
            raise DataError(f"{file}: {bad} of {n} seq2seq records are bad (more than data.max_bad_fraction="
                            f"{max_bad_fraction}); first at line {first['line']}: {first['reason']}")
    if not sources:
        raise DataError(f"no usable seq2seq records in {sorted(per_file) or 'the input'} "
                        f"({ {k: v for k, v in counts.items() if k != 'bad_by_file'} })")
    src_ids, counts["truncated_source"] = _bounded(tokenizer, sources, max_source_len)
    tgt_ids, counts["truncated_target"] = _bounded(tokenizer, targets, max_target_len)
    counts["examples"] = len(sources)
    counts["source_tokens"] = sum(map(len, src_ids))
    counts["target_tokens"] = sum(map(len, tgt_ids))
    s, t = max(map(len, src_ids)), max(map(len, tgt_ids))
    out = np.zeros(len(sources), dtype=np.dtype([("input_ids", np.int32, (s,)), ("attention_mask", np.int8, (s,)),
                                                 ("labels", np.int32, (t,))]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out["input_ids"], out["labels"] = pad, IGNORE
    for i, (a, b) in enumerate(zip(src_ids, tgt_ids)):
        out["input_ids"][i, :len(a)] = a
        out["attention_mask"][i, :len(a)] = 1
        out["labels"][i, :len(b)] = b
    return Pairs(out, counts)


def _bounded(tokenizer, texts: list[str], bound: int) -> tuple[list[list[int]], int]:
    """Token ids of every text (framed: EOS last), each cut to `bound` tokens with its EOS kept, and
    how many were cut."""
    eos = tokenizer.eos_token_id
    out, cut = [], 0
    for ids in tokenizer(texts)["input_ids"]:
        if len(ids) > bound:
            cut += 1
            ids = ids[:bound - 1] + [eos]
        out.append(ids)
    return out, cut


EMBEDDED_VAL_FRACTION = 0.1
"""Held-out share of the embedded translation pairs (their own split, not data.val_fraction)."""


def pair_records(cfg) -> RecordSplits:
    """The records of a seq2seq run (a resolved Config): finetune.paths split by a hash of each
    record's source text (data.val_fraction; a line that has none, by its file and line), or — no
    paths — the embedded English → finetune.target_lang pairs of the gettext catalogs
    (finetune.locale_root, finetune.max_pairs), held out by a hash of the source."""
    ft = cfg.finetune
    if not ft.paths:
        from llmos_ray.data.catalog_tasks import translation_dataset

        if ft.source_lang != "en":
            raise DataError(f"the embedded pairs are English -> finetune.target_lang (msgid -> msgstr); "
                            f"finetune.source_lang={ft.source_lang!r} needs finetune.paths")
        d = translation_dataset(ft.target_lang, root=ft.locale_root, val_fraction=EMBEDDED_VAL_FRACTION,
                                max_pairs=ft.max_pairs)
        return embedded_splits(f"llmos:gettext-en-{ft.target_lang}", d.train, d.val,
                               {"embedded": f"English -> {ft.target_lang} pairs of the gettext catalogs", **d.ledger})

    def source_text(file: str, line: int, record: Any) -> str:
        try:
            return pair_of(record, ft.source_lang, ft.target_lang)[0]
        except ValueError:
            return f"{file}:{line}"

    return split_records(cfg, source_text)


def pair_texts(records: Iterable[tuple[str, int, Any]], source_lang: str = "en",
               target_lang: str = "fr") -> list[str]:
    """Every source and target text of the records that parse (what a tokenizer is trained on)."""
    out: list[str] = []
    for _, _, record in records:
        try:
            out.extend(pair_of(record, source_lang, target_lang))
        except ValueError:
            continue
    return out
