"""The Ray Serve deployment of one base model: `ModelServer` (an Engine fed by @serve.batch admissions,
with the LoRA adapters it holds beside the base: `adapter_host`) and `model_deployment(host)`, which
binds it with the host's replicas, autoscaling and capacity.

    handle = model_deployment(host, table)    # a bound deployment; the ingress calls, per request,
    await handle.generate.remote(GenerationRequest(...))          # -> Result | APIError
    async for chunk in handle.options(stream=True).generate_stream.remote(...)   # -> Chunk | APIError
    await handle.load_adapter.remote(AdapterRef(...))             # -> None | APIError (runtime LoRA)

A request's `adapter` (an AdapterRef, set by the ingress for a served adapter's name) picks the adapter
its rows decode with; rows of different adapters and of the base decode in one batch.

`@serve.batch` (max_batch_size, batch_wait_timeout_s) groups concurrent arrivals into one admission
to the engine; each request then streams `Chunk`s back as they are decoded. A client's mistake
comes back as an APIError value (not raised: no traceback in the replica log).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any, AsyncIterator, Optional, Union

from ray import serve

from llmos_ray.serve import embeddings, logprobs, prompting
from llmos_ray.serve.adapter_host import HostedAdapters
from llmos_ray.serve.engine import Engine
from llmos_ray.serve.loading import cluster_has_gpus
from llmos_ray.serve.metrics import get_metrics
from llmos_ray.serve.spec import Host, ModelSpec
from llmos_ray.serve.types import AdapterRef, APIError, Chunk, GenerationRequest, Result, result_of

log = logging.getLogger(__name__)


class ModelServer:
    """One base model's replica: an Engine fed by @serve.batch admissions, and the LoRA adapters beside
    the base (`adapters`: served name -> URI, configured; runtime ones followed in the adapter table
    `table`). Built into a deployment by `model_deployment(host)`."""

    def __init__(self, spec: dict, adapters: Optional[dict[str, str]] = None, table: Optional[str] = None):
        import torch

        self.spec = ModelSpec(**spec)
        torch.set_num_threads(max(1, int(self.spec.num_cpus)))
        self.engine = Engine.load(self.spec)
        self.adapters = HostedAdapters(self.engine, adapters or {}, table, self.spec.deployment_name)
        self.metrics = get_metrics()
        self._tags = {"model": self.spec.name}
        self._flusher: Optional[asyncio.Task] = None

        async def admit(items: list[tuple]) -> list:
            return self.engine.submit_many(items)

        admit.__name__ = f"admit_{self.spec.deployment_name}"
        self._admit = serve.batch(max_batch_size=self.spec.max_batch_size,
                                  batch_wait_timeout_s=self.spec.batch_wait_timeout_s)(admit)

    def _start_metrics(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics())

    async def _flush_metrics(self, period_s: float = 1.0) -> None:
        """Copy the engine's counters into Ray metrics once a second (no per-token work on the loop)."""
        m, tags = self.metrics, self._tags
        seen_tokens, seen_sizes, t_last = 0, collections.Counter(), time.perf_counter()
        while True:
            await asyncio.sleep(period_s)
            try:
                stats, now = self.engine.stats, time.perf_counter()
                tokens = stats["generated_tokens"]
                if tokens > seen_tokens:
                    m.generated_tokens.inc(tokens - seen_tokens, tags=tags)
                m.tokens_per_s.set((tokens - seen_tokens) / (now - t_last), tags=tags)
                sizes = collections.Counter(stats["batch_sizes"])
                for size, count in (sizes - seen_sizes).items():
                    for _ in range(min(count, 1000)):
                        m.batch_size.observe(size, tags=tags)
                load = self.engine.load_info()
                m.queue_depth.set(load["waiting"], tags=tags)
                m.running.set(load["running"], tags=tags)
                seen_tokens, seen_sizes, t_last = tokens, sizes, now
            except Exception:  # metrics must never take the replica down
                log.exception("metrics flush failed")

    async def info(self) -> dict[str, Any]:
        e = self.engine
        return {"name": self.spec.name, "context_length": e.context_length, "chat_template": e.has_chat_template,
                "device": str(e.device), "quantize": self.spec.quantize, "max_batch_size": e.max_batch_size}

    async def stats(self) -> dict[str, Any]:
        return {**self.engine.snapshot(), "pid": os.getpid()}

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError(f"the generation thread of model {self.spec.name!r} died")

    async def tokenize(self, prompt: Optional[str], messages: Optional[list], add_special_tokens: bool,
                       add_generation_prompt: bool, token_strs: bool,
                       adapter: Optional[AdapterRef] = None) -> Union[dict, APIError]:
        """/tokenize in vLLM's shape."""
        view = await self.adapters.view(adapter)
        if isinstance(view, APIError):
            return view
        try:
            ids = prompting.tokenize(view, prompt, messages, add_special_tokens, add_generation_prompt)
        except APIError as e:
            return e
        return {"count": len(ids), "max_model_len": self.engine.context_length, "tokens": ids,
                "token_strs": logprobs.token_texts(self.engine.tokenizer, ids) if token_strs else None}

    async def detokenize(self, ids: list[int], adapter: Optional[AdapterRef] = None) -> Union[str, APIError]:
        view = await self.adapters.view(adapter)
        if isinstance(view, APIError):
            return view
        bad = next((t for t in ids if not 0 <= t < self.engine.vocab_size), None)
        if bad is not None:
            return APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {self.engine.vocab_size})",
                            param="tokens", code="invalid_value")
        return view.tokenizer.decode(ids)

    async def load_adapter(self, ref: AdapterRef) -> Optional[APIError]:
        """Load a runtime LoRA adapter here (the ingress asks one replica; the others follow the table)."""
        return await self.adapters.load(ref)

    async def unload_adapter(self, adapter_id: str) -> bool:
        return self.adapters.unload(adapter_id)

    async def embed(self, inputs: list, adapter: Optional[AdapterRef] = None
                    ) -> Union[tuple[list[list[float]], int], APIError]:
        """(unit-length embeddings, tokens read) of texts or token-id lists (`embeddings.embed`), through
        the request's LoRA adapter if it names one."""
        e, batches = await self.adapters.view(adapter), []
        if isinstance(e, APIError):
            return e
        try:
            for i, item in enumerate(inputs):
                where = f"input.{i}" if len(inputs) > 1 else "input"
                ids = prompting.tokenize(e, item, None, True) if isinstance(item, str) else item
                bad = next((t for t in ids if not 0 <= t < e.vocab_size), None)
                if not ids or bad is not None or len(ids) > e.context_length:
                    why = (f"token id {bad} is outside the vocabulary [0, {e.vocab_size})" if bad is not None else
                           f"{len(ids)} tokens; model {e.name!r} reads at most {e.context_length}")
                    return APIError(400, f"{where}: {why}", param=where, code="invalid_value")
                batches.append(ids)
        except APIError as err:
            return err
        pooling, step, slot = self.spec.embedding_pooling, self.spec.max_batch_size, self.adapters.slot(adapter)
        vectors = []
        for k in range(0, len(batches), step):  # a thread: the event loop and the engine go on
            part = await asyncio.to_thread(self._embed, batches[k:k + step], pooling, slot)
            vectors += part.tolist()
        return vectors, sum(len(ids) for ids in batches)

    def _embed(self, batch: list[list[int]], pooling: str, slot: Optional[int]):
        e = self.engine
        if slot is None:  # the base alone runs beside the engine's steps
            return embeddings.embed(e.model, batch, pooling, e.pad_id)
        with e.step_lock, e.adapted([slot] * len(batch)):  # an adapter's deltas are changed between steps
            return embeddings.embed(e.model, batch, pooling, e.pad_id)

    async def _prepare(self, request: GenerationRequest):
        """(prompt ids, params, stop ids, adapter id) of a request, checked against its model (the engine
        or its adapter's view); raises APIError."""
        view = await self.adapters.view(request.adapter)
        if isinstance(view, APIError):
            raise view
        default = self.spec.default_max_tokens if request.messages is None else None
        ids, params, stop_ids = prompting.prepare(view, request, default)
        return ids, params, stop_ids, request.adapter.id if request.adapter is not None else None

    async def generate(self, request: GenerationRequest) -> Union[Result, APIError]:
        """The whole completion. A bad request comes back as an APIError value, not raised (no
        traceback in the replica log for a client's mistake)."""
        t0 = time.perf_counter()
        try:
            ids, params, stop_ids, adapter = await self._prepare(request)
        except APIError as e:
            return e
        self._start_metrics()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        chunks: list[Chunk] = []
        first: list[float] = []

        def sink(chunk: Chunk) -> None:  # scheduler thread; wakes the loop only at the end
            if not first:
                first.append(time.perf_counter() - t0)
            chunks.append(chunk)
            if chunk.finish_reason:
                loop.call_soon_threadsafe(_resolve, done, chunk)

        row = await self._admit((ids, params, sink, stop_ids, adapter))
        try:
            last = await done
        finally:
            if row.finish is None:
                self.engine.cancel(row)
        if last.error:
            return APIError(500, f"generation failed: {last.error}", code="generation_error")
        result = result_of(chunks, first[0] if first else 0.0)
        self._name(result.logprobs + (result.prompt_logprobs or []))
        if request.echo and request.prompt_token_ids is not None:
            result.prompt_text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        return result

    def _name(self, entries: list) -> None:
        if entries:
            logprobs.name_tokens(self.engine.tokenizer, entries)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[Union[Chunk, APIError]]:
        """Chunks as they are decoded (coalesced when the reader is slower than the model)."""
        try:
            prepared = await self._prepare(request)
        except APIError as e:
            yield e
            return
        async for chunk in self._chunks(prepared, coalesce=True):
            yield chunk

    async def _chunks(self, prepared, coalesce: bool = False) -> AsyncIterator[Union[Chunk, APIError]]:
        ids, params, stop_ids, adapter = prepared
        self._start_metrics()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        row = await self._admit((ids, params, lambda c: loop.call_soon_threadsafe(chunks.put_nowait, c), stop_ids,
                                 adapter))
        interval, sent_at = (self.spec.stream_interval_s if coalesce else 0.0), None
        try:
            while True:
                chunk = await chunks.get()
                # A slow reader gets fewer, larger pieces; so does every reader within stream_interval_s
                # of its previous chunk (one message per hop for several tokens, the first one at once).
                while coalesce and not chunk.finish_reason:
                    wait = 0.0 if sent_at is None else sent_at + interval - loop.time()
                    if chunks.empty() and wait <= 0:
                        break
                    try:
                        nxt = chunks.get_nowait() if not chunks.empty() else await asyncio.wait_for(chunks.get(), wait)
                    except asyncio.TimeoutError:
                        break
                    chunk = _joined(chunk, nxt)
                sent_at = loop.time()
                if chunk.error:
                    yield APIError(500, f"generation failed: {chunk.error}", code="generation_error")
                    return
                self._name(chunk.logprobs + (chunk.prompt_logprobs or []))
                yield chunk
                if chunk.finish_reason:
                    return
        finally:
            if row.finish is None:
                self.engine.cancel(row)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _joined(chunk: Chunk, nxt: Chunk) -> Chunk:
    """`nxt` carrying the text and log-probabilities of `chunk` before its own."""
    nxt.text = chunk.text + nxt.text
    nxt.logprobs = chunk.logprobs + nxt.logprobs
    nxt.prompt_logprobs = chunk.prompt_logprobs if nxt.prompt_logprobs is None else nxt.prompt_logprobs
    return nxt


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def deployment_options(spec: ModelSpec) -> dict[str, Any]:
    """Serve deployment options of one model's replicas (a generator's or a classifier's): name,
    capacity, CPUs/GPUs (a GPU when the spec asks for one, or on `auto` when the cluster has them),
    health checks, and fixed replicas or autoscaling."""
    num_gpus = spec.num_gpus
    if num_gpus is None:
        num_gpus = 1 if spec.device == "cuda" or (spec.device == "auto" and cluster_has_gpus()) else 0
    options: dict[str, Any] = dict(
        name=spec.deployment_name,
        max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=spec.max_queued_requests,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": num_gpus},
        health_check_period_s=5,
        graceful_shutdown_timeout_s=30,
    )
    if spec.min_replicas == spec.max_replicas:
        options["num_replicas"] = spec.max_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                                         "target_ongoing_requests": spec.target_ongoing_requests}
    return options


def model_deployment(host: Host, table: Optional[str] = None):
    """The bound Serve deployment of one base model and the adapters it holds (`spec.hosts`), with its
    autoscaling and capacity settings; runtime adapters are followed in adapter table `table`."""
    return serve.deployment(ModelServer).options(**deployment_options(host.spec)).bind(
        host.spec.to_dict(), host.adapters, table)
