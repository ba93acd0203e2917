"""Tool calling without Ray: the chat template shows the tools, a forced tool_choice constrains
decoding to a valid call, and calls are parsed back from the text."""

from __future__ import annotations

import json
import time

import jsonschema

from llmos_ray.serve.engine import collect_sync
from llmos_ray.serve.prompting import render_chat
from llmos_ray.serve.structured import json_grammar
from llmos_ray.serve.tools import NamedToolChoice, forced_schema, parse_calls
from llmos_ray.serve.types import GenerationRequest, SamplingParams
from tests.serve.test_structured import engine, submit  # noqa: F401  (the module's engine fixture)

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "additionalProperties": False, "properties": {"utc": {"type": "boolean"}},
             "required": ["utc"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_the_chat_template_shows_the_tools(engine):  # noqa: F811
    text = render_chat(engine, ASK, tools=TOOLS)
    assert "get_weather" in text and "<tool_call>" in text and text.endswith("<|assistant|>\n")
    assert render_chat(engine, ASK) == render_chat(engine, ASK, tools=None) and "get_weather" not in render_chat(
        engine, ASK)


def test_required_and_named_tool_choice_decode_valid_calls(engine):  # noqa: F811
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})
    for choice, names in (("required", {"get_weather", "get_time"}), (named, {"get_time"})):
        grammar = json_grammar(forced_schema(TOOLS, choice))
        pending = [submit(engine, GenerationRequest(SamplingParams(max_tokens=64, temperature=1.0, seed=seed,
                                                                   grammar=grammar), messages=ASK, tools=TOOLS))
                   for seed in range(6)]
        for q in pending:
            r = collect_sync(q, time.perf_counter())
            content, calls = parse_calls(r.text, forced=True)
            assert r.finish_reason == "stop" and content is None and len(calls) == 1, r.text
            fn = calls[0]["function"]
            assert fn["name"] in names
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == fn["name"])
            jsonschema.validate(json.loads(fn["arguments"]), schema)


def test_tool_call_blocks_are_parsed_from_free_text():
    text = 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    content, calls = parse_calls(text, forced=False)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "days": 2})}
    assert parse_calls("no calls <tool_call>{not json}</tool_call>", forced=False) == (
        "no calls <tool_call>{not json}</tool_call>", [])
    assert parse_calls('{"name": "get_time", "argu', forced=True) == ('{"name": "get_time", "argu', [])


def test_openai_fields_we_do_not_support_are_400s_naming_them():
    from llmos_ray.serve.openai import CHAT
    from llmos_ray.serve.types import APIError
    from llmos_ray.serve.validation import validate

    base = {"model": "m", "messages": ASK}
    for field, value in [("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "x"}),
                         ("prediction", {"type": "content"}), ("web_search_options", {}),
                         ("modalities", ["text", "audio"])]:
        try:
            CHAT.plan(validate({**base, field: value}, CHAT.request_model))
        except APIError as e:
            assert (e.status, e.param, e.code) == (400, field, "unsupported_parameter"), field
        else:
            raise AssertionError(f"{field} was accepted")
    plan = CHAT.plan(validate({**base, "modalities": ["text"], "tools": TOOLS}, CHAT.request_model))
    assert plan.tool_calls is False and plan.grammar is None and plan.inputs[0]["tools"][0]["function"]["name"] == (
        "get_weather")
