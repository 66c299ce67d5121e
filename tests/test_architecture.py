"""The package's shape: engines are modules of ``mlplab.engines``, and no two modules import each other.

The import graph is read from the source (every ``import``, also inside functions), so a
cycle fails here even where Python's lazy imports would let it run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO
from mlplab.engines.run import ENGINES, check_engine_trains
from mlplab.errors import ConfigError
from mlplab.numpy_net import NumpyMLP

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
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
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
    with pytest.raises(
        ConfigError, match=r"engine=lightning cannot train NumpyMLP; allowed: model=numpy_mlp with engine=numpy"
    ):
        check_engine_trains("lightning", numpy_net)
    with pytest.raises(ConfigError, match=r"engine=numpy cannot train Linear"):
        check_engine_trains("numpy", __import__("torch").nn.Linear(2, 2))


# -- one fence for Lightning's private API ----------------------------------------------------------

FENCE = PACKAGE / "lightning_ext"
_DEFINED = re.compile(
    r"^\s*(?:def|class)\s+(_[A-Za-z]\w*)|self\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=[^=]|^(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=[^=]",
    re.M,
)


def _lightning_private_names() -> set[str]:
    """Every single-underscore name Lightning's own source defines (functions, classes, attributes)."""
    import lightning

    names = set()
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        for match in _DEFINED.finditer(path.read_text(errors="ignore")):
            names.add(next(g for g in match.groups() if g))
    return names


def private_lightning_uses(source: str, lightning_private: set[str], ours: set[str]) -> list[str]:
    """Where ``source`` imports, touches, overrides or names one of Lightning's private names."""
    hits = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            "lightning",
            "pytorch_lightning",
            "lightning_fabric",
        ):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or any(part.startswith("_") for part in node.module.split(".")):
                hits.append(f"line {node.lineno}: from {node.module} import {', '.join(private) or '...'}")
        elif isinstance(node, ast.Attribute) and node.attr in lightning_private and node.attr not in ours:
            hits.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in lightning_private - ours:
            hits.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.FunctionDef) and node.name in lightning_private and node.name not in ours:
            hits.append(f"line {node.lineno}: def {node.name}")
    return hits


def _our_private_names(paths: list[Path]) -> set[str]:
    """Private names mlplab defines itself outside the fence (its own functions, classes, attributes)."""
    ours = set()
    for path in paths:
        for match in _DEFINED.finditer(path.read_text()):
            ours.add(next(g for g in match.groups() if g))
    return ours


def lightning_overrides(module_name: str) -> list[str]:
    """Private members of Lightning classes that a class of ``module_name`` overrides or assigns."""
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    hits = []
    for cls in vars(module).values():
        if not inspect.isclass(cls) or cls.__module__ != module_name:
            continue
        bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] == "lightning"]
        if not bases:
            continue
        base_source = "".join(inspect.getsource(b) for b in bases if b is not object)
        own = set(vars(cls)) | set(re.findall(r"self\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=[^=]", inspect.getsource(cls)))
        for name in sorted(n for n in own if n.startswith("_") and not n.startswith("__") and n != "_abc_impl"):
            if any(hasattr(b, name) for b in bases) or re.search(rf"self\.{name}\b", base_source):
                hits.append(f"{cls.__name__}.{name}")
    return hits


def test_only_lightning_ext_knows_lightnings_private_api():
    lightning_private = _lightning_private_names()
    assert {
        "_current_fx_name",
        "_batches_that_stepped",
        "_save_topk_checkpoint",
        "_SubprocessScriptLauncher",
    } <= lightning_private
    outside = [p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(FENCE)]
    ours = _our_private_names(outside)
    hits = {
        str(p.relative_to(PACKAGE)): private_lightning_uses(p.read_text(), lightning_private, ours) for p in outside
    }
    for path in outside:
        hits[str(path.relative_to(PACKAGE))] += lightning_overrides(_module_name(path))
    assert {k: v for k, v in hits.items() if v} == {}
    inside = {
        str(p.relative_to(PACKAGE))
        for p in FENCE.rglob("*.py")
        if private_lightning_uses(p.read_text(), lightning_private, set()) or lightning_overrides(_module_name(p))
    }
    assert {"lightning_ext/fastpath.py", "lightning_ext/checkpoint.py", "lightning_ext/ddp.py"} <= inside


def test_the_fence_scan_finds_each_kind_of_use():
    lightning_private = _lightning_private_names()
    source = """
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
class C(ModelCheckpoint):
    def _save_topk_checkpoint(self, trainer, candidates):
        trainer.fit_loop.epoch_loop._batches_that_stepped += 1
        return name == "_current_fx_name"
"""
    hits = private_lightning_uses(source, lightning_private, set())
    assert [h.split(":")[0] for h in hits] == ["line 2", "line 4", "line 5", "line 6"], hits
    assert "ChildLaunchingDDPStrategy._configure_launcher" in lightning_overrides("mlplab.lightning_ext.ddp")


def test_outside_the_verified_lightning_versions_training_takes_lightnings_loop(tmp_path, monkeypatch, caplog):
    """The fast path off: one log line, Lightning's own loop (steps_per_call 1), the same weights."""
    from packaging.specifiers import SpecifierSet

    import mlplab.lightning_ext as ext
    from conftest import QUICK, compose_cfg, load_ckpt
    from mlplab.engines import fit

    args = [*QUICK, "logger=none", "test=false", "steps_per_call=8"]
    fit(compose_cfg(args, tmp_path / "fast"))
    monkeypatch.setattr(ext, "VERIFIED", SpecifierSet("<1"))
    monkeypatch.setattr(ext, "_warned", False)
    with caplog.at_level("INFO"):
        fit(compose_cfg(args, tmp_path / "fallback"))
    assert caplog.text.count("is outside the versions mlplab's Lightning extensions were verified against (<1)") == 1
    assert "steps_per_call=8 -> 1 (one optimizer step per training_step) because of lightning" in caplog.text
    fast = load_ckpt(tmp_path / "fast" / "checkpoints" / "last.ckpt")
    fallback = load_ckpt(tmp_path / "fallback" / "checkpoints" / "last.ckpt")
    assert fast["global_step"] == fallback["global_step"]
    assert all(torch.equal(fast["state_dict"][k], fallback["state_dict"][k]) for k in fast["state_dict"])
