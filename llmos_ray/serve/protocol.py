"""The HTTP API's shapes: OpenAI's request models and response dicts, server-sent events.

The request models are strict (`validation.StrictRequest`): every route parses its body into one
with `validation.parse_body`, so malformed JSON and bad fields become 400s that name the field.
Unknown fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi.responses import StreamingResponse
from pydantic import Field

from llmos_ray.serve.logprobs import MAX_TOP_LOGPROBS
from llmos_ray.serve.tools import MAX_TOOLS, Tool, ToolCall, ToolChoice
from llmos_ray.serve.validation import LogitBias, Seed, StopSequences, StrictRequest, TokenId


class StreamOptions(StrictRequest):
    include_usage: bool = False


class SamplingFields(StrictRequest):
    """Fields shared by completions, chat, the ready-made apps and KServe v2's parameters."""

    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """Below sampling.GREEDY_BELOW (0 included): greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopSequences = None
    seed: Optional[Seed] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    ignore_eos: bool = False
    """Extension (as vLLM): keep generating past the end-of-sequence token."""
    min_tokens: int = Field(0, ge=0)
    """Extension (as vLLM): do not stop before this many tokens."""


class CompletionRequest(SamplingFields):
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    """0 (with echo): score the prompt alone, as lm-evaluation-harness does."""
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """Each token's log-probability and this many alternatives (`logprobs` says which values)."""
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    user: Optional[str] = None


class TextPart(StrictRequest):
    type: str
    text: Optional[str] = None


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    """An assistant's calls (earlier turns of a conversation with tools)."""
    tool_call_id: Optional[str] = None
    """A tool message: the call it answers."""


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    modalities: Optional[list[str]] = None
    function_call: Optional[Any] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    web_search_options: Optional[Any] = None
    """OpenAI fields this server does not support: a 400 naming them (CHAT_UNSUPPORTED), not ignored."""
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    user: Optional[str] = None


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
