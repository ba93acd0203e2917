"""Human-translated program messages from the machine's gettext catalogs: read, cleaned, counted.

Linux distributions install the translations of program messages as compiled gettext catalogs,
`<root>/<lang>/LC_MESSAGES/<domain>.mo` (root = /usr/share/locale), each mapping an English msgid to
a translator's msgstr. `iter_messages` reads them with the standard library
(`gettext.GNUTranslations`, which decodes with the charset each catalog declares) and yields
`Message(lang, domain, msgid, msgstr)`, cleaned by `clean_message`. Every file and every catalog
entry is accounted for in a `CatalogLedger`, exactly once:

    files   == files_read + files_unreadable          (unreadable ones listed with the reason)
    entries == messages + header + plural_form + empty + untranslated + no_letters

- header: the empty msgid (the catalog's metadata);
- plural_form: a plural entry is stored as one key per form, (msgid, i); the form the catalog
  uses for n=1 (its Plural-Forms rule applied to 1) is kept as the translation of the singular
  msgid, the other forms are counted here (the English plural msgid is not in a .mo's keys);
- empty: a msgstr that is empty or only whitespace;
- untranslated: msgstr equal to msgid after cleaning (translators copy names, "OK", "%s: %s");
- no_letters: msgid or msgstr has no letter once format specifiers are taken out ("%s (%d)").
A msgctxt ("Stock label\\x04C_onnect") is dropped from the msgid (counted as `with_context`).

Cleaning keeps format specifiers (`format_specifiers`: printf `%s %5.2f %1$s %(name)s %<PRIu64>`,
Qt `%1`, Python `{0} {name}`) intact, normalises whitespace (every run of whitespace, newlines and
no-break spaces included, becomes one space) and removes mnemonic (keyboard accelerator) markers:
GTK's `_File`/`Pr_eferences`, Qt's `&File`, and the CJK form `文件(_F)`. A marker is a lone `_` or
`&` before a letter or digit; `__` and `&&` are escapes of a literal `_`/`&`, `&amp;` is an
entity, a marker inside a format specifier is part of it. Underscores are everywhere in program
messages (`file_name`, `LC_ALL`, `pg_upgrade`), so markers are removed only in catalogs that use
them: at least MNEMONIC_SHARE of the catalog's msgids carry exactly one lone marker at the start
of a word (on this machine: gtk20 and software-properties for `_`, no catalog for `&`). There, a
string's marker is removed when it is the only lone one in the string, and a marker inside a word
only when a lowercase letter follows (GTK writes `C_reate`; `KP_Begin`, `Page_Down` are key names)
and the message is not one snake_case identifier (`file_name`). Heuristic by nature: "Open file_name"
in a GTK catalog would lose its underscore.
"""

from __future__ import annotations

import gettext
import glob
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator, NamedTuple, Optional

LOCALE_ROOT = "/usr/share/locale"
MNEMONIC_SHARE = 0.02
"""A catalog uses a marker when at least this share (and 2) of its msgids has one at a word start."""
MARKERS = "_&"

_PRINTF = (r"%(?:\d+\$)?(?:\([^()\s]*\))?[-+#0']*(?:\d+|\*(?:\d+\$)?)?(?:\.(?:\d+|\*(?:\d+\$)?))?"
           r"(?:hh|ll|I64|I32|[hlLqjzZtI])?[diouxXeEfFgGaAcCsSpnm%]")
FORMAT_RE = re.compile(rf"{_PRINTF}|%<PRI\w+>|%L?\d+|\{{[^{{}}\s]*\}}")
# One pass finds format specifiers (kept whole), escapes, entities and candidate markers, left to right.
_TOKENS = re.compile(rf"(?P<fmt>{FORMAT_RE.pattern})|(?P<esc>__|&&)|(?P<entity>&#?\w+;)|(?P<mark>[_&])")
_NAME_LIST = re.compile(r"iso_\d")
_IDENTIFIER = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")  # a whole message like 'file_name'
_WORD_START_BEFORE = frozenset(" \t\n\xa0\"'([/«“‘<")


class Message(NamedTuple):
    lang: str
    """The locale directory's name: 'fr', 'pt_BR', 'zh_CN', 'sr@latin'."""
    domain: str
    """The catalog's file name without .mo: 'coreutils', 'gtk20'."""
    msgid: str
    """The English original (context removed; cleaned unless clean=False)."""
    msgstr: str
    """The translation."""


@dataclass
class CatalogLedger:
    """Counts of what was read and what was dropped and why (see the module docstring)."""

    counts: Counter = field(default_factory=Counter)
    unreadable: list = field(default_factory=list)
    """[{"path", "reason"}] for every catalog file that could not be read or decoded."""

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def as_dict(self) -> dict:
        """JSON-ready: every count, and the unreadable files with their reasons."""
        return {**dict(sorted(self.counts.items())), "unreadable": list(self.unreadable)}


def catalog_languages(root: str = LOCALE_ROOT) -> dict[str, int]:
    """{lang: number of .mo files} for every locale directory under `root` that has catalogs."""
    found: Counter = Counter()
    for path in glob.glob(os.path.join(glob.escape(root), "*", "LC_MESSAGES", "*.mo")):
        found[path.split(os.sep)[-3]] += 1
    return dict(sorted(found.items()))


def catalog_files(lang: str, root: str = LOCALE_ROOT) -> list[str]:
    """The .mo files of one language, sorted by name (the reading order everywhere)."""
    return sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(lang), "LC_MESSAGES", "*.mo")))


def read_catalog(path: str) -> gettext.GNUTranslations:
    """One compiled catalog, decoded with its declared charset. Raises OSError, UnicodeError or
    ValueError-like errors for a file that is not a readable .mo (callers count them)."""
    with open(path, "rb") as f:
        return gettext.GNUTranslations(f)


def iter_messages(lang: str, root: str = LOCALE_ROOT, ledger: Optional[CatalogLedger] = None,
                  clean: bool = True, domains: Optional[Collection[str]] = None,
                  name_lists: bool = True) -> Iterator[Message]:
    """The messages of every catalog of `lang` under `root` (or of those named in `domains`),
    files in name order, entries in the catalog's order; counted in `ledger` (module docstring).
    `name_lists=False` skips the iso-codes catalogs (counted as `name_list_files_skipped`)."""
    ledger = ledger if ledger is not None else CatalogLedger()
    for path in catalog_files(lang, root):
        domain = os.path.basename(path)[:-3]
        if domains is not None and domain not in domains:
            continue
        if not name_lists and is_name_list(domain):
            ledger.add("name_list_files_skipped")
            continue
        ledger.add("files")
        try:
            catalog = read_catalog(path)
        except Exception as e:  # noqa: BLE001 - any malformed file is skipped and counted, never fatal
            ledger.add("files_unreadable")
            ledger.unreadable.append({"path": path, "reason": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        ledger.add("files_read")
        yield from _catalog_messages(lang, os.path.basename(path)[:-3], catalog, ledger, clean)


def is_name_list(domain: str) -> bool:
    """Whether a catalog is one of the iso-codes package's lists of names (iso_639-3: languages,
    iso_3166-2: regions, iso_4217: currencies, iso_15924: scripts …): proper nouns, mostly copied
    or barely changed ("Grebo, Barclayville" -> "grebo, Barclayville"); a quarter of the French
    messages on this machine, and poor evidence of a language."""
    return _NAME_LIST.match(domain) is not None


def _catalog_messages(lang: str, domain: str, catalog: gettext.GNUTranslations, ledger: CatalogLedger,
                      clean: bool) -> Iterator[Message]:
    entries = catalog._catalog  # the parsed .mo: {msgid | (msgid, form): msgstr}
    singular_form = _singular_form(catalog)
    markers = mnemonic_markers(_msgid(k) for k in entries) if clean else ""
    if markers:
        ledger.add("catalogs_with_mnemonics")
    for key, msgstr in entries.items():
        ledger.add("entries")
        if isinstance(key, tuple):
            if key[1] != singular_form:
                ledger.add("plural_form")
                continue
        raw = _msgid(key)
        if raw == "":
            ledger.add("header")
            continue
        if "\x04" in (key[0] if isinstance(key, tuple) else key):
            ledger.add("with_context")
        if not msgstr.strip():
            ledger.add("empty")
            continue
        msgid, text = (clean_message(raw, markers), clean_message(msgstr, markers)) if clean else (raw, msgstr)
        if text == msgid:
            ledger.add("untranslated")
        elif not (has_letters(msgid) and has_letters(text)):
            ledger.add("no_letters")
        else:
            ledger.add("messages")
            yield Message(lang, domain, msgid, text)


def _msgid(key) -> str:
    """The msgid of a catalog key, without its msgctxt (stored as 'context\\x04msgid')."""
    msgid = key[0] if isinstance(key, tuple) else key
    return msgid.rsplit("\x04", 1)[-1]


def _singular_form(catalog: gettext.GNUTranslations) -> int:
    """Which plural form the catalog uses for n = 1 (its Plural-Forms rule; 0 without one)."""
    try:
        return int(catalog.plural(1))
    except Exception:  # noqa: BLE001 - a broken rule: the conventional singular form
        return 0


def has_letters(text: str) -> bool:
    """Whether `text` has a letter outside its format specifiers."""
    if "%" in text or "{" in text:
        text = FORMAT_RE.sub("", text)
    return any(ch.isalpha() for ch in text)


def format_specifiers(text: str) -> list[str]:
    """The format specifiers of `text`, in order: '%s', '%-5.2f', '%1$s', '%(name)s', '%%', '%1', '{0}'."""
    return FORMAT_RE.findall(text)


def normalised_specifiers(text: str) -> list[str]:
    """`format_specifiers` as a sorted list with positions taken out ('%2$s' -> '%s', '{1}' -> '{}'),
    so a translation that reorders its arguments has the same list as its msgid."""
    out = []
    for spec in format_specifiers(text):
        spec = re.sub(r"^%\d+\$", "%", spec)
        out.append("{}" if re.fullmatch(r"\{\d*\}", spec) else spec)
    return sorted(out)


def mnemonic_markers(msgids: Iterable[str]) -> str:
    """The marker characters ('_', '&', both or neither) a catalog uses, from its msgids."""
    n, starts = 0, Counter()
    for msgid in msgids:
        n += 1
        for marker in MARKERS:
            if marker not in msgid:
                continue
            lone = _lone_markers(msgid, marker)
            if len(lone) == 1 and _at_word_start(msgid, lone[0]):
                starts[marker] += 1
    return "".join(m for m in MARKERS if starts[m] >= 2 and starts[m] >= MNEMONIC_SHARE * n)


def _lone_markers(text: str, marker: str) -> list[int]:
    """Positions of lone `marker` characters: not an escape, entity or part of a format specifier."""
    return [m.start() for m in _TOKENS.finditer(text) if m.lastgroup == "mark" and m.group() == marker]


def _at_word_start(text: str, i: int) -> bool:
    return (i == 0 or text[i - 1] in _WORD_START_BEFORE) and _marks_letter(text, i)


def _marks_letter(text: str, i: int) -> bool:
    return i + 1 < len(text) and text[i + 1].isalnum()


def clean_message(text: str, markers: str = "") -> str:
    """`text` with the mnemonic markers of `markers` ('_', '&' or both: the catalog's, see
    `mnemonic_markers`) removed, their escapes ('__', '&&') made literal, and whitespace
    normalised. Format specifiers are never changed."""
    for marker in markers:
        if marker in text:
            text = _remove_marker(text, marker)
    return " ".join(text.split())


def _remove_marker(text: str, marker: str) -> str:
    drop = _marker_span(text, marker)
    pieces, pos = [], 0
    for m in _TOKENS.finditer(text):
        if drop and m.lastgroup == "mark" and drop[0] <= m.start() < drop[1]:
            pieces.append(text[pos:drop[0]])
            pos = drop[1]
        elif m.lastgroup == "esc" and m.group()[0] == marker:
            pieces.append(text[pos:m.start()] + marker)
            pos = m.end()
    return "".join(pieces) + text[pos:]


def _marker_span(text: str, marker: str) -> Optional[tuple[int, int]]:
    """The span to delete for the string's one mnemonic marker (with its '(_F)' frame), or None."""
    lone = _lone_markers(text, marker)
    if len(lone) != 1 or not _marks_letter(text, lone[0]):
        return None
    i = lone[0]
    inside_word = text[i - 1].isalnum() if i else False
    if not (_at_word_start(text, i) or (inside_word and text[i + 1].islower() and not _IDENTIFIER.fullmatch(text))):
        return None
    if i > 0 and text[i - 1] == "(" and text[i + 2:i + 3] == ")":  # CJK style: 文件(_F)
        start = i - 1
        while start > 0 and text[start - 1].isspace():
            start -= 1
        return start, i + 3
    return i, i + 1
