"""Constrained decoding: JSON mode and JSON schemas (response_format, forced tool calls) with
llguidance (the grammar engine vLLM, SGLang and llama.cpp use; Rust, CPU, no torch of its own).

    grammar = json_grammar(schema)                 # ingress: a JSON schema -> a grammar (plain str)
    check(engine, grammar)                         # replica: a 400 for a schema it cannot compile
    row.matcher = matcher(engine, grammar)         # engine: one matcher per constrained row
    constrain(rows, logits)                        # engine, per step: -inf outside each row's grammar
    row.matcher.consume_token(token)               # engine: after a token is accepted

`constrain` fills one bitmask for all constrained rows of a step (llguidance's parallel executor)
and applies it to the batched logits in one masked_fill: rows without a grammar are untouched.
The grammar admits the end-of-sequence token only once the JSON is complete, so a constrained
completion that ends with finish_reason "stop" parses; one cut by max_tokens ("length") may not.
Log-probabilities of a constrained row come after the mask (`logprobs`).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from llmos_ray.serve.types import APIError, bad_request

JSON_OBJECT = {"type": "object"}
"""The schema of response_format {"type": "json_object"}: any JSON object."""


def json_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    """The llguidance grammar of a JSON schema (compact JSON: no free whitespace), or a 400 naming `param`."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except Exception as e:  # a schema llguidance cannot read
        raise bad_request(f"{param}: the JSON schema cannot be used: {e}", param) from None


def _tokenizer(engine):
    """llguidance's view of the engine's tokenizer (built once per engine: ~1 s for a large vocabulary)."""
    ll = getattr(engine, "_ll_tokenizer", None)
    if ll is None:
        import llguidance.hf

        ll = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=engine.vocab_size,
                                          eos_token=sorted(engine.eos_ids))
        engine._ll_tokenizer = ll
    return ll


def matcher(engine, grammar: str):
    import llguidance

    return llguidance.LLMatcher(_tokenizer(engine), grammar, log_level=0)


def check(engine, grammar: Optional[str], param: str = "response_format") -> None:
    """A 400 naming `param` for a grammar this model's tokenizer cannot run."""
    if grammar is None:
        return
    m = matcher(engine, grammar)
    if m.is_error():
        raise bad_request(f"{param}: the JSON schema cannot be used: {m.get_error()}", param)


_EXECUTOR: list = []


def constrain(rows: list, logits) -> None:
    """Set to -inf, in place, every logit outside the grammar of each row that has a matcher."""
    import llguidance
    import torch

    live = [(i, r.matcher) for i, r in enumerate(rows) if getattr(r, "matcher", None) is not None]
    if not live:
        return
    words = (logits.shape[-1] + 31) // 32
    bitmask = torch.full((len(live), words), -1, dtype=torch.int32)
    if len(live) == 1:
        live[0][1].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    else:
        if not _EXECUTOR:
            _EXECUTOR.append(llguidance.LLExecutor())
        _EXECUTOR[0].unsafe_compute_mask_ptr([(m, j) for j, (_, m) in enumerate(live)], bitmask.data_ptr(),
                                             words * 4, len(live))
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # word w, bit b -> token 32 w + b
    allowed = bits.reshape(len(live), -1)[:, :logits.shape[-1]].bool().to(logits.device)
    index = torch.tensor([i for i, _ in live], device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def advance(row, token: int) -> None:
    """Feed an accepted token to the row's matcher; a token the grammar refuses is an error."""
    m = getattr(row, "matcher", None)
    if m is not None and not m.consume_token(token):
        raise APIError(500, f"the grammar refused token {token}: {m.get_error()}", code="generation_error")


def schema_of(response_format: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The JSON schema a response_format asks for (None for text), or a 400 naming the field."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema: a JSON schema (an object) is required",
                              "response_format.json_schema.schema")
        json.dumps(schema)  # plain JSON (read_json made it so)
        return schema
    raise bad_request(f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                      "response_format.type")
