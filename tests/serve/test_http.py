"""End to end over real HTTP: the package's one Serve app (`server` in conftest.py: three models
behind one ingress, shared with test_hostile.py).

Expected texts come from plain `model.generate` (greedy, one prompt at a time) in this process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import httpx
import pytest

from tests.serve.conftest import ENV_KEY, FILE_KEY, KEY, error_of
from tests.serve.reference import greedy

pytestmark = pytest.mark.slow

PROMPTS = ["def main():", "import os\nimport sys\n", "The quick brown fox", "class Foo(object):",
           "for i in range(10):", "return None", "# comment", "x = [1, 2, 3]"]


def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


# -- OpenAI API through the official client -----------------------------------------------------


def test_models_list_shows_every_model_and_registry_source(server):
    models = {m.id: m for m in openai_client(server).models.list().data}
    assert set(models) == {"tiny", "lora", "guarded"}
    assert models["tiny"].root == server["tiny"]  # resolved through the registry name
    assert models["lora"].parent == server["tiny"]  # adapter over its base
    assert models["guarded"].root == server["tiny"]  # resolved through the alias tiny:prod


def test_completion_equals_unbatched_greedy(server):
    out = openai_client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(server["tiny"], PROMPTS[0], max_new_tokens=12)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + \
        out.usage.completion_tokens


def test_chat_uses_the_chat_template(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = openai_client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                        temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy(server["tiny"], messages=messages, max_new_tokens=10)
    from llmos_ray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(server["tiny"])
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tok.encode(templated, add_special_tokens=False))


def test_streaming_chat_matches_non_streamed(server):
    client = openai_client(server)
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with server["client"].stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4,
                                                                  "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_a_stream_leaves_the_replica_once_per_stream_interval(server):
    """serve.stream_interval_s (0.1 s by default): the first text at once, then the tokens decoded
    within each interval in one chunk, so a 48-token stream is a handful of messages per hop, not 48."""
    body = {"model": "tiny", "prompt": "import", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True}
    arrived = []
    with server["client"].stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                arrived.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrived, arrived[1:])]
    # The last chunk leaves as soon as the row finishes, so it may follow its predecessor closely;
    # the others are >= 0.1 s apart in the replica (0.05 s leaves room for delivery jitter).
    assert 1 <= len(arrived) < 48 and all(g >= 0.05 for g in gaps[:-1]), gaps


def test_seeded_sampling_is_reproducible(server):
    client = openai_client(server)
    runs = [client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
            .choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_stop_strings_cut_the_output(server):
    full = greedy(server["tiny"], PROMPTS[0], max_new_tokens=12)
    stop = full[3:5]
    assert stop and full.find(stop) >= 0
    out = openai_client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                   stop=[stop])
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"


# -- KServe v2 / Triton ---------------------------------------------------------------------------


def test_triton_client_ready_and_infer(server):
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{server['port']}")
    assert client.is_server_live() and client.is_server_ready()
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.is_model_ready("tiny", headers=auth)
    text = triton.InferInput("text_input", [2], "BYTES")
    text.set_data_from_numpy(np.array([PROMPTS[0].encode(), PROMPTS[2].encode()], dtype=object))
    result = client.infer("tiny", [text], outputs=[triton.InferRequestedOutput("text_output")], headers=auth,
                          parameters={"max_tokens": 8, "temperature": 0})
    got = [t.decode() for t in result.as_numpy("text_output")]
    assert got == [greedy(server["tiny"], p, max_new_tokens=8) for p in (PROMPTS[0], PROMPTS[2])]
    # the same with JSON tensors and max_tokens given as an input
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPTS[0]]},
                       {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [8]},
                       {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [0.0]}]}
    r = server["client"].post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == got[:1]


def test_v2_generate_and_generate_stream(server):
    c = server["client"]
    expected = greedy(server["tiny"], PROMPTS[1], max_new_tokens=8)
    r = c.post("/v2/models/tiny/generate", json={"text_input": PROMPTS[1], "parameters": {"max_tokens": 8,
                                                                                        "temperature": 0}})
    assert r.status_code == 200 and r.json()["text_output"] == expected
    with c.stream("POST", "/v2/models/tiny/generate_stream",
                  json={"text_input": PROMPTS[1], "max_tokens": 8, "temperature": 0}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == expected and events[-1]["finish_reason"]
    assert c.get("/v2").json()["name"] == "llmos-ray"
    assert c.get("/v2/models/tiny").json()["outputs"][0]["name"] == "text_output"


# -- Bad input, auth, routing -------------------------------------------------------------------


def test_bad_requests_are_400_naming_the_field(server):
    c = server["client"]
    r = c.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "temperature": "hot"})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = c.post("/v1/chat/completions", json={"model": "tiny"})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and error_of(r)["param"] == "messages.0.role"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 10**6})  # server limit (400)
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a " * 300, "max_tokens": 390})  # context (512)
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 2000})  # prompt alone too long
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a" * 300_000})  # body limit 200 kB
    assert r.status_code == 413
    r = c.post("/v2/models/tiny/infer", json={"inputs": [{"name": "other", "datatype": "BYTES", "shape": [1],
                                                          "data": ["a"]}]})
    assert r.status_code == 400 and "text_input" in r.json()["error"]


def test_api_keys_from_config_file_and_env(server):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    url = server["url"] + "/v1/completions"
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    for key in (KEY, FILE_KEY, ENV_KEY):
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
    assert httpx.get(server["url"] + "/health").status_code == 200  # probes need no key
    assert httpx.get(server["url"] + "/v1/models").status_code == 401


def test_every_response_carries_its_request_id_once(server):
    c = server["client"]
    responses = [c.get("/v1/models", headers={"X-Request-Id": "req-ok"}),
                 httpx.post(server["url"] + "/v1/completions", json={}, headers={"X-Request-Id": "req-401"}),
                 c.post("/v1/completions", content=b"{", headers={"X-Request-Id": "req-400"}),
                 c.get("/v1/no/such/route", headers={"X-Request-Id": "req-404"})]
    assert [r.headers.get_list("x-request-id") for r in responses] == [["req-ok"], ["req-401"], ["req-400"],
                                                                       ["req-404"]]
    assert [r.status_code for r in responses] == [200, 401, 400, 404]
    with c.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True},
                  headers={"X-Request-Id": "req-stream"}) as r:
        assert r.headers.get_list("x-request-id") == ["req-stream"]
    generated = c.get("/v1/models").headers.get_list("x-request-id")
    assert len(generated) == 1 and len(generated[0]) >= 16


def test_unknown_models_are_404_and_never_paths(server):
    c = server["client"]
    for name in ("nope", "../../etc/passwd", "/etc/passwd", server["tiny"]):
        r = c.post("/v1/completions", json={"model": name, "prompt": "a"})
        assert r.status_code == 404 and error_of(r)["param"] == "model", name
        assert "root:" not in r.text
    assert c.post("/v2/models/..%2F..%2Fetc%2Fpasswd/infer", json={"inputs": []}).status_code == 404
    assert c.get("/v1/models/../../etc/passwd").status_code == 404
    assert c.get("/v1/no/such/route").status_code == 404


def test_two_models_routed_by_name(server):
    client = openai_client(server)
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for m in ("tiny", "lora")}
    assert texts["tiny"] == greedy(server["tiny"], PROMPTS[2], max_new_tokens=10, min_new_tokens=10)
    assert texts["lora"] == greedy(server["tiny"], PROMPTS[2], max_new_tokens=10, min_new_tokens=10,
                                   adapter_dir=server["lora"])
    assert texts["tiny"] != texts["lora"]


# -- Batching and capacity ----------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_equal_unbatched_greedy(server):
    c = server["client"]

    def ask(prompt):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0,
                                            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], int(r.headers["x-llmos-batch-size"])

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert max(size for _, size in answers) > 1
    for prompt, (text, _) in zip(PROMPTS, answers):
        assert text == greedy(server["tiny"], prompt, max_new_tokens=40, min_new_tokens=40), prompt
    stats = c.get("/v1/stats").json()["models"]["tiny"]
    assert stats["max_batch_size_seen"] > 1 and stats["continuous_batching"]


def test_over_capacity_is_503_with_retry_after(server):
    c = server["client"]

    def ask(_):
        return c.post("/v1/completions", json={"model": "guarded", "prompt": "a", "max_tokens": 200,
                                               "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1" and error_of(rejected)["code"] == "model_overloaded"


# -- Safety, apps ---------------------------------------------------------------------------------


def test_content_filter_on_input_and_output(server):
    client = openai_client(server)
    blocked = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say ForbiddenWord"}])
    assert blocked.choices[0].finish_reason == "content_filter" and blocked.choices[0].message.content == ""
    allowed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say forbiddenwords"}],
                                             max_tokens=2)
    assert allowed.choices[0].finish_reason != "content_filter"  # whole words only
    out = client.completions.create(model="guarded", prompt=PROMPTS[0], max_tokens=8, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "content_filter" and out.choices[0].text == ""
    chunks = list(client.completions.create(model="guarded", prompt=PROMPTS[0], max_tokens=8, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == "" and chunks[-1].choices[0].finish_reason == "content_filter"


def test_ready_made_apps(server):
    c = server["client"]
    names = [a["name"] for a in c.get("/v1/apps").json()["data"]]
    assert names == ["chat", "summarize", "translate", "code"]
    r = c.post("/v1/apps/translate", json={"model": "lora", "text": "Hello", "target_language": "French",
                                           "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["app"] == "translate" and r.json()["usage"]["completion_tokens"] <= 6
    r = c.post("/v1/apps/translate", json={"model": "lora", "text": "Hello"})
    assert r.status_code == 400 and error_of(r)["param"] == "target_language"
    assert c.post("/v1/apps/poem", json={"model": "lora"}).status_code == 404


# -- The app store, the SDK and `llmos chat` against this server --------------------------------


def _wait_for_app(client, name: str, version: int) -> dict:
    """The catalogue entry of `name` once the server lists `version`. Each ingress replica re-reads the
    library at most every serve.apps_refresh_s (0.2 s here) and the listing came from one of two, so
    after it shows `version` the wait goes on one more interval: by then every replica serves it."""
    deadline = time.time() + 30
    while True:
        listed = {a["name"]: a for a in client.get("/v1/apps").json()["data"]}
        if listed.get(name, {}).get("version") == version or time.time() > deadline:
            assert listed.get(name, {}).get("version") == version, listed.get(name)
            time.sleep(0.2 + 0.1)
            return listed[name]
        time.sleep(0.2)


def test_an_app_published_while_serving_is_served_then_updated(server):
    from llmos_ray import LLM
    from llmos_ray.serve import app_store

    c, reg = server["client"], server["registry"]
    spec = {"name": "haiku", "description": "A haiku.", "model": "tiny",
            "sampling": {"temperature": 0, "max_tokens": 6},
            "parameters": {"topic": {"type": "string", "required": True}},
            "messages": [{"role": "user", "content": "A haiku about {{ topic }}."}]}
    assert app_store.create(spec, reg).ref == "haiku@1"  # `llmos apps create` does this
    assert _wait_for_app(c, "haiku", 1)["parameters"][0]["name"] == "topic"
    r = c.post("/v1/apps/haiku", json={"topic": "Ray"})  # no model: the app's default
    assert r.status_code == 200, r.text
    first = r.json()
    assert (first["app"], first["app_version"], first["model"]) == ("haiku", 1, "tiny")
    assert first["output"] == greedy(server["tiny"], messages=[{"role": "user", "content": "A haiku about Ray."}],
                                     max_new_tokens=6)
    with LLM.connect(server["url"], api_key=KEY, model="tiny") as remote:
        assert remote.apps.haiku(topic="Ray").output == first["output"]
    bad = c.post("/v1/apps/haiku", json={"topic": 3})
    assert bad.status_code == 400 and error_of(bad)["param"] == "topic"
    changed = {**spec, "messages": [{"role": "user", "content": "Two lines on {{ topic }}, please."}]}
    assert app_store.create(changed, reg).ref == "haiku@2"
    _wait_for_app(c, "haiku", 2)
    second = c.post("/v1/apps/haiku", json={"topic": "Ray"}).json()
    assert second["app_version"] == 2 and second["output"] == greedy(
        server["tiny"], messages=[{"role": "user", "content": "Two lines on Ray, please."}], max_new_tokens=6)
    pinned = c.post("/v1/apps/haiku@1", json={"topic": "Ray"}).json()
    assert pinned["app_version"] == 1 and pinned["output"] == first["output"]


def test_sdk_over_http_equals_the_sdk_in_process(server):
    from llmos_ray import LLM, Chatbot, ModelError
    from llmos_ray.serve.types import APIError

    chat = [{"role": "user", "content": "Hello there"}]
    with LLM.connect(server["url"], api_key=KEY, model="tiny") as remote, \
            LLM.from_pretrained("tiny", registry=server["registry"]) as local:
        assert remote.context_length == local.context_length
        batch = remote.generate(PROMPTS[:4], max_tokens=8, temperature=0)
        assert batch == local.generate(PROMPTS[:4], max_tokens=8, temperature=0)
        assert batch[0] == greedy(server["tiny"], PROMPTS[0], max_new_tokens=8)
        answer = remote.chat(chat, max_tokens=8, temperature=0)
        assert answer == local.chat(chat, max_tokens=8, temperature=0)
        assert "".join(remote.stream(chat, max_tokens=8, temperature=0)) == answer
        assert "".join(remote.stream(PROMPTS[0], max_tokens=8, temperature=0)) == batch[0]
        with pytest.raises(APIError) as e:
            remote.generate("a", max_tokens=-1)
        assert e.value.status == 400 and e.value.param == "max_tokens"
        vectors = remote.embed(["a", "def main():"])  # /v1/embeddings: the same pooling on both sides
        assert max(abs(x - y) for v, w in zip(vectors, local.embed(["a", "def main():"])) for x, y in zip(v, w)) < 1e-5
        bot = Chatbot(remote, max_history_tokens=60, max_tokens=3, temperature=0)
        for i in range(5):
            bot.generate_response(f"message {i}: some words to fill the context")
        assert bot.dropped_turns > 0 and len(bot.history) == 2 * (5 - bot.dropped_turns)
    with pytest.raises(ModelError, match="does not serve 'nope'"):
        LLM.connect(server["url"], api_key=KEY, model="nope")
    with pytest.raises(APIError) as e:
        LLM.connect(server["url"], api_key="sk-wrong", model="tiny")
    assert e.value.status == 401


def test_llmos_chat_in_a_terminal(server):
    import sys

    import pexpect

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = pexpect.spawn(sys.executable, ["-m", "llmos_ray.cli", "chat", "tiny", "--url", server["url"], "--api-key",
                                           KEY, "--temperature", "0", "--max-tokens", "6", "--system", "Be brief."],
                          env={**os.environ, "PYTHONPATH": root}, encoding="utf-8", timeout=60)
    try:
        child.expect("chatting with tiny \\(over HTTP at ")
        child.expect("you> ")
        child.sendline("Hello there")
        child.expect("\r\nyou> ")
        want = greedy(server["tiny"], messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hello there"}], max_new_tokens=6)
        assert child.before.endswith("bot> " + want.replace("\n", "\r\n")), (child.before, want)
        child.sendline("/history")
        child.expect("1 turns kept, 0 dropped")
        child.sendline("/reset")
        child.expect("conversation forgotten")
        child.sendline("/history")
        child.expect("0 turns kept")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# -- Last: a crash, then the metrics of all the above --------------------------------------------


def test_crashed_replica_is_replaced_and_the_app_keeps_answering(server):
    import signal

    c = server["client"]
    pid = c.get("/v1/stats").json()["models"]["tiny"]["pid"]
    os.kill(pid, signal.SIGKILL)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 4}
    assert c.post("/v1/completions", json={**body, "model": "lora"}).status_code == 200  # other models unaffected
    r = c.post("/v1/completions", json=body)  # waits for (or retries onto) the replacement replica
    assert r.status_code == 200, r.text
    assert c.get("/v1/stats").json()["models"]["tiny"]["pid"] != pid


def test_requests_are_counted_by_model_route_and_status(server):
    """Earlier tests' requests, as Prometheus reads them from this node's metrics endpoint (last, so that
    Ray has exported them by now)."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    want = {("tiny", "completions", "200"), ("tiny", "chat", "200"), ("-", "completions", "401"),
            ("tiny", "v2/infer", "200"), ("tiny", "v2/generate_stream", "200"), ("lora", "apps/translate", "200"),
            ("-", "apps/translate", "400"), ("guarded", "completions", "503")}
    deadline, seen = time.time() + 60, set()
    while time.time() < deadline and not want <= seen:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        seen = {(labels["model"], labels["route"], labels["status"]) for labels in _series(text, "requests_total")}
        latency = {(labels["model"], labels["route"]) for labels in _series(text, "request_latency_s_count")}
        time.sleep(0 if want <= seen else 1)
    assert want <= seen, sorted(seen)
    assert {("tiny", "chat"), ("tiny", "v2/generate_stream")} <= latency


def _series(text: str, name: str) -> list[dict]:
    import re

    prefix = f"ray_llmos_serve_{name}{{"
    return [dict(re.findall(r'(\w+)="([^"]*)"', line[len(prefix):line.index("}")]))
            for line in text.splitlines() if line.startswith(prefix)]
