"""LoRA adapters side by side on one base, without Ray: the per-row deltas (`adapters.LoraSet`) and
the engine decoding rows of different adapters and of the base in one batch.

References: each adapter merged into its own copy of the base by peft (`merge_and_unload`) and run
alone, with plain `model.generate` for greedy text (tests/serve/reference.py). Measured differences
of the logits are ~1e-6 (the merged weight W + BA against x W + (x A) B); 1e-4 is the bound.
"""

from __future__ import annotations

import json
import queue
import shutil
import time

import pytest

from llmos_ray.errors import ModelError
from llmos_ray.serve.adapter_host import adapter_view
from llmos_ray.serve.adapters import LoraSet, read_adapter
from llmos_ray.serve.engine import Engine, collect_sync
from llmos_ray.serve.types import GenerationRequest, SamplingParams
from tests.serve.reference import greedy, load

TOL = 1e-4
PROMPTS = ["def main():", "The quick brown fox", "import os\nimport sys\n", "class Foo(object):"]


def fresh_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_each_row_gets_its_own_adapters_logits_and_base_rows_exactly_the_base(tiny_model_dir, lora_dir, lora_dir_b):
    import torch

    base = fresh_base(tiny_model_dir)
    adapters = LoraSet(base)
    a, b = adapters.add("a", read_adapter(lora_dir)), adapters.add("b", read_adapter(lora_dir_b))
    ids = torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(ids).logits  # before any rows are chosen: the hooks leave the base alone
        with adapters.rows([a, None, b, a]):
            mixed = base(ids).logits
        for row, adapter_dir in ((0, lora_dir), (2, lora_dir_b), (3, lora_dir)):
            merged = load(tiny_model_dir, adapter_dir)[0](ids[row:row + 1]).logits[0]
            assert (mixed[row] - merged).abs().max().item() < TOL, row
            assert (mixed[row] - plain[row]).abs().max().item() > 0.1  # the adapter does change it
        alone = load(tiny_model_dir)[0](ids[1:2]).logits[0]
    assert torch.equal(mixed[1], plain[1])  # the base row: bit for bit what the base computes
    assert (mixed[1] - alone).abs().max().item() < 1e-5


def submit(engine, prompt, adapter=None, **params):
    ids, sp, stop = engine.prepare(GenerationRequest(params=SamplingParams(**params), prompt=prompt))
    chunks: queue.Queue = queue.Queue()
    engine.submit(ids, sp, chunks.put, stop, adapter)
    return chunks


@pytest.fixture(scope="module")
def engine(tiny_model_dir, lora_dir, lora_dir_b):
    eng = Engine(fresh_base(tiny_model_dir), load(tiny_model_dir)[1], name="tiny", max_batch_size=4,
                 max_tokens_limit=64)
    eng.add_adapter("a", read_adapter(lora_dir))
    eng.add_adapter("b", read_adapter(lora_dir_b))
    yield eng
    eng.shutdown()


def test_two_adapters_and_the_base_in_one_batch_give_each_ones_greedy_output(engine, tiny_model_dir, lora_dir,
                                                                             lora_dir_b):
    cases = [(PROMPTS[0], "a", lora_dir), (PROMPTS[1], None, None), (PROMPTS[2], "b", lora_dir_b),
             (PROMPTS[1], "b", lora_dir_b)]
    queues, items = [queue.Queue() for _ in cases], []
    for (prompt, adapter, _), q in zip(cases, queues):
        ids, params, stop = engine.prepare(GenerationRequest(
            params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), prompt=prompt))
        items.append((ids, params, q.put, stop, adapter))
    rows = engine.submit_many(items)  # prefilled together, then decoded together
    results = [collect_sync(q, time.perf_counter()) for q in queues]
    assert [r.slot is None for r in rows] == [False, True, False, False]
    for (prompt, _, adapter_dir), r in zip(cases, results):
        assert r.text == greedy(tiny_model_dir, prompt, max_new_tokens=12, min_new_tokens=12, adapter_dir=adapter_dir)
        assert r.batch_size == 4  # all four decoded together
    assert results[1].text != results[3].text  # same prompt: the base and adapter b differ


def test_adapter_rows_logprobs_equal_the_merged_model_run_alone(engine, tiny_model_dir, lora_dir_b):
    params = dict(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    shared = [submit(engine, PROMPTS[3], "b", **params), submit(engine, PROMPTS[0], None, **params)]
    got = collect_sync(shared[0], time.perf_counter())
    collect_sync(shared[1], 0)
    merged = Engine(*load(tiny_model_dir, lora_dir_b), name="merged", max_tokens_limit=64)
    try:
        want = collect_sync(submit(merged, PROMPTS[3], **params), time.perf_counter())
    finally:
        merged.shutdown()
    assert [e.token for e in got.logprobs] == [e.token for e in want.logprobs]
    for g, w in zip(got.logprobs, want.logprobs):
        assert abs(g.logprob - w.logprob) < TOL
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


def test_an_unloaded_adapter_finishes_its_running_rows_and_refuses_new_ones(tiny_model_dir, lora_dir):
    eng = Engine(fresh_base(tiny_model_dir), load(tiny_model_dir)[1], name="tiny", max_tokens_limit=64)
    try:
        eng.add_adapter("a", read_adapter(lora_dir))
        running = submit(eng, PROMPTS[0], "a", max_tokens=40, temperature=0, ignore_eos=True)
        first = running.get(timeout=30)  # decoding has begun
        assert eng.remove_adapter("a") and not eng.remove_adapter("a")
        rest = collect_sync(running, 0)
        assert first.text + rest.text == greedy(tiny_model_dir, PROMPTS[0], max_new_tokens=40, min_new_tokens=40,
                                                adapter_dir=lora_dir)
        with pytest.raises(Exception, match="not loaded"):
            collect_sync(submit(eng, PROMPTS[0], "a", max_tokens=4), 0)
        eng.add_adapter("a2", read_adapter(lora_dir))  # the freed slot is taken again
        assert eng.adapters.names == {"a2": 0}
    finally:
        eng.shutdown()


def test_what_a_shared_base_cannot_apply_is_refused_with_the_reason(tiny_model_dir, lora_dir, tmp_path):
    def variant(name, **config):
        out = tmp_path / name
        shutil.copytree(lora_dir, out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        return str(out)

    for key, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all")):
        with pytest.raises(ModelError, match=key):
            read_adapter(variant(key, **{key: value}))
    with pytest.raises(ModelError, match="not a LoRA adapter"):
        read_adapter(tiny_model_dir)
    with pytest.raises(ModelError, match="LORA adapter|only LoRA"):
        read_adapter(variant("ia3", peft_type="IA3"))


def test_an_adapter_of_another_base_is_refused_before_anything_changes(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmos_ray.models import preset_config

    other = AutoModelForCausalLM.from_config(preset_config("gpt2", "small", 512, 64))  # wider layers
    get_peft_model(other, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                     init_lora_weights=False)).save_pretrained(tmp_path / "wide")
    llama = AutoModelForCausalLM.from_config(preset_config("llama", "tiny", 512, 64))
    get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "llama")
    base = fresh_base(tiny_model_dir)
    adapters = LoraSet(base)
    with pytest.raises(ModelError, match="another base"):
        adapters.add("wide", read_adapter(str(tmp_path / "wide")))
    with pytest.raises(ModelError, match="does not have"):
        adapters.add("llama", read_adapter(str(tmp_path / "llama")))
    assert adapters.names == {} and not base._forward_hooks and all(not m._forward_hooks for m in base.modules())
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(base(ids).logits, load(tiny_model_dir)[0](ids).logits)


def test_an_adapters_own_tokenizer_must_share_the_bases_vocabulary(engine, tiny_model_dir, lora_dir, tmp_path):
    from llmos_ray.data.tokenizer import train_tokenizer
    from tests.conftest import stdlib_texts

    same = tmp_path / "same"
    shutil.copytree(lora_dir, same)
    load(tiny_model_dir)[1].save_pretrained(same)
    (same / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    view = adapter_view(engine, "same", str(same))
    assert {7, 9} <= view.eos_ids and view.name == "same" and view.context_length == engine.context_length
    other = tmp_path / "other"
    shutil.copytree(lora_dir, other)
    train_tokenizer(stdlib_texts(5), vocab_size=300, out_dir=str(other))
    with pytest.raises(ModelError, match="vocabulary"):
        adapter_view(engine, "other", str(other))
