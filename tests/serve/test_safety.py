from __future__ import annotations

from llmos_ray.serve.safety import SafetyPolicy
from llmos_ray.serve.spec import ModelSpec


def policy(**kw) -> SafetyPolicy:
    return SafetyPolicy.from_spec(ModelSpec(name="m", uri="x", **kw))


def stream(p: SafetyPolicy, pieces: list[str]) -> tuple[str, str | None]:
    f = p.output_filter()
    shown = "".join(f.feed(x, final=i == len(pieces) - 1) for i, x in enumerate(pieces))
    return shown, f.finish


def test_input_blocklist_matches_whole_words_case_insensitively():
    p = policy(safety_input_blocklist=["secret plan"], safety_input_patterns=[r"\b\d{3}-\d{4}\b"])
    assert p.blocks_input("the SECRET  PLAN".replace("  ", " "))
    assert not p.blocks_input("secret planet")
    assert p.blocks_input("call 555-1234")
    assert not policy().blocks_input("anything")


def test_streamed_output_never_shows_a_blocked_word():
    p = policy(safety_output_blocklist=["secret"])
    shown, finish = stream(p, ["the sec", "ret is", " out"])
    assert (shown, finish) == ("the ", "content_filter")
    shown, finish = stream(p, ["the sec", "retary", " is here"])  # a longer word is fine
    assert (shown, finish) == ("the secretary is here", None)
    shown, finish = stream(p, ["it is secret"])  # a match at the very end counts when the text is final
    assert (shown, finish) == ("it is ", "content_filter")


def test_output_patterns_and_max_chars():
    shown, finish = stream(policy(safety_output_patterns=[r"\d{4}"]), ["pin ", "12", "34 ok"])
    assert (shown, finish) == ("pin ", "content_filter")
    shown, finish = stream(policy(safety_max_output_chars=5), ["abc", "defgh"])
    assert (shown, finish) == ("abcde", "length")
