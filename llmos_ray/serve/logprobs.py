"""Log-probabilities: of the token each row of a decode step drew, of a prompt's tokens, and their
OpenAI shapes. All maths runs on the batched logits of a step (one log_softmax and one topk for
the rows that asked), never per row in Python.

    entries = of_step(sampled.logits, sampled.tokens, [row.params.logprobs ...])   # engine, per step
    entries = of_prompt(prefill_logits[i], prompt_ids, k)        # echo: the first one's logprob None
    name_tokens(tokenizer, entries)                              # replica: token ids -> text
    completion_logprobs(entries, k, offset)                      # /v1/completions' legacy shape
    chat_logprobs(entries)                                       # /v1/chat/completions' shape

Which values: a generated token's log-probability is log_softmax over the vocabulary of the logits
`sampling.sample` draws from, after the request's logit_bias, presence/frequency penalties and the
end-of-sequence mask (ignore_eos, min_tokens), and BEFORE temperature and top_p (so a greedy and a
sampled request score a token alike; with none of those fields the values are the model's own
log-softmax). A prompt token's log-probability (echo) is the model's own log-softmax: no sampling
field applies to the prompt. A token masked to -inf reports FLOOR (as OpenAI and vLLM: JSON has no
-inf). The end-of-sequence token that ends a completion is not reported (its text is not in the
output); the tokens of a stop string are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token (`logprobs` of /v1/completions, `top_logprobs` of chat), as OpenAI."""
FLOOR = -9999.0
"""The log-probability reported for a token that cannot be drawn (-inf)."""


@dataclass
class TokenLogprob:
    """One token's log-probability and its `top` alternatives (most likely first)."""

    token: int
    logprob: Optional[float]
    """None for a prompt's first token (nothing predicts it)."""
    top: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""
    """The token's text (`name_tokens`)."""
    top_text: list[str] = field(default_factory=list)


def _clean(lp):
    import torch

    return torch.nan_to_num(lp, nan=FLOOR, neginf=FLOOR).clamp(min=FLOOR)


def of_step(logits, tokens: list[int], ks: list[Optional[int]]) -> list[Optional[TokenLogprob]]:
    """Per row of `logits` (rows x vocabulary): the log-probability of `tokens[i]` and its top
    ks[i] alternatives, or None for a row whose ks[i] is None (it did not ask)."""
    import torch

    want = [i for i, k in enumerate(ks) if k is not None]
    out: list[Optional[TokenLogprob]] = [None] * len(ks)
    if not want:
        return out
    index = torch.tensor(want, device=logits.device)
    lp = _clean(torch.log_softmax(logits.index_select(0, index).float(), dim=-1))
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in want], device=lp.device)).squeeze(1).tolist()
    k_max = max(ks[i] for i in want)
    top_v, top_i = lp.topk(min(k_max, lp.shape[-1]), dim=-1) if k_max else (None, None)
    top_v, top_i = (top_v.tolist(), top_i.tolist()) if k_max else ([], [])
    for j, i in enumerate(want):
        top = list(zip(top_i[j][:ks[i]], top_v[j][:ks[i]])) if k_max else []
        out[i] = TokenLogprob(tokens[i], chosen[j], top)
    return out


def of_prompt(logits, ids: list[int], k: int) -> list[TokenLogprob]:
    """The log-probability of every prompt token given the ones before it (logprob None for the
    first: nothing predicts it), from one row's prefill `logits` (positions x vocabulary) whose last
    len(ids) positions are the prompt's (left padding before them)."""
    import torch

    n = len(ids)
    first = [TokenLogprob(ids[0], None)] if ids else []
    if n < 2:
        return first
    lp = _clean(torch.log_softmax(logits[-n:-1].float(), dim=-1))  # position j predicts token j + 1
    target = torch.tensor(ids[1:], device=lp.device)
    chosen = lp.gather(1, target[:, None]).squeeze(1).tolist()
    if k:
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in chosen]
    return first + [TokenLogprob(t, c, top) for t, c, top in zip(ids[1:], chosen, tops)]


def name_tokens(tokenizer, entries: list[TokenLogprob]) -> None:
    """Fill in the text of every token of `entries` (one batched decode)."""
    live = entries
    ids = [e.token for e in live] + [t for e in live for t, _ in e.top]
    if not ids:
        return
    texts = iter(tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False))
    for e in live:
        e.text = next(texts)
    for e in live:
        e.top_text = [next(texts) for _ in e.top]


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token of `ids` (what /tokenize calls token strings)."""
    return tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False) if ids else []


# -- response shapes ----------------------------------------------------------------------------


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """/v1/completions' legacy shape: tokens, token_logprobs, top_logprobs (the top alternatives and
    the chosen token, most likely first), text_offset (from `offset`, by the tokens' text)."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(e.text)
        values.append(e.logprob)
        offset += len(e.text)
        if e.logprob is None:  # a prompt's first token
            tops.append(None)
            continue
        top = {}
        for text, (_, lp) in zip(e.top_text, e.top):
            top.setdefault(text, lp)
        top.setdefault(e.text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def text_length(entries: list[TokenLogprob]) -> int:
    return sum(len(e.text) for e in entries)


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """/v1/chat/completions' shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    return {"content": [{**_token(e.text, e.logprob),
                         "top_logprobs": [_token(t, lp) for t, (_, lp) in zip(e.top_text, e.top)]}
                        for e in entries], "refusal": None}
