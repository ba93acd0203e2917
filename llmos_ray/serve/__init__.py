"""Serving: OpenAI-compatible and KServe v2 HTTP on Ray Serve, one deployment per model (LoRA adapters
beside their base on the base's deployment).

    import llmos_ray.serve
    handle = llmos_ray.serve.serve(cfg)      # cfg: Config (serve.models = dirs or registry names)
    # -> http://{serve.host}:{serve.port}/v1/chat/completions, /v1/completions, /v2/models/{name}/infer

A request's way through the modules:

    build       build_app / emit_config: config -> spec per model, deployments (spec.hosts) -> the application
    ingress     the FastAPI routes (one Ingress deployment), each delegating to:
      middleware    request ids, API keys (keys), limits and the usage ledger (meter: quota, ledger),
                    body limit, request metrics, the error shape
      openai        /v1/completions and /v1/chat/completions: one pipeline; /v1/models
      kserve        the KServe v2 / Triton protocol and its routes
      prompt_apps   ready-made prompt apps (/v1/apps)
      protocol      JSON bodies parsed and validated, OpenAI request models and response shapes, SSE
      dispatch      the served models seen from the ingress: retries, max_tokens cap, safety (safety)
      lora          /v1/load_lora_adapter, /v1/unload_lora_adapter (adapter_table: the runtime adapters)
    replica     ModelServer: one base model's Serve deployment, feeding
      engine        the continuous-batching Engine (sampling: the next token per row; kvcache; rows)
      adapter_host  the LoRA adapters a replica holds beside its base (adapters: the per-row deltas)
      loading       load_model: exports, hub ids, merged LoRA adapters, int8, device and dtype
    types       what travels between ingress and replicas: GenerationRequest, Chunk, Result, APIError
    vllm        the optional vLLM engine (GPU), metrics   the Ray metrics both sides record
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

_started_ray = False


def build_app(config: Any = None):
    """The Serve application for `config` (see llmos_ray.serve.build.as_config for what it accepts)."""
    from llmos_ray.serve.build import build_app as _build

    return _build(config)


def serve(config: Any = None):
    """Deploy the models of `config` on Ray Serve and return the ingress DeploymentHandle.

    Connects to Ray as every llmos command does (`runtime.init_ray`: $RAY_ADDRESS, else a new
    local instance) unless Ray is already initialized. HTTP listens on
    serve.host:serve.port (a Serve instance already running on this cluster keeps its own HTTP
    options). Returns once every replica is ready."""
    global _started_ray
    from ray import serve as ray_serve

    from llmos_ray.serve.build import as_config
    from llmos_ray.serve.build import build_app as _build

    cfg = as_config(config)
    app = _build(cfg)  # resolve models (registry, paths) before starting anything
    from llmos_ray.runtime import init_ray

    _started_ray = init_ray() or _started_ray
    ray_serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    handle = ray_serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix)
    _wait_for_route(cfg.serve)
    log.info("serving %s at http://%s:%d%s", cfg.serve.models, cfg.serve.host, cfg.serve.port,
             cfg.serve.route_prefix)
    return handle


def _wait_for_route(s, timeout_s: float = 15.0) -> None:
    """Return once Serve's HTTP proxy routes serve.route_prefix: it learns an application's route a
    moment after the application is running, and a request in between gets the proxy's 404."""
    import time

    import httpx

    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    url, deadline = f"http://{host}:{s.port}/-/routes", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if s.route_prefix in httpx.get(url, timeout=2).json():
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    log.warning("Serve's proxy at %s does not route %s yet after %.0f s (another Serve instance with other "
                "HTTP options?)", url, s.route_prefix, timeout_s)


def run_until_stopped(config: Any = None) -> None:
    """Block until SIGINT or SIGTERM, then delete the application (and disconnect from Ray if `serve`
    connected; a local instance it started stops with it)."""
    import ray
    from ray import serve as ray_serve

    from llmos_ray.serve.build import as_config

    cfg = as_config(config)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("shutting down application %s", cfg.serve.app_name)
        ray_serve.delete(cfg.serve.app_name)
        if cfg.serve.metering:  # its usage meter (detached) writes what it still holds, then ends
            from llmos_ray.serve.build import usage_url
            from llmos_ray.serve.meter import stop_meter

            stop_meter(cfg.serve.app_name, usage_url(cfg))
        if _started_ray:
            ray.shutdown()


__all__ = ["serve", "build_app", "run_until_stopped"]
