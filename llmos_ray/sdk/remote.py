"""The HTTP side of `LLM`: a model served by `llmos serve`, through its OpenAI-compatible API (httpx).

    POST /v1/completions        generate (all prompts in one request: the server batches them)
    POST /v1/chat/completions   chat, stream (server-sent events)
    GET /v1/apps, POST /v1/apps/{app}
    POST /v1/embeddings, /v1/classify   for servers that serve such models
    GET /v1/stats               the model's context length

An error response becomes `APIError` with the server's status, message, param and code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

from llmos_ray.errors import ConfigError, ModelError
from llmos_ray.sdk.types import AppResult, Completion, Messages
from llmos_ray.serve.types import APIError

KEY_ENV = "LLMOS_API_KEY"
BYTES_PER_TOKEN = 4.0
"""Prompt size estimate before the server has reported any usage."""
TOKENS_PER_MESSAGE = 4
"""Template tokens around each message, for that estimate."""


class RemoteBackend:
    def __init__(self, base_url: str, api_key: Optional[str], model: Optional[str], timeout: float):
        import httpx

        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        key = api_key or os.environ.get(KEY_ENV)
        self.client = httpx.Client(base_url=self.base_url, timeout=timeout,
                                   headers={"Authorization": f"Bearer {key}"} if key else {})
        self.where = self.base_url
        served = [m["id"] for m in self._call("GET", "/v1/models")["data"]]
        if model is None:
            if len(served) != 1:
                raise ConfigError(f"LLM.connect: the server at {self.base_url} serves {', '.join(served)}; "
                                  "pass model=NAME")
            model = served[0]
        elif model not in served:
            raise ModelError(f"the server at {self.base_url} does not serve {model!r} (it serves {', '.join(served)})")
        self.name = model
        self.task = "causal_lm"
        self.context_length = self._context_length()
        self._bytes_per_token = BYTES_PER_TOKEN

    def _call(self, method: str, path: str, body: Optional[dict] = None, what: Optional[str] = None) -> dict:
        import httpx

        try:
            r = self.client.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise ModelError(f"cannot reach the server at {self.base_url}: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            raise _error(r, what)
        return r.json()

    def _context_length(self) -> Optional[int]:
        try:
            return self._call("GET", "/v1/stats")["models"][self.name]["context_length"]
        except (APIError, KeyError, TypeError):
            return None

    # -- generation ----------------------------------------------------------------------------

    def complete(self, prompts: list[str], sampling: dict[str, Any]) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(prompts), 64):  # the server takes at most 64 completions per request
            batch = prompts[start:start + 64]
            body = self._call("POST", "/v1/completions", {"model": self.name, "prompt": batch, **sampling})
            use = body.get("usage") or {}
            one = len(batch) == 1
            for c in sorted(body["choices"], key=lambda c: c["index"]):
                out.append(Completion(c["text"], c["finish_reason"], use.get("prompt_tokens") if one else None,
                                      use.get("completion_tokens") if one else None))
        return out

    def chat(self, messages: Messages, sampling: dict[str, Any]) -> Completion:
        body = self._call("POST", "/v1/chat/completions", {"model": self.name, "messages": messages, **sampling})
        choice, use = body["choices"][0], body.get("usage") or {}
        self._calibrate(messages, use.get("prompt_tokens"))
        return Completion(choice["message"]["content"] or "", choice["finish_reason"], use.get("prompt_tokens"),
                          use.get("completion_tokens"))

    def stream(self, prompt: Optional[str], messages: Optional[Messages], sampling: dict[str, Any]) -> Iterator[str]:
        path = "/v1/completions" if messages is None else "/v1/chat/completions"
        body = {"model": self.name, "stream": True, **sampling, **({"prompt": prompt} if messages is None
                                                                     else {"messages": messages})}

        def pieces() -> Iterator[str]:
            with self.client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r, None)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        e = event["error"]
                        raise APIError(500, e.get("message", "stream failed"), e.get("param"), e.get("code"))
                    for c in event.get("choices", []):
                        text = c.get("text") if messages is None else (c.get("delta") or {}).get("content")
                        if text:
                            yield text

        return pieces()

    def count_tokens(self, messages: Messages) -> int:
        """An estimate: bytes of the messages over the bytes per token the server last reported."""
        size = sum(len(m["content"].encode()) for m in messages)
        return int(size / self._bytes_per_token) + TOKENS_PER_MESSAGE * len(messages)

    def _calibrate(self, messages: Messages, prompt_tokens: Optional[int]) -> None:
        text_tokens = (prompt_tokens or 0) - TOKENS_PER_MESSAGE * len(messages)
        size = sum(len(m["content"].encode()) for m in messages)
        if text_tokens > 0 and size > 0:
            self._bytes_per_token = size / text_tokens

    # -- apps and other tasks --------------------------------------------------------------------

    def apps(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/apps")["data"]

    def app(self, ref: str, params: dict[str, Any], sampling: dict[str, Any]) -> AppResult:
        return AppResult.from_response(self._call("POST", f"/v1/apps/{ref}",
                                                  {"model": self.name, **params, **sampling}))

    def embed(self, texts: list[str]) -> list[list[float]]:
        body = self._call("POST", "/v1/embeddings", {"model": self.name, "input": texts}, what="embed")
        return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        return self._call("POST", "/v1/classify", {"model": self.name, "input": texts}, what="classify")["data"]

    def close(self) -> None:
        self.client.close()


def _error(response, what: Optional[str]) -> Exception:
    """The exception for an error response: ModelError when the server has no such route (`what`
    names the method), else APIError with the server's status, message, param and code."""
    try:
        err = response.json().get("error") or {}
    except ValueError:
        err = {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    if what is not None and response.status_code in (404, 405) and err.get("code") != "model_not_found":
        return ModelError(f"the server at {response.url.scheme}://{response.url.netloc.decode()} does not support "
                          f"{what}() for this model ({response.request.method} {response.url.path}: "
                          f"{response.status_code} {err.get('message', '')})")
    return APIError(response.status_code, err.get("message") or response.text[:500], err.get("param"),
                    err.get("code"), {k: v for k, v in response.headers.items() if k.lower() == "retry-after"})
