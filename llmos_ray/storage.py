"""Files on any fsspec filesystem: what a URI is, small text files written whole, remote
directories brought to local disk and back.

Local writes are atomic (a temporary file renamed over the target), so a reader sees the old file
or the new one, never half of one; an object-store write is one PUT on close, which is atomic too.
"""

from __future__ import annotations

import hashlib
import os
import shutil

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
