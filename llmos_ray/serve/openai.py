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
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Optional, Union

from fastapi.responses import JSONResponse, Response

from llmos_ray.serve import structured, tools
from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.logprobs import chat_logprobs, completion_logprobs, text_length
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
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
    echo: list[Optional[str]]
    """Text put before each input's choices (completions' echo), '' otherwise; None: the prompt's
    token ids as text (the replica's Result.prompt_text)."""
    logprobs: Optional[int] = None
    """Report logprobs with this many alternatives per token (None = off)."""
    prompt_logprobs: bool = False
    """Report the prompt's logprobs too (completions' echo)."""
    grammar: Optional[str] = None
    """Constrain the output to this grammar (`structured`: response_format, a forced tool call)."""
    tool_calls: Optional[bool] = None
    """Parse tool calls from the output (None = no): True = the whole output is one forced call."""

    def requests(self, params: SamplingParams) -> list[GenerationRequest]:
        """n generation requests per input, input-major; the i-th choice gets seed + i."""
        params = replace(params, logprobs=self.logprobs, grammar=self.grammar,
                         prompt_logprobs=self.logprobs if self.prompt_logprobs else None)
        return [GenerationRequest(params=_reseed(params, i), **inp) for inp in self.inputs for i in range(self.n)]

    def echo_text(self, i: int, result) -> str:
        """The echo of the i-th choice's input ('' without echo)."""
        echo = self.echo[i // self.n]
        return (result.prompt_text or "") if echo is None else echo


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
        if req.suffix:
            raise bad_request("suffix: not supported by this server", "suffix", "unsupported_parameter")
        if req.best_of not in (None, req.n):
            raise bad_request("best_of: only best_of == n is supported", "best_of", "unsupported_parameter")
        prompts = _prompts(req.prompt)
        if req.stream and req.echo and not isinstance(prompts[0], str):
            raise bad_request("echo: a streamed echo needs the prompt as text, not token ids", "echo")
        return Plan(inputs=[{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p, "echo": req.echo}
                            for p in prompts],
                    n=req.n, max_tokens=req.max_tokens, safety_texts=[p for p in prompts if isinstance(p, str)],
                    stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    echo=[(p if isinstance(p, str) else None) if req.echo else "" for p in prompts],
                    logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None)

    def choice(self, index: int, text: str, finish: Optional[str], result, plan: Plan) -> dict:
        echo = plan.echo_text(index, result)
        out = completion_choice(index, echo + text, finish)
        if plan.logprobs is not None and finish != "content_filter":
            scored = ((result.prompt_logprobs or []) if plan.prompt_logprobs else []) + result.logprobs
            out["logprobs"] = completion_logprobs(scored)
        return out

    def response(self, rid: str, model: str, choices: list[dict], use: dict) -> dict:
        return completion_response(rid, model, choices, use)

    def start_events(self, rid: str, model: str, created: int, plan: Plan, first,
                     index: int = 0) -> tuple[list[dict], int]:
        """The events before the first piece, and the text offset the pieces' logprobs start at."""
        echo = plan.echo[index // plan.n]
        if not echo:
            return [], 0
        event = completion_chunk(rid, model, created, echo, None, index)
        if plan.prompt_logprobs and first is not None and first.prompt_logprobs is not None:
            event["choices"][0]["logprobs"] = completion_logprobs(first.prompt_logprobs)
        return [event], len(echo)

    def piece_events(self, rid: str, model: str, created: int, text: str, finish: Optional[str],
                     scored: Optional[list], offset: int, index: int = 0) -> tuple[list[dict], int]:
        if not (text or finish):
            return [], offset
        event = completion_chunk(rid, model, created, text, finish, index)
        if scored is not None:
            event["choices"][0]["logprobs"] = completion_logprobs(scored, offset)
            offset += text_length(scored)
        return [event], offset


class _Chat(Endpoint):
    def plan(self, req: ChatCompletionRequest) -> Plan:
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(req, name) is not None:
                raise bad_request(f"{name}: not supported by this server" + (
                    " (deprecated by OpenAI: send tools)" if name.startswith("function") else ""), name,
                    "unsupported_parameter")
        if req.modalities not in (None, ["text"]):
            raise bad_request("modalities: this server answers text only", "modalities", "unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs: requires logprobs: true", "top_logprobs")
        schema = structured.schema_of(req.response_format)
        tool_specs = tools.parse_tools(req.tools, req.tool_choice)
        forced = tools.forced_schema(tool_specs, req.tool_choice)
        if forced is not None and schema is not None:
            raise bad_request("response_format: cannot be combined with a forced tool_choice", "response_format")
        messages = chat_messages(req.messages)
        schema = forced if forced is not None else schema
        return Plan(inputs=[{"messages": messages, "tools": tool_specs}], n=req.n,
                    max_tokens=req.max_completion_tokens or req.max_tokens,
                    safety_texts=[m["content"] for m in messages], stream=req.stream,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage), echo=[""],
                    logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                    grammar=structured.json_grammar(schema, "tools" if forced else "response_format")
                    if schema is not None else None,
                    tool_calls=None if not tool_specs or req.tool_choice == "none" else forced is not None)

    def choice(self, index: int, text: str, finish: Optional[str], result, plan: Plan) -> dict:
        out = chat_choice(index, text, finish)
        if plan.logprobs is not None and finish != "content_filter":
            out["logprobs"] = chat_logprobs(result.logprobs)
        if plan.tool_calls is not None and finish != "content_filter":
            content, calls = tools.parse_calls(text, plan.tool_calls)
            if calls:
                out["message"].update(content=content, tool_calls=calls)
                out["finish_reason"] = "tool_calls" if finish == "stop" else finish
        return out

    def response(self, rid: str, model: str, choices: list[dict], use: dict) -> dict:
        return chat_response(rid, model, choices, use)

    def call_events(self, rid: str, model: str, created: int, text: str, finish: str, plan: Plan,
                    index: int = 0) -> list[dict]:
        """The end of a stream with tools: the whole text's tool calls as one delta (or its content)."""
        choice = self.choice(index, text, finish, None, replace(plan, logprobs=None))
        calls = choice["message"].get("tool_calls")
        if not calls:
            return self.piece_events(rid, model, created, text, finish, None, 0, index)[0]
        delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
        if choice["message"]["content"]:
            delta["content"] = choice["message"]["content"]
        return [chat_chunk(rid, model, created, delta, None, index),
                chat_chunk(rid, model, created, {}, choice["finish_reason"], index)]

    def start_events(self, rid: str, model: str, created: int, plan: Plan, first,
                     index: int = 0) -> tuple[list[dict], int]:
        return [chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None, index)], 0

    def piece_events(self, rid: str, model: str, created: int, text: str, finish: Optional[str],
                     scored: Optional[list], offset: int, index: int = 0) -> tuple[list[dict], int]:
        events = []
        if text or scored:
            events.append(chat_chunk(rid, model, created, {"content": text}, None, index))
            if scored is not None:
                events[-1]["choices"][0]["logprobs"] = chat_logprobs(scored)
        if finish:
            events.append(chat_chunk(rid, model, created, {}, finish, index))
        return events, offset


COMPLETIONS = _Completions("completions", CompletionRequest, "cmpl", "text_completion")
CHAT = _Chat("chat", ChatCompletionRequest, "chatcmpl", "chat.completion.chunk")


class OpenAIRoutes:
    """What the /v1 routes do; the ingress routes delegate here."""

    def __init__(self, models: ServedModels):
        self.models = models
        self.created = int(time.time())

    def list_models(self, key=None) -> dict:
        """The models the caller's key may use (all on an open server)."""
        return {"object": "list", "data": [self._card(self.models.specs[n]) for n in self.models.visible(key)]}

    def get_model(self, name: str, key=None) -> dict:
        return self._card(self.models.get(name, key=key))

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
            opened = await _open_all(self.models, spec, gens)
            return event_stream(self._events(endpoint, spec, rid, opened, plan, ctx))
        results = await asyncio.gather(*(self.models.generate(spec, g) for g in gens))
        choices = [endpoint.choice(i, text, finish, results[i], plan)
                   for i, (text, finish) in enumerate(self.models.finish(spec, results))]
        use = usage(sum(r.prompt_tokens for r in results[::plan.n]), sum(r.completion_tokens for r in results))
        ctx.charge(use["prompt_tokens"], use["completion_tokens"])
        return JSONResponse(endpoint.response(rid, spec.name, choices, use),
                            headers={"x-llmos-batch-size": str(max(r.batch_size for r in results))})

    async def _events(self, endpoint, spec: ModelSpec, rid: str, opened: list, plan: Plan,
                      ctx: RequestContext) -> AsyncIterator[str]:
        """The SSE stream of every choice (interleaved as they decode, each event with its index),
        then the usage chunk and [DONE]."""
        created, last = int(time.time()), [first for first, _ in opened]
        choices = [self._choice_events(endpoint, spec, rid, created, first, stream, plan, ctx, i, last)
                   for i, (first, stream) in enumerate(opened)]
        try:
            async for event in (choices[0] if len(choices) == 1 else _merged(choices)):
                yield sse(event)
            if plan.include_usage:
                yield sse(usage_chunk(rid, spec.name, created, endpoint.chunk_object,
                                      usage(sum(c.prompt_tokens for c in last[::plan.n]),
                                            sum(c.completion_tokens for c in last))))
        except Exception as e:
            yield sse(self.models.stream_error(e, spec).body())
        finally:
            for c in choices:
                await c.aclose()  # each closes its upstream stream (ServedModels.pieces)
        yield "data: [DONE]\n\n"

    async def _choice_events(self, endpoint, spec: ModelSpec, rid: str, created: int, first, stream, plan: Plan,
                             ctx: RequestContext, index: int, last: list) -> AsyncIterator[dict]:
        """The events of one choice; its newest chunk goes to last[index] (for usage)."""
        events, offset = endpoint.start_events(rid, spec.name, created, plan, first, index)
        for event in events:
            yield event
        held = [] if plan.tool_calls is not None else None  # tool calls are parsed from the whole text
        async for text, finish, chunk in self.models.pieces(spec, first, stream, ctx):
            last[index] = chunk
            # pieces() charged this choice's tokens; the request's are every choice's (as its usage)
            ctx.charge(sum(c.prompt_tokens for c in last[::plan.n]), sum(c.completion_tokens for c in last))
            if held is not None:
                held.append(text)
                for event in (endpoint.call_events(rid, spec.name, created, "".join(held), finish, plan, index)
                              if finish else []):
                    yield event
                continue
            scored = chunk.logprobs if plan.logprobs is not None and finish != "content_filter" else None
            events, offset = endpoint.piece_events(rid, spec.name, created, text, finish, scored, offset, index)
            for event in events:
                yield event

    def _blocked(self, endpoint, rid: str, model: str, stream: bool, n: int) -> Response:
        """The answer to a prompt the input safety rules block: empty output, finish_reason content_filter."""
        created = int(time.time())
        if stream:
            async def events():
                quiet = Plan([], 1, None, [], True, False, [""])
                for event in (endpoint.start_events(rid, model, created, quiet, None)[0]
                              + endpoint.piece_events(rid, model, created, "", "content_filter", None, 0)[0]):
                    yield sse(event)
                yield "data: [DONE]\n\n"
            return event_stream(events())
        quiet = Plan([], n, None, [], False, False, [""] * n)
        return JSONResponse(endpoint.response(rid, model, [endpoint.choice(i, "", "content_filter", None, quiet)
                                                           for i in range(n)], usage(0, 0)))

    async def _vllm(self, endpoint, spec: ModelSpec, body: bytes, plan: Plan, ctx: RequestContext) -> Response:
        from llmos_ray.serve import vllm

        data = read_json(body)
        if self.models.input_blocked(spec, [json.dumps(data.get("messages") or data.get("prompt"))]):
            return self._blocked(endpoint, new_id(endpoint.id_prefix), spec.name, plan.stream, 1)
        pieces = vllm.forward(self.models.handles[spec.name], endpoint.route, data)
        if not plan.stream:
            answer = await pieces.__anext__()
            use = answer.get("usage") if isinstance(answer, dict) else None
            if isinstance(use, dict):  # charged as our own engine's answers are (streams from vLLM: not yet)
                ctx.charge(use.get("prompt_tokens") or 0, use.get("completion_tokens") or 0)
            return JSONResponse(answer)

        async def events():
            async for piece in pieces:
                yield piece if isinstance(piece, str) else sse(piece)
        return event_stream(events())


async def _merged(streams: list) -> AsyncIterator[dict]:
    """The items of several async iterators as they come; the first error ends it (the rest are closed)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it) -> None:
        try:
            async for item in it:
                await queue.put(item)
            await queue.put(done)
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(it)) for it in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _open_all(models: ServedModels, spec: ModelSpec, gens: list[GenerationRequest]) -> list:
    """Every choice's (first chunk, stream), opened together (rows of one batch); an error before
    the first token of any is the request's HTTP error, and the others are cancelled."""
    opened = await asyncio.gather(*(models.open_stream(spec, g) for g in gens), return_exceptions=True)
    failed = next((o for o in opened if isinstance(o, BaseException)), None)
    if failed is not None:
        for o in opened:
            if not isinstance(o, BaseException):
                o[1].cancel()
        raise failed
    return opened


def _prompts(prompt) -> list[Union[str, list[int]]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages as the engine takes them ({role, content, tool_calls?, tool_call_id?}), or a
    400 naming what we do not support."""
    out = []
    for i, m in enumerate(messages):
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
        out.append(tools.message_dict("system" if m.role == "developer" else m.role, content, m.tool_calls,
                                      m.tool_call_id, m.name))
    return out


def _reseed(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n choices: same settings, a different (still reproducible) seed, within the seeds' range."""
    if i == 0 or params.seed is None:
        return params
    low, high = SEED_RANGE
    return SamplingParams(**{**params.__dict__, "seed": (params.seed + i - low) % (high - low) + low})

