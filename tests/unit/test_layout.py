"""The package's import graph keeps the request path readable.

Every module of ``portainer_agent`` is parsed with :mod:`ast` (nothing is imported), and
its imports become edges of a graph between the package's own modules. Two rules:

* **Only the entry points import the edge.** The HTTP edge (:data:`EDGE`: the site, the
  channel, the request, the root and the agent endpoint resources) sits on top; the
  toolbox (``toolbox``), the upstreams (``proxy``), ``console``, ``fs`` and the rest never
  reach back into it, not even from inside a function or under ``TYPE_CHECKING``.
* **No cycle among module-level imports.** Imports that run when a module is loaded
  (top level, including ``try``/``if`` blocks, but not ``if TYPE_CHECKING:``) must form a
  DAG. Imports inside functions are left out of this rule on purpose: they are how the
  Swarm, console and metrics stacks stay lazy (``test_startup_imports``), and a lazy
  import back up the graph does not make loading order fragile.

An import of ``a.b.c`` is an edge to ``a.b.c`` only (not to the ``a.b`` package's
``__init__``); ``from a.b import c`` is an edge to ``a.b.c`` when ``c`` is a module.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

import portainer_agent

PACKAGE = "portainer_agent"
ROOT = Path(portainer_agent.__file__).resolve().parent
#: The HTTP edge: everything twisted.web's Site dispatches to.
EDGE = "portainer_agent.http"
#: The modules that assemble the agent and may import the edge.
ENTRY_POINTS = frozenset({"portainer_agent.tap", "portainer_agent.cli", "portainer_agent.twistd",
                          "portainer_agent.__main__"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], module_level: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """(import statement, runs at module load) for every import under ``body``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, module_level
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _imports(node.body, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, False)
            yield from _imports(node.orelse, module_level)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from _imports([c for c in children if isinstance(c, ast.stmt)]
                                        + [s for h in children if isinstance(h, ast.ExceptHandler)
                                           for s in h.body], module_level)


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """module -> {imported package module: imported at module load}."""
    graph: dict[str, dict[str, bool]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, bool] = {}
        tree = ast.parse(path.read_text(), str(path))
        for node, at_load in _imports(tree.body, True):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # ``import a.b.c`` of a name inside c
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target in modules and target != name:
                    edges[target] = edges.get(target, False) or at_load
        graph[name] = edges
    return graph


def in_edge(name: str) -> bool:
    return name == EDGE or name.startswith(EDGE + ".")


def edge_violations(graph: dict[str, dict[str, bool]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, edges in graph.items() for target in edges
                  if in_edge(target) and not in_edge(module) and module not in ENTRY_POINTS)


def find_cycle(graph: dict[str, dict[str, bool]]) -> list[str] | None:
    """One cycle among module-level imports, as a path, or None."""
    edges = {module: sorted(t for t, at_load in targets.items() if at_load) for module, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in edges.get(module, []):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


class LayoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.modules = all_modules()
        self.graph = import_graph(self.modules)

    def test_the_graph_sees_the_package(self) -> None:
        """The parser finds the modules and the imports it is meant to judge (a graph
        with no edges would pass every rule)."""
        self.assertIn("portainer_agent.tap", self.modules)
        self.assertIn(EDGE + ".root", self.modules)
        self.assertIn(EDGE + ".site", self.graph["portainer_agent.tap"])
        self.assertIn("portainer_agent.routing", self.graph[EDGE + ".root"])

    def test_only_the_entry_points_import_the_edge(self) -> None:
        self.assertEqual(edge_violations(self.graph), [])

    def test_module_level_imports_have_no_cycle(self) -> None:
        self.assertIsNone(find_cycle(self.graph))

    def test_a_reach_back_into_the_edge_is_caught(self) -> None:
        """The rule can fail: a proxy module importing the root, even lazily, is named."""
        graph = {name: dict(edges) for name, edges in self.graph.items()}
        graph["portainer_agent.proxy.relay"][EDGE + ".root"] = False
        self.assertIn("portainer_agent.proxy.relay imports portainer_agent.http.root", edge_violations(graph))
        self.assertNotIn("portainer_agent.proxy.relay imports portainer_agent.http.root", edge_violations(self.graph))

    def test_a_cycle_is_caught(self) -> None:
        graph = {"a": {"b": True}, "b": {"c": True}, "c": {"a": True}, "d": {"a": False}}
        self.assertEqual(find_cycle(graph), ["a", "b", "c", "a"])
        graph["c"]["a"] = False  # a lazy import back up is allowed
        self.assertIsNone(find_cycle(graph))
