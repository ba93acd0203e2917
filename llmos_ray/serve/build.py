"""Building the Serve application: `build_app` (one deployment per model — LoRA adapters sharing their
base's, `spec.hosts` — behind the ingress) and `emit_config` (a Serve config file that builds the
same application).

    from llmos_ray.serve.build import build_app
    app = build_app(config)           # Config, ServeConfig, or a dict (see `as_config`)
    serve.run(app)

`build_app` is also the `import_path` of a Serve config file (`llmos serve --emit-config`):
`llmos_ray.serve.build:build_app`, whose `args` are config sections ({serve: ..., registry: ...}).
Models are resolved (registry names, paths, adapters) here, where the application is built, so a
bad name fails before any replica starts.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Optional, Union

from ray import serve
from ray.serve.config import BackpressureConfig

from llmos_ray.config import Config, ServeConfig, all_keys, from_dict, load_config
from llmos_ray.errors import ConfigError
from llmos_ray.registry import registry_uri
from llmos_ray.schema import set_dotted, yaml_value
from llmos_ray.serve.adapter_table import table_name
from llmos_ray.serve.classifier import classifier_deployment
from llmos_ray.serve.ingress import IngressDeployment
from llmos_ray.serve.keys import resolve_keys
from llmos_ray.serve.ledger import default_url
from llmos_ray.serve.replica import model_deployment
from llmos_ray.serve.seq2seq import seq2seq_deployment
from llmos_ray.serve.spec import _split, hosts, resolve_models
from llmos_ray.serve.vllm import vllm_deployment

IMPORT_PATH = "llmos_ray.serve.build:build_app"


def as_config(config: Union[Config, ServeConfig, dict, str, None]) -> Config:
    """A Config from what `build_app` accepts:

    - a Config, or a ServeConfig (other sections default);
    - a path to a YAML config file;
    - a dict of config sections ({serve: {...}, registry: {...}}), optionally with `config` (a
      YAML path) and `overrides` (a list of 'a.b=c'), as in a Serve config file's `args`;
    - a flat dict of serve keys, as `serve run llmos_ray.serve.build:build_app models=DIR port=8000`
      passes them (string values are read as YAML).
    """
    if isinstance(config, Config):
        return config.resolved()
    if isinstance(config, ServeConfig):
        return Config(serve=config).resolved()
    if isinstance(config, str):
        return load_config(config).resolved()
    raw = dict(config or {})
    path = raw.pop("config", None)
    overrides = list(raw.pop("overrides", None) or [])
    sections = {f.split(".")[0] for f in all_keys()}
    serve_keys = {k.split(".", 1)[1] for k in all_keys() if k.startswith("serve.")} | {"model_options"}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in serve_keys:
            flat[f"serve.{key}"] = yaml_value(value, key)
        elif "." in key and key.split(".")[0] in sections:
            flat[key] = yaml_value(value, key)
        else:
            raise ConfigError(f"build_app: unknown argument {key!r}; pass config sections (serve, registry), "
                              f"serve keys ({', '.join(sorted(serve_keys)[:6])}, ...), 'config' or 'overrides'")
    raw = load_config(path, overrides).to_dict()
    for key, value in flat.items():
        set_dotted(raw, key, value)
    return from_dict(raw).validate().resolved()


def build_app(config: Union[Config, ServeConfig, dict, str, None] = None):
    """The Serve application: one deployment per model (LoRA adapters on a shared base: one per base)
    behind the HTTP ingress."""
    cfg = as_config(config)
    specs = resolve_models(cfg)
    s = cfg.serve
    table = table_name(s.app_name, uuid.uuid4().hex[:8])  # this build's runtime adapters (adapter_table)
    handles = {}
    for host in hosts(specs):
        deployment = model_deployment(host, table)
        handles.update({name: deployment for name in host.names})
    for spec in specs:
        if spec.task == "classification":
            handles[spec.name] = classifier_deployment(spec)
        elif spec.task == "seq2seq":
            handles[spec.name] = seq2seq_deployment(spec)
        elif spec.engine == "vllm":
            handles[spec.name] = vllm_deployment(spec)
    keys = resolve_keys(s.api_keys, s.api_keys_file)  # only hashes go on: no secret in the Serve config
    limited = [k.name for k in keys if k.limited]
    if limited and not s.metering:
        raise ConfigError(f"serve.metering is off but keys {', '.join(limited)} have limits (rpm, tpm, "
                          "budget_tokens): turn metering on or drop the limits")
    settings = {"keys": [k.to_dict() for k in keys], "max_request_bytes": s.max_request_bytes,
                "retry_after_s": s.retry_after_s, "registry": registry_uri(cfg.registry.uri),
                "apps_refresh_s": s.apps_refresh_s, "metering": s.metering, "app_name": s.app_name,
                "ingress_replicas": s.ingress_replicas, "usage_db": usage_url(cfg), "adapter_table": table}
    ingress = serve.deployment(IngressDeployment).options(
        name="ingress", num_replicas=s.ingress_replicas, max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=s.ingress_max_ongoing_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(settings, [spec.to_dict() for spec in specs], handles)


def usage_url(cfg: Config) -> str:
    """The usage ledger's database URL: serve.usage_db, else SQLite beside the model library."""
    return cfg.serve.usage_db or default_url(registry_uri(cfg.registry.uri))


def emit_config(config: Config, path: Optional[str] = None) -> str:
    """A Serve config file (YAML) for `serve run`, `serve deploy` and a KubeRay RayService's
    serveConfigV2; written to `path` when given."""
    import yaml

    s = config.serve
    args = {"serve": {**config.to_dict()["serve"], "models": [_absolute(m) for m in s.models]},
            "registry": config.to_dict()["registry"]}
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{"name": s.app_name, "route_prefix": s.route_prefix,
                          "import_path": IMPORT_PATH, "args": args}],
    }
    text = ("# llmos-ray Serve config. Run: `serve run FILE` (local) or `serve deploy FILE` (cluster);\n"
            "# for KubeRay paste `applications` under a RayService's spec.serveConfigV2.\n"
            "# API keys: prefer LLMOS_API_KEYS in runtime_env.env_vars or serve.api_keys_file to keys in this file.\n"
            + yaml.safe_dump(doc, sort_keys=False))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return text


def _absolute(item: str) -> str:
    """Relative local paths in serve.models become absolute, so the file works from any directory."""
    name, source = _split(item)
    if "://" not in source and os.path.isdir(os.path.expanduser(source)):
        source = os.path.abspath(os.path.expanduser(source))
    return f"{name}={source}" if name else source
