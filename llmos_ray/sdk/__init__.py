"""The developer SDK: load a model into this process or connect to a served one, with one API.

    from llmos_ray import LLM, Chatbot
    model = LLM.from_pretrained("tiny:prod")        # or an export dir, s3:// URI, checkpoint, hub id
    chatbot = Chatbot(model)
    response = chatbot.generate_response("Hello!")

    remote = LLM.connect("http://127.0.0.1:8000", api_key="sk-...", model="tiny")

    llm       LLM (generate, chat, stream, translate, embed, classify, apps)
    types     Completion (generated text, a str, with its usage), AppResult
    local     the in-process backend: the server's Engine in this process
    remote    the HTTP backend: the OpenAI-compatible API of `llmos serve`
    chatbot   Chatbot: history kept and trimmed to the context
"""

from llmos_ray.sdk.chatbot import Chatbot
from llmos_ray.sdk.llm import LLM
from llmos_ray.sdk.types import AppResult, Completion
from llmos_ray.serve.types import APIError

__all__ = ["LLM", "Chatbot", "Completion", "AppResult", "APIError"]
