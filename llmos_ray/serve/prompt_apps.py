"""Ready-made apps over any served model: prompt templates with their own parameters.

    GET  /v1/apps                      the catalogue below, with each app's parameters
    POST /v1/apps/summarize            {"model": "tiny", "text": "...", "max_words": 40}
    ->   {"app": "summarize", "model": "tiny", "output": "...", "finish_reason": "stop", "usage": {...}}

Every app also takes the sampling fields of /v1/chat/completions (max_tokens, temperature, top_p,
seed, stop). The prompt is rendered as chat messages, so the model's chat template applies.
`APPS` is the catalogue, `render` turns a request into messages, `run` answers a request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import SamplingFields, new_id, read_json, usage, validate
from llmos_ray.serve.types import APIError, GenerationRequest, bad_request


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    description: str
    required: bool = False
    default: Any = None
    choices: tuple = ()


@dataclass(frozen=True)
class App:
    name: str
    description: str
    system: str
    user: str
    params: tuple[Param, ...]
    temperature: float = 0.2
    max_tokens: int = 256

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "parameters": [{"name": p.name, "type": p.type.__name__, "required": p.required,
                                "default": p.default, "description": p.description,
                                **({"choices": list(p.choices)} if p.choices else {})} for p in self.params]}


APPS: dict[str, App] = {a.name: a for a in [
    App("chat", "One turn of conversation with an optional system prompt.",
        system="{system}", user="{message}", temperature=0.7,
        params=(Param("message", str, "What the user says.", required=True),
                Param("system", str, "System prompt.", default="You are a helpful assistant."))),
    App("summarize", "Summarize a text in a bounded number of words.",
        system="You summarize texts faithfully and concisely, without adding facts.",
        user="Summarize the following text in at most {max_words} words{style}.\n\n{text}",
        params=(Param("text", str, "The text to summarize.", required=True),
                Param("max_words", int, "Upper bound on the summary's length in words.", default=60),
                Param("style", str, "'paragraph' or 'bullets'.", default="paragraph",
                      choices=("paragraph", "bullets")))),
    App("translate", "Translate a text into another language.",
        system="You are a professional translator. Reply with the translation only.",
        user="Translate the following text from {source_language} to {target_language}.\n\n{text}",
        params=(Param("text", str, "The text to translate.", required=True),
                Param("target_language", str, "Language to translate into, e.g. 'French'.", required=True),
                Param("source_language", str, "Language of the text.", default="the detected language"))),
    App("code", "Write code for an instruction.",
        system="You are an expert {language} programmer. Reply with code only, in one fenced code block.",
        user="{instruction}",
        params=(Param("instruction", str, "What the code should do.", required=True),
                Param("language", str, "Programming language.", default="python"))),
]}


def catalog() -> dict[str, Any]:
    return {"object": "list", "data": [a.describe() for a in APPS.values()]}


def render(name: str, body: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(chat messages, sampling defaults) for app `name` and its request body; 400 naming a bad field."""
    if name not in APPS:
        raise APIError(404, f"no app named {name!r}; available: {', '.join(APPS)}", param="app",
                       code="app_not_found")
    app = APPS[name]
    values: dict[str, Any] = {}
    for p in app.params:
        value = body.get(p.name, p.default)
        if value is None:
            if p.required:
                raise APIError(400, f"{p.name}: field required", param=p.name, code="missing_required_parameter")
            continue
        if p.type is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise bad_request(f"{p.name}: must be a positive integer, got {value!r}", p.name)
        if p.type is str and (not isinstance(value, str) or (p.required and not value.strip())):
            raise bad_request(f"{p.name}: must be a non-empty string, got {value!r}", p.name)
        if p.choices and value not in p.choices:
            raise bad_request(f"{p.name}: must be one of {list(p.choices)}, got {value!r}", p.name)
        values[p.name] = value
    if name == "summarize":
        values["style"] = " as bullet points" if values.get("style") == "bullets" else ""
    messages = [{"role": "system", "content": app.system.format(**values)},
                {"role": "user", "content": app.user.format(**values)}]
    return messages, {"temperature": app.temperature, "max_tokens": app.max_tokens}


def route_name(request: Request) -> str:
    """The metrics route of a request to /v1/apps/{app}: 'apps/<name>' for an app that exists."""
    app = request.path_params.get("app")
    return f"apps/{app}" if app in APPS else "apps"


async def run(models: ServedModels, app: str, body: bytes, ctx: RequestContext) -> Response:
    """POST /v1/apps/{app}: render the prompt, generate, answer with the app's output."""
    data = read_json(body)
    messages, defaults = render(app, data)
    name = data.get("model")
    if name is None and len(models.specs) == 1:  # one model served: an app needs no name for it
        name = next(iter(models.specs))
    elif name is None:
        raise APIError(400, f"model: field required (served models: {', '.join(models.specs)})", param="model",
                       code="missing_required_parameter")
    spec = models.get(name, ctx)
    require_generative(spec)
    given = {k: v for k, v in data.items() if k in SamplingFields.model_fields}
    fields = validate({**defaults, **given}, SamplingFields)
    params = models.sampling_params(fields, spec, fields.max_tokens if "max_tokens" in given else None,
                                    default=defaults["max_tokens"])
    if models.input_blocked(spec, [m["content"] for m in messages]):
        text, finish, use = "", "content_filter", usage(0, 0)
    else:
        result = await models.generate(spec, GenerationRequest(params=params, messages=messages))
        (text, finish), = models.finish(spec, [result])
        use = usage(result.prompt_tokens, result.completion_tokens)
    return JSONResponse({"id": new_id("app"), "object": "app.completion", "created": int(time.time()), "app": app,
                         "model": spec.name, "output": text, "finish_reason": finish, "usage": use})
