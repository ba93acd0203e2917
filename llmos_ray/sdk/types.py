"""The plain values the SDK returns: `Completion` (generated text that is a str), `AppResult`; and
the error for a method a model's task does not support."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmos_ray.errors import ModelError

Messages = list[dict[str, str]]


class Completion(str):
    """Generated text (a str) that also carries its finish reason and token counts."""

    finish_reason: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]

    def __new__(cls, text: str, finish_reason: Optional[str] = None, prompt_tokens: Optional[int] = None,
                completion_tokens: Optional[int] = None) -> "Completion":
        out = super().__new__(cls, text)
        out.finish_reason, out.prompt_tokens, out.completion_tokens = finish_reason, prompt_tokens, completion_tokens
        return out

    @property
    def text(self) -> str:
        return str(self)


@dataclass
class AppResult:
    """What an app answered: `output` (also str(result)), and how."""

    app: str
    app_version: int
    model: str
    output: str
    finish_reason: str
    usage: dict[str, int]
    output_check: Optional[dict] = None
    """With an app output schema: {"parsed", "valid", "errors"}."""

    def __str__(self) -> str:
        return self.output

    @classmethod
    def from_response(cls, body: dict) -> "AppResult":
        return cls(app=body["app"], app_version=body.get("app_version", 0), model=body["model"], output=body["output"],
                   finish_reason=body["finish_reason"], usage=body["usage"], output_check=body.get("output_check"))


def unsupported(llm_or_backend, method: str, needs: str) -> ModelError:
    return ModelError(f"model {llm_or_backend.name!r} ({llm_or_backend.task}) does not support {method}(): it needs "
                      f"{needs}")
