"""Corpus sources: expand paths into files, infer their format, read their records.

A *source* is one file (any fsspec URI: local, file://, s3://, gs://, memory://), one directory
written by `datasets.Dataset.save_to_disk`, or one Hugging Face hub dataset
(`hf://datasets/<name>` with `data.format=hf`). Formats:

    .txt              one document per file, or per line with data.txt_mode=line
    .jsonl / .json    one JSON object per line (or a JSON array); text in data.text_field
    .parquet          text in the column data.text_field
    HF datasets dir   text in the column data.text_field, split data.hf_split for a DatasetDict

Any of them may be compressed (.gz, .bz2, .zst, .xz): the compression is inferred from the last
extension. `read_records` yields `(line, text, reason)` per record: `text` is None for a bad
record (malformed JSON, missing or non-string field, undecodable UTF-8, unreadable parquet rows)
and `reason` says why; `line` is 1-based (line of a .txt/.jsonl file, element of a JSON array,
row of a parquet file or dataset). A file whose share of bad records exceeds
`data.max_bad_fraction` raises `DataError` naming the file and its first bad line.

Remote storage: credentials come from the usual places (AWS_* env vars, ~/.aws, GCP ADC).
Per-protocol fsspec options go in `data.storage_options`, e.g. an S3-compatible endpoint
(MinIO, moto, R2):

    data:
      storage_options: {s3: {endpoint_url: "http://localhost:9000", key: ..., secret: ...}}

(`AWS_ENDPOINT_URL_S3` in the environment of every Ray worker works too.)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from llmos_ray.errors import DataError
from llmos_ray.storage import protocol

log = logging.getLogger(__name__)

FORMATS = ("txt", "jsonl", "json", "parquet", "hf")
_EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
               ".parquet": "parquet", ".pq": "parquet"}
_HUB_PREFIX = "hf://datasets/"
# Filesystems that live inside one process: their files are copied into the read tasks.
PROCESS_LOCAL_PROTOCOLS = ("memory",)

Record = tuple[int, Optional[str], Optional[str]]  # (line, text or None, reason or None)


@dataclass
class Source:
    """One expanded corpus source."""

    uri: str
    format: str
    size: int = 0
    """Bytes on storage (0 when unknown); used to group small files into one read task."""


@dataclass
class Corpus:
    """Everything a read task needs to read a corpus: its sources and how to parse them."""

    sources: list[Source]
    text_field: str = "text"
    txt_mode: str = "file"
    hf_split: str = "train"
    max_bad_fraction: float = 0.01
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, bytes] = field(default_factory=dict)
    """Contents of sources on process-local filesystems (memory://), keyed by URI."""
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Listing


def list_sources(paths: list[str], fmt: str = "auto",
                 storage_options: Optional[dict[str, dict[str, Any]]] = None) -> list[str]:
    """Expand files, directories and globs (fsspec URIs) into a deterministic list of source URIs.

    Each entry of `paths` expands to its files sorted by path; entries keep their given order and
    a file named twice is listed once. A directory saved by `datasets.save_to_disk` is one source.
    Raises DataError naming the path when nothing matches or a format cannot be inferred."""
    return [s.uri for s in expand_sources(paths, fmt, storage_options)]


def expand_sources(paths: list[str], fmt: str = "auto",
                   storage_options: Optional[dict[str, dict[str, Any]]] = None) -> list[Source]:
    """`list_sources` with each source's format and size."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    if not paths:
        raise DataError("no corpus paths given")
    out: list[Source] = []
    seen: set[str] = set()
    for path in paths:
        try:
            expanded = _expand_one(path, fmt, storage_options or {})
        except (OSError, ValueError) as e:  # permissions, credentials, unreachable endpoints
            raise DataError(f"cannot list corpus path {path!r}: {type(e).__name__}: {e}") from None
        for src in expanded:
            if src.uri not in seen:
                seen.add(src.uri)
                out.append(src)
    return out


def filesystem(uri: str, storage_options: Optional[dict[str, dict[str, Any]]] = None):
    """(fsspec filesystem, path without protocol) for `uri`, with that protocol's options."""
    import fsspec

    opts = dict((storage_options or {}).get(protocol(uri), {}))
    try:
        return fsspec.core.url_to_fs(uri, **opts)
    except ImportError as e:
        raise DataError(f"cannot read {uri!r}: {e} (install the filesystem package, e.g. "
                        f"pip install 'llmos-ray[s3]' or '[gcs]')") from None
    except ValueError as e:
        raise DataError(f"cannot read {uri!r}: {e}") from None


def _expand_one(path: str, fmt: str, storage_options) -> list[Source]:
    if fmt == "hf" and _looks_like_hub_name(path):
        name = path[len(_HUB_PREFIX):] if path.startswith(_HUB_PREFIX) else path
        return [Source(_HUB_PREFIX + name.strip("/"), "hf")]
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    fs, root = filesystem(path, storage_options)
    if fmt == "hf":
        if not fs.isdir(root) or _saved_dataset_kind(fs, root) is None:
            raise DataError(f"{path!r} is not a directory written by datasets.save_to_disk "
                            f"(no dataset_dict.json or state.json in it)")
        return [Source(fs.unstrip_protocol(root), "hf", _dir_size(fs, root))]
    if any(c in root for c in "*?["):
        matches = fs.glob(root, detail=True)
        if not matches:
            raise DataError(f"no files match {path!r}")
        out = []
        for p in sorted(matches):
            if matches[p].get("type") == "directory":
                out += _expand_dir(fs, p, fmt, path)
            elif not _hidden(p.rsplit("/", 1)[-1]):
                out.append(_file_source(fs, p, matches[p].get("size") or 0, fmt, path))
        if not out:
            raise DataError(f"no corpus files match {path!r}")
        return out
    if not fs.exists(root):
        raise DataError(f"corpus path {path!r} does not exist")
    if fs.isdir(root):
        return _expand_dir(fs, root, fmt, path)
    return [_file_source(fs, root, fs.info(root).get("size") or 0, fmt, path)]


def _expand_dir(fs, root: str, fmt: str, given: str) -> list[Source]:
    root = root.rstrip("/")
    if fmt in ("auto", "hf") and _saved_dataset_kind(fs, root):
        return [Source(fs.unstrip_protocol(root), "hf", _dir_size(fs, root))]
    files = fs.find(root, detail=True)
    # A saved HF dataset inside the directory is one source; its own files are not.
    dataset_roots = sorted({p.rsplit("/", 1)[0] for p in files
                            if p.endswith(("/dataset_dict.json", "/state.json"))
                            and _saved_dataset_kind(fs, p.rsplit("/", 1)[0])}, key=len)
    top_roots = [d for d in dataset_roots if not any(d.startswith(o + "/") for o in dataset_roots if o != d)]
    out: list[Source] = []
    skipped: list[str] = []
    for p in sorted(files):
        rel = p[len(root) + 1:]
        if any(_hidden(part) for part in rel.split("/")):
            continue
        if any(p == d or p.startswith(d + "/") for d in top_roots):
            continue
        if fmt == "auto" and infer_format(p) is None:
            skipped.append(rel)
            continue
        out.append(_file_source(fs, p, files[p].get("size") or 0, fmt, given))
    for d in top_roots:
        out.append(Source(fs.unstrip_protocol(d), "hf", _dir_size(fs, d)))
    out.sort(key=lambda s: s.uri)
    if skipped:
        log.warning("%s: skipped %d file(s) of unknown format (e.g. %s); set data.format to read them",
                    given, len(skipped), skipped[0])
    if not out:
        raise DataError(f"no corpus files (.txt, .jsonl, .json, .parquet, optionally .gz/.bz2/.zst) "
                        f"under {given!r}")
    return out


def _file_source(fs, path: str, size: int, fmt: str, given: str) -> Source:
    f = fmt if fmt != "auto" else infer_format(path)
    if f is None:
        raise DataError(f"cannot infer the format of {fs.unstrip_protocol(path)!r} (from {given!r}) from its "
                        f"extension; name it .txt, .jsonl, .json or .parquet (optionally + .gz/.bz2/.zst), "
                        f"or set data.format")
    return Source(fs.unstrip_protocol(path), f, int(size))


def infer_format(path: str) -> Optional[str]:
    """'txt', 'jsonl', 'json' or 'parquet' from the extension under any compression suffix."""
    from fsspec.utils import infer_compression

    name = path.rsplit("/", 1)[-1].lower()
    if infer_compression(name) is not None:
        name = name.rsplit(".", 1)[0]
    return _EXTENSIONS.get(os.path.splitext(name)[1])


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _looks_like_hub_name(path: str) -> bool:
    """'wikitext' or 'org/name' that is not a local path, or hf://datasets/org/name."""
    if path.startswith(_HUB_PREFIX):
        return True
    return ("://" not in path and not path.startswith(("/", ".", "~")) and path.count("/") <= 1
            and not os.path.exists(path))


def _saved_dataset_kind(fs, root: str) -> Optional[str]:
    """'dict' for a saved DatasetDict, 'dataset' for a saved Dataset, else None."""
    if fs.exists(f"{root}/dataset_dict.json"):
        return "dict"
    if fs.exists(f"{root}/state.json") and fs.exists(f"{root}/dataset_info.json"):
        return "dataset"
    return None


def _dir_size(fs, root: str) -> int:
    try:
        return int(sum((info.get("size") or 0) for info in fs.find(root, detail=True).values()))
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# Reading


def read_records(corpus: Corpus, source: Source) -> Iterator[Record]:
    """Yield `(line, text, reason)` for each record of `source`, then check its bad fraction.

    Stream-level corruption (a truncated .gz, a parquet file without a footer) raises DataError:
    the records after it cannot be found, so no count of them would be honest."""
    total = bad = 0
    first_bad: Optional[tuple[int, str]] = None
    for line, text, reason in _records(corpus, source):
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


def _records(corpus: Corpus, source: Source) -> Iterator[Record]:
    fmt = source.format
    if fmt == "hf":
        yield from _hf_records(corpus, source)
        return
    try:
        with open_source(corpus, source) as f:
            if fmt == "parquet":
                yield from _parquet_records(f, source, corpus.text_field)
            elif fmt == "txt" and corpus.txt_mode == "file":
                yield _decoded(1, f.read())
            elif fmt == "txt":
                for line, raw in enumerate(_lines(f), 1):
                    yield _decoded(line, raw.rstrip(b"\r\n"))
            elif fmt == "json":
                yield from _json_records(f.read(), corpus.text_field)
            else:
                yield from _jsonl_records(_lines(f), corpus.text_field)
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


def _decoded(line: int, raw: bytes) -> Record:
    try:
        return line, raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return line + raw.count(b"\n", 0, e.start), None, f"invalid UTF-8 at byte {e.start}"


def _jsonl_records(lines: Iterable[bytes], text_field: str) -> Iterator[Record]:
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
            yield _field(line, obj, text_field)


def _json_records(data: bytes, text_field: str) -> Iterator[Record]:
    """A .json file: a JSON array of objects, or JSON lines."""
    if not data.lstrip().startswith(b"["):
        yield from _jsonl_records(io.BytesIO(data), text_field)
        return
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"not a valid JSON array: {e}") from None
    for i, obj in enumerate(items, 1):
        yield _field(i, obj, text_field)


def _field(line: int, obj: Any, text_field: str) -> Record:
    if not isinstance(obj, dict):
        return line, None, f"not a JSON object ({type(obj).__name__})"
    if text_field not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        return line, None, f"missing field {text_field!r} (fields: {keys})"
    return _checked(line, obj[text_field], text_field)


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


def _parquet_records(f, source: Source, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.utils import infer_compression

    if infer_compression(source.uri) is not None:  # a compressed stream seeks by re-decompressing
        f = pa.BufferReader(f.read())
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source.uri}: not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{source.uri}: no column {text_field!r} (columns: {', '.join(names)}); "
                        f"set data.text_field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{source.uri}: column {text_field!r} has type {kind}, not a string")
    row = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            values = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        except (pa.ArrowException, OSError) as e:
            reason = f"unreadable row group {g}: {e}"
            for i in range(n):
                yield row + i + 1, None, reason
        else:
            for i, v in enumerate(values):
                yield _checked(row + i + 1, v, text_field)
        row += n


def _hf_records(corpus: Corpus, source: Source) -> Iterator[Record]:
    import datasets

    name = corpus.text_field
    if source.uri.startswith(_HUB_PREFIX):
        hub = source.uri[len(_HUB_PREFIX):]
        try:
            ds = datasets.load_dataset(hub, split=corpus.hf_split, streaming=True)
        except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "cannot load"
            raise DataError(f"cannot load hub dataset {hub!r} split {corpus.hf_split!r}: {e}") from None
        for i, row in enumerate(ds, 1):
            yield _field(i, row, name)
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
    if name not in ds.column_names:
        raise DataError(f"{source.uri}: no column {name!r} (columns: {', '.join(ds.column_names)}); "
                        f"set data.text_field")
    table = ds.with_format("arrow").select_columns([name])
    for start in range(0, len(table), 10_000):
        for i, v in enumerate(table[start:start + 10_000].column(0).to_pylist(), start + 1):
            yield _checked(i, v, name)
