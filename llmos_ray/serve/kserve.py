"""The KServe v2 / Triton inference protocol for text models, beside the OpenAI API.

    POST /v2/models/{name}/infer     inputs: text_input (BYTES, one element per prompt); optional
                                     max_tokens, temperature, top_p, seed, ... as request
                                     `parameters` or as one-element inputs
                                  -> outputs: text_output (BYTES, same shape)

Both JSON tensors and Triton's binary tensor data extension (`Inference-Header-Content-Length`,
4-byte little-endian length before each BYTES element) are understood, so `tritonclient.http`
works with its defaults.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from llmos_ray.serve.types import APIError

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
    try:
        head = json.loads(body[:split])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
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
