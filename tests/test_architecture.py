"""The shape of the code: layers that only import downwards, no import cycles (function-level
imports included), every module importable on its own, modules and functions a reader can hold.

The layers, lowest first. A module may import its own layer and those below, never above:
    0  errors, schema, storage          what everything uses
    1  config, runtime, models          the config, connecting to Ray, model presets
    2  registry, cluster, data          the model library, the local cluster, the corpus pipeline
    3  train                            Ray Train + DeepSpeed
    4  serve                            Ray Serve (loads models, never trains them)
    5  eval                             evaluation (loads models as serving does)
    6  sdk, cli, the package itself     what users call
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llmos_ray")
LAYERS = {
    "llmos_ray.errors": 0, "llmos_ray.schema": 0, "llmos_ray.storage": 0,
    "llmos_ray.config": 1, "llmos_ray.runtime": 1, "llmos_ray.models": 1,
    "llmos_ray.registry": 2, "llmos_ray.cluster": 2, "llmos_ray.data": 2,
    "llmos_ray.train": 3,
    "llmos_ray.serve": 4,
    "llmos_ray.eval": 5,
    "llmos_ray.sdk": 6, "llmos_ray.cli": 6, "llmos_ray": 6,
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
COHESIVE = "Why one module:"
"""A module over MAX_MODULE_LINES says, after these words in its docstring, why it is one concern."""


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


MODULES = modules()


def imported(module: str, path: str) -> set[str]:
    """The llmos_ray modules `module` imports anywhere in its body (function-level imports too)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            names = subs + ([base] if len(subs) < len(node.names) else [])
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module and not module.startswith(name + "."):  # a parent package runs first anyway
                found.add(name)
    return found


GRAPH = {m: imported(m, p) for m, p in MODULES.items()}


def layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rsplit(".", 1)[0]
    return LAYERS[module]


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in MODULES)


def test_lower_layers_never_import_upper_ones():
    upward = sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                    for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_modules_and_functions_stay_readable():
    too_long = []
    for module, path in MODULES.items():
        source = open(path).read()
        tree = ast.parse(source)
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES and COHESIVE not in (ast.get_docstring(tree) or ""):
            too_long.append(f"{module}: {lines} lines; split it along its seam, or say in its docstring "
                            f"'{COHESIVE} …'")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)


FORK_EACH_MODULE = """
import importlib, os, sys, traceback
# Third-party libraries first, once: they cannot hide a cycle or an ordering bug of ours, and
# importing them in every process is what made this test slow. Then each of our modules is the
# first of ours that a fresh child (forked from this parent, which imported none) imports.
import torch, transformers, ray, ray.data, ray.train, ray.serve, fastapi, pydantic  # noqa
failed = []
for module in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().strip().splitlines()[-1].encode())
            code = 1
        os._exit(code)
    os.close(w)
    err = os.read(r, 4096).decode()
    os.close(r)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(f"{module}: {err or 'the child died'}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_process():
    """A cycle hidden by function-level imports, or an import that only works after another module
    ran, fails here: each module is the first of ours that a new process imports (a child forked
    from one interpreter that has imported only third-party libraries)."""
    proc = subprocess.run([sys.executable, "-c", FORK_EACH_MODULE, *sorted(MODULES)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    failed = proc.stdout.strip()
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
