"""App templates: Jinja2 in an immutable sandbox that sees an app's parameters and nothing else.

A template cannot reach the filesystem or run code: the environment has no loader and no globals
(no range, cycler, joiner, namespace, lipsum), `check_template` refuses, when a spec is checked,
placeholders that are no parameter, attributes starting with '_' (`{{ ''.__class__ }}`), the `attr`
filter, include/import/extends and loops nested more than MAX_LOOP_DEPTH deep; and the sandbox
stops anything unsafe at render time anyway (`render_template` turns that into a 400).
"""

from __future__ import annotations

import functools
from typing import Any

from llmos_ray.errors import ConfigError
from llmos_ray.serve.types import bad_request

MAX_LOOP_DEPTH = 2


@functools.lru_cache(maxsize=1)
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals.clear()  # no range, cycler, joiner, namespace, lipsum: a template sees its parameters only
    return env


@functools.lru_cache(maxsize=1024)
def _compiled(source: str):
    return _env().from_string(source)


def check_template(source: str, names: set[str], where: str) -> None:
    """Refuse a template that does not parse, names a placeholder that is no parameter, or reaches
    for attributes, includes or deep loops."""
    from jinja2 import TemplateSyntaxError, meta, nodes

    try:
        tree = _env().parse(source)
        unknown = sorted(meta.find_undeclared_variables(tree) - names)  # compiles: unknown filters fail here
    except TemplateSyntaxError as e:
        raise ConfigError(f"{where}: template error on line {e.lineno}: {e.message}") from None
    if unknown:
        known = ", ".join(sorted(names)) or "none"
        raise ConfigError(f"{where}: unknown placeholder {unknown[0]!r} (parameters: {known})")
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Include, nodes.Import,
                               nodes.FromImport, nodes.Extends)):
        if isinstance(node, nodes.Filter):
            what = "the 'attr' filter" if node.name == "attr" else None
        elif isinstance(node, nodes.Getattr):
            what = f"attribute {node.attr!r}" if node.attr.startswith("_") else None
        elif isinstance(node, nodes.Getitem):
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
            what = f"attribute {key!r}" if isinstance(key, str) and key.startswith("_") else None
        else:
            what = f"'{type(node).__name__.lower()}'"
        if what is not None:
            raise ConfigError(f"{where}: refused: {what} is not allowed in an app template (templates see their "
                              "parameters only: no underscore attributes, attr, include, import or extends)")
    if _loop_depth(tree) > MAX_LOOP_DEPTH:
        raise ConfigError(f"{where}: refused: loops nested more than {MAX_LOOP_DEPTH} deep")


def _loop_depth(node, depth: int = 0) -> int:
    from jinja2 import nodes

    here = depth + isinstance(node, nodes.For)
    return max([here, *(_loop_depth(child, here) for child in node.iter_child_nodes())])


def render_template(app: str, index: int, source: str, values: dict[str, Any], checking: bool) -> str:
    """messages[index] of `app` rendered with `values`; what the sandbox refuses is a ConfigError while
    a spec is being checked, a 400 in a request."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        return _compiled(source).render(**values)
    except SecurityError as e:
        if checking:
            raise ConfigError(f"messages[{index}].content: refused by the template sandbox: {e}") from None
        raise bad_request(f"app {app!r}: its template was refused by the sandbox: {e}", "app") from None
    except (TemplateError, TypeError, ValueError) as e:
        if checking:
            raise ConfigError(f"messages[{index}].content: rendering failed with sample parameters: {e}") from None
        raise bad_request(f"app {app!r}: rendering messages[{index}] failed: {e}") from None
