"""Text generation: a transformers model behind a batching scheduler, and the Ray Serve deployment
that feeds it.

`Engine` (plain Python, no Ray) owns the model, the tokenizer and one scheduler thread. Requests
join the running batch between two tokens (continuous batching): the newcomers' prompts are
prefilled together with left padding, their KV cache is left-padded to the running one's length
and concatenated on the batch axis, and finished rows leave the batch at once. Every row has its
own sampling settings (greedy at temperature 0, temperature/top_p, seed, penalties, stop strings,
max_tokens), so one batch mixes any requests. The event loop never runs model code.

`ModelServer` is the Serve deployment of one model: `@serve.batch` (max_batch_size,
batch_wait_timeout_s) groups concurrent arrivals into one admission, and each request streams
`Chunk`s back as they are decoded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Union

from llmos_ray.errors import ModelError
from llmos_ray.models import context_length, eos_token_ids
from llmos_ray.serve.schemas import APIError, bad_request
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.storage import localize

log = logging.getLogger(__name__)

TURN_END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = None
    """None = the rest of the context, capped by the model's max_tokens_limit."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class GenerationRequest:
    """What the HTTP ingress sends a model replica: a prompt, chat messages or token ids."""

    params: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    prompt_token_ids: Optional[list[int]] = None


@dataclass
class Chunk:
    """A piece of one request's output; the last one has finish_reason set."""

    text: str
    finish_reason: Optional[str] = None
    """'stop', 'length', or 'error' (then `error` says why)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0
    """Most rows decoded together while this request ran."""
    error: Optional[str] = None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    ttft_s: float


class _Row:
    """One sequence in the engine."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Chunk], None],
                 stop_ids: frozenset[int]):
        self.prompt_ids, self.params, self.sink, self.stop_ids = prompt_ids, params, sink, stop_ids
        self.generated: list[int] = []
        self.next_pos = len(prompt_ids)  # position id of the next token fed to the model
        self.last_token: Optional[int] = None
        self.text = ""
        self.sent = 0
        self.finish: Optional[str] = None
        self.cancelled = False
        self.generator = None
        self.counts = None
        self.max_batch = 0
        self.max_stop = max((len(s) for s in params.stop), default=0)


class Engine:
    """A causal LM with a continuous-batching scheduler thread. Thread-safe `submit`/`cancel`."""

    def __init__(self, model, tokenizer, *, name: str = "model", max_batch_size: int = 16,
                 max_tokens_limit: int = 1024, device: str = "cpu"):
        import torch

        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.max_batch_size, self.max_tokens_limit = max_batch_size, max_tokens_limit
        self.context_length = context_length(model.config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(model, tokenizer)
        vocab = tokenizer.get_vocab()
        self.turn_end_ids = frozenset(vocab[t] for t in TURN_END_TOKENS if t in vocab) | self.eos_ids
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.stats = {"steps": 0, "prefills": 0, "generated_tokens": 0, "max_batch_size_seen": 0,
                      "batch_sizes": collections.Counter(), "requests": 0}
        self._rng = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._rows: list[_Row] = []
        self._admitting: list[_Row] = []
        self._cache = None
        self._mask = None
        self._closed = False
        self._mergeable = self._warmup()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: ModelSpec) -> "Engine":
        """Load the model of `spec` (LoRA adapters merged into their base; int8 if asked) and start."""
        model, tokenizer, device = load_model(spec)
        return cls(model, tokenizer, name=spec.name, max_batch_size=spec.max_batch_size,
                   max_tokens_limit=spec.max_tokens_limit, device=device)

    # -- public API --------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, default_max_tokens: Optional[int] = None
                ) -> tuple[list[int], SamplingParams, frozenset[int]]:
        """Tokenize and check a request against the context: (prompt ids, params, stop token ids).
        Raises APIError 400 naming the field."""
        params = request.params
        if request.messages is not None:
            ids = self.tokenizer.encode(self.render_chat(request.messages), add_special_tokens=False)
            field_name, stop_ids = "messages", self.turn_end_ids
        elif request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")
            field_name, stop_ids = "prompt", self.eos_ids
        else:
            ids = self.tokenizer.encode(request.prompt or "")
            field_name, stop_ids = "prompt", self.eos_ids
        if not ids:
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_ids_first]
        room = self.context_length - len(ids)
        if room < 1:
            raise bad_request(f"{field_name}: the prompt has {len(ids)} tokens; model {self.name!r} has a context of "
                              f"{self.context_length} tokens, leaving no room to generate", field_name,
                              "context_length_exceeded")
        max_tokens = params.max_tokens
        if max_tokens is not None:
            if max_tokens > self.max_tokens_limit:
                raise bad_request(f"max_tokens: {max_tokens} is above this server's limit of {self.max_tokens_limit}",
                                  "max_tokens")
            if max_tokens > room:
                raise bad_request(f"max_tokens: {max_tokens} plus the prompt's {len(ids)} tokens exceeds model "
                                  f"{self.name!r}'s context of {self.context_length} tokens (at most {room})",
                                  "max_tokens", "context_length_exceeded")
        else:
            max_tokens = min(room, self.max_tokens_limit, default_max_tokens or self.max_tokens_limit)
        if params.logit_bias:
            bad = next((t for t in params.logit_bias if not 0 <= int(t) < self.vocab_size), None)
            if bad is not None:
                raise bad_request(f"logit_bias: token id {bad} is outside the vocabulary", "logit_bias")
        params = SamplingParams(**{**params.__dict__, "max_tokens": max_tokens})
        return ids, params, stop_ids

    @property
    def eos_ids_first(self) -> int:
        return min(self.eos_ids) if self.eos_ids else 0

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation: the tokenizer's chat template, or a plain fallback."""
        if self.has_chat_template:
            try:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # jinja raises for roles a template does not accept
                raise bad_request(f"messages: the model's chat template rejected them: {e}", "messages") from None
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Chunk], None],
               stop_ids: Optional[frozenset[int]] = None) -> _Row:
        """Queue one sequence; `sink` receives its Chunks from the scheduler thread."""
        return self.submit_many([(prompt_ids, params, sink, stop_ids)])[0]

    def submit_many(self, items: list[tuple]) -> list[_Row]:
        """Queue several sequences at once, so they are prefilled together."""
        import torch

        rows = []
        for prompt_ids, params, sink, stop_ids in items:
            row = _Row(prompt_ids, params, sink, self.eos_ids if stop_ids is None else stop_ids)
            if params.temperature > 0:
                row.generator = (torch.Generator(device=self.device).manual_seed(params.seed)
                                 if params.seed is not None else self._rng)
            if params.presence_penalty or params.frequency_penalty:
                row.counts = torch.zeros(self.vocab_size, device=self.device)
            rows.append(row)
        with self._cond:
            if self._closed:
                raise APIError(503, f"model {self.name!r} is shutting down", code="model_unavailable")
            self._waiting.extend(rows)
            self.stats["requests"] += len(rows)
            self._cond.notify()
        return rows

    def cancel(self, row: _Row) -> None:
        """Stop generating for `row` (its consumer went away); it leaves the batch at the next step."""
        row.cancelled = True

    def generate(self, prompt: str, **params) -> Result:
        """Blocking single request (tests, notebooks): text and usage of one completion."""
        request = GenerationRequest(params=SamplingParams(**params), prompt=prompt)
        ids, sp, stop_ids = self.prepare(request)
        chunks: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        self.submit(ids, sp, chunks.put, stop_ids)
        return collect_sync(chunks, t0)

    def load_info(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._rows), "waiting": len(self._waiting)}

    def snapshot(self) -> dict[str, Any]:
        s = dict(self.stats)
        s["batch_sizes"] = dict(sorted(s["batch_sizes"].items()))
        s.update(self.load_info(), context_length=self.context_length, max_batch_size=self.max_batch_size,
                 device=str(self.device), continuous_batching=self._mergeable)
        return s

    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                try:
                    if not self._step():
                        break
                except Exception as e:  # a bad batch must not kill the engine: fail its rows, go on
                    log.exception("generation step failed for model %s", self.name)
                    self._fail_all(f"{type(e).__name__}: {e}")

    def _step(self) -> bool:
        with self._cond:
            while not self._closed and not self._waiting and not self._rows:
                self._cond.wait()
            if self._closed:
                self._fail_all("the model server is shutting down", waiting=True)
                return False
            room = self.max_batch_size - len(self._rows)
            if self._rows and not self._mergeable:
                room = 0
            new = []
            while self._waiting and len(new) < room:
                row = self._waiting.popleft()
                if not row.cancelled:
                    new.append(row)
        if new:
            self._admitting = new  # failed along with the batch if the prefill raises
            self._prefill(new)
            self._admitting = []
        if self._rows:
            self._decode()
        return True

    def _forward(self, **kwargs):
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(use_cache=True, **kwargs)

    def _prefill(self, new: list[_Row]) -> None:
        import torch

        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        self._join(new, out.past_key_values, mask)
        self._advance(new, out.logits[:, -1, :])
        self.stats["prefills"] += 1
        self.stats["generated_tokens"] += len(new)
        self._retire()

    def _decode(self) -> None:
        import torch

        rows = self._rows
        ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        pos = torch.tensor([[r.next_pos] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self._cache)
        self._cache, self._mask = out.past_key_values, mask
        for r in rows:
            r.next_pos += 1
        self._advance(rows, out.logits[:, -1, :])
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(rows)
        self.stats["batch_sizes"][len(rows)] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(rows))
        self._retire()

    def _join(self, new: list[_Row], cache, mask) -> None:
        """Add freshly prefilled rows (their cache and mask) to the running batch."""
        import torch.nn.functional as F

        if not self._rows:
            self._rows, self._cache, self._mask = list(new), cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for a, b in zip(self._cache.layers, cache.layers):
                a.keys = torch_cat0(_left_pad(a.keys, width), _left_pad(b.keys, width))
                a.values = torch_cat0(_left_pad(a.values, width), _left_pad(b.values, width))
            self._mask = torch_cat0(F.pad(self._mask, (width - self._mask.shape[1], 0)),
                                    F.pad(mask, (width - mask.shape[1], 0)))
            self._rows = self._rows + list(new)
        for r in self._rows:
            r.max_batch = max(r.max_batch, len(self._rows))

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch, and cache columns no row uses."""
        import torch

        keep = [i for i, r in enumerate(self._rows) if r.finish is None and not r.cancelled]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]
        if self._mergeable:
            first = int(self._mask.any(dim=0).nonzero()[0])
            if first > 0:
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
                self._mask = self._mask[:, first:]

    def _advance(self, rows: list[_Row], logits) -> None:
        for row, token in zip(rows, self._sample(rows, logits)):
            self._accept(row, token)

    def _sample(self, rows: list[_Row], logits) -> list[int]:
        import torch

        logits = logits.float()
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                for token, bias in p.logit_bias.items():
                    logits[i, int(token)] += bias
            if r.counts is not None:
                logits[i] -= p.frequency_penalty * r.counts + p.presence_penalty * (r.counts > 0).float()
            if (p.ignore_eos or len(r.generated) < p.min_tokens) and r.stop_ids:
                logits[i, list(r.stop_ids)] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature > 0:
                probs = torch.softmax(logits[i] / p.temperature, dim=-1)
                if p.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p
                    sorted_probs[outside] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return tokens

    def _accept(self, row: _Row, token: int) -> None:
        """Append a sampled token to `row`, find stops, and emit the text that is safe to show."""
        p = row.params
        if token in row.stop_ids and not p.ignore_eos and len(row.generated) >= p.min_tokens:
            return self._emit(row, "stop")
        row.generated.append(token)
        row.last_token = token
        if row.counts is not None:
            row.counts[token] += 1
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        finish = None
        if p.stop:
            start = max(0, row.sent - row.max_stop)
            hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                text, finish = text[:min(hits)], "stop"
        row.text = text
        if finish is None and (len(row.generated) >= p.max_tokens or row.next_pos >= self.context_length):
            finish = "length"
        self._emit(row, finish)

    def _emit(self, row: _Row, finish: Optional[str]) -> None:
        text = row.text
        if finish is not None:
            row.finish = finish
            safe = len(text)
        else:
            safe = _safe_length(text, row.params.stop)
        delta = text[row.sent:safe] if safe > row.sent else ""
        row.sent = max(row.sent, safe)
        if (delta or finish) and not row.cancelled:
            row.sink(Chunk(delta, finish, len(row.prompt_ids), len(row.generated), row.max_batch))

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        rows = self._rows + self._admitting + (list(self._waiting) if waiting else [])
        self._rows, self._admitting, self._cache, self._mask = [], [], None, None
        if waiting:
            self._waiting.clear()
        for r in rows:
            if r.finish is None:
                r.finish = "error"
                r.sink(Chunk("", "error", len(r.prompt_ids), len(r.generated), r.max_batch, error=message))

    def _warmup(self) -> bool:
        """Run one token through the model; report whether its KV cache can be merged across requests."""
        import inspect

        import torch

        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        with torch.inference_mode():
            ids = torch.tensor([[self.pad_id]], device=self.device)
            out = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids))
        self.vocab_size = out.logits.shape[-1]  # the head's size (may exceed the tokenizer's)
        try:
            from transformers.cache_utils import DynamicLayer

            layers = getattr(out.past_key_values, "layers", None)
            mergeable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        except ImportError:
            mergeable = False
        if not mergeable:
            log.warning("model %s: its KV cache type cannot be merged; requests are batched only when they "
                        "arrive together", self.name)
        return mergeable


def torch_cat0(a, b):
    import torch

    return torch.cat([a, b], dim=0)


def _left_pad(x, width: int):
    """Left-pad a (batch, heads, time, dim) cache tensor with zeros to `width` time steps."""
    import torch.nn.functional as F

    return x if x.shape[-2] == width else F.pad(x, (0, 0, width - x.shape[-2], 0))


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown: hold back an incomplete UTF-8 character and any tail that
    could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def collect_sync(chunks: "queue.Queue[Chunk]", t0: float) -> Result:
    parts, first = [], None
    while True:
        c = chunks.get()
        if first is None:
            first = time.perf_counter() - t0
        if c.error:
            raise APIError(500, f"generation failed: {c.error}", code="generation_error")
        parts.append(c.text)
        if c.finish_reason:
            return Result("".join(parts), c.finish_reason, c.prompt_tokens, c.completion_tokens, c.batch_size, first)


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(spec: ModelSpec):
    """(model, tokenizer, device) for a spec: local or remote export, hub id, or LoRA adapter over a base."""
    import torch

    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.models import load_pretrained

    device = "cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()) else "cpu"
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model {spec.name!r}: device=cuda but this replica sees no GPU")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.dtype)
    if dtype is None:
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device == "cuda" \
            else torch.float32
    uri = localize(spec.uri)
    kwargs = dict(trust_remote_code=spec.trust_remote_code, dtype=dtype)
    if spec.base_uri:
        from peft import PeftModel

        base_dir = localize(spec.base_uri)
        model = PeftModel.from_pretrained(load_pretrained(base_dir, **kwargs), uri).merge_and_unload()
        has_tokenizer = any(os.path.exists(os.path.join(uri, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
        tok_dir = uri if has_tokenizer else base_dir
    else:
        model, tok_dir = load_pretrained(uri, **kwargs), uri
    tokenizer = load_tokenizer(tok_dir)
    model.eval().to(device)
    if spec.quantize == "int8":
        if device != "cpu":
            raise ModelError(f"model {spec.name!r}: quantize=int8 (dynamic quantization) runs on CPU only")
        model = quantize_int8(model)
    log.info("loaded model %s from %s on %s (%s%s)", spec.name, spec.uri, device, dtype,
             ", int8" if spec.quantize == "int8" else "")
    return model, tokenizer, device


def quantize_int8(model):
    """Dynamic int8 quantization of the linear layers (CPU). GPT-2's Conv1D layers become nn.Linear first."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, child_name, linear)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------------------------------------
# The Serve deployment


def _serve():
    from ray import serve

    return serve


class ModelServer:
    """One model's replica: an Engine fed by @serve.batch admissions. Built into a deployment by
    `model_deployment(spec)`."""

    def __init__(self, spec: dict):
        import torch

        from llmos_ray.serve.metrics import get_metrics

        self.spec = ModelSpec(**spec)
        torch.set_num_threads(max(1, int(self.spec.num_cpus)))
        self.engine = Engine.load(self.spec)
        self.metrics = get_metrics()
        self._tags = {"model": self.spec.name}
        self._flusher: Optional[asyncio.Task] = None

        async def admit(items: list[tuple]) -> list[_Row]:
            return self.engine.submit_many(items)

        admit.__name__ = f"admit_{self.spec.deployment_name}"
        self._admit = _serve().batch(max_batch_size=self.spec.max_batch_size,
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

    def _prepare(self, request: GenerationRequest):
        default = self.spec.default_max_tokens if request.messages is None else None
        return self.engine.prepare(request, default)

    async def generate(self, request: GenerationRequest) -> Union[Result, APIError]:
        """The whole completion. A bad request comes back as an APIError value, not raised (no
        traceback in the replica log for a client's mistake)."""
        t0 = time.perf_counter()
        try:
            ids, params, stop_ids = self._prepare(request)
        except APIError as e:
            return e
        self._start_metrics()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        parts: list[str] = []
        first: list[float] = []

        def sink(chunk: Chunk) -> None:  # scheduler thread; wakes the loop only at the end
            if not first:
                first.append(time.perf_counter() - t0)
            parts.append(chunk.text)
            if chunk.finish_reason:
                loop.call_soon_threadsafe(_resolve, done, chunk)

        row = await self._admit((ids, params, sink, stop_ids))
        try:
            last = await done
        finally:
            if row.finish is None:
                self.engine.cancel(row)
        if last.error:
            return APIError(500, f"generation failed: {last.error}", code="generation_error")
        return Result("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                      last.batch_size, first[0] if first else 0.0)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[Union[Chunk, APIError]]:
        """Chunks as they are decoded (coalesced when the reader is slower than the model)."""
        try:
            prepared = self._prepare(request)
        except APIError as e:
            yield e
            return
        async for chunk in self._chunks(prepared, coalesce=True):
            yield chunk

    async def _chunks(self, prepared, coalesce: bool = False) -> AsyncIterator[Union[Chunk, APIError]]:
        ids, params, stop_ids = prepared
        self._start_metrics()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        row = await self._admit((ids, params, lambda c: loop.call_soon_threadsafe(chunks.put_nowait, c), stop_ids))
        try:
            while True:
                chunk = await chunks.get()
                while coalesce and not chunk.finish_reason and not chunks.empty():
                    nxt = chunks.get_nowait()  # a slow reader gets fewer, larger pieces
                    nxt.text = chunk.text + nxt.text
                    chunk = nxt
                if chunk.error:
                    yield APIError(500, f"generation failed: {chunk.error}", code="generation_error")
                    return
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


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def model_deployment(spec: ModelSpec):
    """The bound Serve deployment of one model, with its autoscaling and capacity settings."""
    serve = _serve()
    num_gpus = spec.num_gpus
    if num_gpus is None:
        num_gpus = 1 if spec.device == "cuda" or (spec.device == "auto" and _cluster_has_gpus()) else 0
    options = dict(
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
    return serve.deployment(ModelServer).options(**options).bind(spec.to_dict())


def _cluster_has_gpus() -> bool:
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        pass
    import torch

    return torch.cuda.is_available()
