"""Tool (function) calling on /v1/chat/completions, in OpenAI's shapes.

    tools = parse_tools(req)                 # the request's tools as the chat template takes them, or 400
    schema = forced_schema(tools, choice)    # tool_choice "required" or a named function: the JSON of a call
    content, calls = parse_calls(text, forced)   # the completion -> message.content and message.tool_calls

The tools reach the model through its chat template (`tools` in apply_chat_template; our
template, data.tokenizer.CHAT_TEMPLATE, renders them in a system turn and asks for calls as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>; a template that ignores tools gets the
same text as a system message, `tools_text`). tool_choice:

    "none"                 tools are shown, no call is parsed
    "auto" (the default)   <tool_call> blocks in the completion become tool_calls, the rest content
    "required" / named     decoding is constrained (`structured`) to the JSON of a call: {"name":
                           one of the tools (or the named one), "arguments": its parameters' schema},
                           so even an untrained model returns a valid call
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import Field

from llmos_ray.serve.types import bad_request
from llmos_ray.serve.validation import StrictRequest

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
INSTRUCTION = ('You can call these tools. To call one, reply with <tool_call>{"name": NAME, "arguments": '
               '{...}}</tool_call>.')
MAX_TOOLS = 128


class FunctionSpec(StrictRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(StrictRequest):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(StrictRequest):
    name: str


class NamedToolChoice(StrictRequest):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class CallFunction(StrictRequest):
    name: str
    arguments: str


class ToolCall(StrictRequest):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CallFunction


def parse_tools(tools: Optional[list[Tool]], choice: Optional[ToolChoice]) -> Optional[list[dict[str, Any]]]:
    """The tools as the chat template takes them (OpenAI's dicts), checked against tool_choice."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice: needs tools", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools: two tools have the same name", "tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(f"tool_choice.function.name: {choice.function.name!r} is not one of the tools {names}",
                          "tool_choice.function.name")
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def forced_schema(tools: Optional[list[dict]], choice: Optional[ToolChoice]) -> Optional[dict[str, Any]]:
    """The JSON schema of the call a tool_choice of "required" or a named function forces (None otherwise)."""
    if not tools or choice in (None, "none", "auto"):
        return None
    chosen = [t["function"] for t in tools
              if not isinstance(choice, NamedToolChoice) or t["function"]["name"] == choice.function.name]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}} for f in chosen]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _call(obj: Any) -> Optional[dict[str, Any]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse_calls(text: str, forced: bool) -> tuple[Optional[str], list[dict[str, Any]]]:
    """(content, tool_calls) of a completion: the whole text is one call when decoding was forced,
    else each <tool_call> block that holds a call's JSON is one (the rest is the content)."""
    if forced:
        try:
            call = _call(json.loads(text))
        except json.JSONDecodeError:  # cut by max_tokens
            call = None
        return (None, [call]) if call else (text, [])
    calls, rest = [], text
    for m in CALL.finditer(text):
        try:
            call = _call(json.loads(m.group(1)))
        except json.JSONDecodeError:
            continue
        if call:
            calls.append(call)
            rest = rest.replace(m.group(0), "", 1)
    return (rest.strip() or None) if calls else text, calls


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The system message that shows the tools to a model whose chat template does not render them."""
    return INSTRUCTION + "\n" + json.dumps([t["function"] for t in tools], ensure_ascii=False)


def message_dict(role: str, content: str, tool_calls: Optional[list[ToolCall]], tool_call_id: Optional[str],
                 name: Optional[str]) -> dict[str, Any]:
    """A chat message as the template takes it; a call's arguments as an object (as HF templates expect)."""
    out: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        calls = []
        for c in tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except json.JSONDecodeError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    if tool_call_id is not None:
        out["tool_call_id"] = tool_call_id
    if name is not None and role == "tool":
        out["name"] = name
    return out
