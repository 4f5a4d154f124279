"""The package layout holds: no import cycles, a small top-level `mesh/`, the control plane
(`mesh/`) never importing the data plane (`workers/`), and the layers of `mesh/` importing only
downwards (docs/architecture.md describes the layers).

Imports are read with `ast`, not executed: imports inside functions count, imports under
`if TYPE_CHECKING:` do not, relative imports are resolved. `from a.b import c` depends on the
module `a.b.c` when there is one, else on `a.b`. Importing a module also runs its parent
packages' `__init__`; that implicit edge is not counted (every module would depend on `mesh`).
tests/ and bench/ are not checked.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mesh", "workers")
MAX_TOP_LEVEL_MESH_MODULES = 12


# ------------------------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                mods[_module_name(path)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str | None, importer: str, level: int, is_package: bool) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `importer`."""
    if not level:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ours that `name` (a module, or an attribute of one) lives in."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in mods:
            return candidate
    return None


def _imported_names(tree: ast.AST, importer: str, is_package: bool) -> list[tuple[str, int]]:
    """(absolute name, line) of every import that runs, here or in a function."""
    mods = _modules()
    found: list[tuple[str, int]] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for child in node.orelse:  # the `else:` of TYPE_CHECKING runs
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.extend((alias.name, node.lineno) for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = _resolve(node.module, importer, node.level, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in mods else base, node.lineno))

    Visitor().visit(tree)
    return found


@lru_cache(maxsize=1)
def _graph() -> dict[str, dict[str, int]]:
    """importer -> {imported module of ours (or a top-level package name): first line}."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for imported, line in _imported_names(tree, name, path.name == "__init__.py"):
            target = _owner(imported, mods)
            if target is None and imported.split(".")[0] in PACKAGES:
                target = imported  # a module of ours that does not exist (yet): keep the name
            if target is not None and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _where(importer: str, imported: str, graph: dict[str, dict[str, int]]) -> str:
    path = _modules()[importer].relative_to(ROOT) if importer in _modules() else importer
    return f"{path}:{graph[importer][imported]} imports {imported}"


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module
    (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
    return [_a_cycle_in(comp, graph) for comp in sccs]


def _a_cycle_in(comp: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first)."""
    members = set(comp)
    start = comp[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return comp  # unreachable for a strongly connected component


def _violations(rule, graph: dict[str, dict[str, int]] | None = None) -> list[str]:
    """`rule(importer, imported) -> bool` (True: forbidden), over every edge of the graph."""
    graph = _graph() if graph is None else graph
    return [
        _where(importer, imported, graph)
        for importer, edges in sorted(graph.items())
        for imported in sorted(edges)
        if rule(importer, imported)
    ]


def _check(rule_name: str, found: list[str]) -> None:
    assert not found, f"{rule_name}: " + "; ".join(found)


# ------------------------------------------------------------------------------------------ rules


def test_the_graph_sees_the_packages():
    graph = _graph()
    assert "mesh.policy.planner" in graph and "workers.worker" in graph
    assert "mesh.protocol.messages" in graph["mesh.broker.tasks"], "the import parser lost an edge"


def test_no_import_cycles():
    cycles = _cycles(_graph())
    _check("import cycles", [" -> ".join(c) for c in cycles])


def test_mesh_top_level_stays_small():
    top = sorted(p.name for p in (ROOT / "mesh").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MESH_MODULES, (
        f"mesh/ holds {len(top)} modules directly (at most {MAX_TOP_LEVEL_MESH_MODULES}): {top}; "
        "put new ones in a subpackage"
    )


def test_mesh_never_imports_workers():
    _check("mesh imports workers", _violations(lambda a, b: _in(a, "mesh") and _in(b, "workers")))


def test_protocol_imports_only_errors_and_itself():
    _check(
        "mesh.protocol layer",
        _violations(
            lambda a, b: _in(a, "mesh.protocol") and _in(b, "mesh") and not _in(b, "mesh.errors", "mesh.protocol")
        ),
    )


def test_policy_imports_only_protocol_errors_models_settings_and_itself():
    allowed = ("mesh.protocol", "mesh.errors", "mesh.models", "mesh.settings", "mesh.policy")
    _check(
        "mesh.policy layer",
        _violations(lambda a, b: _in(a, "mesh.policy") and _in(b, "mesh", "workers") and not _in(b, *allowed)),
    )


def test_store_storage_broker_import_no_control_tools_client_app():
    above = ("mesh.control", "mesh.tools", "mesh.client", "mesh.app")
    _check(
        "mesh.store/storage/broker layer",
        _violations(lambda a, b: _in(a, "mesh.store", "mesh.storage", "mesh.broker") and _in(b, *above)),
    )


def test_control_imports_no_tools_client_app():
    _check(
        "mesh.control layer",
        _violations(lambda a, b: _in(a, "mesh.control") and _in(b, "mesh.tools", "mesh.client", "mesh.app")),
    )


def test_only_tools_import_tools():
    _check(
        "mesh.tools imported from outside",
        _violations(lambda a, b: _in(b, "mesh.tools") and not _in(a, "mesh.tools")),
    )


def test_only_tools_import_the_gateway():
    """The gateway is a producer above the public API (it uses MeshClient): only the tools
    that run it import it."""
    _check(
        "mesh.gateway imported from outside",
        _violations(lambda a, b: _in(b, "mesh.gateway") and not _in(a, "mesh.gateway", "mesh.tools")),
    )


def test_the_checks_catch_a_cycle_and_a_forbidden_import():
    """The rules above can fail: a made-up graph with a cycle and an upward import."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    tree = ast.parse("from ..control import routing\nif TYPE_CHECKING:\n    import mesh.tools.cli\n"
                     "def f():\n    from .. import client\n")
    names = [n for n, _ in _imported_names(tree, "mesh.store.state", False)]
    assert names == ["mesh.control.routing", "mesh.client"]
    upward = {"mesh.store.x": {"mesh.control.routing": 3, "mesh.protocol.keys": 1}, "mesh.tools.cli": {"workers.worker": 7}}
    assert _violations(lambda a, b: _in(a, "mesh.store") and _in(b, "mesh.control"), upward) == [
        "mesh.store.x:3 imports mesh.control.routing"
    ]
    assert _violations(lambda a, b: _in(a, "mesh") and _in(b, "workers"), upward) == [
        "mesh/tools/cli.py:7 imports workers.worker"
    ]


def test_every_worker_module_is_imported_by_a_unit_test():
    """The worker's core is tested without a worker process (tests/unit): every module of
    workers/ (the runtimes aside: tests/unit/test_runtimes.py covers them through the registry)
    is imported directly by a unit test, not only reached through `celery worker`."""
    unit = ROOT / "tests" / "unit"
    imported: set[str] = set()
    for path in unit.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported.update(name for name, _ in _imported_names(tree, f"tests.unit.{path.stem}", False))
    mods = _modules()
    wanted = [m for m in mods if _in(m, "workers") and m != "workers" and not _in(m, "workers.runtimes")]
    missing = [m for m in wanted if not any(_owner(n, mods) == m for n in imported)]
    assert not missing, f"modules of workers/ no unit test imports: {missing}"
