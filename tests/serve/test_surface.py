"""The OpenAI surface real clients rely on, over real HTTP on the package's one Serve app
(`server` in conftest.py): log-probabilities (lm-evaluation-harness's loglikelihood request, chat,
streams), n > 1 with seeds, usage in streams, /tokenize and /detokenize.

References are computed in this process from the export: one unpadded forward pass (log_softmax
of its logits), tolerance 1e-4 (the engine's batched, cached values differ by ~1e-6).
"""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import error_of
from tests.serve.reference import load
from tests.serve.test_http import openai_client

pytestmark = pytest.mark.slow

TOL = 1e-4


def log_softmax(model_dir: str, ids: list[int]):
    import torch

    model, _ = load(model_dir)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_lm_eval_loglikelihood_request_scores_the_prompt(server):
    """What lm-evaluation-harness's local-completions sends for loglikelihood: token-id prompts,
    echo, logprobs 1, temperature 0, max_tokens 1 (older versions and vLLM's docs: 0)."""
    _, tok = load(server["tiny"])
    prompts = [tok.encode("The quick brown fox jumps over the lazy dog"), tok.encode("def main():\n    return 1")]
    client = openai_client(server)
    for max_tokens in (0, 1):
        out = client.completions.create(model="tiny", prompt=prompts, echo=True, max_tokens=max_tokens, logprobs=1,
                                        temperature=0, seed=1234)
        assert [c.index for c in out.choices] == [0, 1]
        for ids, choice in zip(prompts, out.choices):
            lp = choice.logprobs
            assert len(lp.token_logprobs) == len(ids) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts it
            assert choice.text.startswith(tok.decode(ids, skip_special_tokens=True))
            ref = log_softmax(server["tiny"], ids)
            for j in range(1, len(ids)):
                assert abs(lp.token_logprobs[j] - ref[j - 1, ids[j]].item()) < TOL
                top = lp.top_logprobs[j]  # the best alternative and the chosen token
                assert abs(max(top.values()) - ref[j - 1].max().item()) < TOL
                assert top[lp.tokens[j]] == lp.token_logprobs[j]
            if max_tokens:  # the generated token is the greedy one at the last position
                assert abs(lp.token_logprobs[-1] - ref[-1].max().item()) < TOL
            assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert out.usage.completion_tokens == max_tokens * len(prompts)


def test_completion_logprobs_streamed_equal_whole(server):
    client = openai_client(server)
    body = dict(model="tiny", prompt="import os\n", max_tokens=10, temperature=0, logprobs=3)
    whole = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(p.text for p in pieces) == whole.text
    streamed = [t for p in pieces for t in p.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs and len(streamed) == 10
    assert [t for p in pieces for t in p.logprobs.text_offset] == whole.logprobs.text_offset
    for top, value in zip(whole.logprobs.top_logprobs, whole.logprobs.token_logprobs):
        # greedy: the chosen token ranks first; keys are token texts (byte tokens share '\ufffd')
        assert max(top.values()) == value and 1 <= len(top) <= 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs_through_the_official_client(server):
    _, tok = load(server["tiny"])
    messages = [{"role": "user", "content": "Hello there"}]
    out = openai_client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                        logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        values = [t.logprob for t in c.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (c.token, c.logprob)  # greedy
        assert c.bytes == list(c.token.encode())
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    first = log_softmax(server["tiny"], prompt)[-1].topk(3).values.tolist()
    assert all(abs(a.logprob - b) < TOL for a, b in zip(content[0].top_logprobs, first))


def test_n_choices_with_a_seed_are_reproducible_and_differ(server):
    client = openai_client(server)
    runs = [client.completions.create(model="tiny", prompt="x =", max_tokens=12, temperature=1.0, seed=3, n=3)
            for _ in range(2)]
    texts = [[c.text for c in sorted(r.choices, key=lambda c: c.index)] for r in runs]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3
    _, tok = load(server["tiny"])
    assert runs[0].usage.prompt_tokens == len(tok.encode("x ="))  # one prompt, counted once
    r = server["client"].post("/v1/completions", json={"model": "tiny", "prompt": "x =", "max_tokens": 12, "n": 3,
                                                       "temperature": 1.0, "seed": 3})
    assert [c["text"] for c in r.json()["choices"]] == texts[0]  # the same seeds over raw HTTP
    assert int(r.headers["x-llmos-batch-size"]) >= 3  # the n choices decode as rows of one batch
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=1.0, seed=3, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]


def test_logprob_limits_are_400s_naming_the_field(server):
    c = server["client"]
    for body, param in [({"prompt": "a", "logprobs": 21}, "logprobs"), ({"prompt": "a", "logprobs": -1}, "logprobs"),
                        ({"prompt": "a", "max_tokens": -1}, "max_tokens")]:
        r = c.post("/v1/completions", json={"model": "tiny", **body})
        assert r.status_code == 400 and error_of(r)["param"] == param, body
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "a"}]}
    for body, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"max_tokens": 0}, "max_tokens")]:
        r = c.post("/v1/chat/completions", json={**chat, **body})
        assert r.status_code == 400 and error_of(r)["param"] == param, body
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2], "echo": True, "stream": True})
    assert r.status_code == 400 and error_of(r)["param"] == "echo"
    assert json.loads(c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1}).text)[
        "choices"][0]["logprobs"] is None


def test_tokenize_and_detokenize_in_vllms_shapes(server):
    _, tok = load(server["tiny"])
    c = server["client"]
    r = c.post("/tokenize", json={"model": "tiny", "prompt": "def main():", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("def main():") and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert r["token_strs"] == [tok.decode([t]) for t in r["tokens"]]
    assert c.post("/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json() == {
        "prompt": tok.decode(r["tokens"])}
    messages = [{"role": "user", "content": "Hello there"}]
    chat = openai_client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    r = c.post("/tokenize", json={"model": "tiny", "messages": messages}).json()
    assert r["count"] == chat.usage.prompt_tokens and r["token_strs"] is None
    for path, body, param in [("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                              ("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens.0")]:
        r = c.post(path, json={"model": "tiny", **body})
        assert r.status_code == 400 and error_of(r)["param"] == param, (path, body)
    assert c.post("/tokenize", json={"model": "nope", "prompt": "a"}).status_code == 404


def test_embeddings_equal_a_forward_pass_through_the_official_client(server):
    import base64

    import numpy as np

    from tests.serve.test_embeddings import reference

    texts = ["def main():\n    return 1", "x"]
    client = openai_client(server)
    for name, pooling, adapter in (("tiny", "mean", None), ("lora", "last", server["lora"])):
        model, tok = load(server["tiny"], adapter)
        out = client.embeddings.create(model=name, input=texts)  # the client asks for base64 and decodes it
        assert [d.index for d in out.data] == [0, 1] and out.model == name
        for d, text in zip(out.data, texts):
            assert np.abs(np.array(d.embedding) - reference(model, tok.encode(text), pooling).numpy()).max() < 1e-5
        assert out.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) == out.usage.total_tokens
    ids = tok.encode(texts[0])
    c = server["client"]
    floats = c.post("/v1/embeddings", json={"model": "tiny", "input": [ids], "encoding_format": "float"}).json()
    packed = c.post("/v1/embeddings", json={"model": "tiny", "input": ids, "encoding_format": "base64"}).json()
    assert floats["data"][0]["embedding"] == np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]),
                                                           dtype="<f4").tolist()
    assert floats["usage"]["prompt_tokens"] == len(ids)
    for body, param in [({"input": "a", "dimensions": 8}, "dimensions"), ({"input": []}, "input"),
                        ({"input": ["a", ""]}, "input.1"), ({"input": [10**9]}, "input"),
                        ({"input": "a", "encoding_format": "int8"}, "encoding_format")]:
        r = c.post("/v1/embeddings", json={"model": "tiny", **body})
        assert r.status_code == 400 and error_of(r)["param"] == param, body


def test_json_schema_response_format_through_the_official_client(server):
    import jsonschema

    from tests.serve.test_structured import PERSON

    client = openai_client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person, please"}],
                                         response_format=fmt, max_tokens=96, temperature=1.0, seed=1, n=4)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    c = server["client"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 4}
    for fmt, param in [({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        "response_format")]:
        r = c.post("/v1/chat/completions", json={**chat, "response_format": fmt})
        assert r.status_code == 400 and error_of(r)["param"] == param, fmt


def test_a_required_tool_call_through_the_official_client(server):
    import jsonschema

    from tests.serve.test_tools import ASK, TOOLS, WEATHER

    client = openai_client(server)
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=64, temperature=0.8, seed=2)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # a named function, streamed: the call arrives as a tool_calls delta
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named,
                                                 max_tokens=64, temperature=0.8, seed=3, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER)
    # the conversation goes on with the tool's answer
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    out = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    c = server["client"]
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4}
    for extra, param in [({"tool_choice": "required"}, "tool_choice"),
                         ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                          "tool_choice.function.name"),
                         ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
                          "tools.0.function.name"),
                         ({"functions": [{"name": "f"}]}, "functions")]:
        r = c.post("/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 400 and error_of(r)["param"] == param, extra


def test_streams_of_several_choices_equal_the_whole_response(server):
    client = openai_client(server)
    body = dict(model="tiny", prompt=["x =", "def f():"], max_tokens=8, temperature=1.0, seed=5, n=2)
    whole = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    texts = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in whole.choices} and len(texts) == 4
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=1.0, seed=9, n=3)
    whole = client.chat.completions.create(**chat)
    content, finish = {}, {}
    for c in client.chat.completions.create(**chat, stream=True):
        for choice in c.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert content == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
