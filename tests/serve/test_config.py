"""Pure parts: request parsing, the v2 binary protocol, model resolution, Serve config files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import yaml

from llmos_ray.config import load_config
from llmos_ray.errors import ConfigError, ModelError
from llmos_ray.serve import kserve
from llmos_ray.serve.build import as_config, emit_config
from llmos_ray.serve.protocol import ChatCompletionRequest, CompletionRequest
from llmos_ray.serve.spec import resolve_models
from llmos_ray.serve.types import APIError
from llmos_ray.serve.validation import parse_body


def test_parse_body_names_the_bad_field():
    ok = parse_body(b'{"model": "m", "prompt": "hi", "stop": "x", "unknown_new_sdk_field": 1}', CompletionRequest)
    assert ok.stop == ["x"] and ok.temperature == 1.0
    cases = [(b'{"model": "m"}', CompletionRequest, "prompt"),
             (b'{"model": "m", "prompt": "a", "top_p": 0}', CompletionRequest, "top_p"),
             (b'{"model": "m", "prompt": "a", "max_tokens": -1}', CompletionRequest, "max_tokens"),  # 0: echo
             (b'{"model": "m", "messages": []}', ChatCompletionRequest, "messages"),
             (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', ChatCompletionRequest,
              "messages.0.content")]
    for raw, cls, param in cases:
        with pytest.raises(APIError) as e:
            parse_body(raw, cls)
        assert (e.value.status, e.value.param) == (400, param), raw
    with pytest.raises(APIError) as e:
        parse_body(b"[1]", CompletionRequest)
    assert e.value.code == "invalid_json"


def test_kserve_binary_and_json_tensors():
    texts = [b"hello", "h\u00e9".encode()]
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    head = json.dumps({"id": "7", "inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [5]}],
        "parameters": {"temperature": 0}, "outputs": [{"name": "text_output", "parameters": {"binary_data": True}}]
    }).encode()
    req = kserve.parse_infer(head + raw, str(len(head)))
    assert req.texts == ["hello", "h\u00e9"]
    assert req.sampling.model_dump(exclude_unset=True) == {"temperature": 0, "max_tokens": 5}
    assert req.binary_outputs == {"text_output"} and req.id == "7"
    body, headers = kserve.infer_response("m", "7", ["a", "bc"], binary=True)
    split = int(headers["inference-header-content-length"])
    assert json.loads(body[:split])["outputs"][0]["parameters"]["binary_data_size"] == len(body) - split
    with pytest.raises(APIError):
        kserve.parse_infer(head + raw[:-1], str(len(head)))


def test_models_resolve_from_paths_registry_and_adapters(tiny_model_dir, lora_dir, tmp_path):
    from llmos_ray import registry

    reg = str(tmp_path / "models.json")
    registry.register("base-v1", tiny_model_dir, registry=reg)
    cfg = load_config(None, {"registry.uri": reg, "serve.models": ["base-v1", lora_dir, f"copy={tiny_model_dir}"],
                             "serve.model_options": {"copy": {"max_replicas": 3, "quantize": "int8"}}})
    specs = {s.name: s for s in resolve_models(cfg)}
    assert set(specs) == {"base-v1", "adapter", "copy"}
    assert specs["base-v1"].uri == tiny_model_dir and specs["base-v1"].registry_entry["name"] == "base-v1"
    assert specs["adapter"].base_uri == tiny_model_dir
    assert (specs["copy"].max_replicas, specs["copy"].quantize, specs["base-v1"].max_replicas) == (3, "int8", 1)


def test_adapters_share_their_bases_deployment_unless_merged_or_set_up_otherwise(tiny_model_dir, lora_dir,
                                                                                lora_dir_b):
    from llmos_ray.serve.spec import hosts

    cfg = load_config(None, {"serve.models": [f"tiny={tiny_model_dir}", f"a={lora_dir}", f"b={lora_dir_b}",
                                              f"m={lora_dir}", f"c={lora_dir}", f"d={lora_dir_b}"],
                             "serve.model_options": {
                                 "a": {"safety_input_blocklist": ["x"]},  # applied per name: still shared
                                 "m": {"lora": "merge"},
                                 "c": {"max_batch_size": 4}, "d": {"max_batch_size": 4}}})
    specs = {s.name: s for s in resolve_models(cfg)}
    found = {h.spec.deployment_name: (h.spec.uri, h.names, h.adapters) for h in hosts(list(specs.values()))}
    assert found == {"model-tiny": (tiny_model_dir, ["tiny", "a", "b"], {"a": lora_dir, "b": lora_dir_b}),
                     "model-m": (lora_dir, ["m"], {}),  # merged into its own copy of the base
                     "model-c": (tiny_model_dir, ["c", "d"], {"c": lora_dir, "d": lora_dir_b})}
    assert [(specs[n].host, specs[n].adapter_id) for n in ("tiny", "a", "m", "d")] == [
        ("model-tiny", None), ("model-tiny", "a"), ("model-m", None), ("model-c", "d")]


@pytest.mark.parametrize("overrides, message", [
    ({"serve.models": ["nope"]}, "neither a directory nor a name in the registry"),
    ({"serve.models": ["a=DIR", "a=DIR"]}, "both served as 'a'"),
    ({"serve.model_options": {"a": {"max_replica": 2}}}, "did you mean 'max_replicas'"),
    ({"serve.model_options": {"other": {"max_replicas": 2}}}, "served models are ['a']"),
    ({"serve.model_options": {"a": {"quantize": "int4"}}}, "serve.model_options.a.quantize"),
    ({"serve.model_options": {"a": {"min_replicas": 3}}}, "min_replicas <= max_replicas"),
    ({"serve.models": ["../x=DIR"]}, "served model name"),
])
def test_bad_serve_configs_say_what_to_change(tiny_model_dir, tmp_path, overrides, message):
    base = {"registry.uri": str(tmp_path / "r.json"), "serve.models": ["a=DIR"]}
    merged = {**base, **overrides}
    merged["serve.models"] = [m.replace("DIR", tiny_model_dir) for m in merged["serve.models"]]
    with pytest.raises((ConfigError, ModelError), match=None) as e:
        resolve_models(load_config(None, merged))
    assert message in str(e.value)


def test_emitted_serve_config_builds_the_same_app_args(tiny_model_dir, tmp_path):
    cfg = load_config(None, {"serve.models": [f"tiny={tiny_model_dir}"], "serve.port": 9000,
                             "serve.model_options": {"tiny": {"max_replicas": 2}}})
    path = tmp_path / "serve.yaml"
    emit_config(cfg, str(path))
    doc = yaml.safe_load(path.read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "llmos_ray.serve.build:build_app" and doc["http_options"]["port"] == 9000
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc)  # what `serve deploy` and KubeRay accept
    again = as_config(app["args"])
    assert again.serve == cfg.serve
    assert resolve_models(again)[0].max_replicas == 2


def test_build_app_args_as_serve_run_passes_them(tiny_model_dir):
    cfg = as_config({"models": f"[{tiny_model_dir}]", "port": "8123", "max_batch_size": "4"})
    assert (cfg.serve.models, cfg.serve.port, cfg.serve.max_batch_size) == ([tiny_model_dir], 8123, 4)
    with pytest.raises(ConfigError, match="unknown argument 'modle'"):
        as_config({"modle": "x"})


def test_an_adapter_base_relative_to_the_adapter_resolves(tiny_model_dir, lora_dir, tmp_path):
    import shutil

    from llmos_ray.registry import resolve_source

    os.symlink(tiny_model_dir, tmp_path / "base")
    adapter = tmp_path / "runs" / "sft"
    shutil.copytree(lora_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "../../base"}))
    uri, base, entry = resolve_source(str(adapter), str(tmp_path / "r.json"))
    assert (uri, entry) == (str(adapter), None) and os.path.samefile(base, tiny_model_dir)


def test_middleware_request_ids_and_error_shapes_without_the_serve_proxy():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llmos_ray.serve.middleware import current_request_id, install

    api = install(FastAPI())
    seen = {}

    @api.get("/v1/echo")
    async def echo():
        seen["id"] = current_request_id()
        return {"ok": True}

    @api.get("/v1/bad")
    @api.get("/v2/models/m/bad")
    async def bad():
        raise APIError(400, "temperature: too hot", param="temperature", code="invalid_value")

    @api.get("/v1/broken")
    async def broken():
        raise RuntimeError("disk on fire")

    with TestClient(api) as client:
        r = client.get("/v1/echo")
        assert r.headers.get_list("x-request-id") == [seen["id"]] and len(seen["id"]) == 32
        assert client.get("/v1/bad").json() == {"error": {"message": "temperature: too hot", "type":
                                                          "invalid_request_error", "param": "temperature",
                                                          "code": "invalid_value"}}
        r = client.get("/v2/models/m/bad")
        assert (r.status_code, r.json()) == (400, {"error": "temperature: too hot"})
        r = client.get("/v1/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = client.get("/v1/broken")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "disk on fire" in r.json()["error"]["message"] and r.headers["x-request-id"]
        client.get("/v1/echo", headers={"X-Request-Id": "req-7"})
        assert seen["id"] == "req-7"
