"""The generation engine without Ray: continuous batching must not change greedy outputs."""

from __future__ import annotations

import queue
import time

import pytest

from llmos_ray.serve.engine import Engine, collect_sync
from llmos_ray.serve.loading import load_model
from llmos_ray.serve.rows import safe_length
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, GenerationRequest, SamplingParams
from tests.serve.reference import greedy, load

PROMPTS = ["def main():", "import os", "The quick brown fox jumps", "x", "class A:\n    pass\n", "return 1"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    eng = Engine(model, tok, name="tiny", max_batch_size=3, max_tokens_limit=256)
    yield eng
    eng.shutdown()


def submit(engine, prompt, **params):
    ids, sp, stop_ids = engine.prepare(GenerationRequest(params=SamplingParams(**params), prompt=prompt))
    chunks: queue.Queue = queue.Queue()
    engine.submit(ids, sp, chunks.put, stop_ids)
    return chunks


def test_requests_joining_a_running_batch_keep_greedy_outputs(engine, tiny_model_dir):
    """Six staggered requests through three batch slots: rows join and leave between tokens."""
    pending = []
    for i, p in enumerate(PROMPTS):
        pending.append(submit(engine, p, max_tokens=20, temperature=0, ignore_eos=True))
        time.sleep(0.004 * i)
    results = [collect_sync(q, time.perf_counter()) for q in pending]
    for prompt, r in zip(PROMPTS, results):
        assert r.text == greedy(tiny_model_dir, prompt, max_new_tokens=20, min_new_tokens=20), prompt
        assert (r.completion_tokens, r.finish_reason) == (20, "length")
    assert max(r.batch_size for r in results) == 3  # never more than max_batch_size rows
    assert engine.snapshot()["running"] == 0 and engine.snapshot()["waiting"] == 0


def test_seeds_make_sampling_reproducible_inside_any_batch(engine):
    alone = engine.generate("hello", max_tokens=16, temperature=1.0, seed=11).text
    noise = [submit(engine, "other", max_tokens=16, temperature=1.0) for _ in range(2)]
    together = engine.generate("hello", max_tokens=16, temperature=1.0, seed=11).text
    for q in noise:
        collect_sync(q, 0)
    assert alone == together
    assert engine.generate("hello", max_tokens=16, temperature=1.0, seed=12).text != alone


def test_stop_strings_and_holdback(engine, tiny_model_dir):
    full = greedy(tiny_model_dir, PROMPTS[0], max_new_tokens=16)
    stop = full[4:7]
    r = engine.generate(PROMPTS[0], max_tokens=16, temperature=0, stop=["zzzz", stop])
    assert (r.text, r.finish_reason) == (full[:full.find(stop)], "stop")
    assert safe_length("hello wor", ["world"]) == len("hello ")
    assert safe_length("abc\ufffd", []) == 3
    assert safe_length("abc", ["x"]) == 3


def test_limits_are_400s_naming_the_field(engine):
    with pytest.raises(APIError) as e:
        engine.prepare(GenerationRequest(params=SamplingParams(max_tokens=300), prompt="a"))
    assert (e.value.status, e.value.param) == (400, "max_tokens")
    with pytest.raises(APIError) as e:
        engine.prepare(GenerationRequest(params=SamplingParams(max_tokens=100), prompt="word " * 480))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as e:
        engine.prepare(GenerationRequest(params=SamplingParams(), prompt_token_ids=[10**6]))
    assert e.value.param == "prompt"
    ids, params, _ = engine.prepare(GenerationRequest(params=SamplingParams(), prompt="a"), default_max_tokens=16)
    assert params.max_tokens == 16


def test_lora_adapter_is_merged_into_its_base(tiny_model_dir, lora_dir):
    model, tok, device = load_model(ModelSpec(name="lora", uri=lora_dir, base_uri=tiny_model_dir))
    eng = Engine(model, tok, name="lora")
    try:
        out = eng.generate(PROMPTS[2], max_tokens=8, temperature=0, ignore_eos=True).text
    finally:
        eng.shutdown()
    assert out == greedy(tiny_model_dir, PROMPTS[2], max_new_tokens=8, min_new_tokens=8, adapter_dir=lora_dir)


def test_int8_quantization_keeps_logits_close(tiny_model_dir):
    import torch

    model, tok, _ = load_model(ModelSpec(name="q", uri=tiny_model_dir, quantize="int8"))
    reference, _ = load(tiny_model_dir)
    assert any("quantized" in type(m).__module__ for m in model.modules())
    ids = torch.tensor([tok.encode(PROMPTS[2])])
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 0.05
    eng = Engine(model, tok, name="q")
    try:
        assert eng.generate("hi", max_tokens=4, temperature=0, ignore_eos=True).completion_tokens == 4
    finally:
        eng.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    calls = {"n": 0}
    real = engine._forward

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real(**kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    with pytest.raises(APIError, match="out of memory"):
        engine.generate("a", max_tokens=4, temperature=0)
    assert engine.generate("a", max_tokens=4, temperature=0, ignore_eos=True).completion_tokens == 4


def drain(chunks: queue.Queue) -> tuple[str, list]:
    """All chunks of one request: (its text, the chunks)."""
    got = []
    while not got or not got[-1].finish_reason:
        got.append(chunks.get(timeout=60))
    return "".join(c.text for c in got), got


def test_a_poisoned_row_fails_alone_and_the_batch_decodes_on(tiny_model_dir):
    """Rows that break (a prompt the model cannot embed, a logit_bias outside the logits, NaN
    biases, a temperature of 1e-30, a consumer that raises) join a batch of healthy greedy streams
    through the engine's own API (what the HTTP layer refuses is given to it directly): each ends
    alone or decodes sanely, and the healthy streams equal their unbatched greedy reference."""
    model, tok = load(tiny_model_dir)
    eng = Engine(model, tok, name="poison", max_batch_size=8, max_tokens_limit=256)
    try:
        healthy = {p: queue.Queue() for p in PROMPTS[:3]}
        for p, q in healthy.items():
            ids, sp, stop = eng.prepare(GenerationRequest(SamplingParams(max_tokens=60, temperature=0,
                                                                         ignore_eos=True), prompt=p))
            eng.submit(ids, sp, q.put, stop)
        firsts = {p: q.get(timeout=60) for p, q in healthy.items()}  # the batch is running
        ids = tok.encode(PROMPTS[3])
        poison = {name: queue.Queue() for name in ("bad_prompt", "bad_bias", "nan_bias", "tiny_temperature")}
        broken_sink_calls = []

        def broken_sink(chunk):
            broken_sink_calls.append(chunk)
            raise RuntimeError("the client went away")

        eng.submit_many([
            ([5, eng.vocab_size + 7], SamplingParams(max_tokens=8), poison["bad_prompt"].put, None),
            (ids, SamplingParams(max_tokens=8, logit_bias={eng.vocab_size + 3: 1.0}), poison["bad_bias"].put, None),
            (ids, SamplingParams(max_tokens=8, temperature=1.0, seed=3, logit_bias={5: float("nan")}),
             poison["nan_bias"].put, None),
            (ids, SamplingParams(max_tokens=8, temperature=1e-30, ignore_eos=True), poison["tiny_temperature"].put,
             None),
            (ids, SamplingParams(max_tokens=8), broken_sink, None)])
        results = {name: drain(q) for name, q in poison.items()}
        for p, q in healthy.items():
            text, chunks = drain(q)
            chunks = [firsts[p]] + chunks
            assert firsts[p].text + text == greedy(tiny_model_dir, p, max_new_tokens=60, min_new_tokens=60), p
            assert [c.error for c in chunks if c.error] == [] and chunks[-1].finish_reason == "length"
            assert max(c.batch_size for c in chunks) >= 6  # shared the batch with the poisoned rows
    finally:
        eng.shutdown()
    assert "prefill failed: IndexError" in results["bad_prompt"][1][-1].error
    assert "sampling failed: IndexError" in results["bad_bias"][1][-1].error
    assert results["nan_bias"][1][-1].error is None and results["nan_bias"][1][-1].finish_reason in ("stop", "length")
    assert results["tiny_temperature"][0] == greedy(tiny_model_dir, PROMPTS[3], max_new_tokens=8, min_new_tokens=8)
    assert len(broken_sink_calls) == 1  # cancelled at its first chunk
