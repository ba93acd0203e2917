"""Text generation: a transformers model behind a continuous-batching scheduler (plain Python, no Ray).

    engine = Engine(model, tokenizer, name="tiny", max_batch_size=8)   # or Engine.load(spec)
    engine.generate("def main():", max_tokens=16, temperature=0).text    # blocking (tests, notebooks)
    ids, params, stop_ids = engine.prepare(GenerationRequest(...))        # what a replica does, then
    engine.submit(ids, params, sink, stop_ids)                            # `sink` receives Chunks
    engine.add_adapter("sql", adapters.read_adapter(DIR)); engine.submit(..., adapter="sql")

`Engine` owns the model, the tokenizer and one scheduler thread. Requests join the running batch
between two tokens (continuous batching): the newcomers' prompts are prefilled together with left
padding, their KV cache is left-padded to the running one's length and concatenated on the batch
axis, and finished rows leave the batch at once (`kvcache`). Every row has its own sampling
settings (greedy at temperature 0, temperature/top_p, seed, penalties, stop strings, max_tokens)
and its own LoRA adapter, if any (`adapters.LoraSet`, added and removed between two steps), so one
batch mixes any requests (the next token per row: `sampling.sample`). The caller's event loop never
runs model code. The Serve deployment that feeds it is `replica.ModelServer`.

Blast radius of one: whatever fails for one row (its sampling settings, its logits, decoding its
text, its consumer) ends that request alone with an error Chunk (`_fail`) while the other rows
keep decoding; a prefill that raises is retried row by row, so one prompt that breaks the model
fails alone and the running batch never sees it. Only a failing forward pass of the running
batch itself fails the rows in it (the model failed, not one request); the engine goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Optional

from llmos_ray.models import context_length, eos_token_ids
from llmos_ray.serve import kvcache, logprobs, structured
from llmos_ray.serve.loading import load_model
from llmos_ray.serve.prompting import prepare
from llmos_ray.serve.rows import Row, safe_length
from llmos_ray.serve.sampling import is_greedy, sample
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, Chunk, GenerationRequest, Result, SamplingParams, result_of

log = logging.getLogger(__name__)

TURN_END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


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
        self._waiting: collections.deque[Row] = collections.deque()
        self._rows: list[Row] = []
        self._admitting: list[Row] = []
        self._cache = None
        self._mask = None
        self._closed = False
        self.step_lock = threading.Lock()  # held by a step; adapters change between steps
        self.adapters = None  # adapters.LoraSet, once a LoRA adapter is added beside the base
        self._mergeable = self._warmup()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: ModelSpec) -> "Engine":
        """Load the model of `spec` (a LoRA adapter merged into its base; int8 if asked) and start. Adapters
        beside the base: `add_adapter`."""
        model, tokenizer, device = load_model(spec)
        return cls(model, tokenizer, name=spec.name, max_batch_size=spec.max_batch_size,
                   max_tokens_limit=spec.max_tokens_limit, device=device)

    # -- public API --------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, default_max_tokens: Optional[int] = None
                ) -> tuple[list[int], SamplingParams, frozenset[int]]:
        """Tokenize and check a request against the context: (prompt ids, params, stop token ids).
        Raises APIError 400 naming the field (`prompting.prepare`)."""
        return prepare(self, request, default_max_tokens)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Chunk], None],
               stop_ids: Optional[frozenset[int]] = None, adapter: Optional[str] = None) -> Row:
        """Queue one sequence (decoded with LoRA adapter `adapter`, else the base); `sink` receives its
        Chunks from the scheduler thread."""
        return self.submit_many([(prompt_ids, params, sink, stop_ids, adapter)])[0]

    def submit_many(self, items: list[tuple]) -> list[Row]:
        """Queue several sequences at once, so they are prefilled together: (prompt_ids, params, sink,
        stop_ids[, adapter]) each; their rows, in order. A row whose adapter is not loaded (any more)
        fails alone at once."""
        import torch

        rows, gone = [], []
        for prompt_ids, params, sink, stop_ids, *adapter in items:
            row = Row(prompt_ids, params, sink, self.eos_ids if stop_ids is None else stop_ids)
            rows.append(row)
            if adapter and adapter[0] is not None:
                row.slot = (self.adapters.names if self.adapters is not None else {}).get(adapter[0])
                if row.slot is None:
                    gone.append((row, adapter[0]))
                    continue
            if not is_greedy(params):
                row.generator = (torch.Generator(device=self.device).manual_seed(params.seed)
                                 if params.seed is not None else self._rng)
            if params.presence_penalty or params.frequency_penalty:
                row.counts = torch.zeros(self.vocab_size, device=self.device)
            if params.grammar is not None:
                row.matcher = structured.matcher(self, params.grammar)
        with self._cond:
            if self._closed:
                raise APIError(503, f"model {self.name!r} is shutting down", code="model_unavailable")
            self._waiting.extend(r for r in rows if all(r is not g for g, _ in gone))
            self.stats["requests"] += len(rows)
            self._cond.notify()
        for row, name in gone:
            self._fail(row, f"LoRA adapter {name!r} is not loaded in model {self.name!r}")
        return rows

    def add_adapter(self, name: str, files) -> int:
        """Put LoRA adapter `name` (`adapters.read_adapter`'s files) beside the base and its other adapters,
        between two steps; its slot. ModelError when it does not fit the base."""
        from llmos_ray.serve.adapters import LoraSet

        with self.step_lock:
            if self.adapters is None:
                self.adapters = LoraSet(self.model)
            with self._cond:
                busy = {r.slot for r in self._rows + self._admitting + list(self._waiting)}
            return self.adapters.add(name, files, busy)

    def remove_adapter(self, name: str) -> bool:
        """Take LoRA adapter `name` out of use (False: it was not loaded); rows admitted with it finish with it."""
        with self.step_lock:
            if self.adapters is None or name not in self.adapters.names:
                return False
            self.adapters.remove(name)
            return True

    def adapted(self, rows: list):
        """The context in which a forward pass gives each row (a Row, or a slot) its LoRA adapter."""
        slots = [r if r is None or isinstance(r, int) else r.slot for r in rows]
        if self.adapters is None or all(s is None for s in slots):
            return contextlib.nullcontext()
        return self.adapters.rows(slots)

    def cancel(self, row: Row) -> None:
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
        with self.step_lock:
            if new:
                self._admitting = new  # failed by the loop if joining them to the batch raises
                self._admit(new)
                self._admitting = []
            if self._rows:
                self._decode()
        return True

    def _forward(self, rows: list = (), all_logits: bool = False, **kwargs):
        """The model's forward pass over `rows` (each with its LoRA adapter, if any)."""
        if self._logits_to_keep and not all_logits:
            kwargs["logits_to_keep"] = 1
        with self.adapted(list(rows)):
            return self.model(use_cache=True, **kwargs)

    def _admit(self, new: list[Row]) -> None:
        """Prefill the newcomers together and join them to the running batch. A prefill that
        raises is retried row by row, so the row that breaks it fails alone; the running rows never
        see it (their cache is joined only after a prefill succeeded)."""
        try:
            out, mask = self._prefill(new)
        except Exception as e:
            if len(new) > 1:
                for row in new:
                    self._admit([row])
            else:
                log.exception("prefill failed for one request to model %s", self.name)
                self._fail(new[0], f"prefill failed: {type(e).__name__}: {e}")
            return
        self._join(new, out.past_key_values, mask)
        for i, row in enumerate(new):
            if row.params.prompt_logprobs is not None:
                row.prompt_logprobs = logprobs.of_prompt(out.logits[i], row.prompt_ids, row.params.prompt_logprobs)
            if row.params.max_tokens == 0:  # the prompt alone (its logprobs, echo): done at prefill
                self._emit(row, "length")
        go = [i for i, row in enumerate(new) if row.params.max_tokens != 0]
        self._advance([new[i] for i in go], out.logits[go, -1, :])
        self.stats["prefills"] += 1
        self.stats["generated_tokens"] += len(go)
        self._retire()

    def _prefill(self, new: list[Row]):
        """The forward pass over the newcomers' prompts (left-padded): (model output, attention mask)."""
        import torch

        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self._forward(rows=new, input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            all_logits=any(r.params.prompt_logprobs is not None for r in new))
        return out, mask

    def _decode(self) -> None:
        import torch

        rows = self._rows
        ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        pos = torch.tensor([[r.next_pos] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self._forward(rows=rows, input_ids=ids, attention_mask=mask, position_ids=pos,
                            past_key_values=self._cache)
        self._cache, self._mask = out.past_key_values, mask
        for r in rows:
            r.next_pos += 1
        self._advance(rows, out.logits[:, -1, :])
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(rows)
        self.stats["batch_sizes"][len(rows)] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(rows))
        self._retire()

    def _join(self, new: list[Row], cache, mask) -> None:
        """Add freshly prefilled rows (their cache and mask) to the running batch."""
        if not self._rows:
            self._rows, self._cache, self._mask = list(new), cache, mask
        else:
            self._cache, self._mask = kvcache.join(self._cache, self._mask, cache, mask)
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
        self._cache, self._mask = kvcache.keep(self._cache, self._mask, index, trim=self._mergeable)
        self._rows = [self._rows[i] for i in keep]

    def _advance(self, rows: list[Row], logits) -> None:
        """Sample and accept the next token of every row; a row that fails ends alone."""
        if not rows:
            return
        structured.constrain(rows, logits)
        sampled = sample(rows, logits)
        scored = logprobs.of_step(sampled.logits, sampled.tokens, [r.params.logprobs for r in rows])
        for i, (row, token) in enumerate(zip(rows, sampled.tokens)):
            if i in sampled.failed:
                self._fail(row, f"sampling failed: {sampled.failed[i]}")
                continue
            try:
                self._accept(row, token, scored[i])
            except Exception as e:  # e.g. the tokenizer cannot decode the row's tokens
                self._fail(row, f"{type(e).__name__}: {e}")

    def _accept(self, row: Row, token: int, scored: Optional[logprobs.TokenLogprob] = None) -> None:
        """Append a sampled token to `row`, find stops, and emit the text that is safe to show."""
        p = row.params
        if token in row.stop_ids and not p.ignore_eos and len(row.generated) >= p.min_tokens:
            return self._emit(row, "stop")
        row.generated.append(token)
        structured.advance(row, token)
        if scored is not None:
            row.logprobs.append(scored)
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

    def _emit(self, row: Row, finish: Optional[str]) -> None:
        text = row.text
        if finish is not None:
            row.finish = finish
            safe = len(text)
        else:
            safe = safe_length(text, row.params.stop)
        delta = text[row.sent:safe] if safe > row.sent else ""
        row.sent = max(row.sent, safe)
        if delta or finish:
            self._send(row, Chunk(delta, finish, len(row.prompt_ids), len(row.generated), row.max_batch,
                                  logprobs=row.logprobs, prompt_logprobs=row.prompt_logprobs))
            row.logprobs, row.prompt_logprobs = [], None

    def _send(self, row: Row, chunk: Chunk) -> None:
        """Give `chunk` to the row's consumer; a consumer that raises is gone: the row is cancelled."""
        if row.cancelled:
            return
        try:
            row.sink(chunk)
        except Exception:
            log.exception("model %s: the consumer of a request failed; the request is cancelled", self.name)
            row.cancelled = True

    def _fail(self, row: Row, message: str) -> None:
        """End one request with an error Chunk; the rest of the batch goes on."""
        log.warning("model %s: one request failed and ends alone, the batch goes on: %s", self.name, message)
        row.finish = "error"
        self._send(row, Chunk("", "error", len(row.prompt_ids), len(row.generated), row.max_batch, error=message))

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        rows = self._rows + self._admitting + (list(self._waiting) if waiting else [])
        self._rows, self._admitting, self._cache, self._mask = [], [], None, None
        if waiting:
            self._waiting.clear()
        for r in rows:
            if r.finish is None:
                r.finish = "error"
                self._send(r, Chunk("", "error", len(r.prompt_ids), len(r.generated), r.max_batch, error=message))

    def _warmup(self) -> bool:
        """Run one token through the model; report whether its KV cache can be merged across requests."""
        import inspect

        import torch

        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        with torch.inference_mode():
            ids = torch.tensor([[self.pad_id]], device=self.device)
            out = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids))
        self.vocab_size = out.logits.shape[-1]  # the head's size (may exceed the tokenizer's)
        mergeable = kvcache.mergeable(out.past_key_values)
        if not mergeable:
            log.warning("model %s: its KV cache type cannot be merged; requests are batched only when they "
                        "arrive together", self.name)
        return mergeable


def collect_sync(chunks: "queue.Queue[Chunk]", t0: float) -> Result:
    got, first = [], None
    while True:
        c = chunks.get()
        if first is None:
            first = time.perf_counter() - t0
        if c.error:
            raise APIError(500, f"generation failed: {c.error}", code="generation_error")
        got.append(c)
        if c.finish_reason:
            return result_of(got, first)

