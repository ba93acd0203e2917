"""The next token of every row of a decode step, each row with its own sampling settings.

Per row, in this order: logit_bias, presence/frequency penalties (from the row's token counts),
end-of-sequence tokens masked while ignore_eos or min_tokens holds; then greedy at temperature 0,
else softmax(logits / temperature) cut to the top_p nucleus and drawn with the row's generator
(seeded per request when a seed is given).
"""

from __future__ import annotations


def sample(rows: list, logits) -> list[int]:
    """One token id per row (the engine's rows: .params, .counts, .generated, .stop_ids, .generator)
    from `logits` (rows x vocabulary)."""
    import torch

    logits = logits.float()
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                logits[i, int(token)] += bias
        if r.counts is not None:
            logits[i] -= p.frequency_penalty * r.counts + p.presence_penalty * (r.counts > 0).float()
        if (p.ignore_eos or len(r.generated) < p.min_tokens) and r.stop_ids:
            logits[i, list(r.stop_ids)] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    for i, r in enumerate(rows):
        p = r.params
        if p.temperature > 0:
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
    return tokens
