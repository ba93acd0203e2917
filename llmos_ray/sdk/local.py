"""The in-process side of `LLM`: the server's Engine, loaded as a replica loads it, in this process.

A model reference resolves as `llmos serve` resolves it (`registry.resolve_source`); a training
checkpoint (a `checkpoint_*` folder, local or s3://) is exported once into the cache first
(`llmos export` does the same). Requests go through the same steps as over HTTP: the API's sampling
checks and max_tokens cap (`dispatch.ServedModels.sampling_params`), the engine's context checks
(`Engine.prepare`), completions defaulting to `default_max_tokens`, chat to the rest of the context.
"""

from __future__ import annotations

import difflib
import os
import queue
import time
from typing import Any, Iterator, Optional

from llmos_ray.errors import ConfigError, ModelError
from llmos_ray.sdk.types import AppResult, Completion, Messages, unsupported
from llmos_ray.serve.types import APIError, Chunk, GenerationRequest

OPTION_KEYS = ("device", "dtype", "quantize", "max_batch_size", "max_tokens_limit", "default_max_tokens",
               "trust_remote_code", "num_cpus")


class LocalBackend:
    where = "in-process"

    def __init__(self, engine, spec, registry: Optional[str]):
        self.engine, self.spec, self.registry = engine, spec, registry
        self.name = spec.name
        self.task = "causal_lm"
        self.context_length = engine.context_length

    @classmethod
    def load(cls, source: str, registry: Optional[str], options: dict[str, Any]) -> "LocalBackend":
        import torch

        from llmos_ray.registry import default_name, resolve_source
        from llmos_ray.serve.engine import Engine
        from llmos_ray.serve.spec import ModelSpec

        for key in options:
            if key not in OPTION_KEYS:
                close = difflib.get_close_matches(key, OPTION_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"LLM.from_pretrained: unknown option {key!r}{hint} "
                                  f"(options: {', '.join(OPTION_KEYS)})")
        uri, base, entry = resolve_source(exported(source), registry)
        uri = exported(uri)
        task = (entry or {}).get("task") or model_task(uri)
        if task != "causal_lm":
            raise ModelError(f"model {source!r} is a {task} model; in-process LLM runs text-generation (causal_lm) "
                             "models: serve it (`llmos serve`) and use LLM.connect")
        spec = ModelSpec(name=default_name(source, entry), uri=uri, base_uri=base, registry_entry=entry, **options)
        spec.validate("LLM.from_pretrained")
        if "num_cpus" in options:
            torch.set_num_threads(max(1, int(spec.num_cpus)))
        return cls(Engine.load(spec), spec, registry)

    # -- generation ----------------------------------------------------------------------------

    def _params(self, sampling: dict[str, Any]):
        from llmos_ray.serve.dispatch import ServedModels
        from llmos_ray.serve.protocol import SamplingFields
        from llmos_ray.serve.validation import validate

        fields = validate(sampling, SamplingFields)
        return ServedModels.sampling_params(fields, self.spec, fields.max_tokens)

    def _submit(self, requests: list[GenerationRequest], default_max_tokens: Optional[int]) -> list[queue.Queue]:
        prepared = [self.engine.prepare(r, default_max_tokens) for r in requests]  # every check before any runs
        sinks: list[queue.Queue] = [queue.Queue() for _ in requests]
        self.engine.submit_many([(ids, params, q.put, stop) for (ids, params, stop), q in zip(prepared, sinks)])
        return sinks

    def complete(self, prompts: list[str], sampling: dict[str, Any]) -> list[Completion]:
        params = self._params(sampling)
        sinks = self._submit([GenerationRequest(params=params, prompt=p) for p in prompts],
                             self.spec.default_max_tokens)
        return [_collect(q) for q in sinks]

    def chat(self, messages: Messages, sampling: dict[str, Any]) -> Completion:
        (q,) = self._submit([GenerationRequest(params=self._params(sampling), messages=messages)], None)
        return _collect(q)

    def stream(self, prompt: Optional[str], messages: Optional[Messages], sampling: dict[str, Any]) -> Iterator[str]:
        request = GenerationRequest(params=self._params(sampling), prompt=prompt, messages=messages)
        ids, params, stop = self.engine.prepare(request, self.spec.default_max_tokens if messages is None else None)
        chunks: queue.Queue = queue.Queue()
        row = self.engine.submit(ids, params, chunks.put, stop)

        def pieces() -> Iterator[str]:
            try:
                while True:
                    chunk: Chunk = chunks.get()
                    if chunk.error:
                        raise APIError(500, f"generation failed: {chunk.error}", code="generation_error")
                    if chunk.text:
                        yield chunk.text
                    if chunk.finish_reason:
                        return
            finally:
                if row.finish is None:
                    self.engine.cancel(row)

        return pieces()

    def count_tokens(self, messages: Messages) -> int:
        from llmos_ray.serve.prompting import render_chat

        return len(self.engine.tokenizer.encode(render_chat(self.engine, messages), add_special_tokens=False))

    # -- apps ----------------------------------------------------------------------------------

    def apps(self) -> list[dict[str, Any]]:
        from llmos_ray.serve.app_store import list_apps

        return [s.describe() for s in list_apps(self.registry)]

    def app(self, ref: str, params: dict[str, Any], sampling: dict[str, Any]) -> AppResult:
        """An app run as POST /v1/apps/{ref} runs it, on this model."""
        from llmos_ray.serve import app_store
        from llmos_ray.serve.prompt_apps import response
        from llmos_ray.serve.protocol import usage

        try:
            spec = app_store.get(ref, self.registry)
        except ConfigError as e:
            raise APIError(404, str(e), param="app", code="app_not_found") from None
        need = spec.requires
        if need.get("task", self.task) != self.task or need.get("min_context", 0) > self.context_length:
            raise APIError(400, f"model: app {spec.name!r} needs {need}; {self.name!r} is {self.task} with a context "
                                f"of {self.context_length} tokens", param="model", code="model_not_suitable")
        messages = spec.render(params)
        if spec.blocks_input(messages):
            text, finish, use = "", "content_filter", usage(0, 0)
        else:
            out = self.chat(messages, {**spec.sampling, **sampling})
            text, finish = spec.screen_output(out.text, out.finish_reason)
            use = usage(out.prompt_tokens, out.completion_tokens)
        return AppResult.from_response(response(spec, self.name, text, finish, use))

    # -- other tasks -----------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        """As /v1/embeddings: the last hidden state pooled (spec.embedding_pooling), unit length."""
        from llmos_ray.serve.embeddings import embed

        ids = [self.engine.tokenizer.encode(t) for t in texts]
        return embed(self.engine.model, ids, self.spec.embedding_pooling, self.engine.pad_id).tolist()

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        raise unsupported(self, "classify", "a classification model (serve one and use LLM.connect)")

    def close(self) -> None:
        self.engine.shutdown()


def _collect(chunks: "queue.Queue[Chunk]") -> Completion:
    from llmos_ray.serve.engine import collect_sync

    result = collect_sync(chunks, time.perf_counter())
    return Completion(result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens)


def model_task(uri: str) -> str:
    """The task of a model directory or URI (config.json's architectures); causal_lm when it cannot tell."""
    from llmos_ray.registry import model_task_of

    return model_task_of(uri)


def exported(source: str) -> str:
    """`source`, or for a training checkpoint (llmos_state.json, no config.json; local or fsspec) a
    Hugging Face export of it in the cache, made once."""
    import fsspec

    from llmos_ray.storage import cache_dir, is_remote, local_path

    try:
        fs, path = fsspec.core.url_to_fs(source if is_remote(source) else local_path(source))
        is_checkpoint = fs.isfile(f"{path.rstrip('/')}/llmos_state.json") and \
            not fs.isfile(f"{path.rstrip('/')}/config.json")
    except (OSError, ValueError, ImportError):
        return source
    if not is_checkpoint:
        return source
    out = cache_dir("exports", source)
    if not os.path.isfile(os.path.join(out, "config.json")):
        from llmos_ray.train.checkpoint import export

        export(source, out)
    return out

