"""Language-ID records and translation pairs from gettext catalogs: balanced, held out by the
project's split rule, deterministic, every drop counted; the shipped samples when a machine has
no catalogs."""

import json
import os

import pytest

import llmos_ray.data.catalog_tasks as tasks
from llmos_ray.data.catalog_tasks import (
    DEFAULT_LANGUAGES,
    language_id_dataset,
    translation_dataset,
    write_samples,
)
from llmos_ray.data.documents import is_held_out, text_key
from llmos_ray.errors import DataError
from tests.data.mo_catalogs import write_catalog

WORDS = {  # (open, file, number) in each language: 40 distinct messages per catalog
    "fr": ("Ouvrir le fichier", "numéro"), "de": ("Datei öffnen", "Nummer"), "es": ("Abrir el archivo", "número"),
    "it": ("Apri il file", "numero"), "pt_BR": ("Abrir o arquivo", "número"), "ru": ("Открыть файл", "номер"),
    "zh_CN": ("打开文件", "编号"),
}


def messages(lang: str, n: int, start: int = 0) -> dict:
    phrase, number = WORDS[lang]
    return {f"Open the file number {i}": f"{phrase} {number} {i}" for i in range(start, start + n)}


@pytest.fixture
def locale_root(tmp_path):
    root = tmp_path / "locale"
    for lang in WORDS:
        write_catalog(root, lang, "app", messages(lang, 40))
    # de has more: its extra messages only raise its count, balance cuts them
    write_catalog(root, "de", "more", messages("de", 30, start=40))
    # the same text under two labels is ambiguous; the same message in two catalogs is a duplicate
    write_catalog(root, "fr", "zz-extra", {"Sum": "Total", "Open the file number 1": "Ouvrir le fichier numéro 1",
                                           "Print %s": "Imprimer", "A very long message " * 20: "Un message long"})
    write_catalog(root, "de", "zz-extra", {"Amount": "Total"})
    write_catalog(root, "fr", "iso_639-3", {"Grebo, Barclayville": "grebo, Barclayville"})  # a name list
    return str(root)


def lid_invariant(d) -> None:
    c = d.ledger["records"]
    assert c["candidates"] == sum(c.get(k, 0) for k in ("too_long", "duplicate", "ambiguous", "over_cap")) + \
        c["train"] + c["val"]
    assert (c["train"], c["val"]) == (len(d.train), len(d.val))


def test_language_id_is_balanced_held_out_by_text_and_deterministic(locale_root):
    langs = list(WORDS) + ["en"]
    d = language_id_dataset(langs, root=locale_root, per_label=30, val_fraction=0.25)
    per_train = {lab: sum(r["label"] == lab for r in d.train) for lab in langs}
    per_val = {lab: sum(r["label"] == lab for r in d.val) for lab in langs}
    assert len(set(per_train.values())) == 1 and len(set(per_val.values())) == 1, (per_train, per_val)
    assert 0 < per_val["fr"] <= round(30 * 0.25 / 0.75) and per_train["fr"] <= 30
    assert all(is_held_out(r["text"], 0.25) for r in d.val)
    assert not any(is_held_out(r["text"], 0.25) for r in d.train)
    assert [text_key(r["text"]) for r in d.train] == sorted(text_key(r["text"]) for r in d.train)
    assert set(d.train[0]) == {"text", "label"} and d.labels == sorted(langs)
    texts = [r["text"] for r in d.train + d.val]
    assert len(texts) == len(set(texts)) and "Total" not in texts
    assert language_id_dataset(langs, root=locale_root, per_label=30, val_fraction=0.25) == d
    c = d.ledger["records"]
    assert c["ambiguous"] == 2 and c["too_long"] == 1 and c["duplicate"] == (len(WORDS) - 1) * 40 + 2
    # (each msgid of 'app' is English text in all 7 catalogs; fr repeats one message: its msgid and msgstr)
    lid_invariant(d)
    assert d.ledger["catalogs"]["files_read"] == 10 and d.ledger["source"] == locale_root
    assert d.ledger["catalogs"]["name_list_files_skipped"] == 1


def test_language_id_needs_catalogs_for_each_language(locale_root):
    with pytest.raises(DataError, match=r"no gettext catalogs for \['ja'\].*fr \("):
        language_id_dataset(["en", "fr", "ja"], root=locale_root)
    with pytest.raises(DataError, match="at least 2 languages"):
        language_id_dataset(["fr"], root=locale_root)


def pairs_invariant(d) -> None:
    c = d.ledger["records"]
    dropped = sum(c.get(k, 0) for k in ("too_long", "format_mismatch", "duplicate_source", "over_cap"))
    assert c["candidates"] == dropped + c["train"] + c["val"]


def test_translation_pairs_deduplicated_by_source_and_held_out_by_it(locale_root):
    d = translation_dataset("fr", root=locale_root, val_fraction=0.2)
    sources = [r["source"] for r in d.train + d.val]
    assert len(sources) == len(set(sources)) == 41  # 40 + "Sum"; "Print %s" lost its %s; the long one too long
    assert {"source": "Sum", "target": "Total"} in d.train + d.val
    assert all(is_held_out(r["source"], 0.2) for r in d.val) and not any(is_held_out(r["source"], 0.2) for r in d.train)
    c = d.ledger["records"]
    assert (c["format_mismatch"], c["duplicate_source"], c["conflicting_target"], c["too_long"]) == (1, 1, 0, 1)
    pairs_invariant(d)
    with_names = translation_dataset("fr", root=locale_root, val_fraction=0.2, name_lists=True)
    assert len(with_names.train + with_names.val) == 42
    hf = translation_dataset("fr", root=locale_root, val_fraction=0.2, hf_format=True)
    assert [{"source": r["translation"]["en"], "target": r["translation"]["fr"]} for r in hf.train] == d.train
    capped = translation_dataset("zh_CN", root=locale_root, val_fraction=0.2, max_pairs=10)
    assert len(capped.train) == 10 and len(capped.val) <= 2 and capped.train == \
        translation_dataset("zh_CN", root=locale_root, val_fraction=0.2).train[:10]
    pairs_invariant(capped)
    with pytest.raises(DataError, match="no gettext catalogs for \\['ko'\\]"):
        translation_dataset("ko", root=locale_root)


def test_no_catalogs_falls_back_to_the_shipped_samples(tmp_path):
    empty = str(tmp_path / "no-locale")
    os.makedirs(empty)
    lid = language_id_dataset(root=empty)
    assert lid.ledger["source"].startswith("sample:") and lid.labels == sorted(DEFAULT_LANGUAGES)
    counts = {lab: sum(r["label"] == lab for r in lid.train) for lab in DEFAULT_LANGUAGES}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 30
    assert all(is_held_out(r["text"], 0.1) for r in lid.val) and len(lid.val) >= len(DEFAULT_LANGUAGES)
    lid_invariant(lid)
    pairs = translation_dataset(root=empty)
    assert len(pairs.train) >= 200 and set(pairs.train[0]) == {"source", "target"}
    pairs_invariant(pairs)
    with pytest.raises(DataError, match="shipped sample is English -> 'fr' only"):
        translation_dataset("de", root=empty)


def test_shipped_samples_are_small_and_carry_their_provenance():
    total = 0
    for name, keys in ((tasks.LANGUAGE_ID_SAMPLE, {"text", "label", "domain"}),
                       (tasks.TRANSLATION_SAMPLE, {"source", "target", "domain"})):
        path = os.path.join(tasks.SAMPLES_DIR, name)
        total += os.path.getsize(path)
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert 200 <= len(records) <= 600 and all(set(r) == keys and r["domain"] for r in records)
    assert total < 200_000


def test_write_samples_round_trips_through_the_fallback(locale_root, tmp_path, monkeypatch):
    assert set(DEFAULT_LANGUAGES) == set(WORDS) | {"en"}
    out = str(tmp_path / "samples")
    written = write_samples(out, locale_root, per_label=20, pairs=25)
    assert sorted(written) == sorted([tasks.LANGUAGE_ID_SAMPLE, tasks.TRANSLATION_SAMPLE])
    monkeypatch.setattr(tasks, "SAMPLES_DIR", out)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    from_sample = language_id_dataset(root=empty, per_label=20)
    direct = language_id_dataset(root=locale_root, per_label=20, max_chars=100)
    assert (from_sample.train, from_sample.val) == (direct.train, direct.val) and len(direct.train) == 20 * 8
    pairs = translation_dataset(root=empty, max_pairs=25)
    assert pairs.train == translation_dataset(root=locale_root, max_pairs=25, max_chars=100).train
