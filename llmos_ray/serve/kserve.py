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
works with its defaults. The protocol's bodies (parse_infer, infer_response, ...) are pure
functions; `KServeRoutes` is what the /v2 routes do with them. Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi.responses import JSONResponse, Response

from llmos_ray.serve import classify
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import SamplingFields, event_stream, read_json, sse, usage, validate
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, GenerationRequest, SamplingParams

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                 "ignore_eos", "min_tokens")
INPUTS = [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}] + [
    {"name": k, "datatype": t, "shape": [1], "optional": True}
    for k, t in (("max_tokens", "INT32"), ("temperature", "FP32"), ("top_p", "FP32"), ("seed", "INT64"),
                 ("stop", "BYTES"), ("ignore_eos", "BOOL"), ("min_tokens", "INT32"))]
OUTPUTS = [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]


@dataclass
class InferRequest:
    id: Optional[str]
    texts: list[str]
    sampling: dict[str, Any]
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
    head = read_json(body[:split])
    if not isinstance(head.get("inputs"), list):
        raise bad("request must be a JSON object with an 'inputs' list", "inputs")
    binary, offset = body[split:], 0
    values: dict[str, list] = {}
    for i, tensor in enumerate(head["inputs"]):
        if not isinstance(tensor, dict) or "name" not in tensor or "datatype" not in tensor:
            raise bad(f"inputs[{i}] needs 'name', 'datatype', 'shape' and data", f"inputs[{i}]")
        name, dtype = tensor["name"], tensor["datatype"]
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if offset + size > len(binary):
                raise bad(f"inputs[{i}] ({name}): binary_data_size {size} runs past the body", f"inputs.{name}")
            raw, offset = binary[offset:offset + size], offset + size
            data = _bytes_elements(raw, name) if dtype == "BYTES" else _numeric_elements(raw, dtype, name)
        else:
            data = _flatten(tensor.get("data"))
            if data is None:
                raise bad(f"inputs[{i}] ({name}) has neither data nor binary_data_size", f"inputs.{name}")
        values[name] = data
    if "text_input" not in values:
        raise bad("input 'text_input' (BYTES) is required", "inputs.text_input")
    texts = [_text(v) for v in values["text_input"]]
    sampling = {k: v for k, v in (head.get("parameters") or {}).items() if k in SAMPLING_KEYS}
    for key in SAMPLING_KEYS:
        if key in values and values[key]:
            v = values[key]
            v = [_text(s) for s in v] if key == "stop" else v[0]
            sampling[key] = v.item() if hasattr(v, "item") else v
    outputs = head.get("outputs") or []
    want_binary = bool((head.get("parameters") or {}).get("binary_data_output"))
    binary_outputs = {o.get("name") for o in outputs if isinstance(o, dict) and
                      (o.get("parameters") or {}).get("binary_data", want_binary)}
    if not outputs and want_binary:
        binary_outputs = {"text_output"}
    return InferRequest(head.get("id"), texts, sampling, binary_outputs)


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


def parse_generate(body: bytes) -> tuple[str, dict[str, Any]]:
    """(text_input, sampling fields) of a /generate body; sampling keys may sit at the top or in `parameters`."""
    data = read_json(body)
    if not isinstance(data.get("text_input"), str):
        raise APIError(400, "text_input: a string is required", param="text_input", code="invalid_value")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise APIError(400, "parameters: must be an object", param="parameters", code="invalid_value")
    return data["text_input"], {**{k: v for k, v in data.items() if k in SAMPLING_KEYS}, **parameters}


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise APIError(400, f"input {name}: truncated BYTES element", param=f"inputs.{name}")
        (n,) = struct.unpack_from("<I", raw, i)
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


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise APIError(400, "text_input must be UTF-8", param="inputs.text_input") from None
    if not isinstance(value, str):
        raise APIError(400, f"text_input elements must be strings, got {type(value).__name__}",
                       param="inputs.text_input")
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

    def model_metadata(self, name: str) -> dict[str, Any]:
        spec = self.models.get(name, param="name")
        return classify.model_metadata(spec.name) if spec.task == "classification" else model_metadata(spec.name)

    async def model_ready(self, name: str) -> Response:
        spec = self.models.get(name, param="name")
        ready = await self.models.ready(spec.name)
        return JSONResponse({"name": spec.name, "ready": ready}, status_code=200 if ready else 503)

    def _params(self, raw: dict[str, Any], spec: ModelSpec) -> SamplingParams:
        fields = validate(raw, SamplingFields, prefix="parameters")
        return self.models.sampling_params(fields, spec, fields.max_tokens)

    async def infer(self, name: str, body: bytes, header_length: Optional[str], ctx: RequestContext) -> Response:
        spec = self.models.get(name, ctx, "name")
        parsed = parse_infer(body, header_length)
        if spec.task == "classification":
            return await self.classify.infer(spec, parsed.id, parsed.texts, parsed.binary_outputs, ctx)
        params = self._params(parsed.sampling, spec)
        if self.models.input_blocked(spec, parsed.texts):
            texts, finishes, results = [""] * len(parsed.texts), ["content_filter"] * len(parsed.texts), []
        else:
            results = await asyncio.gather(*(self.models.generate(spec, GenerationRequest(params=params, prompt=t))
                                             for t in parsed.texts))
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
