"""Import graph of vortex_hybrid: the modules of `vortex_hybrid.vflow` import each other without a
cycle.

The graph is read from the source with `ast`, so imports inside functions (lazy imports) count, and
so do imports by name: a module that calls `importlib.import_module` (or `__import__`) is taken to
import every package module it names in a string literal (`"vortex_hybrid.cpu_kernels"`). Imports
under `if TYPE_CHECKING:` do not count (they never run). An edge goes to the module named:
`from .x import name` is an edge to `.x`, or to `.x.name` when that is a submodule. The implicit
import of a parent package (importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first) is
not an edge, as in pydeps and import-linter.

Only cycles among vflow's own modules fail the test. Run it as a script to list the cycles of the
whole package (one per tangle: a set of modules that all reach each other):

    python tests/test_import_graph.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = "vortex_hybrid"
CHECKED = "vortex_hybrid.vflow"        # the subpackage that must stay free of import cycles


def module_files() -> dict[str, Path]:
    """Every module of the installed packages (pyproject.toml's package-dir mapping) -> its file."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup.get("package-dir", {})
    out = {}
    for pkg in setup["packages"]:
        base = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len, default="")
        rest = pkg[len(base):].lstrip(".").split(".") if pkg != base else []
        folder = ROOT.joinpath(dirs[base] if base else "", *[p for p in rest if p])
        for file in folder.glob("*.py"):
            out[pkg if file.name == "__init__.py" else f"{pkg}.{file.stem}"] = file
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imported(module: str, is_package: bool, tree: ast.AST, modules: set[str]) -> set[str]:
    """Modules of `modules` that `module` imports (at any depth of its code)."""
    package = module if is_package else module.rpartition(".")[0]

    def known(name: str) -> str | None:      # `name`, or its longest prefix that is a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    names: list[str] = []
    literals: list[str] = []             # string constants that name a package module
    dynamic = False                      # does the module call import_module / __import__?
    for node in _nodes(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            literals.append(node.value)
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.append(full if full in modules else base)
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            dynamic = dynamic or fname in ("import_module", "__import__")
    if dynamic:                          # imports by name: take every module it names as imported
        names += literals
    return {m for m in map(known, names) if m is not None and m != module}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    files = module_files()
    modules = set(files)
    return {m: _imported(m, f.name == "__init__.py", ast.parse(f.read_text(), str(f)), modules)
            for m, f in files.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each
    module of one reaches every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (modules, the first repeated at the end) per tangle of `graph`, sorted."""
    return sorted(_a_cycle(graph, comp) for comp in tangles(graph))


def _a_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the smallest module name of `comp` (breadth-first search)."""
    start = min(comp)
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        nxt = []
        for v in todo:
            for w in sorted(graph[v] & comp):
                if w == start:                  # start -> ... -> v -> start
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        todo = nxt
    raise AssertionError(f"{sorted(comp)} is not strongly connected")


def test_graph_sees_lazy_and_dynamic_imports():
    graph = import_graph()
    assert "vortex_hybrid.vflow.registry" in graph["vortex_hybrid.vflow.flows.quest"]
    assert "vortex_hybrid.vflow.ops" in graph["vortex_hybrid.vflow.flows.quest"]   # from .. import ops
    assert "vortex_hybrid.cpu_kernels" in graph["vortex_hybrid.runtime.hybrid_attention"]  # in a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_any_vflow_module_brings_the_library_flows_and_the_methods():
    """What the lazy imports used to do on demand happens on import: `vortex_hybrid.vflow` (run
    before any of its modules) imports the library flows, the ops and the compiler."""
    code = "; ".join([
        "from vortex_hybrid.vflow.registry import list_flows",
        "from vortex_hybrid.vflow.flow import Flow",
        "from vortex_hybrid.vflow.vtensor import VTensor",
        "assert {'streaming', 'quest', 'centroid', 'oracle', 'double_sparsity'} <= set(list_flows())",
        "assert callable(Flow.compiled) and callable(VTensor.sum) and callable(VTensor.__rmatmul__)"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _in_vflow(module: str) -> bool:
    return module == CHECKED or module.startswith(CHECKED + ".")


def test_package_has_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_vflow_has_no_import_cycle():
    graph = import_graph()
    vflow = {m: {t for t in targets if _in_vflow(t)} for m, targets in graph.items() if _in_vflow(m)}
    found = cycles(vflow)
    assert not found, f"import cycles inside {CHECKED}:\n" + "\n".join(" -> ".join(c) for c in found)


if __name__ == "__main__":
    graph = import_graph()
    found = tangles(graph)
    for comp in sorted(found, key=min):
        print(" -> ".join(_a_cycle(graph, comp)))
        if len(comp) > 2:
            print("    all of:", ", ".join(sorted(comp)))
    print(f"{len(found)} import cycle(s) in {TOP}")
    sys.exit(1 if found else 0)
