"""Which corpus a config means: `resolve_corpus(data, split)` turns a DataConfig into a `Corpus`
(its sources and how to read them) — the user's paths, a separate validation corpus, or the
default corpus (the Python standard library, `default_corpus`)."""

from __future__ import annotations

from typing import Any

from llmos_ray.data.default_corpus import stdlib_root, stdlib_sources
from llmos_ray.data.sources import PROCESS_LOCAL_PROTOCOLS, Corpus, expand_sources, filesystem
from llmos_ray.errors import DataError
from llmos_ray.storage import protocol


def resolve_corpus(data, split: str = "train") -> Corpus:
    """The corpus `data` (a DataConfig) names for `split`: `data.val_paths` for 'val' when set,
    else `data.paths`, else the default corpus (the Python standard library)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    storage_options = _checked_storage_options(data.storage_options)
    options = dict(text_field=data.text_field, txt_mode=data.txt_mode, hf_split=data.hf_split,
                   max_bad_fraction=data.max_bad_fraction, storage_options=storage_options)
    paths = data.val_paths if split == "val" and data.val_paths else data.paths
    if data.mix and not (split == "val" and data.val_paths):
        return _mixture(data.mix, data.format, options)
    if not paths:
        sources = stdlib_sources()
        options["txt_mode"] = "file"
        return Corpus(sources, **options,
                      description=f"default corpus: {len(sources)} Python standard library files under {stdlib_root()}")
    sources = expand_sources(paths, data.format, storage_options)
    total = sum(s.size for s in sources)
    return Corpus(sources, **options, snapshots=_snapshots(sources, storage_options),
                  description=f"{len(sources)} source(s), {total / 1e6:.1f} MB, from {', '.join(paths[:3])}"
                              f"{' …' if len(paths) > 3 else ''}")


def _snapshots(sources, storage_options) -> dict[str, bytes]:
    snapshots = {}
    for s in sources:
        if protocol(s.uri) in PROCESS_LOCAL_PROTOCOLS:
            if s.format == "hf":
                raise DataError(f"{s.uri}: saved datasets on {protocol(s.uri)}:// cannot be read by Ray workers")
            fs, path = filesystem(s.uri, storage_options)
            snapshots[s.uri] = fs.cat_file(path)
    return snapshots


def _mixture(mix, fmt: str, options: dict) -> Corpus:
    """data.mix: every component's sources in one corpus, each source tagged with its component."""
    from llmos_ray.config import mix_components

    parts = mix_components(mix)
    sources, component_of, owner = [], [], {}
    for c, part in enumerate(parts):
        try:
            found = expand_sources(list(part.paths), fmt, options["storage_options"])
        except DataError as e:
            raise DataError(f"data.mix component {part.name!r}: {e}") from None
        for s in found:
            if s.uri in owner:
                raise DataError(f"{s.uri} is in data.mix components {owner[s.uri]!r} and {part.name!r}: give each "
                                "file to one component")
            owner[s.uri] = part.name
            sources.append(s)
            component_of.append(c)
    shares = ", ".join(f"{p.name} {p.weight / sum(q.weight for q in parts):.0%}" for p in parts)
    return Corpus(sources, **options, snapshots=_snapshots(sources, options["storage_options"]), mix=tuple(parts),
                  component_of=tuple(component_of),
                  description=f"mixture of {len(parts)} corpora ({shares}), {len(sources)} source(s), "
                              f"{sum(s.size for s in sources) / 1e6:.1f} MB")


def check_corpus(data) -> None:
    """Raise DataError now, before anything starts, if a corpus path of `data` does not exist,
    matches nothing or has an unknown format (both splits); lists files, reads nothing."""
    resolve_corpus(data, "train")
    if data.val_paths:
        resolve_corpus(data, "val")


def _checked_storage_options(options: dict) -> dict[str, dict[str, Any]]:
    import fsspec

    known = set(fsspec.available_protocols())
    for key, value in (options or {}).items():
        if key not in known or not isinstance(value, dict):
            raise DataError(f"data.storage_options is keyed by protocol, e.g. "
                            f"{{s3: {{endpoint_url: 'http://localhost:9000'}}}}; got key {key!r}")
    return dict(options or {})
