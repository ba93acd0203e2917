"""Reading gettext catalogs: charsets, unreadable files, every entry counted, cleaning that keeps
format specifiers. Synthetic catalogs (tests/data/mo_catalogs.py) plus a few of the machine's."""

import os

import pytest

from llmos_ray.data.gettext_catalogs import (
    LOCALE_ROOT,
    CatalogLedger,
    catalog_languages,
    clean_message,
    format_specifiers,
    iter_messages,
    mnemonic_markers,
    normalised_specifiers,
)
from tests.data.mo_catalogs import header, write_catalog

DROPS = ("header", "plural_form", "empty", "untranslated", "no_letters")


def invariant(ledger: CatalogLedger) -> None:
    c = ledger.counts
    assert c["entries"] == c["messages"] + sum(c[k] for k in DROPS)
    assert c["files"] == c["files_read"] + c["files_unreadable"] == c["files_read"] + len(ledger.unreadable)


def test_declared_charsets_are_honoured_and_bad_files_counted_not_fatal(tmp_path):
    write_catalog(tmp_path, "fr", "a-utf8", {"Open the file": "Ouvrir le fichier"})
    write_catalog(tmp_path, "fr", "b-latin1", {"Already seen": "Déjà vu"}, charset="ISO-8859-1")
    # a header with Latin-1 bytes that declares UTF-8: what Debian's net-tools.mo (de) does
    bad_header = (header() + "Last-Translator: Jörg\n").encode("latin-1")
    write_catalog(tmp_path, "fr", "c-undecodable", {"Quit": "Quitter"}, raw_header=bad_header)
    write_catalog(tmp_path, "fr", "d-garbage", {}, data=b"this is not a catalog at all, just bytes" * 3)
    ledger = CatalogLedger()
    got = [(m.domain, m.msgid, m.msgstr) for m in iter_messages("fr", str(tmp_path), ledger)]
    assert got == [("a-utf8", "Open the file", "Ouvrir le fichier"), ("b-latin1", "Already seen", "Déjà vu")]
    assert ledger.counts["files"] == 4 and ledger.counts["files_unreadable"] == 2
    reasons = {os.path.basename(u["path"]): u["reason"] for u in ledger.unreadable}
    assert reasons["c-undecodable.mo"].startswith("UnicodeDecodeError")
    assert reasons["d-garbage.mo"].startswith("OSError")  # bad magic number
    invariant(ledger)
    assert catalog_languages(str(tmp_path)) == {"fr": 4}


def test_every_entry_is_kept_or_counted_once(tmp_path):
    entries = {
        "Open %s": "Ouvrir %s",
        "%d file\0%d files": ["%d fichier", "%d fichiers"],   # plural: form 0 is n=1 under this rule
        "menu\x04Quit": "Quitter",                             # msgctxt
        "Cancel": "",                                          # empty translation
        "GNU tar": "GNU tar",                                  # untranslated
        "%s: %s": "%s : %s",                                   # no letters besides the specifiers
        "Delete  the\n file": "Supprimer\tle  fichier",
    }
    write_catalog(tmp_path, "fr", "app", entries)
    ledger = CatalogLedger()
    got = [(m.msgid, m.msgstr) for m in iter_messages("fr", str(tmp_path), ledger)]
    assert got == [("Open %s", "Ouvrir %s"), ("%d file", "%d fichier"), ("Quit", "Quitter"),
                   ("Delete the file", "Supprimer le fichier")]
    c = ledger.counts
    assert (c["entries"], c["header"], c["plural_form"], c["empty"], c["untranslated"], c["no_letters"]) == \
        (9, 1, 1, 1, 1, 1)
    assert c["with_context"] == 1 and c["messages"] == 4
    invariant(ledger)


def test_the_catalogs_plural_rule_picks_the_singular_form(tmp_path):
    # A rule under which n=1 is form 1 (so form 0 is not the singular)
    write_catalog(tmp_path, "xx", "app", {"one apple\0%d apples": ["%d pommes", "une pomme"]},
                  plural="nplurals=2; plural=(n == 1 ? 1 : 0);")
    assert [m.msgstr for m in iter_messages("xx", str(tmp_path))] == ["une pomme"]


GTK_LIKE = ["_File", "_Open", "Save _As", "_Quit", "Pr_eferences", "About", "Help", "Close"]


@pytest.mark.parametrize("raw, markers, cleaned", [
    ("_File", "_", "File"),
    ("Save _As…", "_", "Save As…"),
    ("Pr_eferences", "_", "Preferences"),               # GTK mnemonic inside a word
    ("文件(_F)", "_", "文件"),                            # CJK form: the frame goes too
    ("ファイルを開く (_O)...", "_", "ファイルを開く..."),
    ("file_name", "_", "file_name"),                    # one identifier, even in a GTK catalog
    ("KP_Begin", "_", "KP_Begin"),                      # uppercase after: a key name
    ("Show __init__ of _Module", "_", "Show _init_ of Module"),  # GTK escapes: '__' is a literal '_'
    ("_a and _b", "_", "_a and _b"),                    # two markers: not a label, left alone
    ("Open %(file_name)s in _Editor", "_", "Open %(file_name)s in Editor"),  # specifier untouched
    ("Save {file_name}", "_", "Save {file_name}"),
    ("&File", "&", "File"),
    ("Tom && Jerry &Save", "&", "Tom & Jerry Save"),   # Qt escape and marker
    ("Fish &amp; &Chips", "&", "Fish &amp; Chips"),     # an entity is not a marker
    ("R&D report", "&", "R&D report"),                  # inside a word, uppercase after
    ("_File", "", "_File"),                             # a catalog without markers keeps everything
    ("pg_upgrade failed: __init__ & file_name", "", "pg_upgrade failed: __init__ & file_name"),
    ("  Copie_s\u00a0:\n\tfin  ", "", "Copie_s : fin"),  # whitespace: no-break space and newlines too
])
def test_clean_message(raw, markers, cleaned):
    assert clean_message(raw, markers) == cleaned
    assert format_specifiers(clean_message(raw, markers)) == format_specifiers(raw)


def test_mnemonic_markers_are_a_property_of_the_catalog():
    assert mnemonic_markers(GTK_LIKE) == "_"
    assert mnemonic_markers(["&File", "&Edit", "Tom & Jerry", "About"]) == "&"
    # psql/binutils-like: underscores in identifiers, at most a stray word-start one
    code_like = ["pg_upgrade failed", "window_name", "LC_ALL is not set", "undefined _start"] + ["text"] * 60
    assert mnemonic_markers(code_like) == ""


def test_format_specifiers():
    text = "%s %5.2f %1$s %(name)s %<PRIu64> %% %-10lu %.*s %1 {0} {name} {} and 100% sure"
    assert format_specifiers(text) == ["%s", "%5.2f", "%1$s", "%(name)s", "%<PRIu64>", "%%", "%-10lu", "%.*s",
                                       "%1", "{0}", "{name}", "{}"]
    assert normalised_specifiers("%2$s of %1$d {1} {0}") == normalised_specifiers("%d de %s {} {}")


MACHINE = [d for d in ("gtk20", "coreutils") if os.path.isfile(f"{LOCALE_ROOT}/fr/LC_MESSAGES/{d}.mo")]


@pytest.mark.skipif(len(MACHINE) < 2, reason="needs the machine's fr gtk20 and coreutils catalogs")
def test_machine_catalogs_keep_every_specifier_and_only_gtk_loses_markers():
    raw_ledger, clean_ledger = CatalogLedger(), CatalogLedger()
    raw = list(iter_messages("fr", LOCALE_ROOT, raw_ledger, clean=False, domains=MACHINE))
    cleaned = list(iter_messages("fr", LOCALE_ROOT, clean_ledger, domains=MACHINE))
    invariant(raw_ledger)
    invariant(clean_ledger)
    assert clean_ledger.counts["catalogs_with_mnemonics"] == 1 and len(cleaned) > 1500
    by_id: dict = {}
    for m in raw:
        by_id.setdefault((m.domain, " ".join(m.msgid.split())), set()).add(" ".join(m.msgstr.split()))
    for m in cleaned:
        assert "  " not in m.msgstr and "\n" not in m.msgstr
        if m.domain == "coreutils":  # no mnemonics: cleaning only normalised whitespace
            assert m.msgstr in by_id[("coreutils", m.msgid)]
        assert not any(w.startswith("_") and w[1:2].isalpha() for w in m.msgid.split()) or m.domain != "gtk20"
    for original in raw:  # specifiers survive cleaning in every message read
        assert format_specifiers(clean_message(original.msgstr, "_")) == format_specifiers(original.msgstr)
