"""The plain values passed between the HTTP ingress and the model replicas.

    ingress --GenerationRequest(SamplingParams, prompt | messages | token ids)--> replica
    replica --Result (whole completion) | Chunk, Chunk, ... (stream) | APIError--> ingress

APIError travels as a value too: a replica returns (not raises) it for a client's mistake, and
every HTTP handler raises it; the ingress turns it into the API's error body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from llmos_ray.errors import LlmosError


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = None
    """None = the rest of the context, capped by the model's max_tokens_limit."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: Optional[int] = None
    """Report each generated token's log-probability and this many alternatives (None = off)."""
    prompt_logprobs: Optional[int] = None
    """Report each prompt token's log-probability and this many alternatives (None = off; echo)."""
    grammar: Optional[str] = None
    """Constrain decoding to this llguidance grammar (`structured`: response_format, forced tool calls)."""


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter on a shared base, as a request names it to the replica that holds the base."""

    name: str
    """The served name (what clients put in `model`)."""
    uri: str
    """Where it is read from: a local directory or fsspec URI."""
    id: str
    """Its id in the replicas: the served name for a configured adapter; unique to each runtime load."""


@dataclass
class GenerationRequest:
    """What the HTTP ingress sends a model replica: a prompt, chat messages or token ids."""

    params: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    prompt_token_ids: Optional[list[int]] = None
    echo: bool = False
    """Return the prompt as text (Result.prompt_text) when it was given as token ids."""
    tools: Optional[list[dict[str, Any]]] = None
    """Tools shown to the model through its chat template (with `messages`)."""
    adapter: Optional[AdapterRef] = None
    """The LoRA adapter to decode with, on a shared base (None: the model itself)."""


@dataclass
class Chunk:
    """A piece of one request's output; the last one has finish_reason set."""

    text: str
    finish_reason: Optional[str] = None
    """'stop', 'length', or 'error' (then `error` says why)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0
    """Most rows decoded together while this request ran."""
    error: Optional[str] = None
    logprobs: list = field(default_factory=list)
    """logprobs.TokenLogprob of the tokens generated since the previous chunk (when asked)."""
    prompt_logprobs: Optional[list] = None
    """logprobs.TokenLogprob of the prompt's tokens (first chunk only, when asked)."""


@dataclass
class Result:
    """One whole completion."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    ttft_s: float
    logprobs: Optional[list] = None
    """logprobs.TokenLogprob per generated token (when asked)."""
    prompt_logprobs: Optional[list] = None
    """logprobs.TokenLogprob per prompt token (when asked)."""
    prompt_text: Optional[str] = None
    """The prompt as text, for echo of a prompt given as token ids."""


def result_of(chunks: list[Chunk], ttft_s: float) -> Result:
    """One whole completion from all its chunks (the last one has finish_reason)."""
    last = chunks[-1]
    prompt = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
    scored = [e for c in chunks for e in c.logprobs]
    return Result("".join(c.text for c in chunks), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                  last.batch_size, ttft_s, logprobs=scored, prompt_logprobs=prompt)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "overloaded_error"}


class APIError(LlmosError):
    """An HTTP error with OpenAI's error body. Raised anywhere below a route; picklable across Ray."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def __reduce__(self):
        return (APIError, (self.status, self.message, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)
