"""Package layout rules (issue 13): no module imports another module's
private name, nothing runs at import beyond definitions, and the modules'
top-level imports form no cycle."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnnstress"
# Dotted names under cnnstress, subpackages included: "config", "xai.cam",
# "xai.__init__" (a package's own module).
MODULES = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py"))


def _tree(name: str) -> ast.Module:
    path = PACKAGE.joinpath(*name.split(".")).with_suffix(".py")
    return ast.parse(path.read_text(), filename=str(path.relative_to(PACKAGE)))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _target(node: ast.ImportFrom, name: str = "module") -> str | None:
    """The dotted cnnstress name `node` (in module `name`) imports from ('' for
    the package itself, "xai" for a subpackage), or None for an outside module."""
    if node.level:
        package = name.split(".")[:-1]
        if node.level - 1 > len(package):
            return None  # above cnnstress
        base = package[:len(package) - (node.level - 1)]
        return ".".join(base + (node.module.split(".") if node.module else []))
    if node.module and (node.module == "cnnstress" or node.module.startswith("cnnstress.")):
        return node.module.removeprefix("cnnstress").lstrip(".")
    return None


def _is_package(target: str) -> bool:
    return target == "" or f"{target}.__init__" in MODULES


def _submodule(target: str, name: str) -> str:
    return f"{target}.{name}" if target else name


def private_imports(tree: ast.Module, name: str = "module") -> list[str]:
    """`from .m import _x` and `m._x` (m a cnnstress module or package bound
    by an import) anywhere in `tree`, the source of module `name`."""
    found, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (target := _target(node, name)) is not None:
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
                elif _is_package(target) or _submodule(target, alias.name) in MODULES:
                    bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cnnstress":
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):  # cnnstress.m._x
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_private_import_finder_catches_both_forms():
    tree = ast.parse("from .evaluate import _as_numpy, predict\nfrom . import gradcam\n"
                     "import cnnstress.pipeline\nimport os\n"
                     "gradcam._eval_mode(m)\ncnnstress.pipeline._read_cache(p)\nos._exit\n")
    assert private_imports(tree) == ["line 1: from .evaluate import _as_numpy", "line 5: gradcam._eval_mode",
                                     "line 6: cnnstress.pipeline._read_cache"]
    # in a subpackage: `..` reaches the top level, a subpackage's modules bind
    tree = ast.parse("from ..evaluate import _as_numpy\nfrom .cam import _hook\nfrom ..xai import cam\n"
                     "from cnnstress.robustness import suite\nfrom . import similarity\n"
                     "cam._eval_mode(m)\nsuite._cells()\nsimilarity._pair(a, b)\n")
    assert private_imports(tree, "xai.checks") == [
        "line 1: from ..evaluate import _as_numpy", "line 2: from .cam import _hook", "line 6: cam._eval_mode",
        "line 7: suite._cells", "line 8: similarity._pair"]


@pytest.mark.parametrize("name", MODULES)
def test_no_module_imports_another_modules_private_name(name):
    assert private_imports(_tree(name), name) == []


# Top-level statements that only define things (an `if __name__ == "__main__"`
# guard and an optional-import `try` are definitions too).
def _defines_only(node: ast.stmt, first: bool) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                         ast.Assign, ast.AnnAssign)):
        return True
    if isinstance(node, ast.Expr):
        return first and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    if isinstance(node, ast.If):
        test = ast.unparse(node.test)
        return test in ("TYPE_CHECKING", "__name__ == '__main__'")
    if isinstance(node, ast.Try):
        return all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body) and all(
            all(isinstance(s, (ast.Assign, ast.Import, ast.ImportFrom)) for s in h.body) for h in node.handlers)
    return False


@pytest.mark.parametrize("name", MODULES)
def test_module_top_level_only_defines(name):
    body = _tree(name).body
    bad = [f"line {n.lineno}: {ast.unparse(n).splitlines()[0]}" for i, n in enumerate(body)
           if not _defines_only(n, i == 0)]
    assert bad == []


def test_definitions_check_refuses_statements():
    for src in ("assert 1 == 1", "print('x')", "for i in range(2): pass", "x = 1\n'late string'"):
        body = ast.parse(src).body
        assert not all(_defines_only(n, i == 0) for i, n in enumerate(body)), src


def test_importing_every_module_prints_and_writes_nothing(tmp_path):
    """In a fresh interpreter, with an empty working folder: no output, no file."""
    code = "import importlib\nfor m in %r:\n    importlib.import_module('cnnstress.' + m)\n" % MODULES
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    assert list(tmp_path.iterdir()) == []


def _module_of(target: str) -> str | None:
    """The graph node for an import target: a module, a subpackage's
    __init__, or None for the cnnstress package itself (every module is under
    it, as before subpackages, so it is no edge)."""
    if target in MODULES:
        return target
    if target and f"{target}.__init__" in MODULES:
        return f"{target}.__init__"
    return None


def _with_packages(dep: str, importer: str) -> set[str]:
    """`dep` and the __init__ of each subpackage it sits in that `importer`
    is not already inside (importing xai.cam from outside runs xai/__init__)."""
    out, parts = {dep}, dep.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        package = ".".join(parts[:i])
        if not importer.startswith(package + "."):
            out.add(f"{package}.__init__")
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the cnnstress modules its top level imports (imports inside
    functions and under `if TYPE_CHECKING` are deferred, so they do not count).
    Names are MODULES' dotted names."""
    graph = {}
    for name in MODULES:
        deps = set()
        for node in _tree(name).body:
            stmts = node.body if isinstance(node, ast.Try) else [node]
            for stmt in stmts:
                targets = []
                if isinstance(stmt, ast.ImportFrom) and (target := _target(stmt, name)) is not None:
                    for alias in stmt.names:  # from .xai import cam: the module cam, else the package
                        sub = _submodule(target, alias.name)
                        targets.append(sub if sub in MODULES else target)
                elif isinstance(stmt, ast.Import):
                    targets = [a.name.removeprefix("cnnstress.") for a in stmt.names if a.name.startswith("cnnstress.")]
                for target in targets:
                    if (dep := _module_of(target)) is not None:
                        deps |= _with_packages(dep, name)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    graph = import_graph()
    assert graph["checkpoint"] >= {"io", "model"} and "model" not in graph["io"]  # the graph is read
    assert graph["xai.checks"] >= {"data", "runtime", "xai.cam", "config"}
    assert graph["stages.stress"] >= {"robustness.suite", "robustness.__init__", "stages.base"}   # across subpackages
    assert "xai.__init__" not in graph["xai.checks"] and graph["__init__"] >= {"xai.cam", "xai.__init__"}
    assert find_cycle(graph) is None
