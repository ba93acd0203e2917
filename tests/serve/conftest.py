"""Serve fixtures: two LoRA adapters over the tiny model, free ports, and the package's one Serve app.

`server` (package scope) is one Serve app shared by test_hostile.py, test_http.py and
test_metering.py, three models behind two ingress replicas (they share one usage meter; the
ledger is `usage.db` beside the model library), keys with limits in LIMITED_KEYS:

  tiny     the tiny model, served by its registry name; input blocklist ['forbiddenword']
  lora     a LoRA adapter directory over the tiny model; small limits (max_tokens 16, at most 4
           running + 4 queued), so that fuzzed requests that happen to be valid stay cheap;
           last-token pooling for /v1/embeddings
  guarded  the tiny model by its library alias (tiny:prod -> tiny@1) with room for one running + one
           queued request, and an output rule that matches any text
"""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

KEY, FILE_KEY, ENV_KEY = "sk-test", "sk-from-file", "sk-from-env"
LIMITED_KEYS = [  # records in serve.api_keys (test_metering.py); each secret is findable in any text
    {"name": "rpm5", "key": "sk-secret-rpm5-4f1c", "tenant": "acme", "rpm": 5},
    {"name": "budget", "key": "sk-secret-budget-9d2e", "tenant": "acme", "models": ["tiny"], "budget_tokens": 40,
     "budget_period": "day"},
    {"name": "onlytiny", "key": "sk-secret-onlytiny-77aa", "tenant": "beta", "models": ["tiny"], "apps": []},
    {"name": "counted", "key": "sk-secret-counted-0b3f", "tenant": "beta"},
    {"name": "ops", "key": "sk-secret-admin-c0de", "admin": True},
]
SECRETS = {k["name"]: k["key"] for k in LIMITED_KEYS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lora_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A peft LoRA adapter (random, non-zero B) on the tiny model's attention: changes its outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    out = str(tmp_path_factory.mktemp("lora") / "adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_dir_b(tiny_model_dir, tmp_path_factory) -> str:
    """A second adapter of the tiny model, unlike `lora_dir` in rank (8), targets (attention and both
    projections) and scaling (rsLoRA): each changes the outputs its own way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        use_rslora=True, init_lora_weights=False)
    out = str(tmp_path_factory.mktemp("lora_b") / "adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="package")
def server(ray_session, tiny_model_dir, lora_dir, tmp_path_factory):
    from ray import serve

    import llmos_ray.serve
    from llmos_ray import registry
    from llmos_ray.config import load_config
    from llmos_ray.serve.build import usage_url
    from llmos_ray.serve.meter import stop_meter

    tmp = tmp_path_factory.mktemp("serve")
    reg = str(tmp / "models.json")
    registry.register("tiny", tiny_model_dir, registry=reg, size="tiny", source_run="fixture")
    registry.promote("tiny@1", "prod", reg)
    assert [e.name for e in registry.list_models(reg)] == ["tiny"]
    keys_file = tmp / "keys.txt"
    keys_file.write_text(f"# one key per line\n{FILE_KEY}\n")
    os.environ["LLMOS_API_KEYS"] = ENV_KEY
    port = free_port()
    cfg = load_config(None, {
        "registry.uri": reg,
        "serve.port": port,
        "serve.models": ["tiny", f"lora={lora_dir}", "guarded=tiny:prod"],
        "serve.apps_refresh_s": 0.2,
        "serve.api_keys": [KEY, *LIMITED_KEYS],
        "serve.ingress_replicas": 2,
        "serve.api_keys_file": str(keys_file),
        "serve.max_request_bytes": 200_000,
        "serve.max_tokens_limit": 400,
        "serve.model_options": {
            "tiny": {"safety_input_blocklist": ["forbiddenword"], "max_batch_size": 8},
            "lora": {"num_cpus": 0.5, "max_tokens_limit": 16, "max_batch_size": 4, "max_ongoing_requests": 4,
                     "max_queued_requests": 4, "embedding_pooling": "last"},
            "guarded": {"max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1, "num_cpus": 0.5,
                        "safety_output_patterns": [r"[\s\S]"]},
        },
    })
    t0 = time.perf_counter()
    try:
        llmos_ray.serve.serve(cfg)
    finally:
        del os.environ["LLMOS_API_KEYS"]
    print(f"serve app ready in {time.perf_counter() - t0:.1f} s")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield {"url": url, "port": port, "client": client, "registry": reg, "tiny": tiny_model_dir, "lora": lora_dir,
               "usage_db": usage_url(cfg), "app_name": cfg.serve.app_name}
    serve.shutdown()
    stop_meter(cfg.serve.app_name, usage_url(cfg))


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error object of a /v1 error response (asserting its shape)."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
