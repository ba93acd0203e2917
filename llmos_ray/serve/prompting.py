"""A GenerationRequest as the engine takes it: the prompt's token ids (the chat template applied),
checked against one model's context, vocabulary and max_tokens limit, and its stop token ids.

    ids, params, stop_ids = prepare(engine, request, default_max_tokens)    # = Engine.prepare

The model's half of request validation (the HTTP half is `validation`, before anything reaches a
replica): what is wrong here is an APIError 400 naming the field, never an exception from the
tokenizer or the chat template.
"""

from __future__ import annotations

from typing import Optional

from llmos_ray.serve import structured
from llmos_ray.serve.tools import tools_text
from llmos_ray.serve.types import GenerationRequest, SamplingParams, bad_request


def prepare(engine, request: GenerationRequest, default_max_tokens: Optional[int] = None
            ) -> tuple[list[int], SamplingParams, frozenset[int]]:
    """(prompt ids, params with max_tokens resolved, stop token ids) of `request` for `engine`'s
    model (its tokenizer, context_length, vocab_size, max_tokens_limit, eos_ids, turn_end_ids)."""
    params = request.params
    if request.messages is not None:
        ids = _encode(engine, render_chat(engine, request.messages, tools=request.tools), "messages",
                      add_special_tokens=False)
        field_name, stop_ids = "messages", engine.turn_end_ids
    elif request.prompt_token_ids is not None:
        ids = list(request.prompt_token_ids)
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt: token id {bad} is outside the vocabulary [0, {engine.vocab_size})", "prompt")
        field_name, stop_ids = "prompt", engine.eos_ids
    else:
        ids = _encode(engine, request.prompt or "", "prompt")
        field_name, stop_ids = "prompt", engine.eos_ids
    if not ids:
        bos = engine.tokenizer.bos_token_id
        ids = [bos if bos is not None else min(engine.eos_ids, default=0)]
    room = engine.context_length - len(ids)
    if room < (0 if params.max_tokens == 0 else 1):  # max_tokens 0: the prompt alone is scored (echo)
        raise bad_request(f"{field_name}: the prompt has {len(ids)} tokens; model {engine.name!r} has a context of "
                          f"{engine.context_length} tokens, leaving no room to generate", field_name,
                          "context_length_exceeded")
    max_tokens = params.max_tokens
    if max_tokens is not None:
        if max_tokens > engine.max_tokens_limit:
            raise bad_request(f"max_tokens: {max_tokens} is above this server's limit of {engine.max_tokens_limit}",
                              "max_tokens")
        if max_tokens > room:
            raise bad_request(f"max_tokens: {max_tokens} plus the prompt's {len(ids)} tokens exceeds model "
                              f"{engine.name!r}'s context of {engine.context_length} tokens (at most {room})",
                              "max_tokens", "context_length_exceeded")
    else:
        max_tokens = min(room, engine.max_tokens_limit, default_max_tokens or engine.max_tokens_limit)
    if params.logit_bias:
        bad = next((t for t in params.logit_bias if not 0 <= int(t) < engine.vocab_size), None)
        if bad is not None:
            raise bad_request(f"logit_bias: token id {bad} is outside the vocabulary [0, {engine.vocab_size})",
                              "logit_bias")
    structured.check(engine, params.grammar)
    params = SamplingParams(**{**params.__dict__, "max_tokens": max_tokens})
    return ids, params, stop_ids


def tokenize(engine, prompt: Optional[str], messages: Optional[list[dict[str, str]]], add_special_tokens: bool,
             add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a prompt or of a conversation (rendered as `prepare` renders it): /tokenize."""
    if messages is not None:
        return _encode(engine, render_chat(engine, messages, add_generation_prompt), "messages",
                       add_special_tokens=add_special_tokens)
    return _encode(engine, prompt or "", "prompt", add_special_tokens=add_special_tokens)


def render_chat(engine, messages: list[dict], add_generation_prompt: bool = True,
                tools: Optional[list[dict]] = None) -> str:
    """The prompt text of a conversation: the tokenizer's chat template, or a plain fallback. Tools
    go to the template; one that does not render them gets them as a first system message."""
    template = (engine.tokenizer.chat_template or "") if engine.has_chat_template else ""
    if tools and "tools" not in template:
        messages, tools = [{"role": "system", "content": tools_text(tools)}] + messages, None
    if engine.has_chat_template:
        try:
            return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                        tokenize=False, tools=tools)
        except Exception as e:  # jinja raises for roles a template does not accept
            raise bad_request(f"messages: the model's chat template rejected them: {e}", "messages") from None
    turns = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in messages)
    return turns + ("assistant:" if add_generation_prompt else "")


def _encode(engine, text: str, field_name: str, **kwargs) -> list[int]:
    try:
        return engine.tokenizer.encode(text, **kwargs)
    except Exception as e:  # the HTTP layer refuses what cannot be text; this is the last line
        raise bad_request(f"{field_name}: the model's tokenizer cannot encode it: {type(e).__name__}: {e}",
                          field_name) from None
