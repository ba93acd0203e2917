"""Text classification over HTTP: POST /v1/classify and the KServe v2 `infer` of a classifier.

    POST /v1/classify   {"model", "input": str | [str], "text_pair"?: str | [str], "top_k"?: int}
                     -> {"id", "object": "classification", "model",
                         "data": [{"index", "label", "score", "labels": [{"label", "score"}, ...]}],
                         "usage": {"inputs"}}
    POST /v2/models/{classifier}/infer    inputs: text_input (BYTES, one element per text)
                     -> outputs: label (BYTES) and score (FP32), same shape; JSON or Triton's binary
                        tensor data (4-byte little-endian length before each BYTES element, raw
                        little-endian float32 for FP32), so `tritonclient.http` works as is

The model is a classifier replica (classifier.py); generation routes (/v1/completions, chat,
apps, KServe generate) on a classifier are a 400 saying why (`require_generative`), and
/v1/classify on a generative model likewise. Bodies are read and validated by `validation`, as
every route's: 400s name the field.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Optional, Union

from fastapi.responses import JSONResponse, Response
from pydantic import Field

from llmos_ray.serve.dispatch import RETRIES, ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import new_id
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, bad_request
from llmos_ray.serve.validation import StrictRequest, parse_body

MAX_INPUTS = 256
"""At most this many texts per /v1/classify or infer request."""
INPUTS = [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
OUTPUTS = [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP32", "shape": [-1]}]


class ClassifyRequest(StrictRequest):
    model: str
    input: Union[str, list[str]]
    text_pair: Optional[Union[str, list[str]]] = None
    """Second texts of pair tasks, one per input."""
    top_k: int = Field(1, ge=1, le=1000)
    """Labels returned per input, best first."""


def require_generative(spec: ModelSpec) -> None:
    """A 400 for a generation request to a model that does not generate text."""
    if spec.task == "classification":
        raise bad_request(f"model {spec.name!r} is a text classifier (finetune.task=classification): it does not "
                          f"generate text; POST /v1/classify with {{\"model\": \"{spec.name}\", \"input\": ...}}, or "
                          f"KServe /v2/models/{spec.name}/infer", "model", "model_not_generative")


def _require_classifier(spec: ModelSpec) -> None:
    if spec.task != "classification":
        raise bad_request(f"model {spec.name!r} is a {spec.task} model, not a text classifier; /v1/classify needs a "
                          "model fine-tuned with finetune.task=classification", "model", "model_not_classifier")


def _texts(value, param: str, n: Optional[int] = None) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise bad_request(f"{param}: must not be empty", param)
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"{param}: at most {MAX_INPUTS} texts per request, got {len(texts)}", param)
    if n is not None and len(texts) != n:
        raise bad_request(f"{param}: {len(texts)} texts for {n} inputs; give one per input", param)
    for i, text in enumerate(texts):
        if not text.strip():
            raise bad_request(f"{param}.{i}: empty text", f"{param}.{i}")
    return texts


class ClassifyRoutes:
    """What /v1/classify and a classifier's KServe infer do; the ingress and KServeRoutes delegate here."""

    def __init__(self, models: ServedModels):
        self.models = models

    async def _classify(self, spec: ModelSpec, texts: list[str], pairs: Optional[list[str]], top_k: int) -> list:
        """Each text's [(label, score), ...] from a replica; a replica that died under it is retried."""
        for attempt in range(RETRIES):
            try:
                result = await self.models.handles[spec.name].classify.remote(texts, pairs, top_k)
            except Exception as e:
                err = self.models.error(e, spec)
                if err is not None:
                    raise err from None
                await asyncio.sleep(0.5 * 2 ** attempt)
                continue
            if isinstance(result, APIError):
                raise result
            return result
        raise APIError(503, f"model {spec.name!r} has no live replica; retry later", code="model_unavailable",
                       headers={"Retry-After": str(self.models.retry_after_s)})

    async def classify(self, body: bytes, ctx: RequestContext) -> Response:
        req = parse_body(body, ClassifyRequest)
        spec = self.models.get(req.model, ctx)
        _require_classifier(spec)
        texts = _texts(req.input, "input")
        pairs = _texts(req.text_pair, "text_pair", len(texts)) if req.text_pair is not None else None
        answers = await self._classify(spec, texts, pairs, req.top_k)
        data = [{"index": i, "label": labels[0][0] if labels else None, "score": labels[0][1] if labels else None,
                 "labels": [{"label": name, "score": score} for name, score in labels]}
                for i, labels in enumerate(answers)]
        return JSONResponse({"id": new_id("cls"), "object": "classification", "model": spec.name, "data": data,
                             "usage": {"inputs": len(texts)}})

    async def infer(self, spec: ModelSpec, request_id: Optional[str], texts: list[str], binary_outputs: set[str],
                    ctx: RequestContext) -> Response:
        """KServe v2 infer of a classifier (the request already parsed by kserve.parse_infer)."""
        _texts(texts, "inputs.text_input")
        if binary_outputs == {"text_output"}:  # binary_data_output with no outputs named: all of ours
            binary_outputs = {"label", "score"}
        answers = await self._classify(spec, texts, None, 1)
        labels = [a[0][0] if a else "" for a in answers]
        scores = [a[0][1] if a else 0.0 for a in answers]
        payload, headers = infer_response(spec.name, request_id, labels, scores, binary_outputs)
        return Response(payload, headers=headers)


def model_metadata(name: str) -> dict[str, Any]:
    """KServe v2 metadata of a classifier."""
    return {"name": name, "versions": ["1"], "platform": "llmos-ray", "inputs": INPUTS, "outputs": OUTPUTS}


def infer_response(model: str, request_id: Optional[str], labels: list[str], scores: list[float],
                   binary_outputs: set[str]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a v2 infer response with `label` (BYTES) and `score` (FP32) outputs; the
    outputs named in `binary_outputs` as Triton binary tensor data after the JSON header."""
    raw = {"label": b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in labels)),
           "score": struct.pack(f"<{len(scores)}f", *scores)}
    outputs, tail = [], b""
    for name, dtype, values in (("label", "BYTES", labels), ("score", "FP32", scores)):
        out: dict[str, Any] = {"name": name, "datatype": dtype, "shape": [len(values)]}
        if name in binary_outputs:
            out["parameters"] = {"binary_data_size": len(raw[name])}
            tail += raw[name]
        else:
            out["data"] = values
        outputs.append(out)
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request_id is not None:
        head["id"] = request_id
    header = json.dumps(head).encode()
    if not tail:
        return header, {"content-type": "application/json"}
    return header + tail, {"content-type": "application/octet-stream",
                           "inference-header-content-length": str(len(header))}
