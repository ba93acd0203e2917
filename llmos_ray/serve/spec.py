"""What to serve: `ServeConfig` + the registry -> one `ModelSpec` per served model, and the
deployments that host them (`hosts`).

Resolution happens where the application is built (the driver, or the Serve controller for
`serve run`/`serve deploy`), so a bad name fails before any replica starts.

A generation deployment (`Host`) holds one base model. A LoRA adapter (lora=shared, the default)
is hosted by the deployment of a served model of its base with the same deployment settings
(HOST_KEYS; the safety rules, applied per name by the ingress, may differ), else by one of its own
with the other adapters of that base; the request's `model` picks the adapter, or the base. With
lora=merge an adapter is merged into its own copy of the base in its own deployment.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional

from llmos_ray.config import Config, ServeConfig, ServedModelOptions
from llmos_ray.errors import ConfigError
from llmos_ray.registry import default_name, model_task_of, resolve_source
from llmos_ray.schema import coerce

SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
SERVABLE_TASKS = ("causal_lm", "classification", "seq2seq")


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
    task: str = "causal_lm"
    """What the model does (registry.model_task_of): 'causal_lm' (generation), 'seq2seq' (an encoder-decoder:
    source text -> target text) or 'classification'."""
    host: str = ""
    """The deployment that serves it (`hosts`; '' = its own, `deployment_name`)."""
    adapter_id: Optional[str] = None
    """A LoRA adapter on a shared base: its id in the host's replicas (a runtime load's is unique to that load)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def deployment_name(self) -> str:
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)


PER_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ServedModelOptions))
PER_NAME_KEYS = ("lora", "safety_input_blocklist", "safety_input_patterns", "safety_output_blocklist",
                 "safety_output_patterns", "safety_max_output_chars")
"""Per-model keys that may differ between the models of one deployment (the ingress applies them per name)."""
HOST_KEYS = tuple(k for k in PER_MODEL_KEYS if k not in PER_NAME_KEYS)
"""Per-model keys a base and its shared adapters must agree on to share a deployment: its replicas and engine."""


@dataclass
class Host:
    """One generation deployment (transformers engine): a base model, the served names it answers and the
    LoRA adapters it holds beside the base."""

    spec: ModelSpec
    """The model it loads (the base, or a merged adapter) with the deployment's settings; names the deployment."""
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    """Served name -> LoRA adapter URI, for the adapters on the shared base."""
    names: list[str] = dataclasses.field(default_factory=list)
    """Every served name it answers."""


def hosts(specs: list[ModelSpec]) -> list[Host]:
    """The deployments of the causal LMs on the transformers engine (others have their own, elsewhere):
    one per model, except adapters with lora=shared, which join a served model of their base with the same
    HOST_KEYS, else a deployment of their own base with the other such adapters. Sets each spec's `host`
    and (shared adapters) `adapter_id`."""
    out: list[Host] = []
    by_base: dict[tuple, Host] = {}

    def key(spec: ModelSpec, base: str) -> tuple:
        return (base, tuple(getattr(spec, k) for k in HOST_KEYS))

    generators = [s for s in specs if s.task == "causal_lm" and s.engine == "transformers"]
    shared = [s for s in generators if s.base_uri is not None and s.lora == "shared"]
    for spec in generators:
        if any(spec is s for s in shared):
            continue
        out.append(Host(spec, names=[spec.name]))
        if spec.base_uri is None:
            by_base.setdefault(key(spec, spec.uri), out[-1])
    for spec in shared:
        host = by_base.get(key(spec, spec.base_uri))
        if host is None:
            base = dataclasses.replace(spec, uri=spec.base_uri, base_uri=None, registry_entry=None)
            host = by_base[key(spec, spec.base_uri)] = Host(base)
            out.append(host)
        host.adapters[spec.name] = spec.uri
        host.names.append(spec.name)
        spec.adapter_id = spec.name
    for host in out:
        for spec in generators:
            if spec.name in host.names:
                spec.host = host.spec.deployment_name
    return out


def resolve_models(config: Config) -> list[ModelSpec]:
    """One ModelSpec per `serve.models` entry, with `serve.model_options` applied and checked."""
    serve = config.serve
    if not serve.models:
        raise ConfigError("serve.models is empty: name at least one model (--model DIR_OR_REGISTRY_NAME)")
    hints = typing.get_type_hints(ServeConfig)
    specs: list[ModelSpec] = []
    for item in serve.models:
        name, source = _split(item)
        uri, base, entry = resolve_source(source, config.registry.uri)
        name = name or default_name(source, entry)  # a library reference is served as typed (tiny@2, tiny:prod)
        if not SERVED_NAME_RE.match(name):
            raise ConfigError(f"served model name {name!r} is not valid: use letters, digits, '.', '_', ':', '@' "
                              f"or '-' (set one with NAME={source})")
        if any(s.name == name for s in specs):
            raise ConfigError(f"two serve.models entries are both served as {name!r}; name one with NAME=SOURCE")
        task = (entry or {}).get("task") or model_task_of(uri)
        if task not in SERVABLE_TASKS:
            raise ConfigError(f"model {name!r} ({uri}) is a {task} model, which is not served: llmos serve takes "
                              f"causal LMs (text generation), seq2seq models (finetune.task=seq2seq) and classifiers "
                              "(finetune.task=classification)")
        spec = ModelSpec(name=name, uri=uri, base_uri=base, registry_entry=entry, task=task,
                         **{k: getattr(serve, k) for k in PER_MODEL_KEYS})
        for key, value in (serve.model_options.get(name) or {}).items():
            if key not in PER_MODEL_KEYS:
                close = difflib.get_close_matches(key, PER_MODEL_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"serve.model_options.{name}.{key} is not a per-model key{hint} "
                                  f"(per-model keys: {', '.join(PER_MODEL_KEYS)})")
            setattr(spec, key, coerce(value, hints[key], f"serve.model_options.{name}.{key}"))
        _check_model(spec)
        specs.append(spec)
    unknown = set(serve.model_options) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"serve.model_options names {sorted(unknown)} but the served models are "
                          f"{[s.name for s in specs]}")
    return specs


def _split(item: str) -> tuple[Optional[str], str]:
    """'name=source' -> (name, source); a bare source -> (None, source)."""
    if "=" in item and "://" not in item.split("=", 1)[0]:
        name, source = item.split("=", 1)
        return name.strip(), source.strip()
    return None, item.strip()


def _check_model(spec: ModelSpec) -> None:
    spec.validate(f"serve (model {spec.name!r})")
    if spec.engine == "vllm" and spec.task != "causal_lm":
        raise ConfigError(f"serve (model {spec.name!r}): engine=vllm generates text; a {spec.task} model is served "
                          "with engine=transformers")
    if spec.engine == "vllm" and spec.base_uri is not None:
        raise ConfigError(f"serve (model {spec.name!r}): engine=vllm serves full models here; merge the LoRA "
                          "adapter first")
    if spec.max_ongoing_requests < spec.max_batch_size:
        spec.max_ongoing_requests = spec.max_batch_size  # otherwise batches could never fill
