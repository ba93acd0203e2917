"""The optional vLLM engine: needs a GPU and vllm; otherwise a clear config error."""

from __future__ import annotations

import pytest

from llmos_ray.errors import ConfigError
from llmos_ray.serve import vllm
from llmos_ray.serve.spec import ModelSpec


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_without_vllm_or_gpu_the_error_says_what_to_do():
    if vllm.available() and _gpu():
        pytest.skip("vLLM and a GPU are present")
    with pytest.raises(ConfigError, match="engine=vllm needs"):
        vllm.vllm_deployment(ModelSpec(name="m", uri="org/model", engine="vllm"))


@pytest.mark.skipif(not (vllm.available() and _gpu()), reason="needs vllm and a GPU")
def test_vllm_deployment_builds():
    app = vllm.vllm_deployment(ModelSpec(name="m", uri="facebook/opt-125m", engine="vllm"))
    assert app is not None
