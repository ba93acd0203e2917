"""The Ray Serve replica of an encoder-decoder (an export of finetune.task=seq2seq, a hub T5):
static batches of concurrent requests, one batched `model.generate` per batch.

    handle = seq2seq_deployment(spec)    # a bound deployment with the generator's interface:
    await handle.generate.remote(GenerationRequest(prompt=source))    # -> Result | APIError
    async for chunk in handle.options(stream=True).generate_stream.remote(...)   # -> Chunk | APIError

So /v1/completions (prompt = the source text), KServe v2 `generate`/`infer` and streaming reach
it through the same ingress routes as a causal LM; chat requests are a 400 saying why (an
encoder-decoder has no chat template: it maps one source text to one target), and the prompt
apps send it their `text` parameter as the source (`app_source`) instead of chat messages.

Batching: `@serve.batch` (max_batch_size, batch_wait_timeout_s) gathers concurrent arrivals; the
batch's greedy requests run as one `generate` (the encoder once per request, right-padded under
its attention mask; decoder steps batched across the requests) for the longest max_tokens asked,
each row cut to its own; a row's greedy output does not depend on the other rows, so it equals
the request served alone. A sampled request (temperature > 0) runs alone, seeded by its `seed`.
Static, not continuous: a batch finishes together, and a stream gets its text as one chunk.
A source is the model's training task prefix (finetune.task_prefix in its llmos_config.yaml)
followed by the prompt, unless the prompt already starts with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Union

from ray import serve

from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, Chunk, GenerationRequest, Result, SamplingParams, bad_request

log = logging.getLogger(__name__)

UNSUPPORTED = ("logit_bias", "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos")
"""Sampling fields the seq2seq engine does not implement: a request that sets one is a 400."""


def chat_refusal(name: str) -> APIError:
    return bad_request(f"model {name!r} is a seq2seq (encoder-decoder) model: it maps one source text to one target "
                       "(a translation, a summary) and has no chat template; POST /v1/completions with "
                       "\"prompt\": <the source text>, or use the translate or summarize app", "model",
                       "model_not_chat")


def app_source(app: str, values: dict[str, Any]) -> str:
    """The source text an app sends a seq2seq model: its `text` parameter (translate, summarize)."""
    if not isinstance(values.get("text"), str):
        raise bad_request(f"app {app!r} renders chat messages; a seq2seq model takes one source text, so it runs "
                          "only apps with a 'text' parameter (translate, summarize)", "model", "model_not_suitable")
    return values["text"]


def task_prefix(uri: str) -> str:
    """finetune.task_prefix of the run that exported the model at `uri` ('' when none or unknown)."""
    import yaml

    path = os.path.join(uri, "llmos_config.yaml")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return ((yaml.safe_load(f) or {}).get("finetune") or {}).get("task_prefix") or ""


class Seq2SeqServer:
    """One encoder-decoder's replica. Built into a deployment by `seq2seq_deployment(spec)`."""

    def __init__(self, spec: dict):
        import torch

        from llmos_ray.models import context_length, eos_token_ids
        from llmos_ray.serve.loading import load_model
        from llmos_ray.storage import localize

        self.spec = ModelSpec(**spec)
        torch.set_num_threads(max(1, int(self.spec.num_cpus)))
        self.model, self.tokenizer, self.device = load_model(self.spec)
        self.context = context_length(self.model.config, self.tokenizer)
        self.prefix = task_prefix(localize(self.spec.uri))
        self.eos = eos_token_ids(self.model, self.tokenizer)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        self._lock = threading.Lock()
        self.counts: dict[str, Any] = {"requests": 0, "batches": 0, "generated_tokens": 0,
                                       "batch_sizes": collections.Counter()}

        async def run_batch(items: list[tuple]) -> list:
            return await asyncio.to_thread(self._run_batch, items)

        run_batch.__name__ = f"seq2seq_{self.spec.deployment_name}"
        self._batch = serve.batch(max_batch_size=self.spec.max_batch_size,
                                  batch_wait_timeout_s=self.spec.batch_wait_timeout_s)(run_batch)

    # -- a request ----------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> tuple[list[int], SamplingParams]:
        """(source ids, params) of a request; APIError 400 naming the field."""
        if request.messages is not None:
            raise chat_refusal(self.spec.name)
        params = request.params
        for name in UNSUPPORTED:
            if getattr(params, name) not in (None, 0, 0.0, False, {}):
                raise bad_request(f"{name}: not supported by the seq2seq engine (model {self.spec.name!r})", name)
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if any(not 0 <= i < len(self.tokenizer) for i in ids):
                raise bad_request(f"prompt: token ids must be in [0, {len(self.tokenizer)})", "prompt")
        else:
            text = request.prompt or ""
            if not text.strip():
                raise bad_request("prompt: the source text is empty", "prompt")
            ids = self.tokenizer(text if text.startswith(self.prefix) else self.prefix + text)["input_ids"]
        if len(ids) > self.context:
            raise bad_request(f"prompt: {len(ids)} source tokens exceed model {self.spec.name!r}'s limit of "
                              f"{self.context}", "prompt")
        if params.max_tokens is None:
            params = SamplingParams(**{**params.__dict__, "max_tokens": self.spec.default_max_tokens})
        return ids, params

    async def generate(self, request: GenerationRequest) -> Union[Result, APIError]:
        """The whole target text of one source; a client's mistake comes back as an APIError value."""
        t0 = time.perf_counter()
        try:
            ids, params = self.prepare(request)
        except APIError as e:
            return e
        out = await self._batch((ids, params))
        if isinstance(out, Exception):
            return APIError(500, f"generation failed: {type(out).__name__}: {out}", code="generation_error")
        text, finish, n, batch = out
        return Result(text, finish, len(ids), n, batch, time.perf_counter() - t0)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[Union[Chunk, APIError]]:
        """The target text as one chunk once its batch is done (static batches)."""
        result = await self.generate(request)
        if isinstance(result, APIError):
            yield result
            return
        yield Chunk(result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens,
                    result.batch_size)

    # -- a batch ------------------------------------------------------------------------------

    def _run_batch(self, items: list[tuple[list[int], SamplingParams]]) -> list:
        from llmos_ray.serve.sampling import is_greedy

        out: list = [None] * len(items)
        with self._lock:
            greedy = [i for i, (_, p) in enumerate(items) if is_greedy(p)]
            groups = ([greedy] if greedy else []) + [[i] for i in range(len(items)) if i not in greedy]
            for rows in groups:
                try:
                    for i, answer in zip(rows, self._generate([items[i] for i in rows])):
                        out[i] = (*answer, len(rows))
                except Exception as e:  # noqa: BLE001 - every request of the failed group gets it
                    log.exception("seq2seq generation failed")
                    for i in rows:
                        out[i] = e
            self.counts["requests"] += len(items)
            self.counts["batches"] += len(groups)
            for rows in groups:
                self.counts["batch_sizes"][len(rows)] += 1
        return out

    def _generate(self, items: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str, int]]:
        """(text, finish_reason, tokens) per item: one generate over the items (all greedy, or one sampled)."""
        import torch
        from transformers import GenerationConfig

        from llmos_ray.serve.sampling import is_greedy

        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for r, (ids, _) in enumerate(items):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
        first = items[0][1]
        sampled = not is_greedy(first)
        gen = GenerationConfig(max_new_tokens=max(p.max_tokens for _, p in items), do_sample=sampled, num_beams=1,
                               pad_token_id=self.pad, eos_token_id=sorted(self.eos),
                               **({"temperature": first.temperature, "top_p": first.top_p} if sampled else {}))
        if sampled and first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                      generation_config=gen)
        answers = []
        for r, (_, params) in enumerate(items):
            new = out[r, 1:].tolist()[:params.max_tokens]  # after the decoder start token
            finish = "length"
            for n, token in enumerate(new):
                if token in self.eos:
                    new, finish = new[:n], "stop"
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            at = min((i for i in (text.find(s) for s in params.stop if s) if i >= 0), default=len(text))
            if at < len(text):  # just before the first stop string
                text, finish = text[:at], "stop"
            self.counts["generated_tokens"] += len(new)
            answers.append((text.strip(), finish, len(new)))
        return answers

    # -- what the ingress asks -------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "task": "seq2seq", "context_length": self.context, "chat_template": False,
                "task_prefix": self.prefix, "device": str(self.device), "max_batch_size": self.spec.max_batch_size,
                "batching": "static (@serve.batch)"}

    async def stats(self) -> dict[str, Any]:
        return {**self.counts, "batch_sizes": dict(self.counts["batch_sizes"]), "task": "seq2seq",
                "pid": os.getpid()}

    def check_health(self) -> None:
        return None


def seq2seq_deployment(spec: ModelSpec):
    """The bound Serve deployment of one encoder-decoder, with the spec's replicas and capacity."""
    from llmos_ray.serve.replica import deployment_options

    return serve.deployment(Seq2SeqServer).options(**deployment_options(spec)).bind(spec.to_dict())
