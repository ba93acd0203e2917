"""A classifier served over real HTTP (one Serve app for the module: the session's fine-tuned
language-ID classifier beside the tiny causal LM): /v1/classify and KServe v2 infer through
tritonclient, checked against a direct forward pass of the export; 400s that say why."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow

TEXTS = ["Fichier introuvable", "Datei nicht gefunden", "No such file or directory", "无法打开文件",
         "Impossibile aprire il file", "Не удалось открыть файл"]


@pytest.fixture(scope="module")
def server(ray_session, classifier_run, tiny_model_dir, tmp_path_factory):
    from ray import serve

    import llmos_ray.serve
    from llmos_ray import registry
    from llmos_ray.config import load_config

    reg = str(tmp_path_factory.mktemp("serve-cls") / "models.json")
    entry = registry.register("lang-id", classifier_run.export_dir, registry=reg)
    assert entry.task == "classification" and entry.family == "bert"
    port = free_port()
    models = ["lang-id", f"lm={tiny_model_dir}"]
    cfg = load_config(None, {"registry.uri": reg, "serve.port": port, "serve.models": models,
                             "serve.model_options": {"lang-id": {"num_cpus": 0.5, "max_batch_size": 4},
                                                     "lm": {"num_cpus": 0.5}}})
    t0 = time.perf_counter()
    llmos_ray.serve.serve(cfg)
    print(f"serve app ready in {time.perf_counter() - t0:.1f} s")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield {"port": port, "client": client, "export": classifier_run.export_dir}
    serve.shutdown()


def direct(export_dir: str, texts: list[str]) -> np.ndarray:
    """Softmax probabilities of a plain transformers forward pass, one text at a time (no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        return np.stack([torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).numpy() for t in texts])


def test_classify_matches_a_direct_forward_pass(server):
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(server["export"]).id2label
    probs = direct(server["export"], TEXTS)
    r = server["client"].post("/v1/classify", json={"model": "lang-id", "input": TEXTS, "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "classification" and body["usage"] == {"inputs": len(TEXTS)}
    for item, row in zip(body["data"], probs):  # batches of 4 padded to their longest: the same answers
        best = np.argsort(-row)[:3]
        assert [x["label"] for x in item["labels"]] == [id2label[i] for i in best]
        np.testing.assert_allclose([x["score"] for x in item["labels"]], row[best], atol=1e-4)
        assert item["label"] == id2label[best[0]]
    one = server["client"].post("/v1/classify", json={"model": "lang-id", "input": TEXTS[0]}).json()
    assert len(one["data"]) == 1 and len(one["data"][0]["labels"]) == 1


def test_triton_client_infer_on_the_classifier(server):
    import tritonclient.http as triton
    from transformers import AutoConfig

    client = triton.InferenceServerClient(url=f"127.0.0.1:{server['port']}")
    assert client.is_model_ready("lang-id")
    meta = client.get_model_metadata("lang-id")
    assert [o["name"] for o in meta["outputs"]] == ["label", "score"]
    text = triton.InferInput("text_input", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = client.infer("lang-id", [text], outputs=[triton.InferRequestedOutput("label"),
                                                      triton.InferRequestedOutput("score")])
    probs = direct(server["export"], TEXTS)
    id2label = AutoConfig.from_pretrained(server["export"]).id2label
    assert [b.decode() for b in result.as_numpy("label")] == [id2label[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(result.as_numpy("score"), probs.max(1), atol=1e-4)


def test_wrong_model_kinds_and_bad_input_are_400s_that_say_why(server):
    c = server["client"]
    r = c.post("/v1/completions", json={"model": "lang-id", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 400 and "text classifier" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "model_not_generative"
    r = c.post("/v1/chat/completions", json={"model": "lang-id", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]
    r = c.post("/v1/classify", json={"model": "lm", "input": "hello"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_classifier"
    for body, param in (({"model": "lang-id"}, "input"), ({"model": "lang-id", "input": []}, "input"),
                        ({"model": "lang-id", "input": ["ok", ""]}, "input.1"),
                        ({"model": "lang-id", "input": "x", "top_k": 0}, "top_k"),
                        ({"model": "lang-id", "input": ["a", "b"], "text_pair": ["c"]}, "text_pair")):
        r = c.post("/v1/classify", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert c.post("/v1/classify", json={"model": "nope", "input": "x"}).status_code == 404
    r = c.post("/v1/completions", json={"model": "lm", "prompt": "def", "max_tokens": 2})
    assert r.status_code == 200  # the causal LM beside it still generates
