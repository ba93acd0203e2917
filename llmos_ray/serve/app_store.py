"""The app store: app specs kept in the model library's file (local or s3://), each name with
numbered versions, beside the built-in apps; and the catalogue a running server watches.

    spec = create(yaml.safe_load(open("haiku.yaml")))       # checked (the field named), version N+1
    get("haiku").version, get("haiku@1")                     # the latest, or one version
    list_apps()                                              # the latest of each, built-ins included
    remove("haiku@2"); remove("haiku")                       # one version, or all of them
    export("summarize")                                      # the spec as YAML, ready for `create`

The built-in apps (chat, summarize, translate, code: YAML files in serve/apps/) are version 1 of
their names; creating an app of the same name adds version 2, which replaces it until removed.
A spec's `model` must name a model in the library when it is created.

`AppCatalog` is what the HTTP ingress reads: it checks the library file's version token (mtime on
disk, ETag on S3) at most every `refresh_s` seconds and reloads the specs when it changed, so a
running server serves a new or changed app without a restart. A stored spec that no longer checks
(written by another release) is skipped and logged, and a library that cannot be read keeps the
last good catalogue.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import threading
import time
from typing import Any, Optional

from llmos_ray import registry
from llmos_ray.errors import ConfigError, ModelError
from llmos_ray.serve.app_specs import APP_NAME_RE, AppSpec
from llmos_ray.storage import version_token

log = logging.getLogger(__name__)

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "apps")


@functools.lru_cache(maxsize=1)
def builtin_apps() -> dict[str, AppSpec]:
    """The built-in apps (version 1 of their names)."""
    import yaml

    out = {}
    for name in ("chat", "summarize", "translate", "code"):
        with open(os.path.join(BUILTIN_DIR, f"{name}.yaml")) as f:
            out[name] = AppSpec.from_dict(yaml.safe_load(f), version=1, source="builtin")
    return out


def parse_app_ref(ref: str) -> tuple[str, Optional[int]]:
    """'haiku' -> ('haiku', None); 'haiku@2' -> ('haiku', 2); ConfigError otherwise."""
    name, _, version = ref.partition("@") if isinstance(ref, str) else ("", "", "")
    if not APP_NAME_RE.match(name) or (version and not version.isdigit()):
        raise ConfigError(f"app reference {ref!r} is not valid: NAME or NAME@VERSION (1-64 letters, digits, '_', '-')")
    return name, int(version) if version else None


def create(raw: Any, registry_uri: Optional[str] = None, check_model: bool = True) -> AppSpec:
    """Check the spec `raw` (a mapping from YAML/JSON) and store it as the next version of its name."""
    spec = AppSpec.from_dict(raw)
    if spec.model is not None and check_model:
        try:
            registry.get(spec.model, registry_uri)
        except (ModelError, ConfigError) as e:
            raise ConfigError(f"model: {e}") from None
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stored = spec.to_dict()

    def edit(doc: dict) -> int:
        app = doc["apps"].setdefault(spec.name, {"versions": [], "last_version": 0})
        floor = 1 if spec.name in builtin_apps() else 0
        version = max(app["last_version"], floor) + 1
        app["last_version"] = version
        app["versions"].append({"version": version, "created": created, "spec": stored})
        return version

    version = registry.edit_library(registry_uri, edit)
    return AppSpec.from_dict(stored, version=version, created=created)


def get(ref: str, registry_uri: Optional[str] = None) -> AppSpec:
    """The app `ref` names (NAME: its latest version; NAME@N); ConfigError naming what exists."""
    return pick(load_catalog(registry.read_library(registry_uri)), ref)


def list_apps(registry_uri: Optional[str] = None) -> list[AppSpec]:
    """The latest version of every app, built-ins first, then by name."""
    return latest(load_catalog(registry.read_library(registry_uri)))


def versions(name: str, registry_uri: Optional[str] = None) -> list[AppSpec]:
    catalog = load_catalog(registry.read_library(registry_uri))
    pick(catalog, name)
    return [catalog[name][v] for v in sorted(catalog[name])]


def remove(ref: str, registry_uri: Optional[str] = None) -> list[int]:
    """Delete one version (NAME@N) or every stored version of NAME; the versions removed. Built-ins
    cannot be removed (a stored version of the same name replaces one)."""
    name, version = parse_app_ref(ref)

    def edit(doc: dict) -> list[int]:
        app = doc["apps"].get(name)
        stored = [v["version"] for v in (app or {}).get("versions", [])]
        if not stored or (version is not None and version not in stored):
            what = "is built in and cannot be removed" if name in builtin_apps() else "is not in the app store"
            have = f" (stored versions: {', '.join(map(str, stored))})" if stored else ""
            raise ConfigError(f"app {ref!r} {what}{have}")
        gone = stored if version is None else [version]
        app["versions"] = [v for v in app["versions"] if v["version"] not in gone]
        if not app["versions"]:
            del doc["apps"][name]
        return gone

    return registry.edit_library(registry_uri, edit)


def export(ref: str, registry_uri: Optional[str] = None) -> str:
    """The spec `ref` names as YAML (what `create` reads back)."""
    import yaml

    spec = get(ref, registry_uri)
    head = f"# app {spec.ref} ({spec.source}{', created ' + spec.created if spec.created else ''})\n"
    return head + yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# The catalogue


Catalog = dict[str, dict[int, AppSpec]]
"""name -> version -> spec."""


def load_catalog(doc: dict[str, Any]) -> Catalog:
    """Every app version in a library document, built-ins included (specs that no longer check are skipped)."""
    catalog: Catalog = {name: {1: spec} for name, spec in builtin_apps().items()}
    for name, app in sorted(doc.get("apps", {}).items()):
        for v in app.get("versions", []):
            try:
                spec = AppSpec.from_dict(v["spec"], version=v["version"], created=v.get("created", ""))
            except ConfigError as e:
                log.warning("app %s@%s in the library does not check (%s); skipped", name, v.get("version"), e)
                continue
            catalog.setdefault(name, {})[v["version"]] = spec
    return catalog


def latest(catalog: Catalog) -> list[AppSpec]:
    builtins = list(builtin_apps())
    names = builtins + sorted(n for n in catalog if n not in builtins)
    return [catalog[n][max(catalog[n])] for n in names if catalog.get(n)]


def pick(catalog: Catalog, ref: str) -> AppSpec:
    """The app `ref` (NAME or NAME@N) names in `catalog`; ConfigError naming what exists."""
    name, version = parse_app_ref(ref)
    if name not in catalog:
        import difflib

        close = difflib.get_close_matches(name, list(catalog), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"no app named {name!r}{hint} (apps: {', '.join(a.name for a in latest(catalog))})")
    if version is None:
        return catalog[name][max(catalog[name])]
    if version not in catalog[name]:
        raise ConfigError(f"app {name!r} has no version {version} (versions: "
                          f"{', '.join(map(str, sorted(catalog[name])))})")
    return catalog[name][version]


class AppCatalog:
    """The apps a server offers, reloaded from the library when its file changes (checked at most
    every `refresh_s` seconds; 0 = on every request)."""

    def __init__(self, registry_uri: Optional[str], refresh_s: float = 2.0):
        self.uri = registry.registry_uri(registry_uri)
        self.refresh_s = refresh_s
        self._catalog: Catalog = load_catalog({})
        self._token: Optional[str] = "<unread>"
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> Catalog:
        """The catalogue, reloaded first if the library changed since the last check."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.refresh_s:
                return self._catalog
            self._checked = now
            try:
                token = version_token(self.uri)
                if token != self._token:
                    self._catalog = load_catalog(registry.read_library(self.uri))
                    self._token = token
                    log.info("apps: %s", ", ".join(s.ref for s in latest(self._catalog)))
            except Exception as e:  # noqa: BLE001 - a library that cannot be read keeps the last good catalogue
                log.warning("apps: cannot read the library %s (%s); serving the last catalogue", self.uri, e)
            return self._catalog

    def get(self, ref: str) -> AppSpec:
        return pick(self.refresh(), ref)

    def latest(self) -> list[AppSpec]:
        return latest(self.refresh())

    def names(self) -> set[str]:
        return set(self._catalog)
