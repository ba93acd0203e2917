"""Batched greedy generation: left padding changes nothing, prompts that do not fit are cut from the
left, stop strings end answers."""

from __future__ import annotations

import torch

from llmos_ray.eval.generation import cut_at_stop, greedy_generate

PROMPTS = ["def main():\n    ", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "x",
           "    return self._"]


def reference_greedy(model, tok, prompt, max_new_tokens: int) -> str:
    """One prompt (text or token ids), no padding, transformers' own greedy search."""
    ids = torch.tensor([tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny):
    model, tok = tiny
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4)
    single = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=1)
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert [r["output"] for r in batched] == [reference_greedy(model, tok, p, 10) for p in PROMPTS]
    assert [r["prompt_tokens"] for r in batched] == [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert all(0 < r["new_tokens"] <= 10 and not r["truncated"] for r in batched)


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(tiny, long_text):
    model, tok = tiny
    [r] = greedy_generate(model, tok, [long_text], max_new_tokens=8)
    assert r["truncated"] and r["prompt_tokens"] == model.config.n_positions - 8
    ids = tok(long_text)["input_ids"][-(model.config.n_positions - 8):]
    assert r["output"] == reference_greedy(model, tok, ids, 8)


def test_stop_strings_end_the_answer(tiny):
    model, tok = tiny
    [free] = greedy_generate(model, tok, [PROMPTS[1]], max_new_tokens=12)
    assert len(free["output"]) > 2
    stop = free["output"][1:3]  # occurs in the free answer, after its first character
    [stopped] = greedy_generate(model, tok, [PROMPTS[1]], max_new_tokens=12, stop=[stop])
    assert stopped["output"] == free["output"][:free["output"].find(stop)].strip()
    assert cut_at_stop("a\nb\n\nc", ["\n\n", "c"]) == "a\nb"
    assert cut_at_stop("abc", ["x", ""]) == "abc"
