"""The HTTP ingress: the FastAPI routes, each one line into the module that does the work.

    /health                          ingress liveness (no key)
    /v1/models, /v1/models/{name}    openai.OpenAIRoutes
    /v1/completions                  openai.OpenAIRoutes.respond(COMPLETIONS, ...)
    /v1/chat/completions             openai.OpenAIRoutes.respond(CHAT, ...)
    /v1/embeddings                   embeddings.EmbeddingRoutes
    /tokenize, /detokenize           tokens.TokenRoutes (vLLM's shapes)
    /v1/stats                        the engines' counters (dispatch.ServedModels.stats)
    /v1/usage, /v1/admin/usage       the usage ledger: the caller's own, everyone's (an admin key)
    /v1/load_lora_adapter,           lora.LoraRoutes: LoRA adapters added and removed at run time (vLLM's
    /v1/unload_lora_adapter          shapes; an admin key when keys are configured)
    /v1/apps, /v1/apps/{app}         prompt_apps (apps from the app store, app_store.AppCatalog)
    /v1/classify                     classify.ClassifyRoutes (classifier models)
    /v2/...                          kserve.KServeRoutes (probes under /v2/health need no key)

Request ids, API keys, limits, the body limit, request metrics and the error shape are the
middleware's (`middleware`, with `keys` and the usage meter `meter`); routing a request to its
model's replicas, retries and safety are `dispatch.ServedModels`'. One `Ingress` deployment (or
serve.ingress_replicas of them) sits in front of one `replica.ModelServer` deployment per model
(`build.build_app`). Every POST route's body is one strict request model, parsed by `validation`
(`REQUEST_MODELS` lists them: the hostile-input tests fuzz every route from it, so a new route
belongs there).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from llmos_ray.serve import prompt_apps
from llmos_ray.serve.app_store import AppCatalog, builtin_apps
from llmos_ray.serve.classify import ClassifyRequest, ClassifyRoutes
from llmos_ray.serve.dispatch import ServedModels
from llmos_ray.serve.embeddings import EmbeddingRequest, EmbeddingRoutes
from llmos_ray.serve.keys import KeyRecord
from llmos_ray.serve.kserve import GenerateBody, InferBody, KServeRoutes
from llmos_ray.serve.lora import LoadLoraAdapterRequest, LoraRoutes, UnloadLoraAdapterRequest
from llmos_ray.serve.meter import Meter, usage_report
from llmos_ray.serve.middleware import Guard, context, install, metered, request_body
from llmos_ray.serve.openai import CHAT, COMPLETIONS, OpenAIRoutes
from llmos_ray.serve.tokens import DetokenizeRequest, TokenizeRequest, TokenRoutes

log = logging.getLogger(__name__)

REQUEST_MODELS: dict[str, type] = {
    "/v1/completions": COMPLETIONS.request_model,
    "/v1/chat/completions": CHAT.request_model,
    "/v1/classify": ClassifyRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
    "/v1/load_lora_adapter": LoadLoraAdapterRequest,
    "/v1/unload_lora_adapter": UnloadLoraAdapterRequest,
    **{f"/v1/apps/{name}": prompt_apps.request_model(app) for name, app in builtin_apps().items()},
    "/v2/models/{name}/infer": InferBody,
    "/v2/models/{name}/versions/{version}/infer": InferBody,
    "/v2/models/{name}/generate": GenerateBody,
    "/v2/models/{name}/generate_stream": GenerateBody,
}
"""The request model of the body of every POST route (each prompt app by its own path)."""

api = install(FastAPI(title="llmos-ray", description="OpenAI-compatible and KServe v2 text generation on Ray Serve",
                      version="1"))


class Ingress:
    """One ingress replica: its API keys and limits (`guard`), the served models, and the routes."""

    def __init__(self, settings: dict[str, Any], specs: list[dict[str, Any]], handles: dict[str, Any]):
        keys = [KeyRecord.from_dict(k) for k in settings["keys"]]
        meter = (Meter(settings["app_name"], settings["usage_db"], settings.get("ingress_replicas", 1))
                 if settings.get("metering") else None)
        self.guard = Guard(keys, settings["max_request_bytes"], meter)
        self.models = ServedModels(specs, handles, settings["retry_after_s"], settings.get("adapter_table"))
        self.models.follow(now=True)  # the runtime LoRA adapters, before the first request
        self.openai = OpenAIRoutes(self.models)
        self.kserve = KServeRoutes(self.models)
        self.classify = ClassifyRoutes(self.models)
        self.tokens = TokenRoutes(self.models)
        self.embeddings = EmbeddingRoutes(self.models)
        self.lora = LoraRoutes(self.models, self.guard, settings.get("registry"))
        self.apps = AppCatalog(settings.get("registry"), settings.get("apps_refresh_s", 2.0))
        log.info("ingress for models %s; API keys %s; metering %s", list(self.models.specs),
                 "required" if keys else "not required", "on" if meter else "off")

    # -- OpenAI API --------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "models": list(self.models.specs)})

    @api.get("/v1/models", dependencies=metered("models"))
    async def list_models(self, request: Request) -> Response:
        return JSONResponse(self.openai.list_models(context(request).key))

    @api.get("/v1/models/{name:path}", dependencies=metered("models"))
    async def get_model(self, name: str, request: Request) -> Response:
        return JSONResponse(self.openai.get_model(name, context(request).key))

    @api.post("/v1/completions", dependencies=metered("completions"))
    async def completions(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.openai.respond(COMPLETIONS, body, context(request))

    @api.post("/v1/chat/completions", dependencies=metered("chat"))
    async def chat_completions(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.openai.respond(CHAT, body, context(request))

    @api.post("/v1/classify", dependencies=metered("classify"))
    async def classify_texts(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.classify.classify(body, context(request))

    @api.post("/v1/embeddings", dependencies=metered("embeddings"))
    async def embeddings_of(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.embeddings.embeddings(body, context(request))

    @api.post("/tokenize", dependencies=metered("tokenize"))
    async def tokenize(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.tokens.tokenize(body, context(request))

    @api.post("/detokenize", dependencies=metered("detokenize"))
    async def detokenize(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.tokens.detokenize(body, context(request))

    @api.post("/v1/load_lora_adapter", dependencies=metered("load_lora_adapter", limited=False))
    async def load_lora_adapter(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.lora.load(body, context(request))

    @api.post("/v1/unload_lora_adapter", dependencies=metered("unload_lora_adapter", limited=False))
    async def unload_lora_adapter(self, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.lora.unload(body, context(request))

    # -- stats and prompt apps ---------------------------------------------------------------

    @api.get("/v1/stats", dependencies=metered("stats"))
    async def stats(self) -> Response:
        return JSONResponse({"models": await self.models.stats()})

    @api.get("/v1/apps", dependencies=metered("apps"))
    async def list_apps(self, request: Request) -> Response:
        return JSONResponse(await prompt_apps.catalog(self.apps, context(request).key))

    @api.post("/v1/apps/{app}", dependencies=metered(prompt_apps.route_name))
    async def run_app(self, app: str, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await prompt_apps.run(self.models, self.apps, app, body, context(request))

    # -- usage (never refused for being over a limit: a key over budget may still look) --------

    @api.get("/v1/usage", dependencies=metered("usage", limited=False))
    async def usage(self, request: Request) -> Response:
        return JSONResponse(await usage_report(self.guard, context(request), dict(request.query_params), False))

    @api.get("/v1/admin/usage", dependencies=metered("admin/usage", limited=False))
    async def admin_usage(self, request: Request) -> Response:
        return JSONResponse(await usage_report(self.guard, context(request), dict(request.query_params), True))

    # -- KServe v2 ---------------------------------------------------------------------------

    @api.get("/v2/health/live")
    async def v2_live(self) -> Response:
        return JSONResponse({"live": True})

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> Response:
        return await self.kserve.server_ready()

    @api.get("/v2", dependencies=metered("v2"))
    async def v2_server(self) -> Response:
        return JSONResponse(self.kserve.server_metadata())

    @api.get("/v2/models/{name}", dependencies=metered("v2/metadata"))
    @api.get("/v2/models/{name}/versions/{version}", dependencies=metered("v2/metadata"))
    async def v2_model(self, name: str, request: Request, version: str = "1") -> Response:
        return JSONResponse(self.kserve.model_metadata(name, context(request).key))

    @api.get("/v2/models/{name}/ready", dependencies=metered("v2/ready"))
    @api.get("/v2/models/{name}/versions/{version}/ready", dependencies=metered("v2/ready"))
    async def v2_model_ready(self, name: str, request: Request, version: str = "1") -> Response:
        return await self.kserve.model_ready(name, context(request).key)

    @api.post("/v2/models/{name}/infer", dependencies=metered("v2/infer"))
    @api.post("/v2/models/{name}/versions/{version}/infer", dependencies=metered("v2/infer"))
    async def v2_infer(self, name: str, request: Request, version: str = "1",
                       body: bytes = Depends(request_body)) -> Response:
        return await self.kserve.infer(name, body, request.headers.get("inference-header-content-length"),
                                       context(request))

    @api.post("/v2/models/{name}/generate", dependencies=metered("v2/generate"))
    async def v2_generate(self, name: str, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.kserve.generate(name, body, context(request))

    @api.post("/v2/models/{name}/generate_stream", dependencies=metered("v2/generate_stream"))
    async def v2_generate_stream(self, name: str, request: Request, body: bytes = Depends(request_body)) -> Response:
        return await self.kserve.generate_stream(name, body, context(request))


IngressDeployment = serve.ingress(api)(Ingress)
