"""What to serve: `ServeConfig` + the registry -> one `ModelSpec` per served model.

Resolution happens where the application is built (the driver, or the Serve controller for
`serve run`/`serve deploy`), so a bad name fails before any replica starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional

from llmos_ray.config import Config, ServedModelOptions, ServeConfig, _coerce
from llmos_ray.errors import ConfigError, ModelError

SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(kw_only=True)
class ModelSpec(ServedModelOptions):
    """One served model: its name and source, and its per-model settings (ServedModelOptions, the
    'Per model' keys of ServeConfig) after `serve.model_options` are applied."""

    name: str
    """Name clients put in `model`."""
    uri: str
    """Local directory, fsspec URI or hub id of the model (or of the LoRA adapter)."""
    base_uri: Optional[str] = None
    """For a LoRA adapter: the base model it is applied to."""
    registry_entry: Optional[dict] = None
    """The registry entry it was resolved from, if any."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def deployment_name(self) -> str:
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)


PER_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ServedModelOptions))


def resolve_models(config: Config) -> list[ModelSpec]:
    """One ModelSpec per `serve.models` entry, with `serve.model_options` applied and checked."""
    serve = config.serve
    if not serve.models:
        raise ConfigError("serve.models is empty: name at least one model (--model DIR_OR_REGISTRY_NAME)")
    _check_server(serve)
    hints = typing.get_type_hints(ServeConfig)
    specs: list[ModelSpec] = []
    for item in serve.models:
        name, source = _split(item)
        uri, base, entry = resolve_source(source, config.registry.uri)
        name = name or (entry["name"] if entry else _default_name(source))
        if not SERVED_NAME_RE.match(name):
            raise ConfigError(f"served model name {name!r} is not valid: use letters, digits, '.', '_', ':' or '-' "
                              f"(set one with NAME={source})")
        if any(s.name == name for s in specs):
            raise ConfigError(f"two serve.models entries are both served as {name!r}; name one with NAME=SOURCE")
        spec = ModelSpec(name=name, uri=uri, base_uri=base, registry_entry=entry,
                         **{k: getattr(serve, k) for k in PER_MODEL_KEYS})
        for key, value in (serve.model_options.get(name) or {}).items():
            if key not in PER_MODEL_KEYS:
                close = difflib.get_close_matches(key, PER_MODEL_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"serve.model_options.{name}.{key} is not a per-model key{hint} "
                                  f"(per-model keys: {', '.join(PER_MODEL_KEYS)})")
            setattr(spec, key, _coerce(value, hints[key], f"serve.model_options.{name}.{key}"))
        _check_model(spec)
        specs.append(spec)
    unknown = set(serve.model_options) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"serve.model_options names {sorted(unknown)} but the served models are "
                          f"{[s.name for s in specs]}")
    return specs


def resolve_source(source: str, registry_uri: Optional[str] = None) -> tuple[str, Optional[str], Optional[dict]]:
    """(uri, base_uri for adapters, registry entry) for a directory, URI, registry name or hub id."""
    from llmos_ray import registry

    path = os.path.expanduser(source.removeprefix("file://"))
    entry = None
    if "://" in source and not source.startswith("file://"):
        uri = source
    elif os.path.isdir(path):
        uri = os.path.abspath(path)
    elif registry.NAME_RE.match(source) and registry.exists(source, registry_uri):
        entry = registry.get(source, registry_uri).to_dict()
        uri = entry["uri"]
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        uri = source  # a hub id such as org/model; loading tells whether it exists
    else:
        known = [e.name for e in registry.list_models(registry_uri)]
        close = difflib.get_close_matches(source, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelError(f"model {source!r} is neither a directory nor a name in the registry "
                         f"{registry.registry_uri(registry_uri)}{hint}")
    base = _adapter_base(uri)
    if base is not None:
        base, _, _ = resolve_source(base, registry_uri)
    return uri, base, entry


def _adapter_base(uri: str) -> Optional[str]:
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


def _split(item: str) -> tuple[Optional[str], str]:
    """'name=source' -> (name, source); a bare source -> (None, source)."""
    if "=" in item and "://" not in item.split("=", 1)[0]:
        name, source = item.split("=", 1)
        return name.strip(), source.strip()
    return None, item.strip()


def _default_name(source: str) -> str:
    """The directory's name (its parent's for .../export or .../model), or the hub id's last part."""
    parts = [p for p in re.split(r"[/\\]", source.split("://")[-1]) if p not in ("", ".")]
    if len(parts) >= 2 and parts[-1] in ("export", "model", "final", "hf"):
        return parts[-2]
    return parts[-1] if parts else source


def _check_server(serve: ServeConfig) -> None:
    for key in ("port", "max_request_bytes", "ingress_max_ongoing_requests"):
        if getattr(serve, key) <= 0:
            raise ConfigError(f"serve.{key} must be > 0, got {getattr(serve, key)}")
    if serve.retry_after_s < 0:
        raise ConfigError(f"serve.retry_after_s must be >= 0, got {serve.retry_after_s}")
    if not serve.route_prefix.startswith("/"):
        raise ConfigError(f"serve.route_prefix must start with '/', got {serve.route_prefix!r}")


def _check_model(spec: ModelSpec) -> None:
    where = f"serve (model {spec.name!r})"
    for key in ("max_ongoing_requests", "max_batch_size", "max_tokens_limit", "default_max_tokens", "max_replicas"):
        if getattr(spec, key) <= 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {getattr(spec, key)}")
    if spec.min_replicas < 0 or spec.min_replicas > spec.max_replicas:
        raise ConfigError(f"{where}: need 0 <= min_replicas <= max_replicas, got {spec.min_replicas} and "
                          f"{spec.max_replicas}")
    if spec.max_queued_requests == 0 or spec.max_queued_requests < -1:
        raise ConfigError(f"{where}: max_queued_requests must be > 0 or -1 (unbounded), got {spec.max_queued_requests}")
    if spec.batch_wait_timeout_s < 0 or spec.target_ongoing_requests <= 0:
        raise ConfigError(f"{where}: batch_wait_timeout_s must be >= 0 and target_ongoing_requests > 0")
    if spec.quantize == "int8" and spec.device == "cuda":
        raise ConfigError(f"{where}: quantize=int8 is CPU dynamic quantization; use device=cpu or quantize=none")
    if spec.engine == "vllm" and spec.base_uri is not None:
        raise ConfigError(f"{where}: engine=vllm serves full models here; merge the LoRA adapter first")
    for key in ("safety_input_patterns", "safety_output_patterns"):
        for pattern in getattr(spec, key):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}: {key} has an invalid regular expression {pattern!r}: {e}") from None
    if spec.max_ongoing_requests < spec.max_batch_size:
        spec.max_ongoing_requests = spec.max_batch_size  # otherwise batches could never fill
