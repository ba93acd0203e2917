"""/v1/embeddings: pooled final hidden states of a served causal LM, in OpenAI's shapes.

    POST /v1/embeddings  {"model", "input": str | [str] | [ids] | [[ids]], "encoding_format"?: "float" | "base64",
                          "dimensions"?: (400: not supported), "user"?}
                      -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
                          "usage": {"prompt_tokens", "total_tokens"}}

    vectors = embed(model, [ids, ...], pooling, pad_id)   # the replica's maths (batched, no Ray)

An embedding is the model's last hidden state (after its final norm) pooled over the input's
tokens: `mean` (the default) or `last` (the last token's, as decoder embedding models such as
E5-Mistral do), per model: serve.model_options.NAME.embedding_pooling. It is then scaled to unit
length, as OpenAI's embeddings are. base64 is the little-endian float32 bytes, as the openai
client decodes them.
"""

from __future__ import annotations

import base64
import struct
from typing import Literal, Optional, Union

from fastapi.responses import JSONResponse, Response

from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.types import bad_request
from llmos_ray.serve.validation import StrictRequest, TokenId, parse_body

MAX_INPUTS = 256
"""Most inputs in one /v1/embeddings request (OpenAI allows 2048; each is a forward pass here)."""


class EmbeddingRequest(StrictRequest):
    model: str
    input: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


def embed(model, inputs: list[list[int]], pooling: str, pad_id: int):
    """(inputs x hidden) unit-length embeddings: one left-padded forward pass over all `inputs`."""
    import torch

    width = max(len(ids) for ids in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, row in enumerate(inputs):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1].float()
    if pooling == "last":
        pooled = hidden[:, -1]  # left padding: every row's last token is the last position
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _inputs(value) -> list[Union[str, list[int]]]:
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [list(value)]
    else:
        items = [v if isinstance(v, str) else list(v) for v in value]
    if not items:
        raise bad_request("input: must not be empty", "input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"input: at most {MAX_INPUTS} inputs per request, got {len(items)}", "input")
    for i, item in enumerate(items):
        if not item:
            raise bad_request(f"input.{i}: must not be empty", f"input.{i}" if len(items) > 1 else "input")
    return items


def _encoded(vector: list[float], encoding_format: str) -> Union[list[float], str]:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class EmbeddingRoutes:
    """What /v1/embeddings does; the ingress delegates here."""

    def __init__(self, models: ServedModels):
        self.models = models

    async def embeddings(self, body: bytes, ctx: RequestContext) -> Response:
        req = parse_body(body, EmbeddingRequest)
        spec = self.models.get(req.model, ctx)
        require_generative(spec)
        if spec.engine != "transformers":
            raise bad_request(f"model {spec.name!r} runs on engine {spec.engine!r}: /v1/embeddings serves models on "
                              "the transformers engine", "model", "unsupported_parameter")
        if req.dimensions is not None:
            raise bad_request("dimensions: not supported by this server (embeddings have the model's hidden size)",
                              "dimensions", "unsupported_parameter")
        vectors, tokens = await self.models.call(spec, "embed", _inputs(req.input))
        ctx.charge(tokens, 0)  # the key's usage and limits count embedded tokens as prompt tokens
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": spec.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
