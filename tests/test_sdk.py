"""The SDK in this process (no Ray): `LLM.from_pretrained` by library name, version, alias and path,
greedy output equal to plain transformers, `Chatbot` history; and `prune` (both methods) whose exports
plain transformers loads, the in-process engine serves, and the library records with their lineage.
(The SDK over HTTP, against a served model: tests/serve/test_http.py; `llmos chat`: tests/test_chat.py.)"""

from __future__ import annotations

import json
import os

import pytest

from llmos_ray import LLM, Chatbot, ModelError, prune, registry
from llmos_ray.config import load_config
from tests.conftest import stdlib_texts
from tests.serve.reference import greedy

PROMPTS = ["def main():", "import os\n", "class Foo(object):"]


@pytest.fixture(scope="module")
def library(tiny_model_dir, tmp_path_factory):
    """tiny@1 (the tiny model, alias prod) and tiny@2 (it pruned to 50%, registered by `prune`)."""
    tmp = tmp_path_factory.mktemp("sdk")
    reg = str(tmp / "models.json")
    registry.register("tiny", tiny_model_dir, registry=reg, task="causal_lm", source_run="fixture")
    val = tmp / "val.txt"
    val.write_text(stdlib_texts(6)[5][:3000])
    cfg = load_config(None, {"registry.uri": reg, "eval.perplexity_paths": [str(val)]})
    report = prune("tiny", str(tmp / "pruned"), sparsity=0.5, config=cfg, register="tiny")
    registry.promote("tiny@1", "prod", reg)
    return {"registry": reg, "config": cfg, "report": report, "tmp": tmp}


@pytest.fixture(scope="module")
def llm(library):
    with LLM.from_pretrained("tiny:prod", registry=library["registry"]) as model:
        yield model


def test_three_line_example_on_a_library_model(llm, tiny_model_dir):
    chatbot = Chatbot(llm)
    response = chatbot.generate_response("Hello there")
    messages = [{"role": "user", "content": "Hello there"}]
    assert isinstance(response, str) and chatbot.history == [*messages, {"role": "assistant", "content": response}]
    greedy_bot = Chatbot(llm, max_tokens=8, temperature=0)
    assert greedy_bot.generate_response("Hello there") == greedy(tiny_model_dir, messages=messages, max_new_tokens=8)


def test_generate_chat_stream_equal_plain_transformers_greedy(llm, tiny_model_dir):
    out = llm.generate(PROMPTS, max_tokens=8, temperature=0)
    assert out == [greedy(tiny_model_dir, p, max_new_tokens=8) for p in PROMPTS]
    assert all(c.completion_tokens <= 8 and c.finish_reason in ("stop", "length") for c in out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    answer = llm.chat(messages, max_tokens=6, temperature=0)
    assert answer == greedy(tiny_model_dir, messages=messages, max_new_tokens=6)
    assert "".join(llm.stream(messages, max_tokens=6, temperature=0)) == answer
    assert "".join(llm.stream(PROMPTS[0], max_tokens=8, temperature=0)) == out[0]
    assert llm.apps.summarize(text="Ray runs Python at scale.", max_tokens=4).app == "summarize"


def test_bad_input_and_unsupported_tasks_are_clear(llm, library):
    from llmos_ray import ConfigError
    from llmos_ray.serve.types import APIError

    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        llm.generate("a", temprature=0)
    with pytest.raises(APIError) as e:
        llm.generate("a", max_tokens=-1)
    assert e.value.status == 400 and e.value.param == "max_tokens"
    [vector] = llm.embed("a")  # as /v1/embeddings (tests/serve/test_surface.py compares it with a forward pass)
    assert abs(sum(x * x for x in vector) - 1) < 1e-5
    with pytest.raises(ModelError, match="does not support classify"):
        llm.classify(["a"])
    with pytest.raises(APIError) as e:
        llm.apps.summarize()
    assert e.value.param == "text"
    with pytest.raises(ModelError, match="did you mean 'tiny'"):
        LLM.from_pretrained("tny", registry=library["registry"])
    with pytest.raises(ModelError, match="no version 9"):
        LLM.from_pretrained("tiny@9", registry=library["registry"])
    with pytest.raises(ConfigError, match="unknown option 'dtpye'"):
        LLM.from_pretrained("tiny", registry=library["registry"], dtpye="float32")


def test_chatbot_keeps_and_trims_history(llm):
    bot = Chatbot(llm, system="Be terse.", max_history_tokens=70, max_tokens=3, temperature=0)
    sent = []
    for i in range(6):
        sent.append(f"message {i}: some words to fill the context")
        bot.generate_response(sent[-1])
        kept = bot.history
        assert kept[-2] == {"role": "user", "content": sent[-1]} and kept[-1]["role"] == "assistant"
    assert bot.dropped_turns > 0 and len(bot.history) == 2 * (6 - bot.dropped_turns)
    assert [m["content"] for m in bot.history[::2]] == sent[bot.dropped_turns:], "the oldest turns go first"
    assert llm.count_tokens(bot._messages("next")) <= 70
    bot.reset()
    assert bot.history == [] and bot.dropped_turns == 0


def test_versions_aliases_and_paths_load(library, tiny_model_dir):
    reg = library["registry"]
    pruned = library["report"]["out_dir"]
    with LLM.from_pretrained("tiny@2", registry=reg) as v2, LLM.from_pretrained(pruned) as by_path, \
            LLM.from_pretrained("tiny", registry=reg) as latest:
        assert v2.name == "tiny@2" and by_path.name == "pruned"
        one = v2.generate(PROMPTS[0], max_tokens=6, temperature=0)
        assert one == by_path.generate(PROMPTS[0], max_tokens=6, temperature=0) == \
            latest.generate(PROMPTS[0], max_tokens=6, temperature=0) == greedy(pruned, PROMPTS[0], max_new_tokens=6)


def test_unstructured_pruning_is_exact_reported_and_registered(library, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    report = library["report"]
    assert abs(report["sparsity_measured"] - 0.5) <= 0.01
    before, after = report["perplexity_before"]["perplexity"], report["perplexity_after"]["perplexity"]
    assert before > 1 and after > 1 and report["validation"]["tokens"] > 100
    model = AutoModelForCausalLM.from_pretrained(report["out_dir"])  # plain transformers
    weights = [m.weight for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear) or
               type(m).__name__ == "Conv1D"]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zero - 0.5) <= 0.01, zero
    with open(os.path.join(report["out_dir"], "prune_report.json")) as f:
        assert json.load(f)["sparsity_measured"] == report["sparsity_measured"]
    entry = registry.get("tiny@2", library["registry"])
    assert report["registered"] == "tiny@2" and entry.uri == report["out_dir"]
    assert entry.base_model == "tiny@1" and entry.eval["perplexity"] == pytest.approx(after)
    assert entry.meta["pruning"]["sparsity_measured"] == report["sparsity_measured"]


def test_structured_pruning_removes_mlp_neurons(library, capsys):
    from transformers import AutoModelForCausalLM

    from llmos_ray.cli import main

    out = str(library["tmp"] / "narrow")
    val = library["config"].eval.perplexity_paths[0]
    assert main(["prune", "tiny@1", out, "--sparsity", "0.5", "--structured", "--registry", library["registry"],
                 f"eval.perplexity_paths=[{val}]"]) == 0  # overrides after the options count too
    printed = capsys.readouterr().out
    assert "perplexity" in printed and f"serve --model {out}" in printed
    with open(os.path.join(out, "prune_report.json")) as f:
        report = json.load(f)
    assert abs(report["sparsity_measured"] - 0.5) <= 0.01
    assert report["parameters_after"] < report["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(registry.get("tiny@1", library["registry"]).uri)
    assert model.config.n_inner == (source.config.n_inner or 4 * source.config.n_embd) // 2
    assert sum(p.numel() for p in model.parameters()) == report["parameters_after"]
    with LLM.from_pretrained(out) as narrow:  # the server's engine serves it
        assert narrow.generate(PROMPTS[0], max_tokens=4, temperature=0) == greedy(out, PROMPTS[0], max_new_tokens=4)
