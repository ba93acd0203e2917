"""The validation layer and the numeric guards as pure functions (no Ray, milliseconds)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llmos_ray.serve.app_store import builtin_apps
from llmos_ray.serve.kserve import parse_generate, parse_infer
from llmos_ray.serve.prompt_apps import parameter_values, request_model
from llmos_ray.serve.protocol import ChatCompletionRequest, CompletionRequest
from llmos_ray.serve.types import APIError, SamplingParams
from llmos_ray.serve.validation import parse_body, read_json


def refused(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value


def completion(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "a", **fields}).encode()


def test_bodies_are_bounded_before_the_parser_meets_its_limits():
    for raw in (b"[" * 100_000, b'{"a": ' + b"1" * 5000 + b"}", b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}',
                b"\xff\xfe\xfd", b"[]", b""):
        assert refused(read_json, raw).code == "invalid_json", raw[:20]
    assert read_json(b'{"a": "' + b"[" * 500 + b'", "b": 1.5e-400}') == {"a": "[" * 500, "b": 0.0}
    assert read_json('{"a": "\\ud83d\\ude00", "b": "\\\\ud800"}'.encode()) == {"a": "😀", "b": "\\ud800"}
    e = refused(read_json, b'{"messages": [{"content": "hi \\ud800"}]}')
    assert e.param == "messages.0.content" and "surrogate" in e.message
    assert refused(read_json, b'{"x": {"\\udc00": 1}}').param == "x"


def test_request_models_are_strict_and_name_the_field():
    cases = {"temperature": "0.5", "max_tokens": 2.0, "stream": 1, "seed": 2**63, "logit_bias": {"²": 1},
             "stop": ["x" * 300]}
    for field, value in cases.items():
        assert refused(parse_body, completion(**{field: value}), CompletionRequest).param == field
    assert refused(parse_body, completion(logit_bias={"1.5": 1}), CompletionRequest).param == "logit_bias"
    e = refused(parse_body, completion(prompt=[[1, -1]]), CompletionRequest)
    assert (e.param, e.message) == ("prompt", "prompt.0.1: Input should be greater than or equal to 0")
    req = parse_body(completion(seed=-2**63, logit_bias={"12": 1, "3": -100}, stop="x"), CompletionRequest)
    assert (req.seed, req.logit_bias, req.stop) == (-2**63, {12: 1.0, 3: -100.0}, ["x"])
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": 1}]}]}).encode()
    assert refused(parse_body, body, ChatCompletionRequest).param == "messages.0.content"


def test_app_parameters_sent_as_null_are_absent():
    app = builtin_apps()["summarize"]
    model = request_model(app)
    req = parse_body(b'{"text": "hello", "max_words": null, "style": null}', model)
    assert "at most 60 words." in app.render(parameter_values(app, req))[1]["content"]
    assert refused(parse_body, b'{"text": "hello", "style": "poem"}', model).param == "style"
    assert refused(parse_body, b'{"text": "hello", "max_words": 0}', model).param == "max_words"
    assert refused(parse_body, b'{"text": " "}', model).param == "text"
    assert refused(parse_body, b'{"text": null}', model).param == "text"


def test_kserve_bodies_of_the_wrong_json_types_are_400s_naming_them():
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    for body, param in [({"inputs": [{**text, "parameters": {"binary_data_size": "9"}}]},
                         "inputs.0.parameters.binary_data_size"),
                        ({"inputs": [text], "parameters": []}, "parameters"),
                        ({"inputs": [text], "outputs": {"name": "text_output"}}, "outputs"),
                        ({"inputs": [{**text, "shape": [2]}]}, "inputs.text_input"),
                        ({"inputs": [text, {"name": "seed", "datatype": "INT64", "shape": [1], "data": [2**64]}]},
                         "inputs.seed")]:
        assert refused(parse_infer, json.dumps(body).encode(), None).param == param
    parsed = parse_infer(json.dumps({"inputs": [text], "parameters": {"max_tokens": 3, "binary_data_output": True}})
                         .encode(), None)
    assert (parsed.texts, parsed.sampling.max_tokens, parsed.binary_outputs) == (["a"], 3, {"text_output"})
    assert refused(parse_generate, b'{"text_input": "a", "parameters": {"seed": "1"}}').param == "parameters.seed"
    assert parse_generate(b'{"text_input": "a", "max_tokens": 3, "parameters": {"max_tokens": 5}}')[1].max_tokens == 5


def test_sampling_never_draws_from_nan_and_is_greedy_below_its_epsilon():
    import torch

    from llmos_ray.serve.sampling import sample

    def row(**params):
        return SimpleNamespace(params=SamplingParams(**params), counts=None, generated=[], stop_ids=frozenset(),
                               generator=torch.Generator().manual_seed(0))

    logits = torch.tensor([[0.0, 1.0, 2.0, float("nan")], [0.0, 3.0, 1.0, 2.0], [float("-inf")] * 4,
                           [float("inf"), 1.0, float("nan"), 0.0], [0.0, 1.0, 2.0, 3.0]])
    rows = [row(temperature=1.0), row(temperature=1e-30), row(temperature=0), row(temperature=0.5),
            row(logit_bias={99: 1.0})]
    out = sample(rows, logits)
    assert out.tokens[1] == 1 and out.tokens[3] == 0 and out.tokens[0] != 3
    assert set(out.failed) == {2, 4} and "every logit" in out.failed[2] and "IndexError" in out.failed[4]
