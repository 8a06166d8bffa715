"""Package hygiene: every module imports on its own, no import cycles, command-line code only in
``deltanet/cli``.

The import graph is read from the source with ``ast``. Two kinds of import statement count:

* module-level ones (at the top of a file, or inside a top-level ``if`` / ``try`` / class body:
  everything that runs when the module is imported, except ``if TYPE_CHECKING:`` blocks). These
  make the graph that must have no cycle: a cycle there means that importing one module of it
  first can hit another module still half-initialised (``ImportError: cannot import name``).
* imports inside functions as well. They run later, when the whole package is importable, so a
  cycle through them does no harm at import time; they are deliberately lazy (start-up of the
  command line, optional packages). They still show which way code depends on which, so they
  count for the layering rule: no library module, at any level, imports ``deltanet.cli``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "deltanet"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, *, module_level_only: bool):
    """The Import / ImportFrom nodes of a module; with ``module_level_only`` only those that run
    when the module is imported (not in function bodies, not under ``if TYPE_CHECKING``)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if module_level_only:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and _is_type_checking(node):
                stack.extend(node.orelse)
                continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, node: ast.AST) -> set[str]:
    """The deltanet modules an import statement in module ``name`` loads (by its explicit target:
    ``from deltanet.x import y`` is ``deltanet.x.y`` when that is a module, else ``deltanet.x``)."""
    out = set()
    if isinstance(node, ast.Import):
        out = {a.name for a in node.names}
    else:
        if node.level:  # relative: resolved against the importing module's package
            is_pkg = MODULES[name].name == "__init__.py"
            base = name.split(".")
            base = base[:len(base) - node.level + (1 if is_pkg else 0)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        for a in node.names:
            out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return {m for m in out if m in MODULES}


def import_graph(*, module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in _import_nodes(tree, module_level_only=module_level_only):
            graph[name] |= _targets(name, node) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve():
    g = import_graph(module_level_only=True)
    # `from .synthetic import ...` in deltanet/evaluation/tasks/mqar.py
    assert "deltanet.evaluation.tasks.synthetic" in g["deltanet.evaluation.tasks.mqar"]
    assert len(MODULES) > 40 and "deltanet.cli" in MODULES


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph(module_level_only=True))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_library_never_imports_the_cli():
    """The command line sits on top of the library: no library module imports ``deltanet.cli``,
    not even inside a function (that made the cycle cli -> trainer -> perplexity -> cli)."""
    graph = import_graph(module_level_only=False)
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() if not m.startswith("deltanet.cli")
                 for t in ts if t == "deltanet.cli" or t.startswith("deltanet.cli."))
    assert not bad, bad


def test_argparse_only_in_the_cli():
    users = []
    for name, path in MODULES.items():
        if name == "deltanet.cli" or name.startswith("deltanet.cli."):
            continue
        tree = ast.parse(path.read_text())
        for node in _import_nodes(tree, module_level_only=False):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                users.append(name)
    assert not users, f"argparse outside deltanet/cli: {sorted(set(users))}"


def test_no_cli_main_outside_the_cli():
    """Library modules expose functions taking configs / keyword arguments; the argv entry points
    (``cli_main``) are the command modules of ``deltanet.cli``."""
    found = []
    for name, path in MODULES.items():
        if name == "deltanet.cli" or name.startswith("deltanet.cli."):
            continue
        tree = ast.parse(path.read_text())
        found += [f"{name}.{n.name}" for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cli_main"]
        if "sys.argv" in path.read_text():
            found.append(f"{name} reads sys.argv")
    assert not found, found


_IMPORT_EACH = r"""
import importlib, os, sys, traceback
# third-party packages the library imports, loaded once; each deltanet module is then imported in
# a forked child in which no deltanet module is loaded yet (a fresh interpreter, minus the wait)
import numpy, torch, transformers, triton  # noqa: F401
failed = []
for name in sys.argv[1:]:
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        ok = os.waitpid(pid, 0)[1] == 0
    else:
        import subprocess
        ok = subprocess.run([sys.executable, "-c", f"import {name}"]).returncode == 0
    if not ok:
        failed.append(name)
print("FAILED", " ".join(failed))
"""


def test_every_module_imports_alone():
    """Each module of the package imports in an interpreter where no other deltanet module is loaded
    yet (import order cannot hide a cycle or a missing import). Triton is installed, so the kernel
    modules import too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *sorted(MODULES)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last == "FAILED", f"{last}\n{r.stderr[-4000:]}"


def test_cli_modules_import_without_torch():
    """Importing the command line (and every command module) loads neither torch nor transformers:
    ``deltanet --help`` starts in a fraction of a second."""
    cli_modules = sorted(m for m in MODULES if m == "deltanet.cli" or m.startswith("deltanet.cli."))
    code = ("import importlib, sys\n"
            f"for m in {cli_modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "[]"
