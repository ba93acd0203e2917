"""Labelled data from the machine's gettext catalogs: language identification and translation pairs.

Real, human-made text that every Debian-like machine has (see gettext_catalogs.py), turned into the
two embedded default datasets the classification and seq2seq tasks train on when given no data:

- `language_id_dataset`: `{"text", "label"}` records, a translated message and its language
  ('fr', 'zh_CN', …; 'en' is the msgids of the same catalogs), for DEFAULT_LANGUAGES or any
  languages present. Balanced: every label has the same number of training records (at most
  `per_label`) and the same number of held-out ones (the share `val_fraction` of that).
- `translation_dataset`: `{"source", "target"}` pairs English -> `target_lang` (or Hugging Face's
  `{"translation": {"en": …, "fr": …}}`), one per distinct source (the first in catalog order).

Both hold out a record by the project's one split rule (`documents.is_held_out`) applied to its
text (language ID) or its source (translation), so a message never lands in both splits, and
return records in the order of a stable hash of that key: deterministic and mixed across labels
and catalogs. What was dropped is counted (`TaskSplits.ledger`): the catalog reading's ledger, and
    candidates == too_long + duplicate + ambiguous + over_cap + train + val          (language ID)
    candidates == too_long + format_mismatch + duplicate_source + over_cap + train + val  (pairs)
`ambiguous` counts the texts that occur under more than one label ("Total", "Administrator"),
all removed; `format_mismatch` the pairs whose format specifiers differ (a translation that drops
or adds a `%s` teaches a model to), `duplicate_source` a source seen before (`conflicting_target`
says how many of those had another translation).

A machine without catalogs (an empty locale root) gets the samples shipped in
llmos_ray/data/samples/ (written from this machine's catalogs by `write_samples`: a few hundred
records each, with the catalog each came from), read through the same rules. These are derived
from the distributions' translations of the programs named in each record's `domain` and keep
those programs' licences; the package ships these samples, never whole catalogs.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from llmos_ray.data.documents import is_held_out, text_key
from llmos_ray.data.gettext_catalogs import (
    LOCALE_ROOT,
    CatalogLedger,
    catalog_languages,
    iter_messages,
    normalised_specifiers,
)
from llmos_ray.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_LANGUAGES = ("en", "fr", "de", "es", "it", "pt_BR", "ru", "zh_CN")
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
LANGUAGE_ID_SAMPLE = "gettext_language_id.jsonl"
TRANSLATION_SAMPLE = "gettext_en_fr.jsonl"
SAMPLE_TARGET_LANG = "fr"


@dataclass
class TaskSplits:
    train: list[dict]
    """Training records, in the order of a stable hash of their key."""
    val: list[dict]
    """Held-out records (documents.is_held_out of the key), same order."""
    ledger: dict
    """{"source", "catalogs": reading counts, "records": the task's counts (module docstring)}."""

    @property
    def labels(self) -> list[str]:
        """The label names of a language-ID dataset, sorted."""
        return sorted({r["label"] for r in self.train + self.val if "label" in r})


def language_id_dataset(languages: Sequence[str] = DEFAULT_LANGUAGES, *, root: str = LOCALE_ROOT,
                        per_label: int = 2000, val_fraction: float = 0.1, max_chars: Optional[int] = 300,
                        provenance: bool = False, name_lists: bool = False) -> TaskSplits:
    """Balanced language-identification records `{"text", "label"}` (+ "domain" with `provenance`)
    from the catalogs under `root`, or from the shipped sample when `root` has none. The
    iso-codes name lists are left out unless `name_lists` (gettext_catalogs.is_name_list)."""
    labels = _check_labels(languages)
    _check_fraction(val_fraction)
    reading = CatalogLedger()
    if _has_catalogs(root, [lang for lang in labels if lang != "en"]):
        source, candidates = root, _language_id_candidates(labels, root, reading, name_lists)
    else:
        source, candidates = _sample(LANGUAGE_ID_SAMPLE, root)
        candidates = ((r["text"], r["label"], r.get("domain", "")) for r in candidates)
    counts: Counter = Counter()
    by_label = _unique_texts(candidates, labels, max_chars, counts)
    for label in labels:
        if not by_label[label]:
            raise DataError(f"language {label!r} has no usable messages in {source} (dropped: {dict(counts)})")
    train, val = _balanced_split(by_label, per_label, val_fraction, counts)
    fields = ("text", "label", "domain") if provenance else ("text", "label")
    return TaskSplits([_record(r, fields) for r in train], [_record(r, fields) for r in val],
                      {"source": source, "catalogs": reading.as_dict(), "records": dict(counts)})


def translation_dataset(target_lang: str = "fr", *, root: str = LOCALE_ROOT, val_fraction: float = 0.1,
                        max_chars: Optional[int] = 300, max_pairs: Optional[int] = None, hf_format: bool = False,
                        provenance: bool = False, name_lists: bool = False) -> TaskSplits:
    """English -> `target_lang` pairs `{"source", "target"}` (or `{"translation": {"en", target_lang}}`
    with `hf_format`; + "domain" with `provenance`) from the catalogs under `root`, or from the
    shipped en->fr sample when `root` has none. `max_pairs` caps the training pairs (the held-out
    ones keep their share). The iso-codes name lists are left out unless `name_lists`."""
    _check_fraction(val_fraction)
    if target_lang == "en":
        raise DataError("translation_dataset: target_lang 'en' is the msgids' language; choose another, e.g. 'fr'")
    reading = CatalogLedger()
    if _has_catalogs(root, [target_lang]):
        source = root
        messages = iter_messages(target_lang, root, reading, name_lists=name_lists)
        candidates = ((m.msgid, m.msgstr, m.domain) for m in messages)
    else:
        if target_lang != SAMPLE_TARGET_LANG:
            raise DataError(f"no gettext catalogs under {root!r} and the shipped sample is English -> "
                            f"{SAMPLE_TARGET_LANG!r} only, not {target_lang!r}")
        source, records = _sample(TRANSLATION_SAMPLE, root)
        candidates = ((r["source"], r["target"], r.get("domain", "")) for r in records)
    counts: Counter = Counter()
    pairs = _unique_pairs(candidates, max_chars, counts)
    train, val = _capped_split(pairs, max_pairs, val_fraction, counts)
    out = ([_pair(p, target_lang, hf_format, provenance) for p in split] for split in (train, val))
    return TaskSplits(*out, {"source": source, "catalogs": reading.as_dict(), "records": dict(counts)})


def write_samples(out_dir: str = SAMPLES_DIR, root: str = LOCALE_ROOT, *, per_label: int = 45, pairs: int = 360,
                  max_chars: int = 100) -> dict[str, str]:
    """Write the shipped samples from the catalogs under `root`: `per_label` training records per
    language of DEFAULT_LANGUAGES (and the held-out share of that), and `pairs` en->fr training
    pairs (and their held-out share), each with the catalog it came from. Returns {name: path}."""
    if not _has_catalogs(root, [lang for lang in DEFAULT_LANGUAGES if lang != "en"]):
        raise DataError(f"write_samples: no gettext catalogs for {list(DEFAULT_LANGUAGES)} under {root!r}")
    lid = language_id_dataset(root=root, per_label=per_label, max_chars=max_chars, provenance=True)
    tr = translation_dataset(SAMPLE_TARGET_LANG, root=root, max_chars=max_chars, max_pairs=pairs, provenance=True)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, records in ((LANGUAGE_ID_SAMPLE, lid.train + lid.val), (TRANSLATION_SAMPLE, tr.train + tr.val)):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        written[name] = path
    return written


# ---------------------------------------------------------------------------------------------


def _language_id_candidates(labels: list[str], root: str, reading: CatalogLedger,
                            name_lists: bool) -> Iterator[tuple[str, str, str]]:
    """(text, label, domain): every message's translation under its language, and (when 'en' is a
    label) its msgid under 'en'."""
    for lang in labels:
        if lang == "en":
            continue
        for m in iter_messages(lang, root, reading, name_lists=name_lists):
            yield m.msgstr, lang, m.domain
            if "en" in labels:
                yield m.msgid, "en", m.domain


def _unique_texts(candidates: Iterable[tuple[str, str, str]], labels: list[str], max_chars: Optional[int],
                  counts: Counter) -> dict[str, list[tuple[str, str]]]:
    """{label: [(text, domain)]} of the texts that occur under exactly one label, each once."""
    seen: dict[str, dict[str, str]] = {}
    by_label: dict[str, list[tuple[str, str]]] = {label: [] for label in labels}
    for text, label, domain in candidates:
        if label not in by_label:  # a sample record of a language not asked for
            counts["label_not_requested"] += 1
            continue
        counts["candidates"] += 1
        if max_chars is not None and len(text) > max_chars:
            counts["too_long"] += 1
            continue
        entry = seen.setdefault(text, {})
        if label in entry:
            counts["duplicate"] += 1
        else:
            entry[label] = domain
    for text, entry in seen.items():
        if len(entry) > 1:
            counts["ambiguous"] += len(entry)
            continue
        (label, domain), = entry.items()
        by_label[label].append((text, domain))
    return by_label


def _balanced_split(by_label: dict[str, list[tuple[str, str]]], per_label: int, val_fraction: float,
                    counts: Counter) -> tuple[list[tuple], list[tuple]]:
    """Every label's texts split by is_held_out(text), in key order, each split cut to the size
    its smallest label has (at most per_label training texts, and the val share of that)."""
    parts = {}
    for label, items in by_label.items():
        ordered = sorted(((text_key(t), t, label, d) for t, d in items))
        val = [r for r in ordered if is_held_out(r[1], val_fraction)]
        parts[label] = ([r for r in ordered if not is_held_out(r[1], val_fraction)], val)
    n_train = min(per_label, *(len(p[0]) for p in parts.values()))
    n_val = min(_val_share(per_label, val_fraction), *(len(p[1]) for p in parts.values()))
    train, val = [], []
    for tr, va in parts.values():
        counts["over_cap"] += len(tr) - n_train + len(va) - n_val
        train += tr[:n_train]
        val += va[:n_val]
    counts["train"], counts["val"] = len(train), len(val)
    return sorted(train), sorted(val)


def _unique_pairs(candidates: Iterable[tuple[str, str, str]], max_chars: Optional[int],
                  counts: Counter) -> dict[str, tuple[str, str]]:
    """{source: (target, domain)}: the first usable translation of every source."""
    pairs: dict[str, tuple[str, str]] = {}
    for src, tgt, domain in candidates:
        counts["candidates"] += 1
        if max_chars is not None and max(len(src), len(tgt)) > max_chars:
            counts["too_long"] += 1
        elif normalised_specifiers(src) != normalised_specifiers(tgt):
            counts["format_mismatch"] += 1
        elif src in pairs:
            counts["duplicate_source"] += 1
            counts["conflicting_target"] += pairs[src][0] != tgt
        else:
            pairs[src] = (tgt, domain)
    return pairs


def _capped_split(pairs: dict[str, tuple[str, str]], max_pairs: Optional[int], val_fraction: float,
                  counts: Counter) -> tuple[list[tuple], list[tuple]]:
    ordered = sorted((text_key(src), src, tgt, d) for src, (tgt, d) in pairs.items())
    val = [p for p in ordered if is_held_out(p[1], val_fraction)]
    train = [p for p in ordered if not is_held_out(p[1], val_fraction)]
    if max_pairs is not None:
        n_train, n_val = min(max_pairs, len(train)), min(_val_share(max_pairs, val_fraction), len(val))
        counts["over_cap"] += len(train) - n_train + len(val) - n_val
        train, val = train[:n_train], val[:n_val]
    counts["train"], counts["val"] = len(train), len(val)
    return train, val


def _val_share(n_train: int, val_fraction: float) -> int:
    """Held-out records that go with `n_train` training ones for the share `val_fraction`."""
    return round(n_train * val_fraction / (1 - val_fraction))


def _record(row: tuple, fields: tuple[str, ...]) -> dict:
    _, text, label, domain = row
    return dict(zip(fields, (text, label, domain)))


def _pair(row: tuple, target_lang: str, hf_format: bool, provenance: bool) -> dict:
    _, src, tgt, domain = row
    out: dict = {"translation": {"en": src, target_lang: tgt}} if hf_format else {"source": src, "target": tgt}
    if provenance:
        out["domain"] = domain
    return out


def _check_labels(languages: Sequence[str]) -> list[str]:
    labels = list(dict.fromkeys(languages))
    if len(labels) < 2:  # so one of them is not 'en' (whose text is the other catalogs' msgids)
        raise DataError(f"language identification needs at least 2 languages, got {list(languages)}")
    return labels


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _has_catalogs(root: str, langs: list[str]) -> bool:
    """True when `root` has catalogs for every language in `langs`; False when it has none at all
    (use the shipped sample); DataError naming the missing ones otherwise."""
    available = catalog_languages(root)
    if not available:
        return False
    missing = [lang for lang in langs if lang not in available]
    if missing:
        have = ", ".join(f"{k} ({v})" for k, v in sorted(available.items(), key=lambda kv: -kv[1])[:20])
        raise DataError(f"no gettext catalogs for {missing} under {root}/<lang>/LC_MESSAGES; languages there "
                        f"(files): {have}")
    return True


def _sample(name: str, root: str) -> tuple[str, list[dict]]:
    path = os.path.join(SAMPLES_DIR, name)
    if not os.path.isfile(path):
        raise DataError(f"no gettext catalogs under {root!r} and no shipped sample {path}")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    log.warning("no gettext catalogs under %s: using the shipped sample %s (%d records)", root, path, len(records))
    return f"sample:{path}", records
