"""Reading the records of one source, per format: `read_objects` for structured records (JSONL,
JSON, parquet, CSV, saved or hub datasets), `read_records` for the text of each record (those formats'
data.text_field, and .txt files).

`read_objects` yields `(line, object, None)` per record, or `(line, None, reason)` for one that
does not parse (malformed JSON, undecodable UTF-8, unreadable parquet rows); parquet and dataset
rows are dicts. `read_records` yields `(line, text, reason)`: `text` is None for a bad record
(one that does not parse, or whose field is missing or not a string) and `reason` says why. A
file whose share of bad records exceeds `data.max_bad_fraction` raises `DataError` naming the
file and its first bad line. `line` is 1-based: line of a .txt/.jsonl file (of a .csv file: the
line its record starts on; the header is line 1), element of a JSON array, row of a parquet file
or dataset. CSV values are strings; a row whose field count differs from the header's, or that
is not valid UTF-8, is a bad record. Stream-level corruption (a truncated .gz, a parquet
file without a footer) raises DataError: the records after it cannot be found, so no count of
them would be honest.
"""

from __future__ import annotations

import contextlib
import io
import json
import zlib
from typing import Any, Iterable, Iterator, Optional

from llmos_ray.data.sources import HUB_PREFIX, Corpus, Source
from llmos_ray.errors import DataError
from llmos_ray.storage import protocol

Record = tuple[int, Optional[str], Optional[str]]
"""(line, text or None, reason or None)"""
Parsed = tuple[int, Any, Optional[str]]
"""(line, object, None) or (line, None, reason)"""
OBJECT_FORMATS = ("jsonl", "json", "parquet", "csv", "hf")
"""The formats whose records are objects (a .txt file's are lines of text)."""


def read_records(corpus: Corpus, source: Source) -> Iterator[Record]:
    """Yield `(line, text, reason)` for each record of `source`, then check its bad fraction."""
    total = bad = 0
    first_bad: Optional[tuple[int, str]] = None
    for line, text, reason in _texts(corpus, source):
        total += 1
        if text is None:
            bad += 1
            if first_bad is None:
                first_bad = (line, reason or "bad record")
        yield line, text, reason
    if bad and bad > corpus.max_bad_fraction * total:
        raise DataError(
            f"{source.uri}: {bad} of {total} records are bad ({bad / total:.1%} > data.max_bad_fraction="
            f"{corpus.max_bad_fraction:g}); first at line {first_bad[0]}: {first_bad[1]}. "
            f"Fix the file, check data.format/data.text_field, or raise data.max_bad_fraction")


def read_objects(corpus: Corpus, source: Source) -> Iterator[Parsed]:
    """Yield `(line, object, None)` for each record of a JSONL, JSON, parquet or dataset source, or
    `(line, None, reason)` for one that does not parse. The caller decides what else makes a
    record bad, so it counts them (no bad-fraction check here)."""
    if source.format not in OBJECT_FORMATS:
        raise DataError(f"{source.uri} is {source.format}, whose records are not objects: records are read from "
                        f"JSONL, JSON, parquet or CSV files (or saved datasets)")
    yield from _parsed(corpus, source, None)


def field_text(line: int, obj: Any, name: str) -> Record:
    """The string field `name` of a parsed record, or why there is none."""
    if not isinstance(obj, dict):
        return line, None, f"not a JSON object ({type(obj).__name__})"
    if name not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        return line, None, f"missing field {name!r} (fields: {keys})"
    return _checked(line, obj[name], name)


def _texts(corpus: Corpus, source: Source) -> Iterator[Record]:
    if source.format == "txt":
        yield from _read_stream(corpus, source, lambda f: _txt_records(f, corpus.txt_mode))
        return
    for line, obj, reason in _parsed(corpus, source, corpus.text_field):
        yield (line, None, reason) if reason is not None else field_text(line, obj, corpus.text_field)


def _parsed(corpus: Corpus, source: Source, text_field: Optional[str]) -> Iterator[Parsed]:
    """The records of an object format; with `text_field`, parquet and datasets read that column only."""
    fmt = source.format
    if fmt == "hf":
        yield from _hf_rows(corpus, source, text_field)
    elif fmt == "parquet":
        yield from _read_stream(corpus, source, lambda f: _parquet_rows(f, source, text_field))
    elif fmt == "json":
        yield from _read_stream(corpus, source, lambda f: _json_objects(f.read(), source))
    elif fmt == "csv":
        yield from _read_stream(corpus, source, lambda f: _csv_rows(f, source))
    else:
        yield from _read_stream(corpus, source, lambda f: _jsonl_objects(_lines(f)))


def _read_stream(corpus: Corpus, source: Source, parse) -> Iterator:
    """`parse(binary file)`'s records, with a corrupt stream reported as a DataError naming the file."""
    try:
        with open_source(corpus, source) as f:
            yield from parse(f)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, RuntimeError) as e:
        # A truncated or corrupt compressed stream; ValueError/RuntimeError come from zstd and bz2.
        raise DataError(f"{source.uri}: cannot read the file: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def open_source(corpus: Corpus, source: Source):
    """A binary file object for `source`, decompressed by extension (.gz, .bz2, .zst, .xz)."""
    from fsspec.utils import infer_compression

    compression = infer_compression(source.uri)
    if source.uri in corpus.snapshots:  # memory:// captured when the corpus was resolved
        raw = io.BytesIO(corpus.snapshots[source.uri])
        if compression is None:
            yield raw
        else:
            from fsspec.compression import compr

            with compr[compression](raw, mode="rb") as f:
                yield f
        return
    import fsspec

    with fsspec.open(source.uri, "rb", compression=compression,
                     **corpus.storage_options.get(protocol(source.uri), {})) as f:
        yield f


def _lines(f, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream (each with its b"\\n"), read in large chunks: works for streams
    without readline (zstd) and makes few requests to object stores."""
    pending: list[bytes] = []  # pieces of a line longer than one chunk
    while chunk := f.read(chunk_size):
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        lines[0] = b"".join(pending) + lines[0]
        pending = [lines.pop()] if lines[-1] else []
        if not pending:
            lines.pop()
        for line in lines:
            yield line + b"\n"
    if pending and (last := b"".join(pending)):
        yield last


def _txt_records(f, txt_mode: str) -> Iterator[Record]:
    if txt_mode == "file":
        yield _decoded(1, f.read())
        return
    for line, raw in enumerate(_lines(f), 1):
        yield _decoded(line, raw.rstrip(b"\r\n"))


def _decoded(line: int, raw: bytes) -> Record:
    try:
        return line, raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return line + raw.count(b"\n", 0, e.start), None, f"invalid UTF-8 at byte {e.start}"


def _jsonl_objects(lines: Iterable[bytes]) -> Iterator[Parsed]:
    for line, raw in enumerate(lines, 1):
        if not raw.strip():
            continue  # a blank line holds no record
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield line, None, f"invalid UTF-8 at byte {e.start}"
        except (ValueError, RecursionError) as e:
            yield line, None, f"malformed JSON: {e}"
        else:
            yield line, obj, None


def _json_objects(data: bytes, source: Source) -> Iterator[Parsed]:
    """A .json file: a JSON array of objects, or JSON lines."""
    if not data.lstrip().startswith(b"["):
        yield from _jsonl_objects(io.BytesIO(data))
        return
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{source.uri}: not a valid JSON array: {e}") from None
    for i, obj in enumerate(items, 1):
        yield i, obj, None


def _csv_rows(f, source: Source) -> Iterator[Parsed]:
    """Rows of a CSV file with a header, as dicts of strings (the stdlib csv module: quoted fields
    may hold commas and newlines). Undecodable bytes are kept as surrogates so the rest of the
    file still reads; a row holding any, or with more or fewer fields than the header, is bad."""
    import csv

    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{source.uri}: not a readable CSV header: {e}") from None
    if any(_has_surrogates(h) for h in header):
        raise DataError(f"{source.uri}: the CSV header is not valid UTF-8")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, f"malformed CSV: {e}"
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row:
            continue  # a blank line holds no record
        if len(row) != len(header):
            yield line, None, f"{len(row)} fields, the header has {len(header)}"
        elif any(_has_surrogates(v) for v in row):
            yield line, None, "invalid UTF-8"
        else:
            yield line, dict(zip(header, row)), None


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _checked(line: int, value: Any, text_field: str) -> Record:
    if value is None:
        return line, None, f"field {text_field!r} is null"
    if not isinstance(value, str):
        return line, None, f"field {text_field!r} is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return line, None, f"field {text_field!r} holds an unpaired surrogate (not valid UTF-8)"
    return line, value, None


def _parquet_rows(f, source: Source, text_field: Optional[str]) -> Iterator[Parsed]:
    """Rows as dicts, row group by row group (an unreadable group: a bad record per row). With
    `text_field`, that column only, which must exist and hold strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.utils import infer_compression

    if infer_compression(source.uri) is not None:  # a compressed stream seeks by re-decompressing
        f = pa.BufferReader(f.read())
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source.uri}: not a readable parquet file: {e}") from None
    columns = None
    if text_field is not None:
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{source.uri}: no column {text_field!r} (columns: {', '.join(names)}); "
                            f"set data.text_field")
        kind = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{source.uri}: column {text_field!r} has type {kind}, not a string")
        columns = [text_field]
    row = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            rows = pf.read_row_group(g, columns=columns).to_pylist()
        except (pa.ArrowException, OSError) as e:
            reason = f"unreadable row group {g}: {e}"
            for i in range(n):
                yield row + i + 1, None, reason
        else:
            for i, r in enumerate(rows):
                yield row + i + 1, r, None
        row += n


def _hf_rows(corpus: Corpus, source: Source, text_field: Optional[str]) -> Iterator[Parsed]:
    """Rows of a hub dataset (streamed) or a saved one; with `text_field`, a saved one's column only."""
    import datasets

    if source.uri.startswith(HUB_PREFIX):
        hub = source.uri[len(HUB_PREFIX):]
        try:
            ds = datasets.load_dataset(hub, split=corpus.hf_split, streaming=True)
        except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "cannot load"
            raise DataError(f"cannot load hub dataset {hub!r} split {corpus.hf_split!r}: {e}") from None
        for i, row in enumerate(ds, 1):
            yield i, row, None
        return
    path = source.uri.removeprefix("file://")
    try:
        ds = datasets.load_from_disk(path, storage_options=corpus.storage_options.get(protocol(source.uri)))
    except (OSError, ValueError) as e:
        raise DataError(f"{source.uri}: cannot load the saved dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if corpus.hf_split not in ds:
            raise DataError(f"{source.uri}: no split {corpus.hf_split!r} (splits: {', '.join(ds)}); "
                            f"set data.hf_split")
        ds = ds[corpus.hf_split]
    table = ds.with_format("arrow")
    if text_field is not None:
        if text_field not in ds.column_names:
            raise DataError(f"{source.uri}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                            f"set data.text_field")
        table = table.select_columns([text_field])
    for start in range(0, len(table), 10_000):
        for i, row in enumerate(table[start:start + 10_000].to_pylist(), start + 1):
            yield i, row, None
