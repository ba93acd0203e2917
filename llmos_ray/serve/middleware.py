"""What every HTTP request to the ingress goes through, whatever its route.

    request id    the X-Request-Id the request came with, else a new one (`current_request_id()`);
                  it names the request in error logs and comes back as a response header
    metrics       llmos_serve_requests{model, route, status} and the latency to the last byte
                  (streams included), for every route that declares `metered(route)`
    API keys      `Authorization: Bearer <key>` on metered routes (health probes stay open): the
                  key's record (`keys.KeyRecord`: name, tenant, models, apps, limits) goes into the
                  context; a key with limits is admitted by the usage meter (429 otherwise)
    usage         every request that reached a model or an app (or was refused with 429) becomes
                  one ledger row when it ended, streams included, also when the client went away
                  (`meter.Meter.record`): the handlers put the tokens into the context
    body limit    serve.max_request_bytes, checked as the body arrives (`request_body`)
    error shape   APIError -> OpenAI's {"error": {message, type, param, code}} on /v1 and
                  KServe's {"error": "..."} on /v2; an error no handler caught -> the same, 500;
                  FastAPI's own request errors -> the same, 400 (never its 422 {"detail"});
                  error bodies are ASCII JSON, so no text a client sent can break their encoding

`install(api)` adds the middleware and error handlers to the FastAPI app; a route opts into
metrics and keys with `dependencies=metered("route")` and reads its body with
`body: bytes = Depends(request_body)`. Behind Ray Serve's HTTP proxy, the proxy itself accepts or
generates X-Request-Id and returns it on every response (its own 503s included); this middleware
reads that id, and returns one itself only when no proxy put one on the request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos_ray.serve.keys import KeyRecord, Keyring
from llmos_ray.serve.metrics import get_metrics
from llmos_ray.serve.types import APIError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_STATE_KEY = "llmos"
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("llmos_request_id", default="-")


@dataclass
class RequestContext:
    """One request as the middleware and the handlers share it (in the ASGI scope's state)."""

    request_id: str
    t0: float
    """time.perf_counter() when the request arrived."""
    route: Optional[str] = None
    """The metrics route; None = not metered (health probes, unknown paths)."""
    model: str = "-"
    """The served model, once a handler has resolved it."""
    ttft_s: Optional[float] = None
    """Time to the first streamed text, once seen."""
    key: Optional[KeyRecord] = None
    """The caller's API key (None on an open server)."""
    app: str = "-"
    """The prompt app run, once resolved."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens of the request so far (a stream's grow as it goes): what the ledger records."""
    meter: Any = None
    """The ingress replica's `meter.Meter` (None = metering off)."""

    def charge(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The request's tokens so far (the same numbers as the response's `usage`)."""
        self.prompt_tokens, self.completion_tokens = int(prompt_tokens), int(completion_tokens)


def context(request: Request) -> RequestContext:
    return request.scope["state"][_STATE_KEY]


def current_request_id() -> str:
    """The id of the request being handled ('-' outside one)."""
    return _request_id.get()


class RequestMiddleware:
    """Pure ASGI (streams pass through untouched): request id and context, request metrics, and the
    error shape for an exception no handler caught."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        ctx = RequestContext(incoming or uuid.uuid4().hex, time.perf_counter())
        scope.setdefault("state", {})[_STATE_KEY] = ctx
        token = _request_id.set(ctx.request_id)
        status, started = 500, False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if incoming is None:
                    MutableHeaders(scope=message).append(REQUEST_ID_HEADER, ctx.request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            log.exception("request %s (%s %s) failed", ctx.request_id, scope["method"], scope["path"])
            if started:
                raise
            error = APIError(500, f"internal error: {type(e).__name__}: {e}", code="server_error")
            await error_response(scope["path"], error)(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
            if ctx.route is not None:
                _observe(ctx, status)
                if ctx.meter is not None and (ctx.model != "-" or ctx.app != "-" or status == 429):
                    ctx.meter.record(ctx, status)


def _observe(ctx: RequestContext, status: int) -> None:
    metrics = get_metrics()
    metrics.requests.inc(tags={"model": ctx.model, "route": ctx.route, "status": str(status)})
    metrics.latency.observe(time.perf_counter() - ctx.t0, tags={"model": ctx.model, "route": ctx.route})


# -- the error shape ---------------------------------------------------------------------------


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: whatever text a message quotes, it always encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(path: str, exc: APIError) -> JSONResponse:
    """KServe's {"error": message} under /v2, OpenAI's error object elsewhere."""
    v2 = "/v2/" in path or path.rstrip("/").endswith("/v2")
    return ErrorResponse({"error": exc.message} if v2 else exc.body(), status_code=exc.status, headers=exc.headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request.url.path, exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(request.url.path, APIError(exc.status_code, message,
                                                     code="not_found" if exc.status_code == 404 else None))


async def _request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = f"{param}: {first.get('msg', 'invalid request')}" if param else "invalid request"
    return error_response(request.url.path, APIError(400, message, param=param, code="invalid_value"))


def install(api: FastAPI) -> FastAPI:
    """Add the request middleware and the error handlers to `api`."""
    api.add_middleware(RequestMiddleware)
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _request_error)
    return api


# -- API keys and the body limit ---------------------------------------------------------------


class Guard:
    """The API keys (none = open), the usage meter (None = off) and the request size limit of one
    ingress replica."""

    def __init__(self, keys: list[KeyRecord], max_request_bytes: int, meter=None):
        self.keyring = Keyring(keys)
        self.max_request_bytes = max_request_bytes
        self.meter = meter

    def authenticate(self, request: Request) -> Optional[KeyRecord]:
        """The caller's key record (None on an open server); 401 for a missing or unknown key."""
        if self.keyring.open:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        record = self.keyring.find(token)
        if record is None:
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return record

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}",
                           code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        return bytes(body)


def _guard() -> Guard:
    """The Guard of the ingress replica serving this request. Serve finds the replica's Ingress
    instance this way to pass it as `self` to the route methods; its `guard` is built from the
    replica's config, environment and keys file."""
    from ray import serve

    return serve.get_replica_context().servable_object.guard


class _Metered:
    """The dependency `metered` adds. A module-level class, not a closure: Serve ships the app to
    its replicas by value, and FastAPI reads a dependency's signature there, in the replica."""

    def __init__(self, route: Union[str, Callable[[Request], str]], limited: bool = True):
        self.route, self.limited = route, limited

    async def __call__(self, request: Request) -> None:
        ctx = context(request)
        ctx.route = self.route(request) if callable(self.route) else self.route
        guard = _guard()
        ctx.key = guard.authenticate(request)
        ctx.meter = guard.meter
        if guard.meter is not None and self.limited:
            await guard.meter.admit(ctx.key)


def metered(route: Union[str, Callable[[Request], str]], limited: bool = True) -> list:
    """Route dependencies: count the request under `route` (a name, or a function of the request),
    require an API key and (`limited`) admit it under the key's limits."""
    return [Depends(_Metered(route, limited))]


async def request_body(request: Request) -> bytes:
    """The request body, at most serve.max_request_bytes (413 beyond)."""
    return await _guard().read_body(request)
