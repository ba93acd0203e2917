"""`Chatbot`: a conversation with an `LLM` that keeps its history and trims it to fit.

    from llmos_ray import LLM, Chatbot
    model = LLM.from_pretrained("tiny")
    chatbot = Chatbot(model, system="You are terse.", max_history_tokens=400)
    response = chatbot.generate_response("What is Ray?")
    chatbot.history        # [{"role": "user", ...}, {"role": "assistant", ...}, ...]
    chatbot.reset()

Each request is the system prompt, as much of the history as fits, and the new message. What fits:
at most `max_history_tokens` prompt tokens (when given) and never more than the model's context
minus room for the answer (`max_tokens`, else a quarter of the context); the oldest turns (a user
message and its answer) are dropped first, and `dropped_turns` counts them. In-process the tokens
are counted exactly with the model's chat template; over HTTP they are estimated from the server's
usage counts, and a request the server still finds too long drops another turn and is sent again.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from llmos_ray.errors import ConfigError
from llmos_ray.sdk.llm import LLM, Messages
from llmos_ray.serve.types import APIError


class Chatbot:
    """A conversation with `llm`; `generate_response(text)` answers and remembers."""

    def __init__(self, llm: LLM, system: Optional[str] = None, max_history_tokens: Optional[int] = None,
                 max_tokens: Optional[int] = None, **sampling: Any):
        if max_history_tokens is not None and max_history_tokens < 1:
            raise ConfigError(f"max_history_tokens must be >= 1 or None, got {max_history_tokens}")
        self.llm = llm
        self.system = system
        self.max_history_tokens = max_history_tokens
        self.max_tokens = max_tokens
        """Longest answer in tokens (None: the rest of the context, as the chat API does)."""
        self.sampling = sampling
        self.dropped_turns = 0
        """Turns dropped so far to fit the context."""
        self._history: Messages = []

    @property
    def history(self) -> Messages:
        """The turns kept so far (user and assistant messages, oldest first; a copy)."""
        return [dict(m) for m in self._history]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self._history.clear()
        self.dropped_turns = 0

    def generate_response(self, text: str, **sampling: Any) -> str:
        """The assistant's answer to `text`, remembered with it."""
        return "".join(self._respond(text, sampling, stream=False))

    def stream_response(self, text: str, **sampling: Any) -> Iterator[str]:
        """The answer as it is generated; remembered once complete."""
        return self._respond(text, sampling, stream=True)

    # ---------------------------------------------------------------------------------------------

    def _budget(self) -> Optional[int]:
        limits = [self.max_history_tokens] if self.max_history_tokens is not None else []
        context = self.llm.context_length
        if context:
            limits.append(context - (self.max_tokens or context // 4))
        return min(limits) if limits else None

    def _messages(self, text: str) -> Messages:
        """System + the newest history that fits the budget + the new message; drops the rest."""
        user = {"role": "user", "content": text}
        system = [{"role": "system", "content": self.system}] if self.system else []
        budget = self._budget()
        while self._history and budget is not None:
            n = self.llm.count_tokens(system + self._history + [user])
            if n is None or n <= budget:
                break
            self._drop_oldest()
        return system + self._history + [user]

    def _drop_oldest(self) -> None:
        del self._history[:2]
        self.dropped_turns += 1

    def _respond(self, text: str, sampling: dict, stream: bool) -> Iterator[str]:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("the message must be a non-empty string")
        args = {**self.sampling, **({"max_tokens": self.max_tokens} if self.max_tokens else {}), **sampling}
        while True:
            messages = self._messages(text)
            try:
                if stream:
                    pieces = []
                    for piece in self.llm.stream(messages, **args):
                        pieces.append(piece)
                        yield piece
                    answer = "".join(pieces)
                else:
                    answer = self.llm.chat(messages, **args)
                    yield str(answer)
                break
            except APIError as e:
                if e.code != "context_length_exceeded" or not self._history:
                    raise
                self._drop_oldest()  # the server counts exactly: one turn fewer, and again
        self._history += [{"role": "user", "content": text}, {"role": "assistant", "content": str(answer)}]
