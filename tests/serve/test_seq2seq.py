"""An encoder-decoder served over real HTTP (one Serve app for the module: the session's fine-tuned
translator, tests/conftest.py `seq2seq_run`): concurrent /v1/completions are batched (@serve.batch
static batches) and each answer equals an unbatched greedy `model.generate` of its prefixed source;
the official openai client, streaming, KServe v2 generate and the translate app reach it; chat
and bad input are 400s that say why."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.conftest import SEQ2SEQ_PREFIX

pytestmark = pytest.mark.slow

SOURCES = ["Cannot open file %s", "The file is empty", "Save the document", "Quit the program",
           "No such file or directory", "Print", "Permission denied", "Could not connect to the server"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(server, seq2seq_run):
    """The translator, served as a second application beside the package's shared one (Serve runs one
    HTTP proxy per cluster: it joins that port under /s2s), deleted after this module."""
    from ray import serve

    import llmos_ray.serve
    from llmos_ray.config import load_config

    port = server["port"]
    cfg = load_config(None, {"serve.port": port, "serve.app_name": "s2s", "serve.route_prefix": "/s2s",
                             "serve.metering": False, "serve.models": [f"en-fr={seq2seq_run.export_dir}"],
                             "serve.model_options": {"en-fr": {"num_cpus": 0.5, "max_batch_size": 8,
                                                               "batch_wait_timeout_s": 0.2}}})
    llmos_ray.serve.serve(cfg)
    url = f"http://127.0.0.1:{port}/s2s"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"url": url, "client": client, "export": seq2seq_run.export_dir}
    serve.delete("s2s")


def greedy(export_dir: str, sources: list[str]) -> list[str]:
    """Each source alone (no padding, no batch): the design documents' generate call."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        return [tok.decode(model.generate(tok.encode(SEQ2SEQ_PREFIX + s, return_tensors="pt"),
                                          max_new_tokens=MAX_TOKENS, do_sample=False)[0],
                           skip_special_tokens=True).strip() for s in sources]


def test_concurrent_completions_are_batched_and_equal_unbatched_greedy(server):
    want = greedy(server["export"], SOURCES)
    c = server["client"]

    def complete(source):
        r = c.post("/v1/completions", json={"model": "en-fr", "prompt": source, "max_tokens": MAX_TOKENS,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        return r

    with ThreadPoolExecutor(len(SOURCES)) as pool:
        responses = list(pool.map(complete, SOURCES))
    assert [r.json()["choices"][0]["text"] for r in responses] == want
    assert max(int(r.headers["x-llmos-batch-size"]) for r in responses) > 1  # they did share a generate
    usage = responses[0].json()["usage"]
    assert usage["prompt_tokens"] == len(AutoTokenizer_of(server)(SEQ2SEQ_PREFIX + SOURCES[0])["input_ids"])
    # a prompt that already carries the prefix is not prefixed twice
    again = c.post("/v1/completions", json={"model": "en-fr", "prompt": SEQ2SEQ_PREFIX + SOURCES[0],
                                            "max_tokens": MAX_TOKENS, "temperature": 0}).json()
    assert again["choices"][0]["text"] == want[0] and again["usage"] == usage


def AutoTokenizer_of(server):  # noqa: N802
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server["export"])


def test_openai_client_streaming_and_kserve_generate_reach_the_translator(server):
    import openai

    want = greedy(server["export"], SOURCES[:1])[0]
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="none")
    done = client.completions.create(model="en-fr", prompt=SOURCES[0], max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == want and done.choices[0].finish_reason in ("stop", "length")
    pieces = client.completions.create(model="en-fr", prompt=SOURCES[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    r = server["client"].post("/v2/models/en-fr/generate",
                              json={"text_input": SOURCES[0], "parameters": {"max_tokens": MAX_TOKENS,
                                                                             "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == want
    with pytest.raises(openai.BadRequestError) as e:  # chat on an encoder-decoder: a 400 that says why
        client.chat.completions.create(model="en-fr", messages=[{"role": "user", "content": "Bonjour"}])
    assert e.value.status_code == 400 and e.value.code == "model_not_chat"
    assert "seq2seq (encoder-decoder)" in e.value.message and "/v1/completions" in e.value.message


def test_translate_app_routes_to_the_translator_and_bad_input_is_a_400(server):
    c = server["client"]
    want = greedy(server["export"], SOURCES[1:2])[0]
    r = c.post("/v1/apps/translate", json={"model": "en-fr", "text": SOURCES[1], "target_language": "French",
                                           "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["output"] == want and r.json()["app"] == "translate" and r.json()["model"] == "en-fr"
    t0 = time.perf_counter()
    for body, param, words in [
        ({"model": "en-fr", "prompt": "   ", "max_tokens": 4}, "prompt", "empty"),
        ({"model": "en-fr", "prompt": "x " * 2000, "max_tokens": 4}, "prompt", "source tokens exceed"),
        ({"model": "en-fr", "prompt": "Print", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ]:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    r = c.post("/v1/apps/haiku_missing", json={"model": "en-fr"})
    assert r.status_code == 404
    assert time.perf_counter() - t0 < 10  # refused before any generation
