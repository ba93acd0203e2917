"""Compiled gettext catalogs (.mo) written for tests, so they do not depend on the machine's.

The GNU .mo layout (gettext manual, "The Format of GNU MO Files"): a 28-byte little-endian header
(magic 0x950412de, revision 0, N strings, offset of the msgid table, offset of the msgstr table,
hash table size 0 and offset), two tables of (length, offset) pairs, then the NUL-terminated
strings. A plural entry's msgid is "singular\\0plural" and its msgstr the forms joined by NUL; a
msgctxt is "context\\x04msgid". Python's gettext reads what this writes.
"""

from __future__ import annotations

import os
import struct
from typing import Union

Msgstr = Union[str, list]


def header(charset: str = "UTF-8", plural: str = "nplurals=2; plural=(n != 1);") -> str:
    return f"Content-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: 8bit\nPlural-Forms: {plural}\n"


def mo_bytes(entries: dict[str, Msgstr], charset: str = "UTF-8", raw_header: bytes | None = None,
             plural: str = "nplurals=2; plural=(n != 1);") -> bytes:
    """A .mo file of `entries` {msgid: msgstr | [plural forms]}; a plural msgid is 'one\\0many'.
    Strings are encoded with `charset`; `raw_header` replaces the encoded header."""
    items = [(b"", raw_header if raw_header is not None else header(charset, plural).encode("ascii"))]
    for msgid, msgstr in entries.items():
        value = "\0".join(msgstr) if isinstance(msgstr, list) else msgstr
        items.append((msgid.encode(charset), value.encode(charset)))
    n = len(items)
    ids_at, strs_at = 28, 28 + 8 * n
    data_at = strs_at + 8 * n
    blob, ids_table, strs_table = b"", [], []
    for table, index in ((ids_table, 0), (strs_table, 1)):
        for item in items:
            s = item[index]
            table.append((len(s), data_at + len(blob)))
            blob += s + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, ids_at, strs_at, 0, data_at)
    out += b"".join(struct.pack("<2I", *p) for p in ids_table) + b"".join(struct.pack("<2I", *p) for p in strs_table)
    return out + blob


def write_catalog(root, lang: str, domain: str, entries: dict[str, Msgstr], **kwargs) -> str:
    """Write <root>/<lang>/LC_MESSAGES/<domain>.mo; returns its path."""
    folder = os.path.join(str(root), lang, "LC_MESSAGES")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{domain}.mo")
    with open(path, "wb") as f:
        f.write(kwargs.pop("data", None) or mo_bytes(entries, **kwargs))
    return path
