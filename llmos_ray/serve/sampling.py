"""The next token of every row of a decode step, each row with its own sampling settings, and the
numeric sanity of sampling (all of it here).

Per row, in this order: logit_bias, presence/frequency penalties (from the row's token counts),
end-of-sequence tokens masked while ignore_eos or min_tokens holds. Then the guard: NaN logits
become -inf (never drawn) and every other logit but -inf (a mask) is clamped into
[-LOGIT_LIMIT, LOGIT_LIMIT], so no row can produce NaN or inf probabilities; a row left without
one finite logit fails alone. Then greedy below a temperature of GREEDY_BELOW (as vLLM: 0, and
values so small that logits / temperature would overflow), else softmax(logits / temperature)
cut to the top_p nucleus and drawn with the row's generator (seeded per request when a seed is
given).

A row whose settings or logits fail any of this is reported in `Sampled.failed` with the reason;
the other rows get their tokens (a failure of one row never fails the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (vLLM's _SAMPLING_EPS)."""
LOGIT_LIMIT = 1e4
"""Logits are clamped to at most this (logits / GREEDY_BELOW stays far below float32's max)."""


def is_greedy(params) -> bool:
    """Whether `params` (SamplingParams) decode greedily."""
    return params.temperature < GREEDY_BELOW


@dataclass
class Sampled:
    tokens: list[int]
    """One token id per row (meaningless for a failed row)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Row index -> why that row cannot go on."""
    logits: Any = None
    """The logits the tokens were drawn from (rows x vocabulary): after logit_bias, penalties, the
    end-of-sequence mask and the guard, before temperature and top_p (`logprobs` reads them)."""


def sample(rows: list, logits) -> Sampled:
    """The next token per row (the engine's rows: .params, .counts, .generated, .stop_ids,
    .generator) from `logits` (rows x vocabulary)."""
    import torch

    logits = logits.float()
    failed: dict[int, str] = {}
    for i, r in enumerate(rows):
        try:
            _adjust(r, logits[i])
        except Exception as e:  # one row's settings must not fail the batch
            failed[i] = f"{type(e).__name__}: {e}"
    logits = _guarded(logits)
    for i in (~torch.isfinite(logits).any(dim=-1)).nonzero().flatten().tolist():
        failed.setdefault(i, "no token can be drawn: every logit is -inf or NaN")
    tokens = logits.argmax(dim=-1).tolist()
    for i, r in enumerate(rows):
        if i in failed or is_greedy(r.params):
            continue
        try:
            tokens[i] = _draw(r.params, logits[i], r.generator)
        except Exception as e:
            failed[i] = f"{type(e).__name__}: {e}"
    return Sampled(tokens, failed, logits)


def _guarded(logits):
    """NaN -> -inf; every other logit into [-LOGIT_LIMIT, LOGIT_LIMIT], except -inf (a mask), which stays."""
    import torch

    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=LOGIT_LIMIT, neginf=float("-inf"))
    return torch.where(torch.isneginf(logits), logits, logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT))


def _adjust(r, row_logits) -> None:
    """logit_bias, penalties and the end-of-sequence mask of one row, in place."""
    import torch

    p = r.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=row_logits.device)
        row_logits[ids] += torch.tensor(list(p.logit_bias.values()), device=row_logits.device)
    if r.counts is not None:
        row_logits -= p.frequency_penalty * r.counts + p.presence_penalty * (r.counts > 0).float()
    if (p.ignore_eos or len(r.generated) < p.min_tokens) and r.stop_ids:
        row_logits[list(r.stop_ids)] = float("-inf")


def _draw(p, row_logits, generator) -> int:
    """A token drawn from softmax(logits / temperature) within the top_p nucleus."""
    import torch

    probs = torch.softmax(row_logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
