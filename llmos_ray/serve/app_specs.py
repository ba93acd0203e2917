"""An app: a named spec of typed parameters, chat messages written as templates, a default model or
a requirement on the model, sampling defaults, an optional output JSON Schema and safety policy.

    name: haiku
    description: A haiku about a topic.
    parameters:
      topic: {type: string, required: true, description: What the poem is about., max_length: 200}
      mood: {type: string, enum: [calm, wild], default: calm}
    messages:
      - {role: system, content: You write haiku.}
      - {role: user, content: "A {{ mood }} haiku about {{ topic }}."}
    model: tiny:prod                       # optional: a model library reference
    requires: {task: causal_lm, min_context: 256}
    sampling: {temperature: 0.7, max_tokens: 48}
    output_schema: {type: string}          # optional; the answer is checked against it
    safety: {input_blocklist: [password], output_patterns: ["\\d{16}"], max_output_chars: 400}

`AppSpec.from_dict` checks a spec and raises ConfigError naming the field (an unknown key, a bad
type, a default that does not fit its parameter, a template that does not parse, uses a
placeholder that is no parameter or reaches past its parameters: `app_templates`, Jinja2's
sandbox). Parameter values are data: they are inserted, never evaluated.

At request time `split` separates a body into parameters and sampling fields, `render` checks the
parameters (APIError 400 naming the field) and returns the chat messages, `screen_output` applies
the app's output rules and `check_output` the output schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from llmos_ray.errors import ConfigError
from llmos_ray.serve.app_templates import check_template, render_template
from llmos_ray.serve.protocol import SamplingFields
from llmos_ray.serve.safety import SafetyPolicy
from llmos_ray.serve.types import APIError, bad_request

APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
TYPES = ("string", "integer", "number", "boolean", "array")
ROLES = ("system", "user", "assistant")
TASKS = ("causal_lm", "classification", "seq2seq", "masked_lm", "embedding")
SPEC_KEYS = ("name", "description", "parameters", "messages", "model", "requires", "sampling", "output_schema",
             "safety")
PARAM_KEYS = ("type", "description", "required", "default", "enum", "minimum", "maximum", "max_length")
SAFETY_KEYS = ("input_blocklist", "input_patterns", "output_blocklist", "output_patterns", "max_output_chars")
RESERVED = frozenset({"model", *SamplingFields.model_fields})
"""Request fields that are not app parameters."""
MAX_RENDERED_CHARS = 200_000


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    description: str = ""
    required: bool = False
    default: Any = None
    enum: tuple = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    max_length: Optional[int] = None

    def check(self, value: Any, where: str) -> Any:
        """`value` if it fits this parameter, else ValueError saying why (prefixed by `where`)."""
        ok = {"string": isinstance(value, str), "boolean": isinstance(value, bool),
              "integer": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "array": isinstance(value, list) and all(isinstance(v, str) for v in value)}[self.type]
        if not ok:
            article = "an" if self.type[0] in "ai" else "a"
            kind = "a list of strings" if self.type == "array" else f"{article} {self.type}"
            raise ValueError(f"{where}: must be {kind}, got {value!r}")
        if self.type == "string" and self.required and not value.strip():
            raise ValueError(f"{where}: must be a non-empty string")
        if self.enum and value not in self.enum:
            raise ValueError(f"{where}: must be one of {list(self.enum)}, got {value!r}")
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise ValueError(f"{where}: must be within [{self.minimum}, {self.maximum}], got {value!r}")
        if self.max_length is not None and len(value) > self.max_length:
            raise ValueError(f"{where}: at most {self.max_length} {'items' if self.type == 'array' else 'characters'}")
        return value

    def sample(self) -> Any:
        """A value that fits, to try the templates with when a spec is checked."""
        if self.default is not None:
            return self.default
        if self.enum:
            return self.enum[0]
        low = self.minimum if self.minimum is not None else 1
        return {"string": "text", "integer": int(low), "number": float(low), "boolean": True, "array": ["a"]}[self.type]

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "type": self.type, "required": self.required, "default": self.default,
               "description": self.description}
        if self.enum:
            out["choices"] = list(self.enum)
        out.update({k: getattr(self, k) for k in ("minimum", "maximum", "max_length") if getattr(self, k) is not None})
        return out


@dataclass(frozen=True)
class AppSpec:
    name: str
    description: str
    parameters: tuple[Param, ...]
    messages: tuple[tuple[str, str], ...]
    """(role, template source) pairs."""
    model: Optional[str] = None
    requires: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    output_schema: Optional[dict] = None
    safety: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    """Version in the store (assigned when it is created there; built-ins are version 1)."""
    source: str = "library"
    """'library' (the store) or 'builtin'."""
    created: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    # -- checking a spec ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any, **extra) -> "AppSpec":
        """Check a spec (the YAML/JSON mapping) and build it; ConfigError naming the field otherwise."""
        if not isinstance(raw, dict):
            raise ConfigError(f"an app spec is a mapping of {', '.join(SPEC_KEYS)}; got {type(raw).__name__}")
        _known_keys(raw, SPEC_KEYS, "app spec")
        name = raw.get("name")
        if not isinstance(name, str) or not APP_NAME_RE.match(name):
            raise ConfigError(f"name: {name!r} is not a valid app name (1-64 letters, digits, '_' or '-')")
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"description: must be a string, got {description!r}")
        params = _parameters(raw.get("parameters") or {})
        spec = cls(name=name, description=description, parameters=params,
                   messages=_messages(raw.get("messages"), params), model=_model(raw.get("model")),
                   requires=_requires(raw.get("requires") or {}), sampling=_sampling(raw.get("sampling") or {}),
                   output_schema=_output_schema(raw.get("output_schema")), safety=_safety(raw.get("safety") or {}),
                   **extra)
        spec.render({p.name: p.sample() for p in params}, checking=True)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The spec as written (what `llmos apps export` prints and `create` reads back)."""
        params = {}
        for p in self.parameters:
            d = {k: v for k, v in dataclasses.asdict(p).items() if k != "name" and v not in (None, (), "", False)}
            if p.enum:
                d["enum"] = list(p.enum)
            params[p.name] = d
        out = {"name": self.name, "description": self.description, "parameters": params,
               "messages": [{"role": r, "content": c} for r, c in self.messages], "model": self.model,
               "requires": dict(self.requires), "sampling": dict(self.sampling), "output_schema": self.output_schema,
               "safety": dict(self.safety)}
        return {k: v for k, v in out.items() if v not in (None, {}, "")}

    def describe(self) -> dict[str, Any]:
        """The app's entry in GET /v1/apps."""
        return {"name": self.name, "version": self.version, "source": self.source, "description": self.description,
                "model": self.model, "requires": dict(self.requires), "sampling": dict(self.sampling),
                "temperature": self.sampling.get("temperature", 1.0), "max_tokens": self.sampling.get("max_tokens"),
                "output_schema": self.output_schema, "parameters": [p.describe() for p in self.parameters]}

    # -- a request ------------------------------------------------------------------------------

    def split(self, body: dict[str, Any]) -> tuple[Optional[str], dict[str, Any], dict[str, Any]]:
        """(model, parameters, sampling fields given) of a request body; other fields are ignored."""
        model = body.get("model")
        params = {p.name: body[p.name] for p in self.parameters if p.name in body}
        given = {k: v for k, v in body.items() if k in SamplingFields.model_fields}
        return model, params, given

    def render(self, values: dict[str, Any], checking: bool = False) -> list[dict[str, str]]:
        """The chat messages for these parameter values (null = absent: the default applies). APIError
        400 naming a missing or bad parameter; while `checking` a spec, ConfigError naming the template."""
        filled: dict[str, Any] = {}
        for p in self.parameters:
            value = values.get(p.name)
            if value is None:
                value = p.default
            if value is None:
                if p.required:
                    raise APIError(400, f"{p.name}: field required", param=p.name, code="missing_required_parameter")
                continue
            try:
                filled[p.name] = p.check(value, p.name)
            except ValueError as e:
                raise bad_request(str(e), p.name) from None
        out = []
        for i, (role, source) in enumerate(self.messages):
            text = render_template(self.name, i, source, filled, checking)
            if role == "system" and not text.strip():
                continue  # an optional system prompt left empty
            out.append({"role": role, "content": text})
        if sum(len(m["content"]) for m in out) > MAX_RENDERED_CHARS:
            raise bad_request(f"the rendered prompt of app {self.name!r} exceeds {MAX_RENDERED_CHARS} characters")
        return out

    def policy(self) -> SafetyPolicy:
        """The app's own safety rules (on top of the model's)."""
        s = self.safety
        return SafetyPolicy.from_spec(_SafetyView(s.get("input_blocklist", []), s.get("input_patterns", []),
                                                  s.get("output_blocklist", []), s.get("output_patterns", []),
                                                  s.get("max_output_chars")))

    def blocks_input(self, messages: list[dict[str, str]]) -> bool:
        return self.policy().blocks_input("\n".join(m["content"] for m in messages))

    def screen_output(self, text: str, finish: str) -> tuple[str, str]:
        """The app's output rules applied to a whole answer: (text, finish_reason)."""
        policy = self.policy()
        if not policy.filters_output:
            return text, finish
        screen = policy.output_filter()
        out = screen.feed(text, final=True)
        return out, screen.finish or finish

    def check_output(self, text: str) -> Optional[dict[str, Any]]:
        """With an output schema: {"parsed": the answer as JSON (None if it is not JSON), "valid",
        "errors"}; None without one. A string schema accepts the raw text."""
        if self.output_schema is None:
            return None
        import jsonschema

        try:
            value = json.loads(_strip_fence(text))
        except json.JSONDecodeError as e:
            if self.output_schema.get("type") != "string":
                return {"parsed": None, "valid": False, "errors": [f"the answer is not JSON: {e}"]}
            value = text
        validator = jsonschema.validators.validator_for(self.output_schema)(self.output_schema)
        errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                  for e in validator.iter_errors(value)]
        return {"parsed": value, "valid": not errors, "errors": errors[:10]}


@dataclass(frozen=True)
class _SafetyView:
    """The safety_* attributes SafetyPolicy.from_spec reads, from an app's `safety` section."""

    safety_input_blocklist: list
    safety_input_patterns: list
    safety_output_blocklist: list
    safety_output_patterns: list
    safety_max_output_chars: Optional[int]


# ---------------------------------------------------------------------------------------------
# Checking the sections of a spec


def _known_keys(raw: dict, known: tuple, where: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown field {key!r}{hint} (fields: {', '.join(known)})")


def _parameters(raw: Any) -> tuple[Param, ...]:
    if not isinstance(raw, dict):
        raise ConfigError("parameters: a mapping of parameter name -> {type, description, required, default, ...}")
    params = []
    for name, p in raw.items():
        where = f"parameters.{name}"
        if not isinstance(name, str) or not PARAM_NAME_RE.match(name):
            raise ConfigError(f"{where}: {name!r} is not a valid parameter name (letters, digits, '_')")
        if name in RESERVED:
            raise ConfigError(f"{where}: {name!r} is a request field (model or a sampling setting); name it otherwise")
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: a mapping with at least 'type' ({', '.join(TYPES)})")
        _known_keys(p, PARAM_KEYS, where)
        if p.get("type") not in TYPES:
            raise ConfigError(f"{where}.type: must be one of {', '.join(TYPES)}, got {p.get('type')!r}")
        for key, kind in (("description", str), ("required", bool), ("max_length", int), ("enum", list)):
            if p.get(key) is not None and not isinstance(p[key], kind):
                raise ConfigError(f"{where}.{key}: must be a{'n' if kind is int else ''} {kind.__name__}, "
                                  f"got {p[key]!r}")
        for key in ("minimum", "maximum"):
            if p.get(key) is not None and (isinstance(p[key], bool) or not isinstance(p[key], (int, float))):
                raise ConfigError(f"{where}.{key}: must be a number, got {p[key]!r}")
        param = Param(name=name, type=p["type"], description=p.get("description") or "",
                      required=bool(p.get("required", False)), enum=tuple(p.get("enum") or ()),
                      minimum=p.get("minimum"), maximum=p.get("maximum"), max_length=p.get("max_length"))
        for i, choice in enumerate(param.enum):
            _fits(param, choice, f"{where}.enum[{i}]")
        if p.get("default") is not None:
            param = dataclasses.replace(param, default=_fits(param, p["default"], f"{where}.default"))
        params.append(param)
    return tuple(params)


def _fits(param: Param, value: Any, where: str) -> Any:
    try:
        return param.check(value, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _messages(raw: Any, params: tuple[Param, ...]) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("messages: a non-empty list of {role: system|user|assistant, content: template}")
    names = {p.name for p in params}
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: a mapping {{role, content}}, got {m!r}")
        _known_keys(m, ("role", "content"), where)
        if m.get("role") not in ROLES:
            raise ConfigError(f"{where}.role: must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}.content: must be a string (a template), got {m.get('content')!r}")
        check_template(m["content"], names, f"{where}.content")
        out.append((m["role"], m["content"]))
    if not any(role == "user" for role, _ in out):
        raise ConfigError("messages: at least one message must have role 'user'")
    return tuple(out)


def _model(raw: Any) -> Optional[str]:
    if raw is not None and (not isinstance(raw, str) or not raw.strip()):
        raise ConfigError(f"model: a model library reference (NAME, NAME@N, NAME:ALIAS), got {raw!r}")
    return raw


def _requires(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"requires: a mapping {{task, min_context}}, got {raw!r}")
    _known_keys(raw, ("task", "min_context"), "requires")
    if "task" in raw and raw["task"] not in TASKS:
        raise ConfigError(f"requires.task: must be one of {', '.join(TASKS)}, got {raw['task']!r}")
    if "min_context" in raw and (isinstance(raw["min_context"], bool) or not isinstance(raw["min_context"], int)
                                 or raw["min_context"] < 1):
        raise ConfigError(f"requires.min_context: a positive number of tokens, got {raw['min_context']!r}")
    return dict(raw)


def _sampling(raw: Any) -> dict[str, Any]:
    from llmos_ray.serve.validation import validate

    if not isinstance(raw, dict):
        raise ConfigError(f"sampling: a mapping of sampling settings, got {raw!r}")
    _known_keys(raw, tuple(SamplingFields.model_fields), "sampling")
    try:
        validate(raw, SamplingFields, "sampling")
    except APIError as e:
        raise ConfigError(e.message) from None
    return dict(raw)


def _output_schema(raw: Any) -> Optional[dict]:
    if raw is None:
        return None
    import jsonschema

    if not isinstance(raw, dict):
        raise ConfigError(f"output_schema: a JSON Schema (a mapping), got {raw!r}")
    try:
        jsonschema.validators.validator_for(raw).check_schema(raw)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"output_schema: not a valid JSON Schema: {e.message}") from None
    return raw


def _safety(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"safety: a mapping of {', '.join(SAFETY_KEYS)}, got {raw!r}")
    _known_keys(raw, SAFETY_KEYS, "safety")
    for key in SAFETY_KEYS[:4]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"safety.{key}: a list of strings, got {value!r}")
        if key.endswith("patterns"):
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"safety.{key}: invalid regular expression {pattern!r}: {e}") from None
    limit = raw.get("max_output_chars")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"safety.max_output_chars: a positive integer, got {limit!r}")
    return dict(raw)


def _strip_fence(text: str) -> str:
    """The body of a ``` fenced block when the answer is one, else the text."""
    m = re.fullmatch(r"\s*```[A-Za-z0-9_-]*\n(.*?)\n?```\s*", text, flags=re.S)
    return m.group(1) if m else text.strip()
