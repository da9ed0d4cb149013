"""The project's shape, checked from its source: no import cycle, protobuf only in the receiver's
frontends, and the receiver's parts apart (frontends, queue, schedulers, model host)."""
from __future__ import annotations

import ast
from pathlib import Path

from shared.paths import REPO_ROOT

PACKAGES = ("channel_sim", "receiver_service", "sender_service", "shared", "gesco", "evaluation", "training",
            "scripts", "load")
GENERATED = "gesco.v1"
# The receiver's modules that turn wire messages into jobs: the only ones that may read protobuf.
RECEIVER_FRONTENDS = {"receiver_service.grpc_server"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
            if not name.startswith(GENERATED):
                modules[name] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path) -> set[str]:
    """Every absolute import of the module, at any depth (deferred imports included), except those
    made for type checkers only."""
    names: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest module prefix)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_project() -> None:
    assert cycles(import_graph()) == []


def test_only_the_receivers_frontends_read_protobuf() -> None:
    readers = {name for name, path in project_modules().items()
               if name.startswith("receiver_service") and any(imported.startswith(GENERATED)
                                                                for imported in imported_names(path))}
    assert readers == RECEIVER_FRONTENDS


def test_the_receivers_core_knows_no_frontend() -> None:
    """Queue, schedulers, model host and completion import neither the gRPC nor the REST frontend."""
    graph = import_graph()
    core = ("receiver_service.queue", "receiver_service.schedulers", "receiver_service.step_batching",
            "receiver_service.model_host", "receiver_service.completion", "receiver_service.jobs")
    for module in core:
        assert not graph[module] & {"receiver_service.grpc_server", "receiver_service.app",
                                    "receiver_service.worker"}, module
