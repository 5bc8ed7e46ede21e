"""Package layout rules (issue 13): no module imports another module's
private name, nothing runs at import beyond definitions, and the modules'
top-level imports form no cycle. Issue 21: every import, at any depth
(inside functions and under TYPE_CHECKING too), points down the layer table
LAYERS, and all imports together form no cycle but through the known
violations that the stage contract (issue 21, part 2) removes."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Import:
    """One cnnstress module importing another (MODULES' dotted names; "__init__"
    is the package's front, imported by `from . import name`)."""
    importer: str
    imported: str
    line: int
    where: str   # "top level", "in f()" (run when f runs), "under TYPE_CHECKING" (never run)

    @property
    def deferred(self) -> bool:
        return self.where != "top level"

    def __str__(self) -> str:
        return f"cnnstress.{self.importer} imports cnnstress.{self.imported} (line {self.line}, {self.where})"


def imports(tree: ast.Module, name: str = "module") -> list[Import]:
    """Every import of a cnnstress module anywhere in `tree` (the source of
    module `name`), relative ones resolved; importing a module of a
    subpackage from outside it imports the subpackage's __init__ too."""
    found: list[Import] = []

    def targets(stmt: ast.stmt) -> list[str]:
        if isinstance(stmt, ast.ImportFrom) and (target := _target(stmt, name)) is not None:
            out = []
            for alias in stmt.names:  # from .xai import cam: the module cam, else the package
                sub = _submodule(target, alias.name)
                out.append(sub if _module_of(sub) else target)
            return out
        if isinstance(stmt, ast.Import):
            return [a.name.removeprefix("cnnstress").lstrip(".") for a in stmt.names
                    if a.name.split(".")[0] == "cnnstress"]
        return []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in targets(node):
                dep = _module_of(target) if target else "__init__"   # "": the package's front
                for module in sorted(_with_packages(dep, name)) if dep else ():
                    if module != name:
                        found.append(Import(name, module, node.lineno, where))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.iter_child_nodes(node):
                visit(child, f"in {node.name}()" if where == "top level" else where)
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                visit(child, "under TYPE_CHECKING")
            for child in node.orelse:
                visit(child, where)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, where)

    visit(tree, "top level")
    return found


def all_imports() -> list[Import]:
    return [imp for name in MODULES for imp in imports(_tree(name), name)]


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """module -> the cnnstress modules it imports: at its top level only
    (what runs at import: imports inside functions and under TYPE_CHECKING
    are deferred), or with deferred=True every import at any depth."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in all_imports():
        if deferred or not imp.deferred:
            graph[imp.importer].add(imp.imported)
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


# --- layers (issue 21) ------------------------------------------------------
# The layers, bottom up: a module imports only modules of its own layer and of
# the layers below, at any depth (inside functions and under TYPE_CHECKING too).
# Keys of the table: a top-level module, or a subpackage with all its modules.
LAYERS: dict[str, tuple[str, ...]] = {
    # leaves every layer reads: errors, the settings, files and folders, devices
    # and seeds, the model registry (names, presets, checkpoint paths), timing
    "base": ("errors", "version", "registry", "config", "io", "runtime", "arrays", "budget", "runlog", "resources"),
    # one model or two: data, augmentation, network, training and its
    # checkpoints, evaluation, paired comparison, published weights, the output lock
    "engine": ("data", "augment", "model", "checkpoint", "train", "evaluate", "compare", "weights", "lock",
               "supplied"),
    # what the stages compute and show: stress and explanation methods, typed
    # results and cache checks, figures, report rendering
    "analysis": ("robustness", "xai", "results", "plots", "reporting"),
    "stages": ("stages",),
    "study": ("study",),   # the object the notebook drives; the stages run on it
    # what drives a Study: the pipeline, the CLI, the packed GPU study, the package's front
    "front": ("pipeline", "__main__", "docs_cli", "__init__"),
}
LAYER_ORDER = tuple(LAYERS)
RULE = " -> ".join(LAYER_ORDER)

# Upward imports still allowed, each matched by (importer, imported, where) with
# the reason. Empty since the stage contract (issue 21, part 2): a stage types
# the study it is handed with stages.base.StudyContext, and Study.run is the
# one run loop. An entry that no longer matches an upward import fails
# test_known_upward_imports_are_current.
KNOWN_UPWARD: dict[tuple[str, str, str], str] = {}


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise KeyError(f"cnnstress.{module} is in no layer: add {top!r} to LAYERS in tests/test_layout.py")


def upward(imp: Import) -> str | None:
    """Which layer rule `imp` breaks (one line naming both modules), or None."""
    a, b = layer_of(imp.importer), layer_of(imp.imported)
    if LAYER_ORDER.index(b) <= LAYER_ORDER.index(a):
        return None
    below = ", ".join(LAYER_ORDER[:LAYER_ORDER.index(a) + 1])
    return f"{imp}: {a} -> {b} points up ({RULE}); {a} modules import {below} only"


def test_every_module_has_a_layer_and_every_layer_entry_a_module():
    tops = {m.split(".")[0] for m in MODULES}
    named = [n for names in LAYERS.values() for n in names]
    assert sorted(tops - set(named)) == [], "a new module: put it in its layer in LAYERS"
    assert sorted(set(named) - tops) == [], "no such module: remove it from LAYERS"
    assert len(named) == len(set(named)), "a module in two layers"


def test_import_finder_sees_every_depth():
    src = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nfrom .cam import get_layer\n"
           "from .. import __version__\nif TYPE_CHECKING:\n    from ..study import Study\n"
           "class A:\n    from ..registry import BASELINE\n    def m(self):\n        import cnnstress.stages.base\n"
           "def f():\n    def g():\n        from ..pipeline import run_study\n    from ..xai import cam\n")
    found = [(i.imported, i.line, i.where) for i in imports(ast.parse(src), "xai.checks")]
    assert found == [("xai.cam", 3, "top level"), ("__init__", 4, "top level"), ("study", 6, "under TYPE_CHECKING"),
                     ("registry", 8, "top level"), ("stages.__init__", 10, "in m()"), ("stages.base", 10, "in m()"),
                     ("pipeline", 13, "in f()"), ("xai.cam", 14, "in f()")]


def test_an_upward_import_inside_a_function_is_named():
    [imp] = imports(ast.parse("def save(path):\n    from .study import Study\n"), "io")
    assert upward(imp) == ("cnnstress.io imports cnnstress.study (line 2, in save()): base -> study points up "
                           f"({RULE}); base modules import base only")
    [imp] = imports(ast.parse("from ..evaluate import predict\n"), "xai.cam")
    assert upward(imp) is None


def test_every_import_points_down_the_layers():
    """No import at any depth points to a higher layer, but the known ones
    that the stage contract removes (KNOWN_UPWARD)."""
    broken = [rule for imp in all_imports() if (rule := upward(imp))
              and (imp.importer, imp.imported, imp.where) not in KNOWN_UPWARD]
    assert broken == [], "\n".join(broken)


def test_known_upward_imports_are_current():
    """Each KNOWN_UPWARD entry still matches an upward import: once part 2
    removes one, its entry goes too."""
    seen = {(i.importer, i.imported, i.where) for i in all_imports() if upward(i)}
    assert [k for k in KNOWN_UPWARD if k not in seen] == [], "remove these entries from KNOWN_UPWARD"


def test_no_import_cycle_at_any_depth():
    """All imports together, function-level and type-only included, form no
    cycle but through KNOWN_UPWARD (the layers forbid any other cycle across
    layers; this catches cycles inside one layer, e.g. config <-> io)."""
    graph = {name: set() for name in MODULES}
    for imp in all_imports():
        if (imp.importer, imp.imported, imp.where) not in KNOWN_UPWARD:
            graph[imp.importer].add(imp.imported)
    assert graph["lock"] >= {"io", "registry", "runtime"}   # function-level imports are read
    assert find_cycle(graph) is None
