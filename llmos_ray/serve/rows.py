"""One sequence in the engine (`Row`: its prompt, settings, consumer and what it generated so far) and
how much of its text may be shown yet (`safe_length`: stop strings and incomplete characters held back).
"""

from __future__ import annotations

from typing import Callable, Optional

from llmos_ray.serve.types import Chunk, SamplingParams


class Row:
    """One sequence in the engine."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Chunk], None],
                 stop_ids: frozenset[int]):
        self.prompt_ids, self.params, self.sink, self.stop_ids = prompt_ids, params, sink, stop_ids
        self.generated: list[int] = []
        self.next_pos = len(prompt_ids)  # position id of the next token fed to the model
        self.last_token: Optional[int] = None
        self.text = ""
        self.sent = 0
        self.finish: Optional[str] = None
        self.cancelled = False
        self.generator = None
        self.counts = None
        self.max_batch = 0
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.logprobs, self.prompt_logprobs = [], None  # logprobs.TokenLogprob not yet sent (prompt's: once)
        self.matcher = None  # structured.matcher of a constrained row
        self.slot: Optional[int] = None  # its LoRA adapter's slot in Engine.adapters (None: the base)


def safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown: hold back an incomplete UTF-8 character and any tail that
    could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
