"""`LLM`: one model, in this process or behind a server, with one API.

    from llmos_ray import LLM
    model = LLM.from_pretrained("tiny:prod")          # a library reference, export dir, s3:// URI, hub id
    model.generate(["def main():", "import os"], max_tokens=16, temperature=0)   # batched
    model.chat([{"role": "user", "content": "Hi"}])
    for piece in model.stream("Once upon a time", max_tokens=32): print(piece, end="")
    model.apps.summarize(text="...", max_words=20).output
    remote = LLM.connect("http://127.0.0.1:8000", api_key="sk-...", model="tiny")   # the same methods

`from_pretrained` runs the server's own continuous-batching Engine in-process, loaded the way a
replica loads it (a GPU when this process sees one, else CPU; LoRA adapters merged; checkpoints
exported first); `connect` speaks the OpenAI-compatible HTTP API of `llmos serve`. Sampling keyword
arguments are the API's (max_tokens, temperature, top_p, seed, stop, presence_penalty,
frequency_penalty, logit_bias, ignore_eos, min_tokens) with the server's defaults and limits, so a
greedy generation gives the same text either way. Bad input raises `APIError` (status, param,
code) in both modes; a method the model's task does not support raises ModelError saying so.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator, Optional, Sequence, Union

from llmos_ray.errors import ConfigError
from llmos_ray.sdk.types import AppResult, Completion, Messages, unsupported

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                 "logit_bias", "ignore_eos", "min_tokens")

class LLM:
    """A model to generate with: in-process (`from_pretrained`) or over HTTP (`connect`)."""

    def __init__(self, backend):
        self._backend = backend
        self.apps = Apps(backend)
        """The app store's apps: `llm.apps.summarize(text=...)`, `llm.apps["haiku@2"](...)`, `llm.apps.list()`."""

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, registry: Optional[str] = None, **options: Any) -> "LLM":
        """Load a model into this process: a model library reference (NAME, NAME@N, NAME:ALIAS), an
        export directory, a local or s3:// checkpoint or export, or a hub id. `options` are the
        per-model serving keys (device, dtype, quantize, max_batch_size, max_tokens_limit,
        default_max_tokens, trust_remote_code, ...); `registry` the library file."""
        from llmos_ray.sdk.local import LocalBackend

        return cls(LocalBackend.load(name_or_path, registry, options))

    @classmethod
    def connect(cls, base_url: str, api_key: Optional[str] = None, model: Optional[str] = None, *,
                timeout: float = 120.0) -> "LLM":
        """A model served by `llmos serve` at `base_url` (with or without /v1); `model` is its served
        name (optional when the server serves one model). The key defaults to $LLMOS_API_KEY."""
        from llmos_ray.sdk.remote import RemoteBackend

        return cls(RemoteBackend(base_url, api_key, model, timeout))

    # -- what it is ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The model's name (its library reference or served name)."""
        return self._backend.name

    @property
    def task(self) -> str:
        """causal_lm, classification, seq2seq, ... (what the methods below can do)."""
        return self._backend.task

    @property
    def context_length(self) -> Optional[int]:
        """Tokens the model attends over (None when a server does not say)."""
        return self._backend.context_length

    def count_tokens(self, messages: Messages) -> Optional[int]:
        """Prompt tokens of a conversation as the chat template renders it (over HTTP: an estimate
        calibrated on the server's usage counts; None before any)."""
        return self._backend.count_tokens(messages)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Union[str, Sequence[str]], **sampling: Any) -> Union[Completion, list[Completion]]:
        """Complete a prompt (-> Completion) or several in one batch (-> a list, in order)."""
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        if not batch or not all(isinstance(p, str) for p in batch):
            raise ConfigError("prompts: a string or a non-empty list of strings")
        out = self._backend.complete(batch, sampling_args(sampling))
        return out[0] if single else out

    def chat(self, messages: Messages, **sampling: Any) -> Completion:
        """The assistant's next message for a conversation (rendered with the model's chat template)."""
        return self._backend.chat(check_messages(messages), sampling_args(sampling))

    def stream(self, prompt_or_messages: Union[str, Messages], **sampling: Any) -> Iterator[str]:
        """Text as it is generated, for a prompt (completion) or a conversation (chat)."""
        if isinstance(prompt_or_messages, str):
            return self._backend.stream(prompt_or_messages, None, sampling_args(sampling))
        return self._backend.stream(None, check_messages(prompt_or_messages), sampling_args(sampling))

    def translate(self, text: str, target_language: str, source_language: Optional[str] = None,
                  **sampling: Any) -> str:
        """`text` in `target_language`: the built-in `translate` app for a text-generation model."""
        if self.task != "causal_lm":
            raise unsupported(self, "translate", "a text-generation model (through the translate app)")
        params = {"text": text, "target_language": target_language}
        if source_language:
            params["source_language"] = source_language
        return self.apps["translate"](**params, **sampling).output

    def embed(self, texts: Union[str, Sequence[str]]) -> list[list[float]]:
        """One vector per text, for an embedding model (POST /v1/embeddings over HTTP)."""
        return self._backend.embed([texts] if isinstance(texts, str) else list(texts))

    def classify(self, texts: Union[str, Sequence[str]]) -> list[dict[str, Any]]:
        """A label and score per text, for a classification model (POST /v1/classify over HTTP)."""
        return self._backend.classify([texts] if isinstance(texts, str) else list(texts))

    def close(self) -> None:
        """Stop the in-process engine (or close the HTTP client)."""
        self._backend.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, {self._backend.where})"


class Apps:
    """The app store's apps as methods: `apps.summarize(text=...)`; `apps["haiku@2"](...)`."""

    def __init__(self, backend):
        self._backend = backend

    def list(self) -> list[dict[str, Any]]:
        """The catalogue (as GET /v1/apps lists it)."""
        return self._backend.apps()

    def __getitem__(self, ref: str):
        def run(**params: Any) -> AppResult:
            sampling = sampling_args({k: params.pop(k) for k in list(params) if k in SAMPLING_KEYS})
            return self._backend.app(ref, params, sampling)

        run.__name__ = ref
        return run

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(a["name"].replace("-", "_") for a in self.list())})


def sampling_args(given: dict[str, Any]) -> dict[str, Any]:
    """Sampling keyword arguments, checked by name (their values are checked as the API checks them)."""
    for key in given:
        if key not in SAMPLING_KEYS:
            close = difflib.get_close_matches(key, SAMPLING_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown sampling argument {key!r}{hint} "
                              f"(sampling arguments: {', '.join(SAMPLING_KEYS)})")
    return {k: v for k, v in given.items() if v is not None}


def check_messages(messages: Messages) -> Messages:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ConfigError("messages: a non-empty list of {'role': ..., 'content': ...} dicts with string values")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
