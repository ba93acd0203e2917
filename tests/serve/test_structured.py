"""Constrained decoding in the engine (no Ray): sampled JSON from an untrained tiny model always
parses and validates against its schema (the grammar, not the model, makes it so)."""

from __future__ import annotations

import json
import queue
import time

import jsonschema
import pytest

from llmos_ray.serve.engine import Engine, collect_sync
from llmos_ray.serve.structured import JSON_OBJECT, json_grammar
from llmos_ray.serve.types import APIError, GenerationRequest, SamplingParams
from tests.serve.reference import load

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    eng = Engine(model, tok, name="tiny", max_batch_size=8, max_tokens_limit=256)
    yield eng
    eng.shutdown()


def submit(engine, request: GenerationRequest):
    ids, sp, stop = engine.prepare(request)
    chunks: queue.Queue = queue.Queue()
    engine.submit(ids, sp, chunks.put, stop)
    return chunks


def test_twenty_sampled_requests_all_parse_and_validate(engine):
    grammar = json_grammar(PERSON)
    pending = [submit(engine, GenerationRequest(SamplingParams(max_tokens=96, temperature=1.0, seed=seed,
                                                               grammar=grammar), prompt=prompt))
               for seed in range(10) for prompt in ("A person:", "def main():")]  # constrained rows in one batch
    pending.append(submit(engine, GenerationRequest(SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                                                    prompt="free text")))
    results = [collect_sync(q, time.perf_counter()) for q in pending]
    for r in results[:-1]:
        assert r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.text), PERSON)
    assert len({r.text for r in results[:-1]}) > 1  # sampled, not one fixed answer
    free = results[-1].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # the unconstrained row beside them was not constrained


def closing_bias(tokenizer, bias: float = 4.0) -> dict[int, float]:
    """A logit bias towards the tokens that end JSON strings and objects: an untrained model would
    otherwise write one string until max_tokens (valid so far, never finished)."""
    return {i: bias for t, i in tokenizer.get_vocab().items() if t in ('}', '"', '",', ',')}


def test_json_object_mode_gives_an_object(engine):
    texts = []
    for seed in range(5):
        r = collect_sync(submit(engine, GenerationRequest(
            SamplingParams(max_tokens=200, temperature=0.7, seed=seed, grammar=json_grammar(JSON_OBJECT),
                           logit_bias=closing_bias(engine.tokenizer)),
            messages=[{"role": "user", "content": "Reply in JSON"}])), 0)
        assert r.finish_reason == "stop", r
        assert isinstance(json.loads(r.text), dict)
        texts.append(r.text)
    assert any(t != "{}" for t in texts)


def test_a_schema_the_grammar_cannot_compile_is_a_400(engine):
    with pytest.raises(APIError) as e:
        engine.prepare(GenerationRequest(SamplingParams(grammar=json_grammar({"type": "nonsense"})), prompt="a"))
    assert (e.value.status, e.value.param) == (400, "response_format")
