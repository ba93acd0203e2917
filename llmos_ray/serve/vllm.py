"""Optional vLLM engine for a served model (`serve.model_options.NAME.engine: vllm`), through
`ray.serve.llm`. GPU only; needs `pip install "ray[llm]"` (which brings vllm).

The model then runs in ray.serve.llm's `LLMServer` deployment; our ingress keeps doing auth,
limits, routing, input safety and metrics, and forwards the OpenAI request body to it. Output
safety filtering applies to non-streamed responses only for such models. Tests skip without a GPU.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from llmos_ray.errors import ConfigError


def available() -> bool:
    try:
        import vllm  # noqa: F401
        from ray.serve.llm import LLMConfig  # noqa: F401
    except ImportError:
        return False
    return True


def vllm_deployment(spec):
    """The bound ray.serve.llm deployment of `spec` (raises ConfigError when vLLM cannot run here)."""
    if not available():
        raise ConfigError(f"model {spec.name!r}: engine=vllm needs vllm and ray.serve.llm "
                          "(pip install 'ray[llm]'); or use engine=transformers")
    from llmos_ray.serve.loading import cluster_has_gpus

    if not cluster_has_gpus():
        raise ConfigError(f"model {spec.name!r}: engine=vllm needs GPUs and this cluster has none")
    from ray.serve.llm import LLMConfig, build_llm_deployment

    deployment_config: dict[str, Any] = {"max_ongoing_requests": spec.max_ongoing_requests}
    if spec.min_replicas == spec.max_replicas:
        deployment_config["num_replicas"] = spec.max_replicas
    else:
        deployment_config["autoscaling_config"] = {"min_replicas": spec.min_replicas,
                                                   "max_replicas": spec.max_replicas,
                                                   "target_ongoing_requests": spec.target_ongoing_requests}
    engine_kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.dtype != "auto":
        engine_kwargs["dtype"] = spec.dtype
    config = LLMConfig(model_loading_config={"model_id": spec.name, "model_source": spec.uri},
                       deployment_config=deployment_config, engine_kwargs=engine_kwargs)
    return build_llm_deployment(config, name_prefix=f"{spec.deployment_name}-",
                                override_serve_options={"max_queued_requests": spec.max_queued_requests})


async def forward(handle, kind: str, body: dict[str, Any]) -> AsyncIterator[Any]:
    """Send an OpenAI body to a ray.serve.llm deployment; yields a response dict (non-streaming)
    or SSE strings ("data: ...\\n\\n")."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    request = (ChatCompletionRequest if kind == "chat" else CompletionRequest)(**body)
    method = handle.options(stream=True).chat if kind == "chat" else handle.options(stream=True).completions
    async for item in method.remote(request):
        for piece in item if isinstance(item, list) else [item]:
            yield piece.model_dump() if hasattr(piece, "model_dump") else piece
