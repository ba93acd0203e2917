"""The model library: named models with numbered versions, aliases and lineage, in one JSON file.

    from llmos_ray import registry
    registry.register("tiny", "runs/tiny/export", size="tiny")      # version 1 (again: version 2, ...)
    registry.promote("tiny@2", "prod")                                # the alias 'prod' now means version 2
    registry.get("tiny:prod").uri        # also "tiny" (the latest version) and "tiny@1"
    registry.attach_eval("tiny@2", {"perplexity": 41.2})

A model reference is `NAME` (its latest version), `NAME@N` (version N) or `NAME:ALIAS` (the version
the alias points at; `NAME:latest` = `NAME`). `resolve_source` says what any reference a user types
means (a directory, an fsspec URI, a library reference or a hub id) for serving, evaluation,
fine-tuning and the SDK alike.

Each version carries its lineage: the run that produced it, its base model, the data it was
trained on (counts), its evaluation results and its task; a local export's own files
(llmos_state.json, llmos_config.yaml, the run's data_stats.json, config.json) fill in what is not
given. Versions are never renumbered: removing one leaves a gap.

The file lives at any fsspec URI: `registry.uri` in the config, else $LLMOS_REGISTRY, else
~/.llmos/models.json. The app store (`serve.app_store`) keeps its apps in the same file. Concurrent
writers never lose an entry (`storage.update_json_doc`: a lock on local disk, compare-and-swap on
S3). The one-file format of earlier releases (one entry per name) is read as version 1 of each.

Why one module: references, versions, aliases, lineage and what a reference resolves to are one
table read and written as one document; splitting it would put its format in two places.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from llmos_ray.errors import ConfigError, ModelError
from llmos_ray.storage import is_remote, read_json_doc, update_json_doc

ENV_VAR = "LLMOS_REGISTRY"
DEFAULT_URI = "~/.llmos/models.json"
FORMAT_VERSION = 2
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
REF_RE = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<version>[0-9]{1,9})|:(?P<alias>[^@:]+))?$")
LATEST = "latest"


@dataclass
class ModelEntry:
    """One version of a named model."""

    name: str
    """Library name (letters, digits, '.', '_', '-'; no path characters)."""
    uri: str
    """Hugging Face export directory, LoRA adapter directory or checkpoint: a local path or fsspec URI."""
    version: int = 1
    """Version number within the name, from 1; `NAME@N` refers to it."""
    family: Optional[str] = None
    """Architecture family (gpt2, llama, ...); read from config.json when not given."""
    size: Optional[str] = None
    """Preset size or a free-form size such as '125m'."""
    task: Optional[str] = None
    """What the model does: causal_lm, classification, seq2seq, masked_lm (from config.json when not given)."""
    created: str = ""
    """UTC time of registration (ISO 8601)."""
    source_run: Optional[str] = None
    """Lineage: the training run that produced it."""
    base_model: Optional[str] = None
    """Lineage: the model it was trained, fine-tuned or pruned from."""
    data_stats: dict[str, Any] = field(default_factory=dict)
    """Lineage: what its training data pass read and dropped (documents, bad records, ...)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Evaluation results, e.g. {'perplexity': 41.2, 'rougeL': 0.31}."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else given to register(), e.g. description, pruning settings."""
    aliases: list[str] = field(default_factory=list)
    """Aliases (prod, staging, ...) that point at this version."""

    @property
    def ref(self) -> str:
        """The exact reference of this version, `NAME@N`."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ref": self.ref}


class Ref(NamedTuple):
    name: str
    version: Optional[int]
    alias: Optional[str]


def registry_uri(uri: Optional[str] = None) -> str:
    """The library file in effect: `uri`, else $LLMOS_REGISTRY, else ~/.llmos/models.json."""
    uri = uri or os.environ.get(ENV_VAR) or DEFAULT_URI
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def validate_name(name: str) -> str:
    """Return `name` if it is a valid model name, else raise ConfigError saying why."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', no spaces)")
    return name


def parse_ref(ref: str) -> Ref:
    """'tiny' / 'tiny@3' / 'tiny:prod' -> Ref; ConfigError naming what is wrong."""
    m = REF_RE.match(ref) if isinstance(ref, str) else None
    if m is None:
        validate_name(ref)  # raises with the naming rules
        raise ConfigError(f"model reference {ref!r} is not valid: use NAME, NAME@VERSION or NAME:ALIAS")
    validate_name(m["name"])
    if m["alias"] is not None and not ALIAS_RE.match(m["alias"]):
        raise ConfigError(f"alias {m['alias']!r} in {ref!r} is not valid: use letters, digits, '_' or '-', "
                          "starting with a letter")
    version = int(m["version"]) if m["version"] is not None else None
    if version == 0:
        raise ConfigError(f"model reference {ref!r}: versions start at 1")
    return Ref(m["name"], version, None if m["alias"] == LATEST else m["alias"])


def is_ref(text: str) -> bool:
    """Whether `text` has the shape of a library reference (NAME, NAME@N, NAME:ALIAS)."""
    try:
        parse_ref(text)
        return True
    except ConfigError:
        return False


# ---------------------------------------------------------------------------------------------
# Writing


def register(name: str, uri: str, *, family: Optional[str] = None, size: Optional[str] = None,
             task: Optional[str] = None, source_run: Optional[str] = None, base_model: Optional[str] = None,
             data_stats: Optional[dict] = None, eval: Optional[dict] = None, overwrite: bool = False,
             registry: Optional[str] = None, **meta) -> ModelEntry:
    """Add `uri` as the next version of `name` and return it. A local `uri` must be a model or adapter
    directory and is stored as an absolute path; its lineage is read from its files where not given.
    Registering the URI the latest version already has is refused unless overwrite=True, which
    updates that version in place."""
    validate_name(name)
    uri = _normalize_model_uri(uri)
    found = _lineage(uri)
    fields = dict(family=family or found.get("family"), size=size, task=task or found.get("task"),
                  source_run=source_run or found.get("source_run"), base_model=base_model or found.get("base_model"),
                  data_stats=dict(data_stats if data_stats is not None else found.get("data_stats", {})),
                  eval=dict(eval or {}), meta=dict(meta), uri=uri,
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    json.dumps(fields)  # fail before writing if not JSON-serializable

    def edit(models: dict) -> int:
        model = models.setdefault(name, {"versions": [], "aliases": {}, "last_version": 0})
        latest = model["versions"][-1] if model["versions"] else None
        if latest is not None and latest["uri"] == uri:
            if not overwrite:
                raise ConfigError(f"{uri} is already registered as {name}@{latest['version']}; pass "
                                  "overwrite=True (--overwrite) to update that version, or register another URI")
            latest.update({k: v for k, v in fields.items() if k != "created"})
            return latest["version"]
        model["last_version"] += 1
        model["versions"].append({"version": model["last_version"], **fields})
        return model["last_version"]

    version = _edit_models(registry, edit)
    return get(f"{name}@{version}", registry)


def promote(ref: str, alias: str, registry: Optional[str] = None) -> ModelEntry:
    """Point `alias` (prod, staging, ...) of the model at the version `ref` names; returns that version."""
    target = parse_ref(ref)
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or alias == LATEST:
        raise ConfigError(f"alias {alias!r} is not valid: use letters, digits, '_' or '-', starting with a letter "
                          f"('{LATEST}' always means the newest version)")

    def edit(models: dict) -> int:
        version = _find(models, target, registry)["version"]
        models[target.name]["aliases"][alias] = version
        return version

    return get(f"{target.name}@{_edit_models(registry, edit)}", registry)


def remove(ref: str, registry: Optional[str] = None) -> ModelEntry:
    """Delete a version (`NAME@N`, `NAME:ALIAS`) or, for a bare `NAME`, the model with all its versions
    (not the model files). Returns the (latest) removed version; aliases pointing at it go too."""
    target = parse_ref(ref)
    whole = target.version is None and target.alias is None
    removed: dict = {}

    def edit(models: dict) -> None:
        raw = _find(models, target, registry)
        model = models[target.name]
        removed.clear()
        removed.update(_entry(target.name, model, raw).to_dict())
        if whole or len(model["versions"]) == 1:
            del models[target.name]
            return
        model["versions"] = [v for v in model["versions"] if v["version"] != raw["version"]]
        model["aliases"] = {a: v for a, v in model["aliases"].items() if v != raw["version"]}

    _edit_models(registry, edit)
    removed.pop("ref", None)
    return ModelEntry(**removed)


def attach_eval(ref: str, results: dict[str, Any], registry: Optional[str] = None) -> ModelEntry:
    """Merge `results` into the eval dict of the version `ref` names (new values replace old ones)."""
    target = parse_ref(ref)
    if not isinstance(results, dict):
        raise ConfigError(f"eval results must be a dict, got {type(results).__name__}")
    json.dumps(results)  # fail before writing if not JSON-serializable

    def edit(models: dict) -> int:
        raw = _find(models, target, registry)
        raw.setdefault("eval", {}).update(results)
        return raw["version"]

    return get(f"{target.name}@{_edit_models(registry, edit)}", registry)


# ---------------------------------------------------------------------------------------------
# Reading


def get(ref: str, registry: Optional[str] = None) -> ModelEntry:
    """The version `ref` names; ModelError (naming close matches, versions or aliases) when there is none."""
    target = parse_ref(ref)
    models = read_library(registry)["models"]
    raw = _find(models, target, registry)
    return _entry(target.name, models[target.name], raw)


def versions(name: str, registry: Optional[str] = None) -> list[ModelEntry]:
    """Every version of `name`, oldest first."""
    models = read_library(registry)["models"]
    _find(models, Ref(validate_name(name), None, None), registry)
    return [_entry(name, models[name], raw) for raw in models[name]["versions"]]


def list_models(registry: Optional[str] = None, all_versions: bool = False) -> list[ModelEntry]:
    """The latest version of every model (every version with all_versions), sorted by name."""
    models = read_library(registry)["models"]
    out = []
    for name in sorted(models):
        raws = models[name]["versions"] if all_versions else models[name]["versions"][-1:]
        out += [_entry(name, models[name], raw) for raw in raws]
    return out


def exists(ref: str, registry: Optional[str] = None) -> bool:
    """Whether `ref` names a version in the library."""
    if not is_ref(ref):
        return False
    try:
        get(ref, registry)
        return True
    except ModelError:
        return False


def read_library(registry: Optional[str] = None) -> dict[str, Any]:
    """The whole library document {"version", "models", "apps"} (empty when the file does not exist)."""
    uri = registry_uri(registry)
    try:
        raw = read_json_doc(uri)
    except json.JSONDecodeError as e:
        raise ModelError(f"the registry file {uri} is not valid JSON ({e}); fix or move it") from None
    return _upgrade(raw, uri)


def edit_library(registry: Optional[str], edit: Callable[[dict], Any]) -> Any:
    """Apply `edit` to the library document (any section) and write it back without losing a
    concurrent writer's change; returns what `edit` returned (it may run more than once)."""
    uri = registry_uri(registry)
    out: list = []

    def apply(raw: Optional[dict]) -> dict:
        doc = _upgrade(raw, uri)
        out[:] = [edit(doc)]
        return doc

    update_json_doc(uri, apply)
    return out[0]


def _edit_models(registry: Optional[str], edit: Callable[[dict], Any]) -> Any:
    return edit_library(registry, lambda doc: edit(doc["models"]))


def _upgrade(raw: Optional[dict], uri: str) -> dict[str, Any]:
    """The library document in the current format; the one-entry-per-name format becomes version 1 of each."""
    if raw is None:
        return {"version": FORMAT_VERSION, "models": {}, "apps": {}}
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ModelError(f"the registry file {uri} does not look like a model registry (no 'models' mapping)")
    if raw.get("version", 1) < 2:
        models = {}
        for name, old in raw["models"].items():
            entry = {k: v for k, v in old.items() if k != "name"}
            models[name] = {"versions": [{"version": 1, **entry}], "aliases": {}, "last_version": 1}
        raw = {**raw, "models": models}
    raw["version"] = FORMAT_VERSION
    raw.setdefault("apps", {})
    return raw


def _find(models: dict, target: Ref, registry: Optional[str]) -> dict:
    """The raw version `target` names in `models`; ModelError saying what exists otherwise."""
    model = models.get(target.name)
    if model is None or not model["versions"]:
        close = difflib.get_close_matches(target.name, list(models), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelError(f"no model named {target.name!r} in the registry {registry_uri(registry)}{hint} "
                         "(`llmos models list` shows them)")
    by_number = {v["version"]: v for v in model["versions"]}
    if target.alias is not None:
        if target.alias not in model["aliases"]:
            have = ", ".join(f"{a} -> {v}" for a, v in sorted(model["aliases"].items())) or "none"
            raise ModelError(f"model {target.name!r} has no alias {target.alias!r} (aliases: {have}); set one with "
                             f"`llmos models promote {target.name}@N {target.alias}`")
        return by_number[model["aliases"][target.alias]]
    if target.version is None:
        return model["versions"][-1]
    if target.version not in by_number:
        raise ModelError(f"model {target.name!r} has no version {target.version} (versions: "
                         f"{', '.join(str(v) for v in sorted(by_number))})")
    return by_number[target.version]


def _entry(name: str, model: dict, raw: dict) -> ModelEntry:
    known = {f.name for f in dataclasses.fields(ModelEntry)}
    aliases = sorted(a for a, v in model.get("aliases", {}).items() if v == raw["version"])
    return ModelEntry(**{k: v for k, v in raw.items() if k in known and k not in ("name", "aliases")},
                      name=name, aliases=aliases)


def _normalize_model_uri(uri: str) -> str:
    if is_remote(uri):
        return uri
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    if not os.path.isdir(path):
        raise ModelError(f"model directory {path} does not exist")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        raise ModelError(f"{path} has neither config.json nor adapter_config.json: is it a Hugging Face export "
                         "or a LoRA adapter directory? (`llmos export CHECKPOINT DIR` makes one)")
    return path


def _lineage(uri: str) -> dict[str, Any]:
    """What a local export says about itself: family and task (config.json or adapter_config.json),
    the run and base model (llmos_config.yaml), the run's data counts (data_stats.json beside it)."""
    from llmos_ray.models import model_task

    if is_remote(uri):
        return {}
    out: dict[str, Any] = {}
    cfg = _read_json(os.path.join(uri, "config.json"))
    if cfg is not None:
        out.update(family=cfg.get("model_type"), task=model_task(cfg))
    else:
        adapter = _read_json(os.path.join(uri, "adapter_config.json")) or {}
        base = adapter.get("base_model_name_or_path")
        out.update(family=f"lora:{base}" if base else "lora", base_model=base,
                   task="classification" if adapter.get("task_type") == "SEQ_CLS" else "causal_lm")
    run_cfg = os.path.join(uri, "llmos_config.yaml")
    if os.path.isfile(run_cfg):
        import yaml

        with open(run_cfg) as f:
            run = yaml.safe_load(f) or {}
        out["source_run"] = (run.get("run") or {}).get("name")
        out["base_model"] = out.get("base_model") or (run.get("model") or {}).get("base")
        stats = _read_json(os.path.join((run.get("run") or {}).get("output_dir") or "", "data_stats.json"))
        if isinstance(stats, dict):
            out["data_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
    return out


def model_task_of(uri: str) -> str:
    """What the model at `uri` (a directory, fsspec URI or hub id) does, from its config.json
    (models.model_task) — a LoRA adapter from its peft task type — else 'causal_lm'."""
    import fsspec

    from llmos_ray.models import model_task

    for name in ("config.json", "adapter_config.json"):
        try:
            with fsspec.open(f"{uri.rstrip('/')}/{name}", "r") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if name == "adapter_config.json":
            return "classification" if config.get("task_type") == "SEQ_CLS" else "causal_lm"
        return model_task(config)
    if not is_remote(uri) and not os.path.exists(os.path.expanduser(uri)) and uri.count("/") == 1:
        try:  # a hub id: its config, when the hub is reachable (or cached)
            from transformers import AutoConfig

            return model_task(AutoConfig.from_pretrained(uri))
        except (OSError, ValueError):
            pass
    return "causal_lm"


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# What a model reference means


def resolve_source(source: str, registry: Optional[str] = None) -> tuple[str, Optional[str], Optional[dict]]:
    """(uri, base_uri for LoRA adapters, library entry) for a directory, fsspec URI, library
    reference (NAME, NAME@N, NAME:ALIAS) or hub id; ModelError naming close library names (or the
    versions and aliases that exist) when it is none of them."""
    path = os.path.expanduser(source.removeprefix("file://"))
    entry = None
    if is_remote(source):
        uri = source
    elif os.path.isdir(path):
        uri = os.path.abspath(path)
        if not any(os.path.isfile(os.path.join(uri, f)) for f in ("config.json", "adapter_config.json")):
            raise ModelError(f"model directory {uri} has no config.json (nor adapter_config.json): is it a Hugging "
                             "Face export? (`llmos export CHECKPOINT DIR` makes one)")
    elif is_ref(source) and parse_ref(source).name in read_library(registry)["models"]:
        entry = get(source, registry).to_dict()  # a missing version or alias: ModelError saying what exists
        uri = entry["uri"]
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        uri = source  # a hub id such as org/model; loading tells whether it exists
    else:
        known = list(read_library(registry)["models"])
        name = parse_ref(source).name if is_ref(source) else source
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelError(f"model {source!r} is neither a directory nor a name in the registry "
                         f"{registry_uri(registry)}{hint}")
    base = adapter_base(uri)
    if base is not None:
        base, _, _ = resolve_source(base, registry)
    return uri, base, entry


def adapter_base(uri: str) -> Optional[str]:
    """The base model named in a local LoRA adapter directory's adapter_config.json, else None."""
    if "://" in uri:
        return None
    cfg_path = os.path.join(uri, "adapter_config.json")
    if not os.path.isfile(cfg_path) or os.path.isfile(os.path.join(uri, "config.json")):
        return None
    with open(cfg_path) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"LoRA adapter {uri} names no base_model_name_or_path in adapter_config.json")
    beside = os.path.normpath(os.path.join(uri, base))  # a relative base is relative to the adapter
    if not os.path.isabs(base) and not os.path.isdir(base) and os.path.isdir(beside):
        return beside
    return base


def default_name(source: str, entry: Optional[dict] = None) -> str:
    """A short name for a model reference: a library reference as typed ('tiny', 'tiny@2',
    'tiny:prod'), a directory's name (its parent's for .../export, .../model), or a hub id's last
    part. What `serve` and `evaluate` call a model unless told otherwise."""
    if entry is not None:
        return source if is_ref(source) and parse_ref(source).name == entry["name"] else entry["name"]
    parts = [p for p in re.split(r"[/\\]", source.split("://")[-1]) if p not in ("", ".")]
    if len(parts) >= 2 and parts[-1] in ("export", "model", "final", "hf"):
        return parts[-2]
    return parts[-1] if parts else source


def parameter_count(uri: str) -> Optional[int]:
    """Parameters of a local export (summed from its safetensors headers, nothing loaded), else None."""
    import glob
    import struct

    if is_remote(uri) or not os.path.isdir(uri):
        return None
    total = 0
    for path in glob.glob(os.path.join(uri, "*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total or None


def human_count(n: Optional[int]) -> str:
    """5_500_000 -> '5.5M'."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
