"""Corpus sources: expand paths into files and infer their format (records.py reads them).

A *source* is one file (any fsspec URI: local, file://, s3://, gs://, memory://), one directory
written by `datasets.Dataset.save_to_disk`, or one Hugging Face hub dataset
(`hf://datasets/<name>` with `data.format=hf`). Formats:

    .txt              one document per file, or per line with data.txt_mode=line
    .jsonl / .json    one JSON object per line (or a JSON array); text in data.text_field
    .parquet          text in the column data.text_field
    .csv              a header row, then one record per row (RFC 4180 quoting); text in data.text_field
    HF datasets dir   text in the column data.text_field, split data.hf_split for a DatasetDict

Any of them may be compressed (.gz, .bz2, .zst, .xz): the compression is inferred from the last
extension. A `Corpus` is the sources and how to read them (text field, txt mode, bad-record
limit, storage options), everything a read task needs.

Remote storage: credentials come from the usual places (AWS_* env vars, ~/.aws, GCP ADC).
Per-protocol fsspec options go in `data.storage_options`, e.g. an S3-compatible endpoint
(MinIO, moto, R2):

    data:
      storage_options: {s3: {endpoint_url: "http://localhost:9000", key: ..., secret: ...}}

(`AWS_ENDPOINT_URL_S3` in the environment of every Ray worker works too.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from llmos_ray.errors import DataError
from llmos_ray.storage import protocol

log = logging.getLogger(__name__)

FORMATS = ("txt", "jsonl", "json", "parquet", "csv", "hf")
_EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
               ".parquet": "parquet", ".pq": "parquet",
               ".csv": "csv"}
HUB_PREFIX = "hf://datasets/"
# Filesystems that live inside one process: their files are copied into the read tasks.
PROCESS_LOCAL_PROTOCOLS = ("memory",)


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
    mix: tuple = ()
    """For a weighted mixture (data.mix): its components (mix.Component), in order."""
    component_of: tuple = ()
    """For a mixture: the component index of each source."""


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
        name = path[len(HUB_PREFIX):] if path.startswith(HUB_PREFIX) else path
        return [Source(HUB_PREFIX + name.strip("/"), "hf")]
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
        raise DataError(f"no corpus files (.txt, .jsonl, .json, .parquet, .csv, optionally .gz/.bz2/.zst) "
                        f"under {given!r}")
    return out


def _file_source(fs, path: str, size: int, fmt: str, given: str) -> Source:
    f = fmt if fmt != "auto" else infer_format(path)
    if f is None:
        raise DataError(f"cannot infer the format of {fs.unstrip_protocol(path)!r} (from {given!r}) from its "
                        f"extension; name it .txt, .jsonl, .json, .parquet or .csv (optionally + .gz/.bz2/.zst), "
                        f"or set data.format")
    return Source(fs.unstrip_protocol(path), f, int(size))


def infer_format(path: str) -> Optional[str]:
    """'txt', 'jsonl', 'json', 'parquet' or 'csv' from the extension under any compression suffix."""
    from fsspec.utils import infer_compression

    name = path.rsplit("/", 1)[-1].lower()
    if infer_compression(name) is not None:
        name = name.rsplit(".", 1)[0]
    return _EXTENSIONS.get(os.path.splitext(name)[1])


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _looks_like_hub_name(path: str) -> bool:
    """'wikitext' or 'org/name' that is not a local path, or hf://datasets/org/name."""
    if path.startswith(HUB_PREFIX):
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
