"""The OpenAI API: /v1/completions and /v1/chat/completions through one pipeline, and /v1/models.

    parse the body -> find the model -> validate (the endpoint's plan) -> sampling settings
      -> input safety -> generate (whole, or streamed) -> output safety -> the response or the
      SSE stream in the endpoint's shape

`COMPLETIONS` and `CHAT` say what differs between the two endpoints (request model, unsupported
fields, the inputs, the shape of a choice and of a stream's events); `OpenAIRoutes.respond` is
the pipeline both go through. Models on the vLLM engine get the same checks and input safety,
then the request body is forwarded to ray.serve.llm.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from fastapi.responses import JSONResponse, Response

from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_choice,
    chat_chunk,
    chat_response,
    completion_choice,
    completion_chunk,
    completion_response,
    event_stream,
    model_card,
    new_id,
    sse,
    usage,
    usage_chunk,
)
from llmos_ray.serve.seq2seq import chat_refusal
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import GenerationRequest, SamplingParams, bad_request
from llmos_ray.serve.validation import SEED_RANGE, parse_body, read_json


@dataclass
class Plan:
    """A validated request: what to generate and how to answer."""

    inputs: list[dict[str, Any]]
    """GenerationRequest fields per input: {'prompt': ...}, {'prompt_token_ids': ...} or {'messages': ...}."""
    n: int
    max_tokens: Optional[int]
    safety_texts: list[str]
    """The text the input safety rules read."""
    stream: bool
    include_usage: bool
    echo: list[str]
    """Text put before each input's choices (completions' echo), '' otherwise."""

    def requests(self, params: SamplingParams) -> list[GenerationRequest]:
        """n generation requests per input, input-major; the i-th choice gets seed + i."""
        return [GenerationRequest(params=_reseed(params, i), **inp) for inp in self.inputs for i in range(self.n)]


@dataclass(frozen=True)
class Endpoint:
    route: str
    """Metrics route; also the ray.serve.llm method ('completions' or 'chat')."""
    request_model: type
    id_prefix: str
    chunk_object: str
    """`object` of the usage chunk at the end of a stream."""


class _Completions(Endpoint):
    def plan(self, req: CompletionRequest) -> Plan:
        if req.logprobs:
            raise bad_request("logprobs: not supported by this server", "logprobs", "unsupported_parameter")
        if req.suffix:
            raise bad_request("suffix: not supported by this server", "suffix", "unsupported_parameter")
        if req.best_of not in (None, req.n):
            raise bad_request("best_of: only best_of == n is supported", "best_of", "unsupported_parameter")
        prompts = _prompts(req.prompt)
        if req.stream and len(prompts) * req.n > 1:
            raise bad_request("stream: streaming supports one prompt with n=1", "stream")
        return Plan(inputs=[{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts],
                    n=req.n, max_tokens=req.max_tokens, safety_texts=[p for p in prompts if isinstance(p, str)],
                    stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    echo=[p if isinstance(p, str) and req.echo else "" for p in prompts])

    def response(self, rid: str, model: str, finished: list[tuple[str, str]], use: dict) -> dict:
        return completion_response(rid, model, [completion_choice(i, t, f) for i, (t, f) in enumerate(finished)], use)

    def start_events(self, rid: str, model: str, created: int, echo: str) -> list[dict]:
        return [completion_chunk(rid, model, created, echo, None)] if echo else []

    def piece_events(self, rid: str, model: str, created: int, text: str, finish: Optional[str]) -> list[dict]:
        return [completion_chunk(rid, model, created, text, finish)] if text or finish else []


class _Chat(Endpoint):
    def plan(self, req: ChatCompletionRequest) -> Plan:
        if req.tools or req.functions:
            raise bad_request("tools: tool and function calling are not supported by this server", "tools",
                              "unsupported_parameter")
        if req.logprobs:
            raise bad_request("logprobs: not supported by this server", "logprobs", "unsupported_parameter")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only {'type': 'text'} is supported", "response_format",
                              "unsupported_parameter")
        if req.stream and req.n > 1:
            raise bad_request("stream: streaming supports n=1", "n")
        messages = _messages(req)
        return Plan(inputs=[{"messages": messages}], n=req.n, max_tokens=req.max_completion_tokens or req.max_tokens,
                    safety_texts=[m["content"] for m in messages], stream=req.stream,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage), echo=[""])

    def response(self, rid: str, model: str, finished: list[tuple[str, str]], use: dict) -> dict:
        return chat_response(rid, model, [chat_choice(i, t, f) for i, (t, f) in enumerate(finished)], use)

    def start_events(self, rid: str, model: str, created: int, echo: str) -> list[dict]:
        return [chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None)]

    def piece_events(self, rid: str, model: str, created: int, text: str, finish: Optional[str]) -> list[dict]:
        return (([chat_chunk(rid, model, created, {"content": text}, None)] if text else [])
                + ([chat_chunk(rid, model, created, {}, finish)] if finish else []))


COMPLETIONS = _Completions("completions", CompletionRequest, "cmpl", "text_completion")
CHAT = _Chat("chat", ChatCompletionRequest, "chatcmpl", "chat.completion.chunk")


class OpenAIRoutes:
    """What the /v1 routes do; the ingress routes delegate here."""

    def __init__(self, models: ServedModels):
        self.models = models
        self.created = int(time.time())

    def list_models(self) -> dict:
        return {"object": "list", "data": [self._card(s) for s in self.models.specs.values()]}

    def get_model(self, name: str) -> dict:
        return self._card(self.models.get(name))

    def _card(self, spec: ModelSpec) -> dict:
        created = self.created
        if spec.registry_entry and spec.registry_entry.get("created"):
            try:
                from datetime import datetime

                created = int(datetime.fromisoformat(spec.registry_entry["created"]).timestamp())
            except ValueError:
                pass
        return model_card(spec.name, created, spec.uri, spec.base_uri)

    async def respond(self, endpoint: Union[_Completions, _Chat], body: bytes, ctx: RequestContext) -> Response:
        """The pipeline of both endpoints, from the request body to the response."""
        req = parse_body(body, endpoint.request_model)
        spec = self.models.get(req.model, ctx)
        require_generative(spec)
        if spec.task == "seq2seq" and isinstance(endpoint, _Chat):
            raise chat_refusal(spec.name)
        plan = endpoint.plan(req)
        self.models.check_fanout(spec, len(plan.inputs) * plan.n, "prompt" if len(plan.inputs) > 1 else "n")
        params = self.models.sampling_params(req, spec, plan.max_tokens)
        if spec.engine == "vllm":
            return await self._vllm(endpoint, spec, body, plan, ctx)
        rid = new_id(endpoint.id_prefix)
        if self.models.input_blocked(spec, plan.safety_texts):
            return self._blocked(endpoint, rid, spec.name, plan.stream, len(plan.inputs) * plan.n)
        gens = plan.requests(params)
        if plan.stream:
            first, stream = await self.models.open_stream(spec, gens[0])
            return event_stream(self._events(endpoint, spec, rid, first, stream, plan, ctx))
        results = await asyncio.gather(*(self.models.generate(spec, g) for g in gens))
        finished = [(plan.echo[i // plan.n] + text, finish)
                    for i, (text, finish) in enumerate(self.models.finish(spec, results))]
        use = usage(sum(r.prompt_tokens for r in results[::plan.n]), sum(r.completion_tokens for r in results))
        return JSONResponse(endpoint.response(rid, spec.name, finished, use),
                            headers={"x-llmos-batch-size": str(max(r.batch_size for r in results))})

    async def _events(self, endpoint, spec: ModelSpec, rid: str, first, stream, plan: Plan,
                      ctx: RequestContext) -> AsyncIterator[str]:
        created, last = int(time.time()), first
        try:
            for event in endpoint.start_events(rid, spec.name, created, plan.echo[0]):
                yield sse(event)
            async for text, finish, chunk in self.models.pieces(spec, first, stream, ctx):
                last = chunk
                for event in endpoint.piece_events(rid, spec.name, created, text, finish):
                    yield sse(event)
            if plan.include_usage:
                yield sse(usage_chunk(rid, spec.name, created, endpoint.chunk_object,
                                      usage(last.prompt_tokens, last.completion_tokens)))
        except Exception as e:
            yield sse(self.models.stream_error(e, spec).body())
        yield "data: [DONE]\n\n"

    def _blocked(self, endpoint, rid: str, model: str, stream: bool, n: int) -> Response:
        """The answer to a prompt the input safety rules block: empty output, finish_reason content_filter."""
        created = int(time.time())
        if stream:
            async def events():
                for event in (endpoint.start_events(rid, model, created, "")
                              + endpoint.piece_events(rid, model, created, "", "content_filter")):
                    yield sse(event)
                yield "data: [DONE]\n\n"
            return event_stream(events())
        return JSONResponse(endpoint.response(rid, model, [("", "content_filter")] * n, usage(0, 0)))

    async def _vllm(self, endpoint, spec: ModelSpec, body: bytes, plan: Plan, ctx: RequestContext) -> Response:
        from llmos_ray.serve import vllm

        data = read_json(body)
        if self.models.input_blocked(spec, [json.dumps(data.get("messages") or data.get("prompt"))]):
            return self._blocked(endpoint, new_id(endpoint.id_prefix), spec.name, plan.stream, 1)
        pieces = vllm.forward(self.models.handles[spec.name], endpoint.route, data)
        if not plan.stream:
            return JSONResponse(await pieces.__anext__())

        async def events():
            async for piece in pieces:
                yield piece if isinstance(piece, str) else sse(piece)
        return event_stream(events())


def _prompts(prompt) -> list[Union[str, list[int]]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        if m.role == "tool":
            raise bad_request(f"messages.{i}.role: tool messages are not supported (no tool calling)",
                              f"messages.{i}.role")
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages.{i}.content.{j}: only text parts are supported, got {part.type!r}",
                                      f"messages.{i}.content.{j}.type")
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _reseed(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n choices: same settings, a different (still reproducible) seed, within the seeds' range."""
    if i == 0 or params.seed is None:
        return params
    low, high = SEED_RANGE
    return SamplingParams(**{**params.__dict__, "seed": (params.seed + i - low) % (high - low) + low})

