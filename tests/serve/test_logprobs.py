"""Log-probabilities from the engine (no Ray) against a direct forward pass of the export.

The reference is one unpadded forward pass over prompt + generated tokens in this process: the
engine's values come from batched, left-padded prefills and KV-cached decode steps, so they may
differ from it by float rounding only (1e-4 is far above what was measured, ~1e-6).
"""

from __future__ import annotations

import queue
import time

import pytest

from llmos_ray.serve.engine import Engine, collect_sync
from llmos_ray.serve.logprobs import FLOOR, chat_logprobs, completion_logprobs, name_tokens, of_step
from llmos_ray.serve.types import GenerationRequest, SamplingParams
from tests.serve.reference import load

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    eng = Engine(model, tok, name="tiny", max_batch_size=4, max_tokens_limit=64)
    yield eng
    eng.shutdown()


def reference(engine, ids: list[int], bias: dict | None = None, masked=()):
    """log_softmax of the model's logits at every position of `ids` (position j predicts j + 1),
    after a logit `bias` and with the `masked` tokens at -inf (what ignore_eos does to the end-of-sequence tokens)."""
    import torch

    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0].float()
    for token, b in (bias or {}).items():
        logits[:, token] += b
    logits[:, list(masked)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def run(engine, prompt, **params):
    ids, sp, stop = engine.prepare(GenerationRequest(params=SamplingParams(**params), prompt=prompt))
    chunks: queue.Queue = queue.Queue()
    engine.submit(ids, sp, chunks.put, stop)
    return ids, chunks


def test_generated_tokens_logprobs_equal_a_forward_pass_and_top_k_is_sorted(engine):
    # two prompts of different lengths in one batch: left padding and KV-cache steps must not show
    (ids, q), (_, other) = (run(engine, p, max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
                            for p in ("def main():\n    return", "x"))
    result, _ = collect_sync(q, time.perf_counter()), collect_sync(other, time.perf_counter())
    assert len(result.logprobs) == result.completion_tokens == 8 and result.prompt_logprobs is None
    generated = [e.token for e in result.logprobs]
    ref = reference(engine, ids + generated, masked=engine.eos_ids)  # ignore_eos masks them: documented
    for j, e in enumerate(result.logprobs):
        row = ref[len(ids) + j - 1]
        assert abs(e.logprob - row[e.token].item()) < TOL
        top_v, top_i = row.topk(5)
        assert [t for t, _ in e.top] == top_i.tolist()
        assert all(abs(a - b) < TOL for (_, a), b in zip(e.top, top_v.tolist()))
        assert [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)
        assert e.top[0][0] == e.token  # greedy: the chosen token ranks first


def test_prompt_logprobs_with_max_tokens_0_first_token_none(engine):
    """echo + max_tokens 0 (lm-evaluation-harness's loglikelihood request), admitted beside a running row."""
    _, running = run(engine, "import os", max_tokens=30, temperature=0, ignore_eos=True)
    running.get(timeout=60)  # the batch is decoding
    ids, q = run(engine, "The quick brown fox jumps over", max_tokens=0, logprobs=2, prompt_logprobs=2)
    result = collect_sync(q, time.perf_counter())
    collect_sync(running, 0)
    assert (result.text, result.completion_tokens, result.finish_reason, result.logprobs) == ("", 0, "length", [])
    prompt = result.prompt_logprobs
    assert [e.token for e in prompt] == ids and prompt[0].logprob is None and prompt[0].top == []
    ref = reference(engine, ids)
    for j, e in enumerate(prompt[1:], start=1):
        assert abs(e.logprob - ref[j - 1, ids[j]].item()) < TOL
        assert [t for t, _ in e.top] == ref[j - 1].topk(2).indices.tolist()
    name_tokens(engine.tokenizer, prompt)
    shape = completion_logprobs(prompt)
    assert shape["token_logprobs"][0] is None and shape["top_logprobs"][0] is None
    assert "".join(shape["tokens"]) == engine.tokenizer.decode(ids)
    assert shape["text_offset"] == [len("".join(shape["tokens"][:j])) for j in range(len(ids))]
    for j in range(1, len(ids)):  # the chosen token is always in the legacy top_logprobs
        assert shape["top_logprobs"][j][shape["tokens"][j]] == shape["token_logprobs"][j]


def test_values_come_after_logit_bias_and_before_temperature(engine):
    """Documented in serve/logprobs.py: logit_bias and the end-of-sequence mask apply, temperature does not."""
    bias = {11: 3.0, 50: -100.0}
    ids, q = run(engine, "hello world", max_tokens=6, temperature=1.7, seed=5, logit_bias=bias, logprobs=0,
                 ignore_eos=True)
    result = collect_sync(q, time.perf_counter())
    generated = [e.token for e in result.logprobs]
    ref = reference(engine, ids + generated, bias, masked=engine.eos_ids)
    for j, e in enumerate(result.logprobs):
        assert abs(e.logprob - ref[len(ids) + j - 1, e.token].item()) < TOL and e.top == []
    ids, q = run(engine, "hello world", max_tokens=1, temperature=0, logit_bias={50: -100.0}, logprobs=0,
                 min_tokens=1)
    assert collect_sync(q, 0).logprobs[0].token != 50
    # a token masked to -inf (as min_tokens masks the end-of-sequence token) reports the floor, never -inf
    import torch

    [masked] = of_step(torch.tensor([[0.0, float("-inf"), 0.0]]), [1], [3])
    assert masked.logprob == FLOOR and masked.top[-1] == (1, FLOOR)


def test_chat_shape_and_floor(engine):
    from llmos_ray.serve.logprobs import TokenLogprob

    entries = [TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.25)]), TokenLogprob(9, FLOOR, [])]
    name_tokens(engine.tokenizer, entries)
    shape = chat_logprobs(entries)
    assert shape["refusal"] is None and [c["logprob"] for c in shape["content"]] == [-0.5, FLOOR]
    first = shape["content"][0]
    assert first["token"] == engine.tokenizer.decode([5]) and first["bytes"] == list(first["token"].encode())
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -1.25]
