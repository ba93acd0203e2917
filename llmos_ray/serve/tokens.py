"""/tokenize and /detokenize, in vLLM's shapes, through the model's own tokenizer (its replica).

    POST /tokenize    {"model", "prompt": str, "add_special_tokens"?: true}
                   or {"model", "messages": [...], "add_generation_prompt"?: true, "add_special_tokens"?: false}
                      "return_token_strs"?: false
                   -> {"count", "max_model_len", "tokens": [ids], "token_strs": [str] | null}
    POST /detokenize  {"model", "tokens": [ids]} -> {"prompt": str}

A chat is rendered by the same chat template as /v1/chat/completions (`prompting.render_chat`), so
`count` is the prompt_tokens a chat completion reports.
"""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse, Response
from pydantic import Field

from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.openai import chat_messages
from llmos_ray.serve.protocol import ChatMessage
from llmos_ray.serve.types import bad_request
from llmos_ray.serve.validation import StrictRequest, TokenId, parse_body

MAX_DETOKENIZE = 100_000
"""Most token ids in one /detokenize request."""


class TokenizeRequest(StrictRequest):
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = None
    """Default: true for a prompt, false for messages (the chat template places them)."""
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictRequest):
    model: str
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE)


class TokenRoutes:
    """What /tokenize and /detokenize do; the ingress delegates here."""

    def __init__(self, models: ServedModels):
        self.models = models

    def _spec(self, model: str, ctx: RequestContext):
        spec = self.models.get(model, ctx)
        require_generative(spec)
        if spec.engine != "transformers":
            raise bad_request(f"model {spec.name!r} runs on engine {spec.engine!r}: /tokenize and /detokenize serve "
                              "models on the transformers engine", "model", "unsupported_parameter")
        return spec

    async def tokenize(self, body: bytes, ctx: RequestContext) -> Response:
        req = parse_body(body, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("prompt: give exactly one of prompt and messages", "prompt")
        spec = self._spec(req.model, ctx)
        messages = chat_messages(req.messages) if req.messages is not None else None
        add_special = req.add_special_tokens if req.add_special_tokens is not None else messages is None
        out = await self.models.call(spec, "tokenize", req.prompt, messages, add_special, req.add_generation_prompt,
                                     req.return_token_strs)
        return JSONResponse(out)

    async def detokenize(self, body: bytes, ctx: RequestContext) -> Response:
        req = parse_body(body, DetokenizeRequest)
        spec = self._spec(req.model, ctx)
        return JSONResponse({"prompt": await self.models.call(spec, "detokenize", list(req.tokens))})
