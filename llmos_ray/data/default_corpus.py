"""The corpus used when `data.paths` is empty, and the small samples shipped with the package.

The default corpus is the Python standard library installed with the interpreter: ~700 `.py`
files, ~12 MB of real text on every machine, read as one document per file. Test suites,
`idle_test` and `site-packages` are left out. The files are ordered by a stable hash of their path,
so the order is the same on every run on one machine (another Python version gives another corpus)
and a short run sees every part of the library.
"""

from __future__ import annotations

import os
import sysconfig

from llmos_ray.data.sources import Source
from llmos_ray.errors import DataError

SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources() -> list[Source]:
    """The standard library's `.py` files as txt sources (one document per file), sorted."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                out.append(Source("file://" + path, "txt", os.path.getsize(path)))
    out.sort(key=lambda s: corpus_order_key(s.uri, root))
    return out


def corpus_order_key(uri: str, root: str) -> str:
    """Files in the order of a stable hash of their path under the stdlib root: deterministic, and
    mixed, so a short run does not train on one package (say, encodings' codec tables) at a time."""
    import hashlib

    return hashlib.sha1(uri.removeprefix("file://" + root).encode()).hexdigest()


def sample_path(name: str = "tiny.jsonl") -> str:
    """Path of a sample corpus shipped in llmos_ray/data/samples/ (e.g. 'tiny.jsonl')."""
    path = os.path.join(SAMPLES_DIR, name)
    if not os.path.exists(path):
        have = ", ".join(sorted(os.listdir(SAMPLES_DIR)))
        raise DataError(f"no sample {name!r} in {SAMPLES_DIR} (have: {have})")
    return path
