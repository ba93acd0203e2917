"""Fine-tuning: loss masks for every format, the chat template round trip, full and LoRA
fine-tuning through Ray Train + DeepSpeed, and distillation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llmos_ray.config import load_config
from llmos_ray.data.sft import build_examples, encode, ensure_chat_template, to_messages

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from llmos_ray.data.tokenizer import load_tokenizer

    t = load_tokenizer(tiny_tokenizer_dir)
    ensure_chat_template(t)
    return t


def target_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_prompt_completion_mask_is_exactly_the_completion_and_eos(tok):
    ids, mask = encode(tok, to_messages({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, "prompt_completion"),
                       "prompt_completion")
    assert target_text(tok, ids, mask) == " 4" + tok.eos_token
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == "Q: 2+2?\nA:"


@pytest.mark.parametrize("record,fmt,answers", [
    ({"instruction": "Add", "input": "1 and 1", "output": "2"}, "alpaca", ["2"]),
    ({"instruction": "Say hi", "output": "hi"}, "alpaca", ["hi"]),
    ({"messages": CHAT}, "chat", ["4", "6, of course."]),
])
def test_chat_formats_mask_exactly_the_assistant_turns(tok, record, fmt, answers):
    ids, mask = encode(tok, to_messages(record, fmt), fmt)
    assert target_text(tok, ids, mask) == "".join(f"{a}<|end|>" for a in answers)
    assert tok.decode(ids) == tok.apply_chat_template(to_messages(record, fmt), tokenize=False)


def test_templates_without_generation_markers_are_masked_turn_by_turn(tok):
    """A hub tokenizer's template rarely marks assistant text: we then diff renders turn by turn."""
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, mask = encode(plain, CHAT, "chat")
    assert ids == encode(tok, CHAT, "chat")[0]
    assert target_text(plain, ids, mask) == "4<|end|>\n6, of course.<|end|>\n"  # the turn's closing newline too


def test_bad_records_counted_with_file_and_line_and_truncation(tok):
    recs = [("a.jsonl", 1, {"prompt": "x", "completion": "y"}), ("a.jsonl", 2, ValueError("not valid JSON")),
            ("a.jsonl", 3, {"messages": [{"role": "user", "content": "only a question"}]}),
            ("a.jsonl", 4, {"text": "no format"}), ("a.jsonl", 5, {"messages": CHAT})]
    ex = build_examples(recs, tok, seq_len=16, max_bad_fraction=0.9)
    c = ex.counts
    assert (c["records"], c["examples"], c["bad_records"]) == (5, 2, 3)
    assert [b["line"] for b in c["bad_by_file"]["a.jsonl"]] == [2, 3, 4]
    assert c["truncated"] == 1 and ex.tokens.shape == (2, 17)
    # left truncation keeps the final answer
    assert target_text(tok, ex.tokens[1], ex.mask[1]).endswith("6, of course.<|end|>")
    with pytest.raises(Exception, match="a.jsonl: 3 of 5 records are bad.*first at line 2"):
        build_examples(recs, tok, seq_len=16, max_bad_fraction=0.5)


def test_default_instruction_set_is_real_and_split():
    from llmos_ray.data.instructions import stdlib_instructions

    train, val = stdlib_instructions("train"), stdlib_instructions("val")
    assert len(train) > 500 and len(val) > 20
    assert not {r["name"] for r in train} & {r["name"] for r in val}
    assert all(r["messages"][1]["content"].strip() for r in val)


# ---------------------------------------------------------------------------------------------
# Through Ray Train + DeepSpeed



def ft_config(tmp_path, name, base, *overrides):
    return load_config(None, [
        f"run.name={name}", f"run.output_dir={tmp_path / name}", "run.wandb=disabled", f"model.base={base}",
        "data.seq_len=96", "train.num_workers=2", "train.micro_batch_size=4", "train.max_steps=16",
        "train.log_every=2", "train.eval_every=8", "train.eval_batches=2", "train.checkpoint_every=16",
        "train.lr=3e-3", "train.warmup_steps=2", *overrides])


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """A user's chat JSONL (multi-turn, one corrupted line), written from the embedded set."""
    from llmos_ray.data.instructions import stdlib_instructions

    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    with open(path, "w") as f:
        for r in stdlib_instructions("train", limit=300):
            f.write(json.dumps({"messages": [{"role": "system", "content": "You explain Python."}] + r["messages"]})
                    + "\n")
        f.write("{not json\n")
    return str(path)


@pytest.mark.slow
def test_full_finetune_lowers_held_out_loss_and_keeps_the_chat_template(ray_session, tiny_model_dir, sft_file,
                                                                         tmp_path, tok):
    from transformers import AutoTokenizer

    from llmos_ray.train.finetune import finetune

    cfg = ft_config(tmp_path, "full", tiny_model_dir, f"finetune.paths=[{sft_file}]", "data.val_fraction=0.1")
    result = finetune(cfg)
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.1
    # Reports every 2 steps of ~0.1 s: Ray Train's controller, which takes one report per poll (2 s
    # by default), must not set the pace (trainer.CONTROLLER_POLL_S). Throttled, every gap is >= 2 s.
    times = [h["time"] for h in result.history if "loss" in h]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    assert len(gaps) == 7 and gaps[len(gaps) // 2] < 1.0, gaps
    counts = json.load(open(os.path.join(result.output_dir, "data_stats.json")))
    assert counts["train"]["bad_records"] + (counts["val"] or {}).get("bad_records", 0) == 1
    exported = AutoTokenizer.from_pretrained(result.export_dir)
    prompt = CHAT[:2]
    assert exported.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    gen = json.load(open(os.path.join(result.export_dir, "generation_config.json")))
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]


@pytest.mark.slow
def test_lora_changes_only_adapters_and_merged_equals_base_plus_adapter(ray_session, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmos_ray.train.checkpoint import consolidated_state_dict, export
    from llmos_ray.train.finetune import finetune

    cfg = ft_config(tmp_path, "lora", tiny_model_dir, "finetune.lora=true", "finetune.lora_r=4",
                    "deepspeed.zero_stage=3", "finetune.paths=[]")
    result = finetune(cfg)
    weights = consolidated_state_dict(result.checkpoint)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    adapters = [k for k in weights if "lora_" in k]
    assert adapters and all(float(weights[k].abs().sum()) > 0 for k in adapters if "lora_B" in k)
    for key, value in weights.items():
        if "lora_" not in key:
            plain = key.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(value, base[plain], msg=key)  # frozen

    adapter_dir = export(result.checkpoint, str(tmp_path / "adapter"), merge_lora=False)
    assert os.path.exists(os.path.join(adapter_dir, "adapter_config.json"))
    merged = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    x = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, with_adapter(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_distillation_kl_to_teacher_falls(ray_session, tiny_model_dir, tmp_path):
    from llmos_ray.train.finetune import distill

    cfg = load_config(None, [
        "run.name=distill", f"run.output_dir={tmp_path / 'distill'}", "run.wandb=disabled",
        f"distill.teacher={tiny_model_dir}", "model.family=llama", "model.size=tiny", "data.max_documents=60",
        "data.seq_len=64", "train.num_workers=2", "train.micro_batch_size=4", "train.max_steps=16",
        "train.log_every=4", "train.eval_every=100", "train.checkpoint_every=16", "train.lr=5e-3",
        "train.warmup_steps=2", "distill.alpha=1.0"])
    result = distill(cfg)
    kl = [h["kl"] for h in result.history if "kl" in h]
    assert len(kl) == 4 and kl[-1] < 0.7 * kl[0]
    assert np.isfinite(result.metrics["loss"])


def test_finetune_mix_interleaves_instruction_sets_by_weight(tmp_path):
    """finetune.mix: each set split by its records' hash, the splits mixed 3:1 in order, shares counted."""
    from llmos_ray.train.finetune import instruction_records

    for name, n in (("qa", 400), ("code", 200)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"{name} question {i}", "completion": f" answer {i}"}) + "\n")
    cfg = load_config(None, {"finetune.mix": [{"name": "qa", "paths": [str(tmp_path / "qa.jsonl")], "weight": 3},
                                              {"name": "code", "paths": [str(tmp_path / "code.jsonl")]}],
                             "data.val_fraction": 0.1}).resolved("finetune")
    counts: dict = {}
    train, val = instruction_records(cfg, counts)
    qa = [r for _, _, r in train if r["prompt"].startswith("qa")]
    assert counts["train"]["qa"]["share"] == pytest.approx(0.75, abs=0.01) and counts["train"]["qa"]["exhausted"]
    assert len(qa) == counts["train"]["qa"]["documents"] and 300 < len(qa) < 400  # ~10% held out
    assert [int(r["prompt"].split()[-1]) for r in qa] == sorted(int(r["prompt"].split()[-1]) for r in qa)
    assert not {(s, line) for s, line, _ in train} & {(s, line) for s, line, _ in val}
