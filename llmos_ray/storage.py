"""Files on any fsspec filesystem: what a URI is, small text files written whole, remote
directories brought to local disk and back, and small JSON documents that several processes
update at once (`update_json_doc`: a file lock on local disk, compare-and-swap on S3).

Local writes are atomic (a temporary file renamed over the target), so a reader sees the old file
or the new one, never half of one; an object-store write is one PUT on close, which is atomic too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from typing import Callable, Iterator, Optional

CACHE_ENV = "LLMOS_CACHE"


def is_remote(uri: str) -> bool:
    """True for s3://, gs://, memory:// …; False for plain paths and file://."""
    return "://" in uri and not uri.startswith("file://")


def protocol(uri: str) -> str:
    """The fsspec protocol of `uri` ('file' for plain paths)."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def local_path(uri: str) -> str:
    """A plain path for a local URI (file:// stripped, ~ expanded)."""
    return os.path.expanduser(uri.removeprefix("file://"))


def write_text(uri: str, text: str) -> None:
    """Write a small text file (config, report, registry) at a local path, atomically and synced
    to disk, or at any fsspec URI."""
    if is_remote(uri):
        import fsspec

        with fsspec.open(uri, "w") as f:
            f.write(text)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cache_dir(kind: str, uri: str) -> str:
    """Where a remote `uri` of `kind` ('models', 'tokenizers') is kept locally: $LLMOS_CACHE or
    ~/.cache/llmos, then a hash of the URI."""
    root = os.environ.get(CACHE_ENV, os.path.expanduser(os.path.join("~", ".cache", "llmos")))
    return os.path.join(root, kind, hashlib.sha256(uri.encode()).hexdigest()[:16])


def localize(uri: str, kind: str = "models", refresh: bool = False) -> str:
    """A local directory for `uri`: local paths as they are; a remote directory (s3://, gs://, …)
    copied once into the cache (again with `refresh`). The cached copy appears complete or not at all."""
    if not is_remote(uri):
        return local_path(uri)
    import fsspec

    cache = cache_dir(kind, uri)
    if os.path.isdir(cache) and not refresh:
        return cache
    tmp = f"{cache}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fs, path = fsspec.core.url_to_fs(uri)
    fs.get(path.rstrip("/") + "/", tmp.rstrip("/") + "/", recursive=True)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    if os.path.isdir(cache):
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return cache


def upload_dir(local: str, uri: str) -> None:
    """Copy a local directory to a remote `uri` (its files under that prefix)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(local.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


# ---------------------------------------------------------------------------------------------
# Small JSON documents that several processes update (the model library)

CAS_ATTEMPTS = 60


def read_json_doc(uri: str) -> Optional[dict]:
    """A JSON document at any fsspec URI, or None when it does not exist. `json.JSONDecodeError`
    for a damaged file (the caller says what the file is)."""
    data, _ = _read_with_token(uri)
    return None if data is None else json.loads(data)


def update_json_doc(uri: str, edit: Callable[[Optional[dict]], dict]) -> dict:
    """Read-modify-write the JSON document at `uri` so that concurrent writers never lose an update;
    returns what was written. `edit` gets the current document (None when there is none) and
    returns the new one; it may run more than once, so it must depend on its argument only.

    - local files: an exclusive flock on `<uri>.lock` for the whole edit, then an atomic rename;
    - s3://: compare-and-swap. The PUT carries If-Match with the ETag that was read (If-None-Match: *
      for a new file); when another writer got there first (412 / 409), read again and redo the
      edit, with jittered backoff. S3 makes conditional writes atomic;
    - other object stores: one PUT; concurrent writers there: the last one wins.
    """
    if not is_remote(uri):
        with _file_lock(local_path(uri)):
            data, _ = _read_with_token(uri)
            doc = edit(None if data is None else json.loads(data))
            write_text(uri, _dump(doc))
            return doc
    for attempt in range(CAS_ATTEMPTS):
        data, token = _read_with_token(uri)
        doc = edit(None if data is None else json.loads(data))
        if protocol(uri) not in ("s3", "s3a"):
            write_text(uri, _dump(doc))
            return doc
        if _put_if(uri, _dump(doc).encode(), token):
            return doc
        time.sleep(random.uniform(0, min(0.02 * 2 ** attempt, 1.0)))
    raise OSError(f"{uri}: {CAS_ATTEMPTS} attempts to update it lost to other writers; try again")


def version_token(uri: str) -> Optional[str]:
    """Changes whenever the file at `uri` changes (None when it does not exist): what a watcher polls."""
    if not is_remote(uri):
        try:
            st = os.stat(local_path(uri))
        except FileNotFoundError:
            return None
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"
    if protocol(uri) in ("s3", "s3a"):
        fs, bucket, key = _s3(uri)
        try:
            return fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        except FileNotFoundError:
            return None
    data, _ = _read_with_token(uri)
    return None if data is None else hashlib.sha256(data).hexdigest()


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _s3(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


def _read_with_token(uri: str) -> tuple[Optional[bytes], Optional[str]]:
    """(content or None, the ETag it was read at on S3, else None)."""
    if not is_remote(uri):
        try:
            with open(local_path(uri), "rb") as f:
                return f.read(), None
        except FileNotFoundError:
            return None, None
    if protocol(uri) in ("s3", "s3a"):
        from fsspec.asyn import sync

        fs, bucket, key = _s3(uri)

        async def get() -> tuple[bytes, str]:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                return await body.read(), response["ETag"]
            finally:
                body.close()

        try:
            return sync(fs.loop, get)
        except FileNotFoundError:
            return None, None
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, None


def _put_if(uri: str, data: bytes, etag: Optional[str]) -> bool:
    """One conditional PUT: True when it landed, False when the object changed since `etag` was read."""
    fs, bucket, key = _s3(uri)
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except FileExistsError:
        return False
    except OSError as e:
        cause = getattr(e.__cause__, "response", None) or {}
        if cause.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
                cause.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return False
        raise
    fs.invalidate_cache(f"{bucket}/{key}")
    return True
