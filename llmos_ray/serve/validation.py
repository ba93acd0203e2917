"""The one validation layer of the HTTP API: a request body (bytes) becomes a typed request model,
or an APIError 400 that names the field. Every route parses its body here: the OpenAI routes,
the prompt apps and KServe v2 alike.

    data = read_json(body)                    # bounded JSON -> a dict, or 400
    req = validate(data, CompletionRequest)   # a strict pydantic model, or 400 naming `param`
    req = parse_body(body, CompletionRequest) # both

`read_json` bounds the body before and while decoding it, so no body reaches the limits of the
parsers below (Python's json raises RecursionError past ~1000 levels; int() raises ValueError
past 4,300 digits):

    nesting      at most MAX_DEPTH nested arrays/objects
    numbers      at most MAX_NUMBER_CHARS characters; NaN, Infinity and floats that overflow to
                 inf are refused (they are not JSON, and they would reach the maths as NaN)
    strings      lone UTF-16 surrogates ("\\ud800") are refused with the field that holds one:
                 they cannot be encoded, so they must reach neither a tokenizer nor a response

(The size of a body is the middleware's: serve.max_request_bytes, 413.) Request models are
strict: no type coercion ("1" is not 1, 1.0 is not an int, 1 is not true), no NaN.

The field types the request models share live here too: `Seed` (a 64-bit integer, as
torch.Generator.manual_seed takes), `TokenId`, `StopSequences` and `LogitBias` (token-id keys in
ASCII digits: "²" and "1.5" are not token ids).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Annotated, Any, Optional, TypeVar, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from llmos_ray.serve.types import APIError

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 64
"""Most nested JSON arrays/objects in a request body (OpenAI bodies nest ~5 deep; tool schemas ~20)."""
MAX_NUMBER_CHARS = 100
"""Longest JSON number accepted, in characters."""
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 16, 256
MAX_LOGIT_BIAS = 1024
"""Most logit_bias entries in one request (each is work on every decoding step)."""
SEED_RANGE = (-2**63, 2**63)
"""Seeds are 64-bit signed integers: torch.Generator.manual_seed accepts them all."""
TOKEN_ID_LIMIT = 2**31
"""Token ids are below this (the engine checks the model's own vocabulary)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN_KEY = re.compile(r"[0-9]{1,10}")
_LONG_NUMBER = re.compile(r"-?[0-9][0-9.eE+-]{%d,}" % MAX_NUMBER_CHARS)
_BIG_EXPONENT = re.compile(r"[eE]\+?0*[0-9]{3,}")


class _BodyError(ValueError):
    """A bound of `read_json` was crossed while decoding."""


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BodyError(f"the number {text} is too large for a float")
    return value


def _constant(name: str):
    raise _BodyError(f"{name} is not a JSON value")


def _depth(outside: str) -> int:
    """The deepest nesting of arrays/objects in JSON whose strings were taken out (`outside`)."""
    if outside.count("[") + outside.count("{") <= MAX_DEPTH:  # cannot be deeper: no scan
        return 0
    brackets = _NOT_BRACKET.sub("", outside)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def read_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object within the bounds above, or APIError 400."""
    try:
        text = raw.decode(json.detect_encoding(raw))
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 text: {e}", code="invalid_json") from None
    outside = _STRING.sub('""', text)  # the bounds read the JSON between its strings
    depth = _depth(outside)
    if depth > MAX_DEPTH:
        raise APIError(400, f"request body nests {depth} arrays/objects deep; the limit is {MAX_DEPTH}",
                       code="invalid_json")
    long = _LONG_NUMBER.search(outside)
    if long:
        raise APIError(400, f"request body has a number of {len(long.group())} characters; the limit is "
                       f"{MAX_NUMBER_CHARS}", code="invalid_json")
    # Only a float with an exponent of 3+ digits can overflow to inf: only then is each float checked.
    hooks = {"parse_float": _float} if _BIG_EXPONENT.search(outside) else {}
    try:
        data = json.loads(text, parse_constant=_constant, **hooks)
    except (json.JSONDecodeError, _BodyError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {_json_type(data)}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):
        _refuse_surrogates(data)
    return data


def _refuse_surrogates(data: dict[str, Any]) -> None:
    """APIError 400 naming the first string (or key) in `data` that holds a lone surrogate."""
    found = _surrogate_at(data, "")
    if found is not None:
        path, char = found
        raise APIError(400, f"{path or 'request body'}: contains the lone UTF-16 surrogate {char!a}, which is not "
                       "valid Unicode text", param=path or None, code="invalid_value")


def _surrogate_at(value: Any, path: str) -> Optional[tuple[str, str]]:
    """(path, surrogate) of the first lone surrogate in `value`; a key that holds one is named by its parent."""
    if isinstance(value, str):
        hit = _SURROGATE.search(value)
        return (path, hit.group()) if hit else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return path, _SURROGATE.search(key).group()
        found = _surrogate_at(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


_LABELS = ("str", "int", "float", "bool", "none", "[key]")
_LABEL_PREFIXES = ("list[", "dict[", "union[", "tagged-union[", "literal[", "nullable[", "function-", "lax-or-strict[",
                   "json-or-python[", "chain[", "constrained-", "is-instance[", "model[", "tuple[", "set[")


def _is_label(part: Any) -> bool:
    text = str(part)
    return text in _LABELS or text.startswith(_LABEL_PREFIXES)


def _param(loc: tuple) -> Optional[str]:
    """The field a pydantic error location names: its path up to the first of pydantic's own labels
    (a union reports one error per member; the member's label is not a field)."""
    parts = list(itertools.takewhile(lambda p: not _is_label(p), loc))
    return ".".join(str(p) for p in parts) or None


def validate(data: Any, model_cls: type[M], prefix: str = "") -> M:
    """`data` as a `model_cls`, or APIError 400 naming the offending field (`prefix.field` when given)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        param = _param(errors[0]["loc"])
        # Of a union's errors (one per member), the one that got deepest says what is wrong.
        first = max((err for err in errors if _param(err["loc"]) == param), key=lambda err: len(err["loc"]))
        where = ".".join(str(p) for p in first["loc"] if not _is_label(p)) or None
        if prefix:
            param, where = (f"{prefix}.{param}" if param else prefix), (f"{prefix}.{where}" if where else prefix)
        missing = first["type"] == "missing"
        message = "field required" if missing else first["msg"]
        raise APIError(400, f"{where}: {message}" if where else message, param=param,
                       code="missing_required_parameter" if missing else "invalid_value") from None


def parse_body(raw: bytes, model_cls: type[M]) -> M:
    """Bytes -> a validated request, or APIError 400 naming the offending field."""
    return validate(read_json(raw), model_cls)


def shown(value: Any, limit: int = 80) -> str:
    """`value` as an error message quotes it: its repr, cut at `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- field types shared by the request models -------------------------------------------------


class StrictRequest(BaseModel):
    """A request body or part of one: strict types, no NaN; unknown fields are ignored (as
    OpenAI-compatible servers do, so that newer SDKs keep working)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _stops(value: Union[str, list[str], None]) -> list[str]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for s in stops:
        if not s:
            raise ValueError("stop sequences must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return stops


def _logit_bias(value: Optional[dict[str, float]]) -> Optional[dict[int, float]]:
    if not value:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    out = {}
    for key, bias in value.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise ValueError(f"keys are token ids in decimal digits, got {shown(key)}")
        if not -100 <= bias <= 100:
            raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
        out[int(key)] = bias
    return out


Seed = Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1], description="A 64-bit signed integer.")]
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]
StopSequences = Annotated[Optional[Union[str, list[str]]], AfterValidator(_stops)]
"""A stop string or a list of them; validated into a list[str] (empty when none)."""
LogitBias = Annotated[Optional[dict[str, float]], AfterValidator(_logit_bias),
                      Field(json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,10}$"}})]
"""{"token id": bias in [-100, 100]}; validated into {int: float} (None when empty)."""
