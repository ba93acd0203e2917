"""Serving metrics through `ray.util.metrics` (exported by Ray as Prometheus `ray_llmos_serve_*`).

Ingress: requests by model/route/status, latency, time to first token, safety blocks.
Ingress, per key: tokens by key NAME (never the secret), tenant, model and kind (prompt/completion).
Model replicas: generated tokens (and tokens/s), sequences waiting for a batch slot (queue depth),
running sequences, decode batch size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


@dataclass
class ServeMetrics:
    requests: Any
    latency: Any
    ttft: Any
    safety_blocks: Any
    generated_tokens: Any
    tokens_per_s: Any
    queue_depth: Any
    running: Any
    batch_size: Any
    tokens: Any


@functools.lru_cache(maxsize=None)
def get_metrics() -> ServeMetrics:
    """The metric objects of this process (created once, inside a Ray worker)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    model = ("model",)
    return ServeMetrics(
        requests=Counter("llmos_serve_requests", "HTTP requests by model, route and status code.",
                         tag_keys=("model", "route", "status")),
        latency=Histogram("llmos_serve_request_latency_s", "Request latency in seconds (to the last byte).",
                          boundaries=LATENCY_BOUNDARIES, tag_keys=("model", "route")),
        ttft=Histogram("llmos_serve_time_to_first_token_s", "Time to the first generated text, in seconds.",
                       boundaries=LATENCY_BOUNDARIES, tag_keys=model),
        safety_blocks=Counter("llmos_serve_safety_blocks", "Requests or completions stopped by the safety filter.",
                              tag_keys=("model", "direction")),
        generated_tokens=Counter("llmos_serve_generated_tokens", "Tokens generated.", tag_keys=model),
        tokens_per_s=Gauge("llmos_serve_generated_tokens_per_s", "Generated tokens per second of one replica.",
                           tag_keys=model),
        queue_depth=Gauge("llmos_serve_queue_depth", "Sequences waiting for a batch slot in one replica.",
                          tag_keys=model),
        running=Gauge("llmos_serve_running_sequences", "Sequences being decoded in one replica.", tag_keys=model),
        batch_size=Histogram("llmos_serve_batch_size", "Sequences decoded together per step.",
                             boundaries=BATCH_BOUNDARIES, tag_keys=model),
        tokens=Counter("llmos_serve_tokens", "Tokens charged to API keys (prompt and completion), by key name.",
                       tag_keys=("key", "tenant", "model", "kind")),
    )
