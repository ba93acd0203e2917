"""Ready-made apps over any served model: prompt templates with their own parameters.

    GET  /v1/apps                      the catalogue below, with each app's parameters
    POST /v1/apps/summarize            {"model": "tiny", "text": "...", "max_words": 40}
    ->   {"app": "summarize", "model": "tiny", "output": "...", "finish_reason": "stop", "usage": {...}}

Every app also takes the sampling fields of /v1/chat/completions (max_tokens, temperature, top_p,
seed, stop). The prompt is rendered as chat messages, so the model's chat template applies.
`APPS` is the catalogue; each app's body is validated by its own strict request model
(`App.request_model`: its parameters and the sampling fields; an optional parameter sent as null
is absent); `render` turns a request into messages, `run` answers a request.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field, create_model

from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import SamplingFields, new_id, usage
from llmos_ray.serve.types import APIError, GenerationRequest
from llmos_ray.serve.validation import parse_body, shown

MAX_INT_PARAM = 100_000
"""Largest value of an app's integer parameter (e.g. summarize's max_words)."""


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

    @functools.cached_property
    def request_model(self) -> type[BaseModel]:
        """The strict model of this app's request body: `model`, its parameters, the sampling fields."""
        fields: dict[str, Any] = {"model": (Optional[str], None)}
        for p in self.params:
            kind: Any = (Literal[p.choices] if p.choices else  # type: ignore[valid-type]
                         Annotated[int, Field(ge=1, le=MAX_INT_PARAM)] if p.type is int else
                         Annotated[str, AfterValidator(_not_blank)] if p.required else str)
            fields[p.name] = (kind, ...) if p.required else (Optional[kind], None)
        return create_model(f"{self.name.title()}AppRequest", __base__=SamplingFields, **fields)


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


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def app_named(name: str) -> App:
    """The app `name`, or APIError 404 naming the apps there are."""
    if name not in APPS:
        raise APIError(404, f"no app named {shown(name)}; available: {', '.join(APPS)}", param="app",
                       code="app_not_found")
    return APPS[name]


def render(app: App, req: BaseModel) -> list[dict[str, str]]:
    """The chat messages of a validated request to `app` (absent or null parameters take their default)."""
    values = {p.name: getattr(req, p.name) if getattr(req, p.name) is not None else p.default for p in app.params}
    if app.name == "summarize":
        values["style"] = " as bullet points" if values.get("style") == "bullets" else ""
    return [{"role": "system", "content": app.system.format(**values)},
            {"role": "user", "content": app.user.format(**values)}]


def route_name(request: Request) -> str:
    """The metrics route of a request to /v1/apps/{app}: 'apps/<name>' for an app that exists."""
    app = request.path_params.get("app")
    return f"apps/{app}" if app in APPS else "apps"


async def run(models: ServedModels, app: str, body: bytes, ctx: RequestContext) -> Response:
    """POST /v1/apps/{app}: render the prompt, generate, answer with the app's output."""
    spec_app = app_named(app)
    req = parse_body(body, spec_app.request_model)
    messages = render(spec_app, req)
    name = req.model
    if name is None and len(models.specs) == 1:  # one model served: an app needs no name for it
        name = next(iter(models.specs))
    elif name is None:
        raise APIError(400, f"model: field required (served models: {', '.join(models.specs)})", param="model",
                       code="missing_required_parameter")
    spec = models.get(name, ctx)
    require_generative(spec)
    if "temperature" not in req.model_fields_set:
        req = req.model_copy(update={"temperature": spec_app.temperature})
    params = models.sampling_params(req, spec, req.max_tokens, default=spec_app.max_tokens)
    if models.input_blocked(spec, [m["content"] for m in messages]):
        text, finish, use = "", "content_filter", usage(0, 0)
    else:
        result = await models.generate(spec, GenerationRequest(params=params, messages=messages))
        (text, finish), = models.finish(spec, [result])
        use = usage(result.prompt_tokens, result.completion_tokens)
    return JSONResponse({"id": new_id("app"), "object": "app.completion", "created": int(time.time()), "app": app,
                         "model": spec.name, "output": text, "finish_reason": finish, "usage": use})
