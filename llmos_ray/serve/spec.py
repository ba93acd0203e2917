"""What to serve: `ServeConfig` + the registry -> one `ModelSpec` per served model.

Resolution happens where the application is built (the driver, or the Serve controller for
`serve run`/`serve deploy`), so a bad name fails before any replica starts.
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
