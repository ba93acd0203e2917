"""Content safety per model: input/output blocklists (whole words, case-insensitive) and regular
expressions, and a cap on output length.

A blocked prompt is not generated at all; the response is an ordinary OpenAI response with empty
content and `finish_reason: "content_filter"`. A completion that hits an output rule is cut where
the match starts and ends with `finish_reason: "content_filter"`. When streaming, text that could
still turn into a match is held back (the longest blocked word; 64 characters when output regexes
are set), so nothing blocked reaches the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

PATTERN_HOLDBACK = 64


def _compile(words: list[str], patterns: list[str]) -> Optional[re.Pattern]:
    parts = [r"(?<!\w)" + re.escape(w.strip()) + r"(?!\w)" for w in words if w.strip()]
    parts += [f"(?:{p})" for p in patterns]
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


@dataclass
class SafetyPolicy:
    input_re: Optional[re.Pattern] = None
    output_re: Optional[re.Pattern] = None
    max_output_chars: Optional[int] = None
    holdback: int = 0

    @classmethod
    def from_spec(cls, spec) -> "SafetyPolicy":
        """From a ModelSpec's safety_* settings."""
        holdback = max((len(w) for w in spec.safety_output_blocklist), default=0)
        if spec.safety_output_patterns:
            holdback = max(holdback, PATTERN_HOLDBACK)
        return cls(_compile(spec.safety_input_blocklist, spec.safety_input_patterns),
                   _compile(spec.safety_output_blocklist, spec.safety_output_patterns),
                   spec.safety_max_output_chars, holdback)

    @property
    def filters_output(self) -> bool:
        return self.output_re is not None or self.max_output_chars is not None

    def blocks_input(self, text: str) -> bool:
        return self.input_re is not None and self.input_re.search(text) is not None

    def output_filter(self) -> "OutputFilter":
        return OutputFilter(self)


class OutputFilter:
    """Streams text through the output rules: feed() returns what may be shown now."""

    def __init__(self, policy: SafetyPolicy):
        self.policy = policy
        self.text = ""
        self.sent = 0
        self.finish: Optional[str] = None
        """'content_filter' or 'length' once a rule has ended the output."""

    def feed(self, delta: str, final: bool = False) -> str:
        if self.finish is not None:
            return ""
        self.text += delta
        p = self.policy
        end = len(self.text)
        if p.output_re is not None:
            for m in p.output_re.finditer(self.text):
                # a whole-word match touching the end may still grow into a longer word: wait for more text
                if final or m.end() < len(self.text):
                    end, self.finish = m.start(), "content_filter"
                    break
        if p.max_output_chars is not None and end > p.max_output_chars:
            end, self.finish = p.max_output_chars, "length"
        if self.finish is None and not final:
            end = max(self.sent, end - p.holdback)
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
