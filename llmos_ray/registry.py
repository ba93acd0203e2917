"""The model library: named models, each a checkpoint or export URI plus metadata, in one JSON file.

    from llmos_ray import registry
    registry.register("tiny-v1", "runs/tiny/export", family="gpt2", size="tiny", source_run="tiny")
    registry.attach_eval("tiny-v1", {"perplexity": 41.2})
    registry.get("tiny-v1").uri          # what `llmos serve --model tiny-v1` loads

`resolve_source` says what any model reference a user types means (a directory, an fsspec URI,
a registry name or a hub id), for serving and evaluation alike.

The file lives at any fsspec URI: `registry.uri` in the config, else $LLMOS_REGISTRY, else
~/.llmos/models.json. Local writes are atomic (temporary file + rename) and serialized with a lock
file; an object store write is one PUT, so readers never see half a file (concurrent writers to an
object store: the last one wins). Names are plain identifiers, never paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from llmos_ray.errors import ConfigError, ModelError
from llmos_ray.storage import is_remote, write_text

ENV_VAR = "LLMOS_REGISTRY"
DEFAULT_URI = "~/.llmos/models.json"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ModelEntry:
    name: str
    """Registry name (letters, digits, '.', '_', '-'; no path characters)."""
    uri: str
    """Hugging Face export directory, LoRA adapter directory or checkpoint: a local path or fsspec URI."""
    family: Optional[str] = None
    """Architecture family (gpt2, llama, ...); read from config.json when not given."""
    size: Optional[str] = None
    """Preset size or a free-form size such as '125m'."""
    task: Optional[str] = None
    """What the model does: causal_lm, classification, masked_lm, seq2seq; read from config.json when not given."""
    created: str = ""
    """UTC time of registration (ISO 8601)."""
    source_run: Optional[str] = None
    """The training run that produced it."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Evaluation results, e.g. {'perplexity': 41.2, 'rougeL': 0.31}."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else given to register(), e.g. description, base model."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def registry_uri(uri: Optional[str] = None) -> str:
    """The registry file in effect: `uri`, else $LLMOS_REGISTRY, else ~/.llmos/models.json."""
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


def register(name: str, uri: str, *, family: Optional[str] = None, size: Optional[str] = None,
             source_run: Optional[str] = None, eval: Optional[dict] = None, overwrite: bool = False,
             registry: Optional[str] = None, task: Optional[str] = None, **meta) -> ModelEntry:
    """Add `name` -> `uri` to the library and return the entry. A local `uri` must be a model or adapter
    directory and is stored as an absolute path. Re-registering a name needs overwrite=True."""
    validate_name(name)
    uri = _normalize_model_uri(uri)
    if family is None:
        family = _read_family(uri)
    entry = ModelEntry(name=name, uri=uri, family=family, size=size, task=task or model_task_of(uri),
                       source_run=source_run,
                       eval=dict(eval or {}), meta=dict(meta),
                       created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    with _editing(registry) as models:
        if name in models and not overwrite:
            raise ConfigError(f"model {name!r} is already registered (uri {models[name]['uri']}); "
                              "remove it first or pass overwrite=True (--overwrite)")
        models[name] = entry.to_dict()
    return entry


def list_models(registry: Optional[str] = None) -> list[ModelEntry]:
    """Every entry, sorted by name."""
    models = _read(registry_uri(registry))
    return [_entry(models[n]) for n in sorted(models)]


def get(name: str, registry: Optional[str] = None) -> ModelEntry:
    """The entry called `name`; ModelError (naming close matches) when there is none."""
    validate_name(name)
    uri = registry_uri(registry)
    models = _read(uri)
    if name not in models:
        raise ModelError(_missing(name, models, uri))
    return _entry(models[name])


def exists(name: str, registry: Optional[str] = None) -> bool:
    return bool(NAME_RE.match(name)) and name in _read(registry_uri(registry))


def remove(name: str, registry: Optional[str] = None) -> ModelEntry:
    """Delete the entry (not the model files) and return it."""
    validate_name(name)
    with _editing(registry) as models:
        if name not in models:
            raise ModelError(_missing(name, models, registry_uri(registry)))
        return _entry(models.pop(name))


def attach_eval(name: str, results: dict[str, Any], registry: Optional[str] = None) -> ModelEntry:
    """Merge `results` into the entry's eval dict (new values replace old ones of the same key)."""
    validate_name(name)
    if not isinstance(results, dict):
        raise ConfigError(f"eval results must be a dict, got {type(results).__name__}")
    json.dumps(results)  # fail before writing if not JSON-serializable
    with _editing(registry) as models:
        if name not in models:
            raise ModelError(_missing(name, models, registry_uri(registry)))
        models[name].setdefault("eval", {}).update(results)
        return _entry(models[name])


# ---------------------------------------------------------------------------------------------


def _entry(raw: dict) -> ModelEntry:
    known = {f.name for f in dataclasses.fields(ModelEntry)}
    return ModelEntry(**{k: v for k, v in raw.items() if k in known})


def _missing(name: str, models: dict, uri: str) -> str:
    close = difflib.get_close_matches(name, list(models), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"no model named {name!r} in the registry {uri}{hint} (`llmos models list` shows them)"


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


def _read_family(uri: str) -> Optional[str]:
    if is_remote(uri):
        return None
    for name, key in (("config.json", "model_type"), ("adapter_config.json", "base_model_name_or_path")):
        path = os.path.join(uri, name)
        if os.path.isfile(path):
            with open(path) as f:
                value = json.load(f).get(key)
            return value if key == "model_type" else (f"lora:{value}" if value else "lora")
    return None


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


def _read(uri: str) -> dict[str, dict]:
    import fsspec

    try:
        with fsspec.open(uri, "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelError(f"the registry file {uri} is not valid JSON ({e}); fix or move it") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ModelError(f"the registry file {uri} does not look like a model registry (no 'models' mapping)")
    return raw["models"]


def _write(uri: str, models: dict[str, dict]) -> None:
    write_text(uri, json.dumps({"version": FORMAT_VERSION, "models": models}, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _editing(registry: Optional[str]) -> Iterator[dict[str, dict]]:
    """Read-modify-write the registry; a local file is locked for the whole edit."""
    uri = registry_uri(registry)
    with _lock(uri):
        models = _read(uri)
        yield models
        _write(uri, models)


@contextlib.contextmanager
def _lock(uri: str):
    if is_remote(uri):
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(uri), exist_ok=True)
    with open(uri + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# What a model reference means


def resolve_source(source: str, registry: Optional[str] = None) -> tuple[str, Optional[str], Optional[dict]]:
    """(uri, base_uri for LoRA adapters, registry entry) for a directory, fsspec URI, registry name
    or hub id; ModelError naming close registry names when it is none of them."""
    path = os.path.expanduser(source.removeprefix("file://"))
    entry = None
    if is_remote(source):
        uri = source
    elif os.path.isdir(path):
        uri = os.path.abspath(path)
        if not any(os.path.isfile(os.path.join(uri, f)) for f in ("config.json", "adapter_config.json")):
            raise ModelError(f"model directory {uri} has no config.json (nor adapter_config.json): is it a Hugging "
                             "Face export? (`llmos export CHECKPOINT DIR` makes one)")
    elif NAME_RE.match(source) and exists(source, registry):
        entry = get(source, registry).to_dict()
        uri = entry["uri"]
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        uri = source  # a hub id such as org/model; loading tells whether it exists
    else:
        known = [e.name for e in list_models(registry)]
        close = difflib.get_close_matches(source, known, n=3)
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


def default_name(source: str) -> str:
    """A short name for a model reference: the directory's name (its parent's for .../export,
    .../model), or a hub id's last part. What `serve` and `evaluate` call a model given by path."""
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
