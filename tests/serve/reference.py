"""Unbatched greedy generation with plain transformers: the reference the server must reproduce."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4)
def load(model_dir: str, adapter_dir: str | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmos_ray.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    return model, load_tokenizer(model_dir)


def greedy(model_dir: str, prompt: str | None = None, *, messages: list | None = None, max_new_tokens: int,
           min_new_tokens: int = 0, adapter_dir: str | None = None) -> str:
    """`model.generate` for one prompt (or chat), greedy, decoded without special tokens."""
    import torch

    model, tok = load(model_dir, adapter_dir)
    if messages is not None:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        vocab = tok.get_vocab()
        eos = sorted({tok.eos_token_id} | {vocab[t] for t in ("<|end|>", "<|endoftext|>") if t in vocab})
    else:
        ids, eos = tok.encode(prompt), [tok.eos_token_id]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)
