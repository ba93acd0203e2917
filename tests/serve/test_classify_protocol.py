"""The classification wire formats without a server: KServe v2 infer responses (JSON and Triton's
binary tensors, read back by tritonclient's own decoder) and the request checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmos_ray.serve.classify import ClassifyRequest, _texts, infer_response, require_generative
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError
from llmos_ray.serve.validation import parse_body


def test_binary_infer_response_decodes_with_tritonclient():
    from tritonclient.http import InferResult

    body, headers = infer_response("clf", "r1", ["fr", "zh_CN"], [0.9, 0.25], {"label", "score"})
    result = InferResult.from_response_body(body, header_length=int(headers["inference-header-content-length"]))
    assert [b.decode() for b in result.as_numpy("label")] == ["fr", "zh_CN"]
    np.testing.assert_allclose(result.as_numpy("score"), [0.9, 0.25], rtol=1e-6)
    assert result.as_numpy("score").dtype == np.float32 and result.get_response()["id"] == "r1"
    plain, headers = infer_response("clf", None, ["en"], [0.5], set())
    assert headers == {"content-type": "application/json"}
    assert [o["data"] for o in json.loads(plain)["outputs"]] == [["en"], [0.5]]


def test_request_checks_name_the_field():
    req = parse_body(b'{"model": "clf", "input": ["a", "b"], "top_k": 2}', ClassifyRequest)
    assert _texts(req.input, "input") == ["a", "b"]
    for body, field in ((b'{"model": "clf"}', "input"), (b'{"model": "clf", "input": "a", "top_k": 0}', "top_k"),
                        (b'{"model": "clf", "input": [1]}', "input")):
        with pytest.raises(APIError) as e:
            parse_body(body, ClassifyRequest)
        assert e.value.status == 400 and e.value.param.startswith(field)
    with pytest.raises(APIError, match="input.1: empty text"):
        _texts(["a", " "], "input")
    with pytest.raises(APIError, match="text_pair: 1 texts for 2 inputs"):
        _texts(["x"], "text_pair", 2)
    with pytest.raises(APIError, match="is a text classifier.*POST /v1/classify") as e:
        require_generative(ModelSpec(name="clf", uri="/x", task="classification"))
    assert e.value.status == 400 and e.value.code == "model_not_generative"
    require_generative(ModelSpec(name="lm", uri="/x"))  # a causal LM generates
