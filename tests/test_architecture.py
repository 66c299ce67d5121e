"""The package's shape: engines are modules of ``mlplab.engines``, and no two modules import each other.

The import graph is read from the source (every ``import``, also inside functions), so a
cycle fails here even where Python's lazy imports would let it run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mlplab.engines.run import ENGINES, check_engine_trains
from mlplab.errors import ConfigError
from mlplab.numpy_net import NumpyMLP

from conftest import REPO

PACKAGE = REPO / "src" / "mlplab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> the mlplab modules it imports`` (a name imported from a package counts as the
    package, unless it is a submodule)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"mlplab.engines.run", "mlplab.engines.lightning", "mlplab.cli"} <= set(graph)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_engine_is_a_module_with_fit():
    import importlib
    import inspect

    for name in ENGINES:
        fit = importlib.import_module(f"mlplab.engines.{name}").fit
        assert list(inspect.signature(fit).parameters)[:4] == ["cfg", "dm", "net", "ckpt_path"], name


def test_the_numpy_net_and_the_numpy_engine_go_together():
    numpy_net = NumpyMLP([4, 3, 2])
    check_engine_trains("numpy", numpy_net)
    with pytest.raises(ConfigError, match=r"engine=lightning cannot train NumpyMLP; allowed: model=numpy_mlp with engine=numpy"):
        check_engine_trains("lightning", numpy_net)
    with pytest.raises(ConfigError, match=r"engine=numpy cannot train Linear"):
        check_engine_trains("numpy", __import__("torch").nn.Linear(2, 2))
