"""The embedded default instruction set: real tasks built from the installed Python standard library.

Every documented function becomes one chat example — the user gives the function's code (its
docstring removed) and asks what it does; the assistant answers with the docstring's first
sentence. A stable hash of the function's qualified name holds out `VAL_FRACTION` of them for
evaluation (`documents.is_held_out`). Same Python, same examples, on every machine.
"""

from __future__ import annotations

import ast
from typing import Iterator

from llmos_ray.data.default_corpus import stdlib_sources
from llmos_ray.data.documents import is_held_out

VAL_FRACTION = 0.05
MAX_CODE_CHARS = 400
PROMPT = "Summarize what this Python function does in one sentence.\n\n{code}"


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = " ".join(first.split())
    if "." in first:
        first = first[: first.index(".") + 1]
    return first if 20 <= len(first) <= 160 else None


def _functions(path: str, module: str) -> Iterator[tuple[str, str, str]]:
    """(qualified name, code without docstring, summary) of documented functions in a file."""
    try:
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                summary = _summary(doc) if doc else None
                if summary is None or len(child.body) < 2:
                    continue
                doc_node = child.body[0]
                start = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                kept = lines[start - 1: doc_node.lineno - 1] + lines[doc_node.end_lineno: child.end_lineno]
                code = "\n".join(kept)
                if len(code) > MAX_CODE_CHARS:
                    code = code[:MAX_CODE_CHARS] + "\n    ..."
                yield f"{module}.{prefix}{child.name}", code, summary

    yield from visit(tree, "")


def stdlib_instructions(split: str = "train", limit: int | None = None) -> list[dict]:
    """Chat records {"messages": [...], "name": ...} of the default set's `split` ("train"/"val")."""
    out = []
    for source in stdlib_sources():
        path = source.uri.removeprefix("file://")
        module = path.rsplit("/", 1)[-1][:-3]
        for name, code, summary in _functions(path, module):
            if is_held_out(name, VAL_FRACTION) != (split == "val"):
                continue
            out.append({"name": name, "messages": [{"role": "user", "content": PROMPT.format(code=code)},
                                                   {"role": "assistant", "content": summary}]})
            if limit is not None and len(out) >= limit:
                return out
    return out
