"""The served models as the ingress sees them, shared by the OpenAI, KServe v2 and prompt-app routes.

    models = ServedModels(specs, handles, retry_after_s)
    spec = models.get(name, ctx)                          # 404 naming the served models
    params = models.sampling_params(fields, spec, max_tokens)   # the server's max_tokens cap
    models.check_fanout(spec, count, "prompt")            # 400 for more completions than it can ever admit
    if models.input_blocked(spec, texts): ...             # input safety rules
    result = await models.generate(spec, request)         # a replica that died is retried
    [(text, finish)] = models.finish(spec, [result])      # output safety rules
    first, stream = await models.open_stream(spec, request)
    async for text, finish, chunk in models.pieces(spec, first, stream, ctx): ...   # same rules

Replica failures map to APIErrors here: capacity -> 503 + Retry-After, a dead replica -> retried
(RETRIES attempts) then 503, anything else -> 500, logged with the request id.

A LoRA adapter on a shared base is a served name whose spec has an `adapter_id`: its requests go to
its host deployment's handle with an AdapterRef (`GenerationRequest.adapter`, or `adapter=` for the
other replica methods). Adapters loaded at run time join the names here as the application's adapter
table says (`follow`: a long poll, so every ingress replica sees a load or unload in about one round
trip); they take the per-model settings of the first model of their host (safety rules included).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, AsyncIterator, Optional

from llmos_ray.serve.adapter_table import TableFollower
from llmos_ray.serve.keys import KeyRecord
from llmos_ray.serve.metrics import get_metrics
from llmos_ray.serve.middleware import RequestContext, current_request_id
from llmos_ray.serve.protocol import SamplingFields
from llmos_ray.serve.safety import OutputFilter, SafetyPolicy
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import AdapterRef, APIError, GenerationRequest, Result, SamplingParams, bad_request
from llmos_ray.serve.validation import shown

log = logging.getLogger(__name__)

RETRIES = 4  # attempts when a replica dies under a request (0.5, 1, 2 s apart) while Serve replaces it
MAX_FANOUT = 64
"""At most this many completions (prompts x n, or a v2 infer batch) in one HTTP request."""


class ServedModels:
    """Names -> specs, deployment handles and safety policies; generation with retries and safety."""

    def __init__(self, specs: list[dict[str, Any]], handles: dict[str, Any], retry_after_s: int,
                 adapter_table: Optional[str] = None):
        self.specs = {s["name"]: ModelSpec(**s) for s in specs}
        self.handles = dict(handles)
        self.retry_after_s = retry_after_s
        self.transformers = [n for n, s in self.specs.items() if s.engine == "transformers"]
        self._stream = {n: handles[n].options(method_name="generate_stream", stream=True) for n in self.transformers}
        self.safety = {name: SafetyPolicy.from_spec(spec) for name, spec in self.specs.items()}
        self.metrics = get_metrics()
        self._ready: set[str] = set()
        self.configured = set(self.specs)
        self.hosts = {s.host: handles[s.name] for s in self.specs.values() if s.host}
        """Generation deployment name -> its handle."""
        self._first = {}
        self.bases: dict[str, ModelSpec] = {}
        """Base model (its normalised URI) -> the first served model of a deployment that holds it shared."""
        for spec in self.specs.values():
            self._first.setdefault(spec.host, spec)
            if spec.host and (spec.adapter_id or spec.base_uri is None):
                self.bases.setdefault(normalised(spec.base_uri if spec.adapter_id else spec.uri), spec)
        self.runtime: dict[str, dict[str, Any]] = {}
        """Served name -> adapter table record, for the adapters loaded at run time."""
        self.table_name = adapter_table
        self._follower = TableFollower(adapter_table, "ingress", f"ingress-{os.getpid()}-{id(self)}")

    def get(self, name: Any, ctx: Optional[RequestContext] = None, param: str = "model",
            key: Optional[KeyRecord] = None) -> ModelSpec:
        """The spec of served model `name` (404 naming `param` otherwise); counted under it in `ctx`.
        A model the caller's key (`key`, else ctx.key) may not use is a 404 like a model that is not
        served: the message names only the models the key may use."""
        # Names are only ever dictionary keys here: a name is never turned into a path.
        self.follow()
        key = key if key is not None or ctx is None else ctx.key
        if not isinstance(name, str) or name not in self.specs or (key is not None and not key.allows_model(name)):
            raise APIError(404, f"model {shown(name)} does not exist; served models: {', '.join(self.visible(key))}",
                           param=param, code="model_not_found")
        if ctx is not None:
            ctx.model = name
        return self.specs[name]

    def visible(self, key: Optional[KeyRecord]) -> list[str]:
        """The served models key `key` may use (all when None)."""
        self.follow()
        return [n for n in self.specs if key is None or key.allows_model(n)]

    # -- LoRA adapters on a shared base ----------------------------------------------------------

    @staticmethod
    def adapter_ref(spec: ModelSpec) -> Optional[AdapterRef]:
        """What names `spec`'s adapter to its host's replicas (None: not an adapter on a shared base)."""
        return AdapterRef(spec.name, spec.uri, spec.adapter_id) if spec.adapter_id else None

    def table(self):
        """The application's adapter table actor."""
        return self._follower.table()

    def add_runtime(self, record: dict[str, Any]) -> None:
        """Serve a runtime adapter (an adapter table record) under its name, on its host."""
        template, handle = self._first.get(record["host"]), self.hosts.get(record["host"])
        if template is None or handle is None:
            log.warning("adapter table names deployment %s, which this ingress does not know", record["host"])
            return
        name = record["name"]
        self.specs[name] = spec = dataclasses.replace(template, name=name, uri=record["uri"], base_uri=record["base"],
                                                      registry_entry=None, adapter_id=record["id"])
        self.handles[name], self._stream[name] = handle, self._stream[template.name]
        self.safety[name], self.runtime[name] = SafetyPolicy.from_spec(spec), record

    def drop_runtime(self, name: str) -> None:
        if self.runtime.pop(name, None) is not None:
            for table in (self.specs, self.handles, self._stream, self.safety):
                table.pop(name, None)

    def sync(self, records: dict[str, dict[str, Any]]) -> None:
        """Serve exactly the runtime adapters of the table's `records`."""
        for name, record in list(self.runtime.items()):
            if records.get(name, {}).get("id") != record["id"]:
                self.drop_runtime(name)
        for name, record in records.items():
            if name not in self.runtime and name not in self.configured:
                self.add_runtime(record)

    def follow(self, now: bool = False) -> None:
        """Follow the adapter table from now on (once; on this replica's event loop, not outside one);
        `now`: read the whole table first, before this returns (when the ingress replica starts)."""
        self._follower.start(self._changed, self.sync if now else None)

    async def _changed(self, records: dict[str, dict[str, Any]]) -> None:
        self.sync(records)

    @staticmethod
    def sampling_params(fields: SamplingFields, spec: ModelSpec, max_tokens: Optional[int],
                        default: Optional[int] = None) -> SamplingParams:
        """The sampling settings of a request. The one place the server's max_tokens cap applies to
        HTTP requests: a max_tokens above spec.max_tokens_limit is a 400; a `default` (a prompt
        app's) is lowered to it."""
        if max_tokens is None and default is not None:
            max_tokens = min(default, spec.max_tokens_limit)
        if max_tokens is not None and max_tokens > spec.max_tokens_limit:
            raise bad_request(f"max_tokens: {max_tokens} is above this server's limit of {spec.max_tokens_limit}",
                              "max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                              seed=fields.seed, stop=list(fields.stop or []), presence_penalty=fields.presence_penalty,
                              frequency_penalty=fields.frequency_penalty,
                              logit_bias=fields.logit_bias, ignore_eos=fields.ignore_eos, min_tokens=fields.min_tokens)

    @staticmethod
    def admission_limit(spec: ModelSpec) -> int:
        """The most generations of one request that model `spec` can ever hold at once: what its
        replicas run or hold (max_replicas x max_ongoing_requests) plus the queue in front of them,
        and at most MAX_FANOUT."""
        held = spec.max_replicas * spec.max_ongoing_requests
        return min(MAX_FANOUT, held + spec.max_queued_requests if spec.max_queued_requests > 0 else MAX_FANOUT)

    def check_fanout(self, spec: ModelSpec, count: int, param: str) -> None:
        """A 400 (not a 503 that invites a retry) for a request of more generations than model
        `spec` will ever admit at once."""
        limit = self.admission_limit(spec)
        if count > limit:
            why = ("this server's limit per request" if limit == MAX_FANOUT else
                   f"what model {spec.name!r} can ever hold at once: {spec.max_replicas} replica(s) x "
                   f"max_ongoing_requests {spec.max_ongoing_requests} + max_queued_requests {spec.max_queued_requests}")
            raise bad_request(f"{param}: this request asks for {count} completions; at most {limit} fit ({why}); "
                              "send them in smaller requests", param, "too_many_completions")

    # -- safety --------------------------------------------------------------------------------

    def input_blocked(self, spec: ModelSpec, texts: list[str]) -> bool:
        """Whether the input safety rules of `spec` block these texts (counted when they do)."""
        if self.safety[spec.name].blocks_input("\n".join(texts)):
            self.metrics.safety_blocks.inc(tags={"model": spec.name, "direction": "input"})
            return True
        return False

    def _output_filter(self, spec: ModelSpec) -> Optional[OutputFilter]:
        policy = self.safety[spec.name]
        return policy.output_filter() if policy.filters_output else None

    def _screen(self, spec: ModelSpec, filt: Optional[OutputFilter], text: str,
                finish: Optional[str]) -> tuple[str, Optional[str]]:
        """The output safety rules, for a whole text or one streamed piece (the last has a finish)."""
        if filt is None:
            return text, finish
        text = filt.feed(text, final=finish is not None)
        if filt.finish is not None:
            finish = filt.finish
            if finish == "content_filter":
                self.metrics.safety_blocks.inc(tags={"model": spec.name, "direction": "output"})
        return text, finish

    def finish(self, spec: ModelSpec, results: list[Result]) -> list[tuple[str, str]]:
        """(text, finish_reason) per whole result after the output safety rules."""
        out = [self._screen(spec, self._output_filter(spec), r.text, r.finish_reason) for r in results]
        if results:  # measured in the replica, from admission to the first text
            self.metrics.ttft.observe(min(r.ttft_s for r in results), tags={"model": spec.name})
        return out

    # -- generation ----------------------------------------------------------------------------

    def error(self, exc: BaseException, spec: ModelSpec) -> Optional[APIError]:
        """Map an exception from a model deployment to an APIError; None = worth retrying."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
            exc = exc.cause
        if isinstance(exc, APIError):
            return APIError(exc.status, exc.message, exc.param, exc.code, exc.headers)
        if isinstance(exc, BackPressureError):
            return APIError(503, f"model {spec.name!r} is at capacity; retry after {self.retry_after_s} s",
                            code="model_overloaded", headers={"Retry-After": str(self.retry_after_s)})
        if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
            return None
        if isinstance(exc, DeploymentUnavailableError):
            return APIError(503, f"model {spec.name!r} is not available right now", code="model_unavailable",
                            headers={"Retry-After": str(self.retry_after_s)})
        log.exception("request %s to model %s failed", current_request_id(), spec.name, exc_info=exc)
        return APIError(500, f"model {spec.name!r} failed: {type(exc).__name__}: {exc}", code="server_error")

    def stream_error(self, exc: BaseException, spec: ModelSpec) -> APIError:
        """The error to send as the last event of a stream that broke."""
        if isinstance(exc, APIError):
            return exc
        return self.error(exc, spec) or APIError(503, "the model replica died mid-stream")

    def _no_replica(self, spec: ModelSpec) -> APIError:
        return APIError(503, f"model {spec.name!r} has no live replica; retry later", code="model_unavailable",
                        headers={"Retry-After": str(self.retry_after_s)})

    async def _retry_or_raise(self, exc: Exception, spec: ModelSpec, attempt: int) -> None:
        err = self.error(exc, spec)
        if err is not None:
            raise err from None
        log.warning("request %s: a replica of model %s died during it; retrying (%d)", current_request_id(),
                    spec.name, attempt + 1)
        if attempt + 1 < RETRIES:
            await asyncio.sleep(0.5 * 2 ** attempt)

    async def generate(self, spec: ModelSpec, gen: GenerationRequest) -> Result:
        """One non-streamed generation; a replica that died under it is retried on another one."""
        return await self._call(spec, "generate", dataclasses.replace(gen, adapter=self.adapter_ref(spec)))

    async def call(self, spec: ModelSpec, method: str, *args) -> Any:
        """A method of a model's replica (tokenize, embed ...; `adapter=` names a shared-base adapter); a
        replica that died under it is retried on another one; an APIError it returns is raised."""
        ref = self.adapter_ref(spec)
        return await self._call(spec, method, *args, **({"adapter": ref} if ref is not None else {}))

    async def _call(self, spec: ModelSpec, method: str, *args, **kwargs) -> Any:
        for attempt in range(RETRIES):
            try:
                result = await getattr(self.handles[spec.name], method).remote(*args, **kwargs)
            except Exception as e:
                await self._retry_or_raise(e, spec, attempt)
                continue
            if isinstance(result, APIError):
                raise result
            return result
        raise self._no_replica(spec)

    async def open_stream(self, spec: ModelSpec, gen: GenerationRequest):
        """(first chunk, the rest): errors before the first token still become HTTP errors."""
        gen = dataclasses.replace(gen, adapter=self.adapter_ref(spec))
        for attempt in range(RETRIES):
            stream = self._stream[spec.name].remote(gen)
            try:
                first = await stream.__anext__()
            except Exception as e:
                await self._retry_or_raise(e, spec, attempt)
                continue
            if isinstance(first, APIError):
                stream.cancel()
                raise first
            return first, stream
        raise self._no_replica(spec)

    async def pieces(self, spec: ModelSpec, first, stream,
                     ctx: RequestContext) -> AsyncIterator[tuple[str, Optional[str], Any]]:
        """(text, finish_reason, chunk) after the output safety rules; closes the upstream stream early."""
        filt = self._output_filter(spec)
        chunk, done = first, False
        try:
            while True:
                ctx.charge(chunk.prompt_tokens, chunk.completion_tokens)
                text, finish = self._screen(spec, filt, chunk.text, chunk.finish_reason)
                if text and ctx.ttft_s is None:
                    ctx.ttft_s = time.perf_counter() - ctx.t0
                    self.metrics.ttft.observe(ctx.ttft_s, tags={"model": spec.name})
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

    # -- state of the replicas -----------------------------------------------------------------

    async def ready(self, name: str) -> bool:
        """Whether model `name` has answered a health check (once it has, it stays ready here)."""
        if name not in self._ready:
            try:
                await asyncio.wait_for(self.handles[name].check_health.remote(), 2.0)
                self._ready.add(name)
            except Exception:
                return False
        return True

    async def stats(self) -> dict[str, Any]:
        """Each transformers model's engine counters (from one of its replicas)."""
        snaps = await asyncio.gather(*(self.handles[n].stats.remote() for n in self.transformers),
                                     return_exceptions=True)
        return {n: (s if not isinstance(s, BaseException) else {"error": str(s)})
                for n, s in zip(self.transformers, snaps)}


def normalised(uri: str) -> str:
    """A model URI as bases are compared: local paths resolved, remote ones without a trailing '/'."""
    return uri.rstrip("/") if "://" in uri else os.path.realpath(os.path.expanduser(uri))
