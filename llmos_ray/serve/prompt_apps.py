"""The app routes: the app store's apps over any served model.

    GET  /v1/apps                      the catalogue (the latest version of each app, its parameters)
    POST /v1/apps/summarize            {"model": "tiny", "text": "...", "max_words": 40}
    POST /v1/apps/haiku@2              a pinned version
    ->   {"app": "summarize", "app_version": 1, "model": "tiny", "output": "...", "finish_reason": "stop",
          "usage": {...}}                                       (+ "output_check" with an output schema)

Every app also takes the sampling fields of /v1/chat/completions (max_tokens, temperature, top_p,
seed, stop), over its own sampling defaults. The prompt is the app's chat messages rendered with
the request's parameters, so the model's chat template applies; a seq2seq model (an encoder-decoder)
gets the app's `text` parameter as its source instead. With no "model", the app's
default model is used when it is served (by that name, or a served version of that library
model), else the one served model. The model's safety rules and the app's own both apply.
Apps come from an `app_store.AppCatalog`, which picks up new and changed apps without a restart.
A body is read by the one validation layer into the app's strict request model (`request_model`:
`model`, its parameters with their types and bounds, the sampling fields); a parameter sent as
null is absent (its default applies).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field, create_model

from llmos_ray.errors import ConfigError
from llmos_ray.serve.app_specs import AppSpec, Param
from llmos_ray.serve.app_store import AppCatalog, latest, pick
from llmos_ray.serve.classify import require_generative
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.keys import KeyRecord
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.protocol import SamplingFields, new_id, usage
from llmos_ray.serve.seq2seq import app_source
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError, GenerationRequest
from llmos_ray.serve.validation import parse_body, shown, validate

_known: set[str] = set()
"""App names of the latest catalogue read in this process (metrics label only known names)."""
_context: dict[str, int] = {}
"""Context length per served model, asked of a replica once."""
_models: dict[str, type[BaseModel]] = {}
"""Request models by app version and parameters (an app's request model is built once)."""
_SCALARS = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list[str]}


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _field(p: Param) -> tuple[Any, Any]:
    """A parameter as a pydantic field: its type, choices, bounds and length; optional ones nullable.
    Fields are named `param_<name>` with the parameter's name as alias, so that no parameter name
    can collide with the model's own attributes."""
    if p.enum:
        kind: Any = Literal[tuple(p.enum)]  # type: ignore[valid-type]
    else:
        bounds = {k: v for k, v in (("ge", p.minimum), ("le", p.maximum), ("max_length", p.max_length))
                  if v is not None}
        kind = Annotated[_SCALARS[p.type], Field(**bounds)] if bounds else _SCALARS[p.type]
        if p.type == "string" and p.required:
            kind = Annotated[kind, AfterValidator(_not_blank)]
    if p.required and p.default is None:
        return kind, Field(alias=p.name)
    return Optional[kind], Field(None, alias=p.name)


def request_model(spec: AppSpec) -> type[BaseModel]:
    """The strict model of a request body to app `spec`: `model`, its parameters, the sampling fields."""
    key = f"{spec.name}@{spec.version}:{spec.parameters!r}"
    if key not in _models:
        fields = {f"param_{p.name}": _field(p) for p in spec.parameters}
        name = "".join(part.title() for part in spec.name.replace("-", "_").split("_")) + "AppRequest"
        _models[key] = create_model(name, __base__=SamplingFields, model=(Optional[str], None), **fields)
    return _models[key]


def parameter_values(spec: AppSpec, req: BaseModel) -> dict[str, Any]:
    """{parameter name: value or None} of a request validated by `request_model(spec)`."""
    return {p.name: getattr(req, f"param_{p.name}") for p in spec.parameters}


async def catalog(apps: AppCatalog, key: Optional[KeyRecord] = None) -> dict[str, Any]:
    """GET /v1/apps: the latest version of every app the caller's key may run (the library is
    re-read when it changed)."""
    specs = [s for s in latest(await asyncio.to_thread(apps.refresh)) if key is None or key.allows_app(s.name)]
    _known.update(s.name for s in specs)
    return {"object": "list", "data": [s.describe() for s in specs]}


def route_name(request: Request) -> str:
    """The metrics route of a request to /v1/apps/{app}: 'apps/<name>' for a known app."""
    app = str(request.path_params.get("app", "")).partition("@")[0]
    return f"apps/{app}" if app in _known else "apps"


async def find(apps: AppCatalog, ref: str, key: Optional[KeyRecord] = None) -> AppSpec:
    """The app `ref` names, or a 404 naming the apps there are. An app the caller's `key` may not
    run is a 404 like one that does not exist, naming none."""
    current = await asyncio.to_thread(apps.refresh)
    if key is not None and key.apps is not None:
        current = {name: versions for name, versions in current.items() if key.allows_app(name)}
    try:
        spec = pick(current, ref)
    except ConfigError as e:
        message = str(e) if key is None or key.apps is None else f"app {shown(ref)} does not exist"
        raise APIError(404, message, param="app", code="app_not_found") from None
    _known.add(spec.name)
    return spec


def choose_model(spec: AppSpec, requested: Any, models: ServedModels) -> str:
    """The served model an app request runs on: the one asked for, else the app's default model
    when it is served, else the one model served; 400 otherwise."""
    if requested is not None:
        return requested
    served = models.specs
    if spec.model is not None:
        if spec.model in served:
            return spec.model
        wanted = spec.model.split("@")[0].split(":")[0]
        same = [n for n, s in served.items() if (s.registry_entry or {}).get("name") == wanted]
        if len(same) == 1:
            return same[0]
        raise APIError(400, f"model: app {spec.name!r} runs on model {spec.model!r}, which is not served here "
                            f"(served: {', '.join(served)}); name one in \"model\"", param="model",
                       code="missing_required_parameter")
    if len(served) == 1:
        return next(iter(served))
    raise APIError(400, f"model: field required (served models: {', '.join(served)})", param="model",
                   code="missing_required_parameter")


async def check_requirements(spec: AppSpec, model: ModelSpec, models: ServedModels) -> None:
    """400 when the model does not meet the app's `requires` (task, min_context)."""
    need = spec.requires
    task = (model.registry_entry or {}).get("task") or model.task
    if "task" in need and need["task"] != task:
        raise APIError(400, f"model: app {spec.name!r} needs a {need['task']} model; {model.name!r} is {task}",
                       param="model", code="model_not_suitable")
    if "min_context" in need and model.engine == "transformers":
        if model.name not in _context:
            info = await asyncio.wait_for(models.handles[model.name].info.remote(), 10)
            _context[model.name] = info["context_length"]
        if _context[model.name] < need["min_context"]:
            raise APIError(400, f"model: app {spec.name!r} needs a context of {need['min_context']} tokens; "
                                f"{model.name!r} has {_context[model.name]}", param="model", code="model_not_suitable")


async def run(models: ServedModels, apps: AppCatalog, app: str, body: bytes, ctx: RequestContext) -> Response:
    """POST /v1/apps/{app}: render the prompt, generate, answer with the app's output."""
    spec = await find(apps, app, ctx.key)
    ctx.app, ctx.route = spec.name, f"apps/{spec.name}"  # whichever ingress replica saw the app first
    req = parse_body(body, request_model(spec))
    values = parameter_values(spec, req)
    messages = spec.render(values)
    model = models.get(choose_model(spec, req.model, models), ctx)
    require_generative(model)
    source = app_source(spec.name, values) if model.task == "seq2seq" else None
    if source is not None:  # an encoder-decoder takes the text itself, not chat messages (serve/seq2seq.py)
        messages = [{"role": "user", "content": source}]
    await check_requirements(spec, model, models)
    given = {k for k in req.model_fields_set if k in SamplingFields.model_fields}
    defaults = validate(spec.sampling, SamplingFields, prefix="sampling")
    fields = req.model_copy(update={k: getattr(defaults, k) for k in spec.sampling if k not in given})
    params = models.sampling_params(fields, model, fields.max_tokens if "max_tokens" in given else None,
                                    default=spec.sampling.get("max_tokens"))
    if spec.blocks_input(messages) or models.input_blocked(model, [m["content"] for m in messages]):
        text, finish, use = "", "content_filter", usage(0, 0)
    else:
        gen = GenerationRequest(params=params, prompt=source) if source is not None else \
            GenerationRequest(params=params, messages=messages)
        result = await models.generate(model, gen)
        (text, finish), = models.finish(model, [result])
        text, finish = spec.screen_output(text, finish)
        use = usage(result.prompt_tokens, result.completion_tokens)
        ctx.charge(result.prompt_tokens, result.completion_tokens)
    return JSONResponse(response(spec, model.name, text, finish, use))


def response(spec: AppSpec, model: str, text: str, finish: str, use: dict, rid: Optional[str] = None) -> dict:
    """The body of an app's answer (the SDK builds the same in-process)."""
    out = {"id": rid or new_id("app"), "object": "app.completion", "created": int(time.time()), "app": spec.name,
           "app_version": spec.version, "model": model, "output": text, "finish_reason": finish, "usage": use}
    check = spec.check_output(text)
    if check is not None:
        out["output_check"] = check
    return out
