"""Hostile input over real HTTP never costs a 5xx, and one bad request never harms another.

Property-based, against the package's one Serve app (`server`, conftest.py), on 127.0.0.1 only:
- schemathesis generates bodies for every POST route from an OpenAPI document built from the
  routes' request models (`ingress.REQUEST_MODELS`): valid ones (positive) and ones that break
  the schema (negative);
- hypothesis puts hostile JSON values (huge and tiny numbers, lone surrogates, look-alike digits,
  nulls, deep nesting...) into the fields of otherwise valid bodies, field names taken from the
  request models;
- fixed hostile bytes cover what no schema describes (nesting past any parser, numbers of
  thousands of digits, NaN, broken UTF-8, Triton binary tensors that lie about their sizes).
Every response: no 5xx but 503 with Retry-After; the error shape of the route's family (OpenAI's
on /v1, KServe's {"error": "..."} on /v2); a 200 stream carries no error event. Afterwards a
valid request is still answered with its greedy reference. Bounded: derandomized, a few dozen
examples per route, no example database. Fuzzed bodies go to `lora` (max_tokens <= 16, at most 8
completions per request), so that the valid ones stay cheap.
"""

from __future__ import annotations

import concurrent.futures
import json
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import error_of
from tests.serve.reference import greedy

pytestmark = pytest.mark.slow

MODEL = "lora"
BOUNDED = settings(max_examples=12, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))


def concrete(path: str) -> str:
    return path.replace("{name}", MODEL).replace("{version}", "1")


def check(path: str, r) -> None:
    """What every response to hostile input must be."""
    assert r.status_code < 500 or (r.status_code == 503 and "retry-after" in r.headers), \
        (path, r.status_code, r.text[:500])
    if r.status_code >= 400:
        if path.startswith("/v2"):
            body = r.json()
            assert set(body) == {"error"} and isinstance(body["error"], str), (path, body)
        else:
            error_of(r)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events and not [e for e in events if "error" in e], (path, r.text[:500])


def post(server, path: str, body: bytes, **headers):
    r = server["client"].post(path, content=body, headers={"content-type": "application/json", **headers})
    check(path, r)
    return r


def still_answers(server) -> None:
    r = server["client"].post("/v1/completions", json={"model": "tiny", "prompt": "def main():", "max_tokens": 6,
                                                       "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(server["tiny"], "def main():",
                                                                              max_new_tokens=6)


def test_every_post_route_has_a_request_model():
    from llmos_ray.serve.ingress import REQUEST_MODELS, api

    def routes(router):  # FastAPI >= 0.137 nests the routes Serve's ingress added under an included router
        for r in router.routes:
            yield from routes(r.original_router) if hasattr(r, "original_router") else [r]

    posts = {r.path for r in routes(api) if "POST" in getattr(r, "methods", ())}
    apps = {p for p in REQUEST_MODELS if p.startswith("/v1/apps/")}
    assert posts == (set(REQUEST_MODELS) - apps) | {"/v1/apps/{app}"}


def openapi_document() -> dict:
    """An OpenAPI document of every POST route, its body schema from the route's request model."""
    from pydantic.json_schema import models_json_schema

    from llmos_ray.serve.ingress import REQUEST_MODELS

    models = list(dict.fromkeys(REQUEST_MODELS.values()))
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    body = {m: {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{m.__name__}"}}}} for m in models}
    return {"openapi": "3.1.0", "info": {"title": "llmos-ray", "version": "1"},
            "components": {"schemas": schemas["$defs"]},
            "paths": {concrete(p): {"post": {"requestBody": body[m], "responses": {"200": {"description": "ok"}}}}
                      for p, m in REQUEST_MODELS.items()}}


def as_bytes(body) -> bytes:
    """A generated body as sent: JSON, or as it is when schemathesis made raw bytes (syntax fuzzing)."""
    from schemathesis.core import NotSet

    if isinstance(body, NotSet):
        return b""
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def test_bodies_generated_from_the_request_models_never_cost_a_5xx(server):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(openapi_document())
    seen = {}
    for op in schema.get_all_operations():
        op = op.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @BOUNDED
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                body = case.body
                if mode is GenerationMode.POSITIVE and isinstance(body, dict) and op.path.startswith(
                        ("/v1", "/tokenize", "/detokenize")):
                    body = {**body, "model": MODEL}  # past the 404, into the model's own checks
                r = post(server, op.path, as_bytes(body))
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
            fuzz()
    assert seen.get(200) and seen.get(400), seen  # both valid and refused bodies were generated
    still_answers(server)


HOSTILE_LEAVES = st.one_of(
    st.none(), st.booleans(), st.sampled_from(["", "²", "1.5", "-1", "\ud800", "a\udfffb", "\u0000", "NaN", "1e400"]),
    st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([2**63, -2**63 - 1, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e-30, 5e-324, -0.0, 1e308, 2.0000001]),
    st.text(max_size=20))
HOSTILE = st.recursive(HOSTILE_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["", "0", "²", "\ud800", "text_input", "binary_data_size", "name", "x"]), inner, max_size=3),
    max_leaves=6)


def base_bodies() -> dict[str, dict]:
    """A valid body per POST route."""
    from llmos_ray.serve.ingress import REQUEST_MODELS

    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}
    bodies = {"/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 2},
              "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 2},
              "/v2/models/{name}/infer": {"inputs": [text], "parameters": {"max_tokens": 2}},
              "/v2/models/{name}/generate": {"text_input": "hello", "max_tokens": 2},
              "/v1/embeddings": {"model": MODEL, "input": "hello"},
              "/tokenize": {"model": MODEL, "prompt": "hello"}, "/detokenize": {"model": MODEL, "tokens": [1, 2]}}
    for path, model in REQUEST_MODELS.items():
        if path.startswith("/v1/apps/"):
            required = {k: "hello" for k, f in model.model_fields.items() if f.is_required()}
            bodies[path] = {"model": MODEL, **required, "max_tokens": 2}
    bodies["/v2/models/{name}/versions/{version}/infer"] = bodies["/v2/models/{name}/infer"]
    bodies["/v2/models/{name}/generate_stream"] = bodies["/v2/models/{name}/generate"]
    return bodies


@st.composite
def mutated(draw, path: str, base: dict):
    """`base` with one field of the route's request model (or a nested part) set to a hostile value."""
    from llmos_ray.serve.ingress import REQUEST_MODELS

    body = json.loads(json.dumps(base))
    target = draw(st.sampled_from(sorted(REQUEST_MODELS[path].model_fields) + ["nested"]))
    if target != "nested":
        body[target] = draw(HOSTILE)
    elif "inputs" in body:
        tensor = body["inputs"][0]
        key = draw(st.sampled_from(["data", "shape", "datatype", "parameters", "name"]))
        tensor[key] = draw(st.one_of(HOSTILE, HOSTILE.map(lambda v: {"binary_data_size": v})))
        if draw(st.booleans()):
            body[draw(st.sampled_from(["outputs", "parameters", "id"]))] = draw(HOSTILE)
    elif "messages" in body:
        body["messages"][0][draw(st.sampled_from(["role", "content", "name"]))] = draw(HOSTILE)
    else:
        body[draw(st.sampled_from(["logit_bias", "stop", "seed", "parameters"]))] = draw(HOSTILE)
    return body


def test_hostile_values_in_every_field_never_cost_a_5xx(server):
    for path, base in base_bodies().items():
        @BOUNDED
        @given(body=mutated(path, base))
        def fuzz(body):
            post(server, concrete(path), json.dumps(body).encode())
        fuzz()
    still_answers(server)


def hostile_bytes(base: dict) -> list[bytes]:
    """Bodies no schema describes, each on its own a parser's or a library's edge."""
    valid = json.dumps(base)[1:-1]
    return [b"[" * 100_000 + b"]" * 100_000, ("{" + valid + ', "x": ' + "[" * 200 + "]" * 200 + "}").encode(),
            ("{" + valid + ', "max_tokens": ' + "1" * 5000 + "}").encode(),
            ("{" + valid + ', "temperature": NaN}').encode(), ("{" + valid + ', "top_p": Infinity}').encode(),
            ("{" + valid + ', "seed": 1e400}').encode(), ("{" + valid + ', "stop": "\\ud800"}').encode(),
            ("{" + valid + ', "\\udc00": 1}').encode(), b'{"model": "\xff\xfe"}', b"\xef\xbb\xbf{}", b"", b"{",
            b"[]", b'"text"', b"null", b"1" * 5000, ("{" + valid + ', "logit_bias": {"\\u00b2": 1}}').encode()]


def test_hostile_bytes_on_every_route(server):
    for path, base in base_bodies().items():
        for body in hostile_bytes(base):
            post(server, concrete(path), body)
    header = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 9}}]}).encode()
    element = struct.pack("<I", 5) + b"hello"
    infer = concrete("/v2/models/{name}/infer")
    for body, length in [(header + element, str(len(header))), (header + element, "9" * 5000),
                         (header + element, "²".encode()), (header + element, str(len(header) + 100)),
                         (header + struct.pack("<I", 2**31) + b"hello", str(len(header))),
                         (header + b"\xff" * 9, str(len(header)))]:
        post(server, infer, body, **{"inference-header-content-length": length})
    still_answers(server)


def test_a_request_that_can_never_be_admitted_is_a_400_not_a_503(server):
    c = server["client"]
    texts = {"name": "text_input", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}
    r = c.post("/v2/models/guarded/infer", json={"inputs": [texts], "parameters": {"max_tokens": 2}})
    assert r.status_code == 400 and "at most 2" in r.json()["error"] and "max_queued_requests" in r.json()["error"]
    r = c.post("/v1/completions", json={"model": "guarded", "prompt": "a", "n": 3, "max_tokens": 2})
    assert r.status_code == 400 and error_of(r)["code"] == "too_many_completions" and error_of(r)["param"] == "n"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": ["a"] * 65, "max_tokens": 1})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"


def test_a_poisoned_request_never_harms_the_streams_decoding_beside_it(server):
    """Healthy greedy streams are decoding when requests arrive that poisoned the whole batch
    before (a temperature of 1e-30 made the probabilities NaN), and hostile ones: the streams equal
    their greedy reference and carry no error event."""
    c = server["client"]
    prompts = ["def main():", "import os\nimport sys\n", "The quick brown fox"]
    started = [threading.Event() for _ in prompts]

    def stream(i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stream": True}
        events = []
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    started[i].set()
        return events

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        streams = [pool.submit(stream, i) for i in range(len(prompts))]
        assert all(e.wait(60) for e in started)  # the healthy streams are decoding
        poisons = [pool.submit(c.post, "/v1/completions", json={"model": "tiny", "prompt": prompts[0],
                                                                "max_tokens": 8, "temperature": t, "ignore_eos": True})
                   for t in (1e-30, 1e-300, 5e-324)]
        hostile = [pool.submit(c.post, "/v1/completions", content=body) for body in hostile_bytes(
            {"model": "tiny", "prompt": "x", "max_tokens": 4})]
        results = [s.result() for s in streams]
        poisoned = [p.result() for p in poisons]
    for r in (h.result() for h in hostile):
        check("/v1/completions", r)
    for prompt, events in zip(prompts, results):
        assert [e for e in events if "error" in e] == []
        text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        assert text == greedy(server["tiny"], prompt, max_new_tokens=40, min_new_tokens=40), prompt
    expected = greedy(server["tiny"], prompts[0], max_new_tokens=8, min_new_tokens=8)
    assert [r.status_code for r in poisoned] == [200] * 3
    assert [r.json()["choices"][0]["text"] for r in poisoned] == [expected] * 3  # below 1e-5: greedy
