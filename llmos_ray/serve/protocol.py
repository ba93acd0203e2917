"""The HTTP API's shapes: request bodies parsed and validated, OpenAI's request models and response
dicts, server-sent events.

Every route reads its body with `read_json` (one JSON object) and checks it with `validate` (a
pydantic model), so malformed JSON and bad fields become 400s that name the field, on the OpenAI
routes, the prompt apps and KServe v2 alike. Unknown fields are ignored, as OpenAI-compatible
servers do, so newer SDKs keep working.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, TypeVar, Union

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmos_ray.serve.types import APIError

M = TypeVar("M", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by completions, chat and the ready-made apps."""

    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: bool = False
    """Extension (as vLLM): keep generating past the end-of-sequence token."""
    min_tokens: int = Field(0, ge=0)
    """Extension (as vLLM): do not stop before this many tokens."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if not v:
            return None
        out = {}
        for key, bias in v.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
            out[key] = bias
        return out


class CompletionRequest(SamplingFields):
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    user: Optional[str] = None


class TextPart(_Request):
    type: str
    text: Optional[str] = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    user: Optional[str] = None


def read_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or APIError 400 `invalid_json`. Every route parses its body here."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def validate(data: dict[str, Any], model_cls: type[M], prefix: str = "") -> M:
    """`data` as a `model_cls`, or APIError 400 naming the offending field (`prefix.field` when given)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "union[")))
        # A union reports one error per member: name the field, not pydantic's member labels.
        param = param.split(".list[")[0].split(".str")[0] or None
        if prefix:
            param = f"{prefix}.{param}" if param else prefix
        message = first["msg"]
        if first["type"] == "missing":
            message = "field required"
        raise APIError(400, f"{param}: {message}" if param else message, param=param,
                       code="missing_required_parameter" if first["type"] == "missing" else "invalid_value") from None


def parse_body(raw: bytes, model_cls: type[M]) -> M:
    """Bytes -> a validated request, or APIError 400 naming the offending field."""
    return validate(read_json(raw), model_cls)


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as compact JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The HTTP response of a stream of server-sent events (not buffered by proxies)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------
# Responses (plain dicts in OpenAI's shapes; built here so every route agrees)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def completion_choice(index: int, text: str, finish_reason: Optional[str]) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def chat_choice(index: int, text: str, finish_reason: Optional[str]) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None, "finish_reason": finish_reason}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: Optional[str], index: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: Optional[str],
                     index: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(name: str, created: int, root: str, parent: Optional[str]) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmos", "root": root, "parent": parent}
