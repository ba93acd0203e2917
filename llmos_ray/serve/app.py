"""The HTTP ingress (OpenAI API + KServe v2) and `build_app`, the Serve application builder.

    from llmos_ray.serve.app import build_app
    app = build_app(config)           # Config, ServeConfig, or a dict (see `as_config`)
    serve.run(app)

`build_app` is also the `import_path` of a Serve config file (`llmos serve --emit-config`):
`llmos_ray.serve.app:build_app`, whose `args` are config sections ({serve: ..., registry: ...}).

One `ModelServer` deployment per model (own replicas, autoscaling, capacity) sits behind one
ingress deployment that authenticates, validates, routes by the request's `model`, applies
safety rules, turns capacity limits into 503 + Retry-After, and records metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos_ray.config import Config, ServeConfig, all_keys, from_dict, load_config
from llmos_ray.errors import ConfigError
from llmos_ray.schema import set_dotted, yaml_value
from llmos_ray.serve import apps, kserve
from llmos_ray.serve.replica import model_deployment
from llmos_ray.serve.safety import SafetyPolicy
from llmos_ray.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    chat_choice,
    chat_chunk,
    chat_response,
    completion_choice,
    completion_chunk,
    completion_response,
    model_card,
    new_id,
    parse_body,
    usage,
    usage_chunk,
)
from llmos_ray.serve.spec import ModelSpec, resolve_models
from llmos_ray.serve.types import APIError, GenerationRequest, Result, SamplingParams, bad_request

log = logging.getLogger(__name__)

API_KEYS_ENV = "LLMOS_API_KEYS"
RETRIES = 4  # attempts when a replica dies under a request (0.5, 1, 2 s apart) while Serve replaces it

api = FastAPI(title="llmos-ray", description="OpenAI-compatible and KServe v2 text generation on Ray Serve",
              version="1")


def _is_v2(request: Request) -> bool:
    return "/v2/" in request.url.path or request.url.path.rstrip("/").endswith("/v2")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    body = {"error": exc.message} if _is_v2(request) else exc.body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return await _api_error(request, APIError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                              else None))


def resolve_api_keys(keys: list[str], keys_file: Optional[str]) -> list[str]:
    """Keys from the config, $LLMOS_API_KEYS (comma separated) and the keys file, in that order."""
    found = [k.strip() for k in keys if k.strip()]
    found += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if keys_file:
        try:
            with open(os.path.expanduser(keys_file)) as f:
                found += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise ConfigError(f"serve.api_keys_file {keys_file!r} cannot be read: {e}") from None
    return list(dict.fromkeys(found))


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Ingress:
    """Routes, validates and meters requests; the model replicas do the generation."""

    def __init__(self, settings: dict[str, Any], specs: list[dict[str, Any]], handles: dict[str, Any]):
        from llmos_ray.serve.metrics import get_metrics

        self.settings = settings
        self.specs = {s["name"]: ModelSpec(**s) for s in specs}
        self.handles = handles
        transformers_models = [n for n, s in self.specs.items() if s.engine == "transformers"]
        self._generate_handles = {n: handles[n].options(method_name="generate") for n in transformers_models}
        self._stream_handles = {n: handles[n].options(method_name="generate_stream", stream=True)
                                for n in transformers_models}
        self.safety = {name: SafetyPolicy.from_spec(spec) for name, spec in self.specs.items()}
        self.keys = [k.encode() for k in resolve_api_keys(settings["api_keys"], settings.get("api_keys_file"))]
        self.created = int(time.time())
        self.metrics = get_metrics()
        self._ready: set[str] = set()
        log.info("ingress for models %s; API keys %s", list(self.specs), "required" if self.keys else "not required")

    # -- plumbing ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(token, k) for k in self.keys):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        limit = self.settings["max_request_bytes"]
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}",
                           code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        return bytes(body)

    def _spec(self, name: Any, param: str = "model") -> ModelSpec:
        # Names are only ever dictionary keys here: a name is never turned into a path.
        if not isinstance(name, str) or name not in self.specs:
            raise APIError(404, f"model {name!r} does not exist; served models: {', '.join(self.specs)}",
                           param=param, code="model_not_found")
        return self.specs[name]

    def _observe(self, route: str, model: str, status: int, t0: float) -> None:
        self.metrics.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.metrics.latency.observe(time.perf_counter() - t0, tags={"model": model, "route": route})

    async def _metered(self, request: Request, route: str, work) -> Response:
        """Run `work(body, ctx)` with auth, body limits, error mapping and request metrics."""
        t0 = time.perf_counter()
        ctx: dict[str, Any] = {"model": "-", "t0": t0, "route": route}
        status = 500
        try:
            self._auth(request)
            body = await self._body(request) if request.method == "POST" else b""
            response = await work(body, ctx)
            status = response.status_code
            return response
        except APIError as e:
            status = e.status
            raise
        finally:
            if not ctx.get("streaming"):
                self._observe(route, ctx["model"], status, t0)

    def _params(self, req: SamplingFields, spec: ModelSpec, max_tokens: Optional[int]) -> SamplingParams:
        if max_tokens is not None and max_tokens > spec.max_tokens_limit:
            raise bad_request(f"max_tokens: {max_tokens} is above this server's limit of {spec.max_tokens_limit}",
                              "max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop=list(req.stop or []), presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty,
                              logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
                              ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)

    def _error(self, exc: BaseException, spec: ModelSpec) -> Optional[APIError]:
        """Map an exception from a model deployment to an APIError; None = worth retrying."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
            exc = exc.cause
        if isinstance(exc, APIError):
            return APIError(exc.status, exc.message, exc.param, exc.code, exc.headers)
        if isinstance(exc, BackPressureError):
            return APIError(503, f"model {spec.name!r} is at capacity; retry after {self.settings['retry_after_s']} s",
                            code="model_overloaded", headers={"Retry-After": str(self.settings["retry_after_s"])})
        if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
            return None
        if isinstance(exc, DeploymentUnavailableError):
            return APIError(503, f"model {spec.name!r} is not available right now", code="model_unavailable",
                            headers={"Retry-After": str(self.settings["retry_after_s"])})
        log.exception("request to model %s failed", spec.name, exc_info=exc)
        return APIError(500, f"model {spec.name!r} failed: {type(exc).__name__}: {exc}", code="server_error")

    async def _generate(self, spec: ModelSpec, gen: GenerationRequest) -> Result:
        """One non-streamed generation; a replica that died under it is retried on another one."""
        for attempt in range(RETRIES):
            try:
                result = await self._generate_handles[spec.name].remote(gen)
            except Exception as e:
                err = self._error(e, spec)
                if err is not None:
                    raise err from None
                log.warning("replica of model %s died during a request; retrying (%d)", spec.name, attempt + 1)
                if attempt + 1 < RETRIES:
                    await asyncio.sleep(0.5 * 2 ** attempt)
                continue
            if isinstance(result, APIError):
                raise result
            return result
        raise APIError(503, f"model {spec.name!r} has no live replica; retry later", code="model_unavailable",
                       headers={"Retry-After": str(self.settings["retry_after_s"])})

    async def _open_stream(self, spec: ModelSpec, gen: GenerationRequest):
        """(first chunk, the rest): errors before the first token still become HTTP errors."""
        for attempt in range(RETRIES):
            stream = self._stream_handles[spec.name].remote(gen)
            try:
                first = await stream.__anext__()
            except Exception as e:
                err = self._error(e, spec)
                if err is not None:
                    raise err from None
                if attempt + 1 < RETRIES:
                    await asyncio.sleep(0.5 * 2 ** attempt)
                continue
            if isinstance(first, APIError):
                stream.cancel()
                raise first
            return first, stream
        raise APIError(503, f"model {spec.name!r} has no live replica; retry later", code="model_unavailable",
                       headers={"Retry-After": str(self.settings["retry_after_s"])})

    async def _pieces(self, spec: ModelSpec, first, stream, ctx) -> AsyncIterator[tuple[str, Optional[str], Any]]:
        """(text, finish_reason, chunk) after the safety filter; closes the upstream stream early."""
        policy = self.safety[spec.name]
        filt = policy.output_filter() if policy.filters_output else None
        chunk, done = first, False
        try:
            while True:
                text, finish = chunk.text, chunk.finish_reason
                if filt is not None:
                    text = filt.feed(text, final=finish is not None)
                    if filt.finish is not None:
                        finish = filt.finish
                        if finish == "content_filter":
                            self.metrics.safety_blocks.inc(tags={"model": spec.name, "direction": "output"})
                if text and "ttft" not in ctx:
                    ctx["ttft"] = time.perf_counter() - ctx["t0"]
                    self.metrics.ttft.observe(ctx["ttft"], tags={"model": spec.name})
                yield text, finish, chunk
                if finish is not None:
                    done = chunk.finish_reason is not None
                    return
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    done = True
                    return
                if isinstance(chunk, APIError):
                    done = True
                    raise chunk
        finally:
            if not done:
                stream.cancel()

    def _stream_response(self, events: AsyncIterator[str], ctx: dict) -> StreamingResponse:
        ctx["streaming"] = True
        route, model, t0 = ctx["route"], ctx["model"], ctx["t0"]

        async def body():
            try:
                async for event in events:
                    yield event
            finally:
                self._observe(route, model, 200, t0)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _stream_error(self, exc: BaseException, spec: ModelSpec) -> dict:
        err = exc if isinstance(exc, APIError) else (self._error(exc, spec) or
                                                     APIError(503, "the model replica died mid-stream"))
        return err.body()

    def _finish_results(self, spec: ModelSpec, results: list[Result], ctx: dict) -> list[tuple[str, str]]:
        """(text, finish_reason) per result after the output safety rules."""
        policy = self.safety[spec.name]
        out = []
        for r in results:
            text, finish = r.text, r.finish_reason
            if policy.filters_output:
                filt = policy.output_filter()
                text = filt.feed(text, final=True)
                if filt.finish is not None:
                    finish = filt.finish
                    if finish == "content_filter":
                        self.metrics.safety_blocks.inc(tags={"model": spec.name, "direction": "output"})
            out.append((text, finish))
        if results:  # measured in the replica, from admission to the first text
            self.metrics.ttft.observe(min(r.ttft_s for r in results), tags={"model": spec.name})
        return out

    def _input_blocked(self, spec: ModelSpec, texts: list[str]) -> bool:
        if self.safety[spec.name].blocks_input("\n".join(texts)):
            self.metrics.safety_blocks.inc(tags={"model": spec.name, "direction": "input"})
            return True
        return False

    # -- OpenAI API --------------------------------------------------------------------------

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(self.specs)})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        async def work(body, ctx):
            return JSONResponse({"object": "list", "data": [self._card(s) for s in self.specs.values()]})
        return await self._metered(request, "models", work)

    @api.get("/v1/models/{name:path}")
    async def get_model(self, name: str, request: Request) -> Response:
        async def work(body, ctx):
            return JSONResponse(self._card(self._spec(name)))
        return await self._metered(request, "models", work)

    def _card(self, spec: ModelSpec) -> dict:
        created = self.created
        if spec.registry_entry and spec.registry_entry.get("created"):
            try:
                from datetime import datetime

                created = int(datetime.fromisoformat(spec.registry_entry["created"]).timestamp())
            except ValueError:
                pass
        return model_card(spec.name, created, spec.uri, spec.base_uri)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._metered(request, "completions", self._completions)

    async def _completions(self, body: bytes, ctx: dict) -> Response:
        req = parse_body(body, CompletionRequest)
        spec = self._spec(req.model)
        ctx["model"] = spec.name
        if req.logprobs:
            raise bad_request("logprobs: not supported by this server", "logprobs", "unsupported_parameter")
        if req.suffix:
            raise bad_request("suffix: not supported by this server", "suffix", "unsupported_parameter")
        if req.best_of not in (None, req.n):
            raise bad_request("best_of: only best_of == n is supported", "best_of", "unsupported_parameter")
        prompts = _prompts(req.prompt)
        if len(prompts) * req.n > 64:
            raise bad_request("prompt: at most 64 completions (prompts x n) per request", "prompt")
        if req.stream and len(prompts) * req.n > 1:
            raise bad_request("stream: streaming supports one prompt with n=1", "stream")
        params = self._params(req, spec, req.max_tokens)
        if spec.engine == "vllm":
            return await self._vllm(spec, "completions", body, req.stream, ctx)
        rid, model = new_id("cmpl"), spec.name
        if self._input_blocked(spec, [p for p in prompts if isinstance(p, str)]):
            return self._blocked(rid, model, "completion", req.stream, len(prompts) * req.n, ctx)
        gens = [GenerationRequest(params=_reseed(params, i), **({"prompt": p} if isinstance(p, str)
                                                                 else {"prompt_token_ids": p}))
                for p in prompts for i in range(req.n)]
        echo = [(p if isinstance(p, str) else "") if req.echo else "" for p in prompts for _ in range(req.n)]
        if req.stream:
            first, stream = await self._open_stream(spec, gens[0])
            return self._stream_response(self._completion_events(spec, rid, first, stream, echo[0], req, ctx), ctx)
        results = await asyncio.gather(*(self._generate(spec, g) for g in gens))
        finished = self._finish_results(spec, results, ctx)
        choices = [completion_choice(i, echo[i] + text, finish) for i, (text, finish) in enumerate(finished)]
        use = usage(sum(r.prompt_tokens for r in results[::req.n]), sum(r.completion_tokens for r in results))
        return JSONResponse(completion_response(rid, model, choices, use),
                            headers={"x-llmos-batch-size": str(max(r.batch_size for r in results))})

    async def _completion_events(self, spec, rid, first, stream, echo, req, ctx) -> AsyncIterator[str]:
        created, last = int(time.time()), first
        try:
            if echo:
                yield _sse(completion_chunk(rid, spec.name, created, echo, None))
            async for text, finish, chunk in self._pieces(spec, first, stream, ctx):
                last = chunk
                if text or finish:
                    yield _sse(completion_chunk(rid, spec.name, created, text, finish))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(usage_chunk(rid, spec.name, created, "text_completion",
                                       usage(last.prompt_tokens, last.completion_tokens)))
        except Exception as e:
            yield _sse(self._stream_error(e, spec))
        yield "data: [DONE]\n\n"

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._metered(request, "chat", self._chat)

    async def _chat(self, body: bytes, ctx: dict) -> Response:
        req = parse_body(body, ChatCompletionRequest)
        spec = self._spec(req.model)
        ctx["model"] = spec.name
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
        params = self._params(req, spec, req.max_completion_tokens or req.max_tokens)
        if spec.engine == "vllm":
            return await self._vllm(spec, "chat", body, req.stream, ctx)
        rid = new_id("chatcmpl")
        if self._input_blocked(spec, [m["content"] for m in messages]):
            return self._blocked(rid, spec.name, "chat", req.stream, req.n, ctx)
        gens = [GenerationRequest(params=_reseed(params, i), messages=messages) for i in range(req.n)]
        if req.stream:
            first, stream = await self._open_stream(spec, gens[0])
            return self._stream_response(self._chat_events(spec, rid, first, stream, req, ctx), ctx)
        results = await asyncio.gather(*(self._generate(spec, g) for g in gens))
        finished = self._finish_results(spec, results, ctx)
        choices = [chat_choice(i, text, finish) for i, (text, finish) in enumerate(finished)]
        use = usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
        return JSONResponse(chat_response(rid, spec.name, choices, use),
                            headers={"x-llmos-batch-size": str(max(r.batch_size for r in results))})

    async def _chat_events(self, spec, rid, first, stream, req, ctx) -> AsyncIterator[str]:
        created, last = int(time.time()), first
        try:
            yield _sse(chat_chunk(rid, spec.name, created, {"role": "assistant", "content": ""}, None))
            async for text, finish, chunk in self._pieces(spec, first, stream, ctx):
                last = chunk
                if text:
                    yield _sse(chat_chunk(rid, spec.name, created, {"content": text}, None))
                if finish:
                    yield _sse(chat_chunk(rid, spec.name, created, {}, finish))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(usage_chunk(rid, spec.name, created, "chat.completion.chunk",
                                       usage(last.prompt_tokens, last.completion_tokens)))
        except Exception as e:
            yield _sse(self._stream_error(e, spec))
        yield "data: [DONE]\n\n"

    def _blocked(self, rid: str, model: str, kind: str, stream: bool, n: int, ctx: dict) -> Response:
        """The answer to a prompt the input safety rules block: empty output, finish_reason content_filter."""
        created = int(time.time())
        if stream:
            async def events():
                if kind == "chat":
                    yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
                    yield _sse(chat_chunk(rid, model, created, {}, "content_filter"))
                else:
                    yield _sse(completion_chunk(rid, model, created, "", "content_filter"))
                yield "data: [DONE]\n\n"
            return self._stream_response(events(), ctx)
        if kind == "chat":
            return JSONResponse(chat_response(rid, model, [chat_choice(i, "", "content_filter") for i in range(n)],
                                              usage(0, 0)))
        return JSONResponse(completion_response(rid, model, [completion_choice(i, "", "content_filter")
                                                             for i in range(n)], usage(0, 0)))

    async def _vllm(self, spec: ModelSpec, kind: str, body: bytes, stream: bool, ctx: dict) -> Response:
        from llmos_ray.serve import vllm

        data = json.loads(body)
        text = json.dumps(data.get("messages") or data.get("prompt"))
        if self._input_blocked(spec, [text]):
            rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
            return self._blocked(rid, spec.name, "chat" if kind == "chat" else "completion", stream, 1, ctx)
        pieces = vllm.forward(self.handles[spec.name], kind, data)
        if not stream:
            return JSONResponse(await pieces.__anext__())

        async def events():
            async for piece in pieces:
                yield piece if isinstance(piece, str) else _sse(piece)
        return self._stream_response(events(), ctx)

    # -- stats and ready-made apps -----------------------------------------------------------

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> Response:
        async def work(body, ctx):
            names = [n for n, s in self.specs.items() if s.engine == "transformers"]
            snaps = await asyncio.gather(*(self.handles[n].stats.remote() for n in names), return_exceptions=True)
            return JSONResponse({"models": {n: (s if not isinstance(s, BaseException) else {"error": str(s)})
                                            for n, s in zip(names, snaps)}})
        return await self._metered(request, "stats", work)

    @api.get("/v1/apps")
    async def list_apps(self, request: Request) -> Response:
        async def work(body, ctx):
            return JSONResponse(apps.catalog())
        return await self._metered(request, "apps", work)

    @api.post("/v1/apps/{app}")
    async def run_app(self, app: str, request: Request) -> Response:
        async def work(body, ctx):
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(data, dict):
                raise APIError(400, "request body must be a JSON object", code="invalid_json")
            messages, defaults = apps.render(app, data)
            spec = self._spec(data.get("model"))
            ctx["model"] = spec.name
            sampling = parse_body(json.dumps({**defaults, **{k: v for k, v in data.items()
                                                             if k in SamplingFields.model_fields}}), SamplingFields)
            if "max_tokens" not in data:
                sampling.max_tokens = min(sampling.max_tokens, spec.max_tokens_limit)
            params = self._params(sampling, spec, sampling.max_tokens)
            rid = new_id("app")
            if self._input_blocked(spec, [m["content"] for m in messages]):
                result = Result("", "content_filter", 0, 0, 0, 0.0)
                text, finish = "", "content_filter"
            else:
                result = await self._generate(spec, GenerationRequest(params=params, messages=messages))
                (text, finish), = self._finish_results(spec, [result], ctx)
            return JSONResponse({"id": rid, "object": "app.completion", "created": int(time.time()), "app": app,
                                 "model": spec.name, "output": text, "finish_reason": finish,
                                 "usage": usage(result.prompt_tokens, result.completion_tokens)})
        return await self._metered(request, f"apps/{app}" if app in apps.APPS else "apps", work)

    # -- KServe v2 ---------------------------------------------------------------------------

    @api.get("/v2/health/live")
    async def v2_live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    @api.get("/v2/health/ready")
    async def v2_ready(self, request: Request) -> Response:
        ready = all(await asyncio.gather(*(self._model_ready(n) for n in self.specs)))
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def _model_ready(self, name: str) -> bool:
        if name not in self._ready:
            try:
                await asyncio.wait_for(self.handles[name].check_health.remote(), 2.0)
                self._ready.add(name)
            except Exception:
                return False
        return True

    @api.get("/v2")
    async def v2_server(self, request: Request) -> Response:
        from llmos_ray import __version__

        async def work(body, ctx):
            return JSONResponse({"name": "llmos-ray", "version": __version__,
                                 "extensions": ["binary_tensor_data", "generate"]})
        return await self._metered(request, "v2", work)

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def v2_model(self, name: str, request: Request, version: str = "1") -> Response:
        async def work(body, ctx):
            return JSONResponse(kserve.model_metadata(self._spec(name, "name").name))
        return await self._metered(request, "v2/metadata", work)

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(self, name: str, request: Request, version: str = "1") -> Response:
        async def work(body, ctx):
            spec = self._spec(name, "name")
            ready = await self._model_ready(spec.name)
            return JSONResponse({"name": spec.name, "ready": ready}, status_code=200 if ready else 503)
        return await self._metered(request, "v2/ready", work)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(self, name: str, request: Request, version: str = "1") -> Response:
        async def work(body, ctx):
            spec = self._spec(name, "name")
            ctx["model"] = spec.name
            parsed = kserve.parse_infer(body, request.headers.get("inference-header-content-length"))
            params = self._v2_params(parsed.sampling, spec)
            if self._input_blocked(spec, parsed.texts):
                texts, finishes, results = [""] * len(parsed.texts), ["content_filter"] * len(parsed.texts), []
            else:
                results = await asyncio.gather(*(self._generate(spec, GenerationRequest(params=params, prompt=t))
                                                 for t in parsed.texts))
                texts, finishes = map(list, zip(*self._finish_results(spec, results, ctx))) if results else ([], [])
            payload, headers = kserve.infer_response(
                spec.name, parsed.id, texts, "text_output" in parsed.binary_outputs,
                {"finish_reason": ",".join(finishes),
                 "completion_tokens": sum(r.completion_tokens for r in results)})
            if results:
                headers["x-llmos-batch-size"] = str(max(r.batch_size for r in results))
            return Response(payload, headers=headers)
        return await self._metered(request, "v2/infer", work)

    def _v2_params(self, raw: dict, spec: ModelSpec) -> SamplingParams:
        try:
            fields = SamplingFields.model_validate(raw)
        except Exception as e:
            first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
            param = "parameters." + ".".join(str(p) for p in first["loc"])
            raise bad_request(f"{param}: {first['msg']}", param) from None
        return self._params(fields, spec, fields.max_tokens)

    def _v2_generate_request(self, body: bytes, spec: ModelSpec) -> tuple[GenerationRequest, dict]:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict) or not isinstance(data.get("text_input"), str):
            raise bad_request("text_input: a string is required", "text_input")
        raw = {**{k: v for k, v in data.items() if k in kserve.SAMPLING_KEYS}, **(data.get("parameters") or {})}
        return GenerationRequest(params=self._v2_params(raw, spec), prompt=data["text_input"]), data

    @api.post("/v2/models/{name}/generate")
    async def v2_generate(self, name: str, request: Request) -> Response:
        async def work(body, ctx):
            spec = self._spec(name, "name")
            ctx["model"] = spec.name
            gen, _ = self._v2_generate_request(body, spec)
            if self._input_blocked(spec, [gen.prompt]):
                return JSONResponse({"model_name": spec.name, "model_version": "1", "text_output": "",
                                     "finish_reason": "content_filter"})
            result = await self._generate(spec, gen)
            (text, finish), = self._finish_results(spec, [result], ctx)
            return JSONResponse({"model_name": spec.name, "model_version": "1", "text_output": text,
                                 "finish_reason": finish, "usage": usage(result.prompt_tokens,
                                                                          result.completion_tokens)},
                                headers={"x-llmos-batch-size": str(result.batch_size)})
        return await self._metered(request, "v2/generate", work)

    @api.post("/v2/models/{name}/generate_stream")
    async def v2_generate_stream(self, name: str, request: Request) -> Response:
        async def work(body, ctx):
            spec = self._spec(name, "name")
            ctx["model"] = spec.name
            gen, _ = self._v2_generate_request(body, spec)
            if self._input_blocked(spec, [gen.prompt]):
                async def blocked():
                    yield _sse({"model_name": spec.name, "model_version": "1", "text_output": "",
                                "finish_reason": "content_filter"})
                return self._stream_response(blocked(), ctx)
            first, stream = await self._open_stream(spec, gen)

            async def events():
                try:
                    async for text, finish, _ in self._pieces(spec, first, stream, ctx):
                        if text or finish:
                            yield _sse({"model_name": spec.name, "model_version": "1", "text_output": text,
                                        **({"finish_reason": finish} if finish else {})})
                except Exception as e:
                    yield _sse({"error": self._stream_error(e, spec)["error"]["message"]})
            return self._stream_response(events(), ctx)
        return await self._metered(request, "v2/generate_stream", work)


IngressDeployment = serve.ingress(api)(Ingress)


# ---------------------------------------------------------------------------------------------
# Building the application


def as_config(config: Union[Config, ServeConfig, dict, str, None]) -> Config:
    """A Config from what `build_app` accepts:

    - a Config, or a ServeConfig (other sections default);
    - a path to a YAML config file;
    - a dict of config sections ({serve: {...}, registry: {...}}), optionally with `config` (a
      YAML path) and `overrides` (a list of 'a.b=c'), as in a Serve config file's `args`;
    - a flat dict of serve keys, as `serve run llmos_ray.serve.app:build_app models=DIR port=8000`
      passes them (string values are read as YAML).
    """
    if isinstance(config, Config):
        return config.resolved()
    if isinstance(config, ServeConfig):
        return Config(serve=config).resolved()
    if isinstance(config, str):
        return load_config(config).resolved()
    raw = dict(config or {})
    path = raw.pop("config", None)
    overrides = list(raw.pop("overrides", None) or [])
    sections = {f.split(".")[0] for f in all_keys()}
    serve_keys = {k.split(".", 1)[1] for k in all_keys() if k.startswith("serve.")} | {"model_options"}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in serve_keys:
            flat[f"serve.{key}"] = yaml_value(value, key)
        elif "." in key and key.split(".")[0] in sections:
            flat[key] = yaml_value(value, key)
        else:
            raise ConfigError(f"build_app: unknown argument {key!r}; pass config sections (serve, registry), "
                              f"serve keys ({', '.join(sorted(serve_keys)[:6])}, ...), 'config' or 'overrides'")
    raw = load_config(path, overrides).to_dict()
    for key, value in flat.items():
        set_dotted(raw, key, value)
    return from_dict(raw).validate().resolved()


def build_app(config: Union[Config, ServeConfig, dict, str, None] = None):
    """The Serve application: one deployment per model behind the HTTP ingress."""
    cfg = as_config(config)
    specs = resolve_models(cfg)
    handles = {}
    for spec in specs:
        if spec.engine == "vllm":
            from llmos_ray.serve.vllm import vllm_deployment

            handles[spec.name] = vllm_deployment(spec)
        else:
            handles[spec.name] = model_deployment(spec)
    s = cfg.serve
    settings = {"api_keys": resolve_api_keys(s.api_keys, s.api_keys_file), "api_keys_file": s.api_keys_file,
                "max_request_bytes": s.max_request_bytes, "retry_after_s": s.retry_after_s}
    from ray.serve.config import BackpressureConfig

    ingress = serve.deployment(IngressDeployment).options(
        name="ingress", max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=s.ingress_max_ongoing_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(settings, [spec.to_dict() for spec in specs], handles)


def emit_config(config: Config, path: Optional[str] = None) -> str:
    """A Serve config file (YAML) for `serve run`, `serve deploy` and a KubeRay RayService's
    serveConfigV2; written to `path` when given."""
    import yaml

    s = config.serve
    args = {"serve": {**config.to_dict()["serve"], "models": [_absolute(m) for m in s.models]},
            "registry": config.to_dict()["registry"]}
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{"name": s.app_name, "route_prefix": s.route_prefix,
                          "import_path": "llmos_ray.serve.app:build_app", "args": args}],
    }
    text = ("# llmos-ray Serve config. Run: `serve run FILE` (local) or `serve deploy FILE` (cluster);\n"
            "# for KubeRay paste `applications` under a RayService's spec.serveConfigV2.\n"
            "# API keys: prefer LLMOS_API_KEYS in runtime_env.env_vars or serve.api_keys_file to keys in this file.\n"
            + yaml.safe_dump(doc, sort_keys=False))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return text


def _absolute(item: str) -> str:
    """Relative local paths in serve.models become absolute, so the file works from any directory."""
    from llmos_ray.serve.spec import _split

    name, source = _split(item)
    if "://" not in source and os.path.isdir(os.path.expanduser(source)):
        source = os.path.abspath(os.path.expanduser(source))
    return f"{name}={source}" if name else source


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
    """The i-th of n choices: same settings, a different (still reproducible) seed."""
    if i == 0 or params.seed is None:
        return params
    return SamplingParams(**{**params.__dict__, "seed": params.seed + i})
