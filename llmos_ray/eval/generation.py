"""Batched greedy generation for generation tasks (no Ray).

Prompts are encoded with the tokenizer's defaults (a BOS where the tokenizer adds one), cut from
the left when prompt + max_new_tokens would not fit the context, sorted by length, left-padded
with the pad token (EOS when there is none) and decoded greedily, `batch_size` at a time. An
answer ends at EOS, at max_new_tokens, or just before the first of the `stop` strings.

An encoder-decoder (a seq2seq export) reads its prompt as the source: cut from the right to its
context (T5's own tokenizer truncation), right-padded (the encoder attends to the whole source
under its mask), and the answer is the whole decoder output after the decoder start token.
"""

from __future__ import annotations

from typing import Sequence

from llmos_ray.errors import ConfigError, DataError, ModelError
from llmos_ray.models import context_length, eos_token_ids


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
                    stop: Sequence[str] = ()) -> list[dict]:
    """Per prompt, in order: {"output": answer text (stripped), "prompt_tokens": tokens fed,
    "new_tokens": tokens generated, "truncated": whether the prompt was cut to fit}."""
    import torch
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = eos_token_ids(model, tokenizer)
    if not eos:
        raise ModelError("neither the model nor the tokenizer names an eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    room = context_length(model.config) - (0 if seq2seq else max_new_tokens)
    if room < 1:
        raise ConfigError(f"eval.max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of "
                         f"{context_length(model.config)} tokens")
    encoded = tokenizer(list(prompts))["input_ids"]
    truncated = [len(ids) > room for ids in encoded]
    encoded = [(ids[:room - 1] + ids[-1:] if seq2seq else ids[-room:]) if len(ids) > room else ids
               for ids in encoded]  # a source keeps its final EOS
    if any(not ids for ids in encoded):
        raise DataError("a task prompt encodes to no tokens; give the model something to continue")
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad, eos_token_id=sorted(eos),
                                  stop_strings=list(stop) or None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    device = next(model.parameters()).device
    results: list[dict] = [{} for _ in encoded]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every row's next token is the last column
                ids = encoded[i]
                at = slice(0, len(ids)) if seq2seq else slice(width - len(ids), width)
                input_ids[r, at] = torch.tensor(ids)
                attention[r, at] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=generation,
                                 **({"tokenizer": tokenizer} if stop else {}))
            for r, i in enumerate(rows):
                new = out[r, 1:].tolist() if seq2seq else out[r, width:].tolist()
                for n, token in enumerate(new):
                    if token in eos:
                        new = new[:n]
                        break
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[i] = {"output": cut_at_stop(text, stop).strip(), "prompt_tokens": len(encoded[i]),
                              "new_tokens": len(new), "truncated": truncated[i]}
    return results


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
