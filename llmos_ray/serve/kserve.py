"""The KServe v2 / Triton inference protocol for text models, beside the OpenAI API.

    GET  /v2, /v2/models/{name}[/ready], /v2/health/{live,ready}    server and model metadata, probes
    POST /v2/models/{name}/infer     inputs: text_input (BYTES, one element per prompt); optional
                                     max_tokens, temperature, top_p, seed, ... as request
                                     `parameters` or as one-element inputs
                                  -> outputs: text_output (BYTES, same shape)
    POST /v2/models/{name}/generate[_stream]   {"text_input": ..., "parameters": {...}}
                                  -> {"text_output": ..., "finish_reason": ...} (SSE when streamed)

Both JSON tensors and Triton's binary tensor data extension (`Inference-Header-Content-Length`,
4-byte little-endian length before each BYTES element) are understood, so `tritonclient.http`
works with its defaults. Bodies are validated by strict request models (`InferBody`,
`GenerateBody`: the wrong JSON type for `parameters`, `outputs` or `binary_data_size` is a 400
naming it), then by the protocol's rules (shapes, binary data, datatypes). The protocol's bodies
(parse_infer, infer_response, ...) are pure functions; `KServeRoutes` is what the /v2 routes do
with them. Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

from fastapi.responses import JSONResponse, Response
from pydantic import Field

from llmos_ray.serve import classify
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import SamplingFields, event_stream, sse, usage
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, GenerationRequest, SamplingParams
from llmos_ray.serve.validation import StrictRequest, read_json, validate

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                 "ignore_eos", "min_tokens")
INPUTS = [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}] + [
    {"name": k, "datatype": t, "shape": [1], "optional": True}
    for k, t in (("max_tokens", "INT32"), ("temperature", "FP32"), ("top_p", "FP32"), ("seed", "INT64"),
                 ("stop", "BYTES"), ("ignore_eos", "BOOL"), ("min_tokens", "INT32"))]
OUTPUTS = [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]


class TensorParameters(StrictRequest):
    binary_data_size: Optional[int] = Field(None, ge=0)
    """Bytes of this tensor's data in the binary part of the body (Triton's binary tensor extension)."""
    binary_data: Optional[bool] = None


class InputTensor(StrictRequest):
    name: str
    datatype: str
    shape: list[Annotated[int, Field(ge=0)]]
    parameters: Optional[TensorParameters] = None
    data: Any = None
    """The elements, flat or nested by shape; absent when they are binary."""


class RequestedOutput(StrictRequest):
    name: str
    parameters: Optional[TensorParameters] = None


class InferParameters(SamplingFields):
    binary_data_output: Optional[bool] = None


class InferBody(StrictRequest):
    """The JSON part of a v2 infer request."""

    id: Optional[str] = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: Optional[list[RequestedOutput]] = None
    parameters: Optional[InferParameters] = None


class GenerateBody(SamplingFields):
    """A /generate[_stream] body: the sampling fields at the top or in `parameters` (which win)."""

    text_input: str
    parameters: Optional[SamplingFields] = None


@dataclass
class InferRequest:
    id: Optional[str]
    texts: list[str]
    sampling: SamplingFields
    binary_outputs: set[str] = field(default_factory=set)


def model_metadata(name: str) -> dict[str, Any]:
    return {"name": name, "versions": ["1"], "platform": "llmos-ray", "inputs": INPUTS, "outputs": OUTPUTS}


def parse_infer(body: bytes, header_length: Optional[str]) -> InferRequest:
    """Parse a v2 infer request (JSON, optionally followed by binary tensor data)."""
    def bad(message: str, param: Optional[str] = None) -> APIError:
        return APIError(400, message, param=param, code="invalid_value")

    try:
        split = int(header_length) if header_length else len(body)
    except ValueError:
        raise bad("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= split <= len(body):
        raise bad(f"Inference-Header-Content-Length {split} is outside the body ({len(body)} bytes)")
    raw = read_json(body[:split])
    head = validate(raw, InferBody)
    binary, offset = body[split:], 0
    values: dict[str, list] = {}
    for tensor in head.inputs:
        name = tensor.name
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if size is not None:
            if offset + size > len(binary):
                raise bad(f"inputs.{name}: binary_data_size {size} runs past the body", f"inputs.{name}")
            chunk, offset = binary[offset:offset + size], offset + size
            data = _bytes_elements(chunk, name) if tensor.datatype == "BYTES" else \
                _numeric_elements(chunk, tensor.datatype, name)
        else:
            data = _flatten(tensor.data)
            if data is None:
                raise bad(f"inputs.{name}: has neither data nor binary_data_size", f"inputs.{name}")
        if len(data) != math.prod(tensor.shape):
            raise bad(f"inputs.{name}: shape {tensor.shape} holds {math.prod(tensor.shape)} elements, the data "
                      f"has {len(data)}", f"inputs.{name}")
        values[name] = data
    if not values.get("text_input"):
        raise bad("inputs.text_input: a BYTES input with at least one element is required", "inputs.text_input")
    texts = [_text(v, "text_input") for v in values["text_input"]]
    given = {k: v for k, v in (raw.get("parameters") or {}).items() if k in SamplingFields.model_fields}
    from_inputs = {k: [_text(s, k) for s in values[k]] if k == "stop" else values[k][0]
                   for k in SAMPLING_KEYS if values.get(k)}
    validate(from_inputs, SamplingFields, prefix="inputs")
    sampling = validate({**given, **from_inputs}, SamplingFields, prefix="parameters")
    want_binary = bool(head.parameters and head.parameters.binary_data_output)
    outputs = head.outputs or []
    binary_outputs = {o.name for o in outputs
                      if (o.parameters.binary_data if o.parameters and o.parameters.binary_data is not None
                          else want_binary)}
    if not outputs and want_binary:
        binary_outputs = {"text_output"}
    return InferRequest(head.id, texts, sampling, binary_outputs)


def infer_response(model: str, request_id: Optional[str], texts: list[str], binary: bool,
                   extra: Optional[dict] = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a v2 infer response with `text_output`."""
    out: dict[str, Any] = {"name": "text_output", "datatype": "BYTES", "shape": [len(texts)]}
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [out]}
    if request_id is not None:
        head["id"] = request_id
    if extra:
        head["parameters"] = extra
    if not binary:
        out["data"] = texts
        return json.dumps(head).encode(), {"content-type": "application/json"}
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))
    out["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(head).encode()
    return header + raw, {"content-type": "application/octet-stream",
                          "inference-header-content-length": str(len(header))}


def parse_generate(body: bytes) -> tuple[str, SamplingFields]:
    """(text_input, sampling fields) of a /generate body; sampling keys may sit at the top or in `parameters`."""
    raw = read_json(body)
    validate(raw, GenerateBody)  # names a bad field where it is, at the top or in parameters
    parameters = raw.get("parameters") or {}
    merged = {**{k: v for k, v in raw.items() if k in SamplingFields.model_fields}, **parameters}
    return raw["text_input"], validate(merged, SamplingFields, prefix="parameters")


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise APIError(400, f"input {name}: truncated BYTES element", param=f"inputs.{name}")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise APIError(400, f"input {name}: a BYTES element of {n} bytes runs past its tensor's data",
                           param=f"inputs.{name}")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _numeric_elements(raw: bytes, dtype: str, name: str) -> list:
    formats = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H",
               "UINT32": "I", "UINT64": "Q", "FP32": "f", "FP64": "d"}
    if dtype not in formats:
        raise APIError(400, f"input {name}: datatype {dtype} is not supported", param=f"inputs.{name}")
    fmt = formats[dtype]
    count = len(raw) // struct.calcsize(fmt)
    return list(struct.unpack(f"<{count}{fmt}", raw[:count * struct.calcsize(fmt)]))


def _flatten(data) -> Optional[list]:
    if data is None:
        return None
    if not isinstance(data, list):
        return [data]
    out = []
    for d in data:
        out.extend(_flatten(d) if isinstance(d, list) else [d])
    return out


def _text(value, name: str) -> str:
    """One element of the BYTES input `name` as text."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise APIError(400, f"inputs.{name}: elements must be UTF-8 text", param=f"inputs.{name}",
                           code="invalid_value") from None
    if not isinstance(value, str):
        raise APIError(400, f"inputs.{name}: elements must be strings, got {type(value).__name__}",
                       param=f"inputs.{name}", code="invalid_value")
    return value


# ---------------------------------------------------------------------------------------------
# The routes


class KServeRoutes:
    """What the /v2 routes do; the ingress routes delegate here."""

    def __init__(self, models: ServedModels):
        self.models = models
        self.classify = classify.ClassifyRoutes(models)

    @staticmethod
    def server_metadata() -> dict[str, Any]:
        from llmos_ray import __version__

        return {"name": "llmos-ray", "version": __version__, "extensions": ["binary_tensor_data", "generate"]}

    async def server_ready(self) -> Response:
        ready = all(await asyncio.gather(*(self.models.ready(n) for n in self.models.specs)))
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def model_metadata(self, name: str, key=None) -> dict[str, Any]:
        spec = self.models.get(name, param="name", key=key)
        return classify.model_metadata(spec.name) if spec.task == "classification" else model_metadata(spec.name)

    async def model_ready(self, name: str, key=None) -> Response:
        spec = self.models.get(name, param="name", key=key)
        ready = await self.models.ready(spec.name)
        return JSONResponse({"name": spec.name, "ready": ready}, status_code=200 if ready else 503)

    def _params(self, fields: SamplingFields, spec: ModelSpec) -> SamplingParams:
        return self.models.sampling_params(fields, spec, fields.max_tokens)

    async def infer(self, name: str, body: bytes, header_length: Optional[str], ctx: RequestContext) -> Response:
        spec = self.models.get(name, ctx, "name")
        parsed = parse_infer(body, header_length)
        if spec.task == "classification":  # one call, run in chunks of max_batch_size: no generation fan-out
            return await self.classify.infer(spec, parsed.id, parsed.texts, parsed.binary_outputs, ctx)
        self.models.check_fanout(spec, len(parsed.texts), "inputs.text_input")
        params = self._params(parsed.sampling, spec)
        if self.models.input_blocked(spec, parsed.texts):
            texts, finishes, results = [""] * len(parsed.texts), ["content_filter"] * len(parsed.texts), []
        else:
            results = await asyncio.gather(*(self.models.generate(spec, GenerationRequest(params=params, prompt=t))
                                             for t in parsed.texts))
            ctx.charge(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
            finished = self.models.finish(spec, results)
            texts, finishes = [t for t, _ in finished], [f for _, f in finished]
        payload, headers = infer_response(
            spec.name, parsed.id, texts, "text_output" in parsed.binary_outputs,
            {"finish_reason": ",".join(finishes), "completion_tokens": sum(r.completion_tokens for r in results)})
        if results:
            headers["x-llmos-batch-size"] = str(max(r.batch_size for r in results))
        return Response(payload, headers=headers)

    def _generate_request(self, name: str, body: bytes, ctx: RequestContext) -> tuple[ModelSpec, GenerationRequest]:
        spec = self.models.get(name, ctx, "name")
        classify.require_generative(spec)
        text, raw = parse_generate(body)
        return spec, GenerationRequest(params=self._params(raw, spec), prompt=text)

    async def generate(self, name: str, body: bytes, ctx: RequestContext) -> Response:
        spec, gen = self._generate_request(name, body, ctx)
        head = {"model_name": spec.name, "model_version": "1"}
        if self.models.input_blocked(spec, [gen.prompt]):
            return JSONResponse({**head, "text_output": "", "finish_reason": "content_filter"})
        result = await self.models.generate(spec, gen)
        ctx.charge(result.prompt_tokens, result.completion_tokens)
        (text, finish), = self.models.finish(spec, [result])
        return JSONResponse({**head, "text_output": text, "finish_reason": finish,
                             "usage": usage(result.prompt_tokens, result.completion_tokens)},
                            headers={"x-llmos-batch-size": str(result.batch_size)})

    async def generate_stream(self, name: str, body: bytes, ctx: RequestContext) -> Response:
        spec, gen = self._generate_request(name, body, ctx)
        head = {"model_name": spec.name, "model_version": "1"}
        if self.models.input_blocked(spec, [gen.prompt]):
            async def blocked():
                yield sse({**head, "text_output": "", "finish_reason": "content_filter"})
            return event_stream(blocked())
        first, stream = await self.models.open_stream(spec, gen)

        async def events():
            try:
                async for text, finish, _ in self.models.pieces(spec, first, stream, ctx):
                    if text or finish:
                        yield sse({**head, "text_output": text, **({"finish_reason": finish} if finish else {})})
            except Exception as e:
                yield sse({"error": self.models.stream_error(e, spec).message})
        return event_stream(events())
