"""The shape of the code base: no import cycles among margo_stream, controller and agent, no
source file past 600 lines, aioquic's internals used in one place only (the mTLS hook, which
checks them against the pinned version). Read from the source with ``ast``; nothing here
imports the project's modules."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("margo_stream", "controller", "agent")
SOURCE_DIRS = (*PACKAGES, "bench")
MAX_LINES = 600
MTLS_HOOK = Path("margo_stream/transport/mtls_hook.py")

# aioquic internals the client-certificate hook relies on (pinned aioquic version). Any other
# underscore name that aioquic defines and this project does not is counted too, see below.
AIOQUIC_PRIVATE = frozenset(
    {
        "_quic",
        "_request_client_certificate",
        "_peer_certificate",
        "_peer_certificate_chain",
        "_peer_cid",
        "_peer_cid_available",
        "_host_cids",
        "_initialize",
        "_replenish_connection_ids",
        "_server_handle_hello",
    }
)


def python_files(*dirs: str) -> Iterator[Path]:
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


# --------------------------------------------------------------------------- import cycles


def imported_modules(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules ``module`` imports anywhere in its body (functions and ``if
    TYPE_CHECKING:`` blocks included); ``from pkg import mod`` names the module pkg.mod."""

    def owner(name: str) -> str | None:  # the longest known module that ``name`` starts with
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                return candidate
        return None

    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                if not is_package:
                    package.pop()
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else owner(target))
    return {m for m in found if m is not None and m != module}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in python_files(*PACKAGES)}
    known = set(files)
    return {
        name: imported_modules(name, path.name == "__init__.py", parse(path), known)
        for name, path in files.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in discovery order, members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
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
                components.append(sorted(component))
    return components


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_graph_sees_every_kind_of_import() -> None:
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    tree = ast.parse(
        "import pkg.a\n"
        "from . import b\n"
        "from .sub import c\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.sub.d import Thing\n"
        "def f():\n"
        "    from pkg.sub import helper\n"
    )
    assert imported_modules("pkg.x", False, tree, known) == {
        "pkg.a",
        "pkg.b",
        "pkg.sub.c",
        "pkg.sub.d",
        "pkg.sub",  # helper is a name in pkg/sub/__init__.py
    }
    # in a package's __init__, one dot is the package itself
    tree = ast.parse("from . import c\nfrom .. import a\nfrom ..b import Thing\n")
    assert imported_modules("pkg.sub", True, tree, known) == {"pkg.sub.c", "pkg.a", "pkg.b"}


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "margo_stream.transport.mtls_hook" in graph and graph["controller.service"]
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    report = "\n".join(
        f"  {' <-> '.join(c)}\n    e.g. {' -> '.join(one_cycle(graph, c))}" for c in cycles
    )
    print(report)
    assert not cycles, f"{len(cycles)} import cycles among the project's modules:\n{report}"


def test_strongly_connected_finds_cycles_and_only_them() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    components = strongly_connected(graph)
    assert [c for c in components if len(c) > 1] == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


# --------------------------------------------------------------------------- file size


def test_no_source_file_is_past_600_lines() -> None:
    files = [*python_files(*SOURCE_DIRS), ROOT / "dev.py"]
    assert len(files) > 50
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files past {MAX_LINES} lines (split them): {long}"


# --------------------------------------------------------------------------- aioquic internals


def names_defined(trees: list[ast.Module]) -> set[str]:
    """Underscore names the given modules define: functions, attributes they assign, class
    attributes and ``__slots__`` entries."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ = ("_x", ...), namedtuple fields
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def aioquic_private_names() -> frozenset[str]:
    spec = importlib.util.find_spec("aioquic")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    aioquic = [parse(p) for p in [*package.rglob("*.py"), *package.rglob("*.pyi")]]
    project = [parse(p) for p in python_files(*SOURCE_DIRS)]
    # a name aioquic defines that the project never defines is aioquic's wherever it is used
    return AIOQUIC_PRIVATE | (names_defined(aioquic) - names_defined(project))


def test_aioquic_internals_are_touched_only_by_the_mtls_hook() -> None:
    # the shipped code only: tests may peek at a handshake's internals to set one up
    private = aioquic_private_names()
    assert {"_request_client_certificate", "_quic", "_peer_cid"} <= private
    touched: dict[str, set[str]] = {}
    for path in python_files(*SOURCE_DIRS):
        uses = {
            name
            for node in ast.walk(parse(path))
            if (
                name := node.attr
                if isinstance(node, ast.Attribute)
                else node.value
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
                else None
            )
            in private
        }
        if uses:
            touched[str(path.relative_to(ROOT))] = uses
    assert str(MTLS_HOOK) in touched  # the hook does use them: the scan sees it
    others = {p: sorted(u) for p, u in touched.items() if p != str(MTLS_HOOK)}
    assert not others, f"aioquic internals used outside {MTLS_HOOK}: {others}"


# --------------------------------------------------------------------------- qh3, one module

QH3_MODULE = Path("margo_stream/transport/qh3_connection.py")


def test_qh3_is_imported_by_one_module_only() -> None:
    """The agent's second QUIC stack stays behind ``ChannelConnection`` in one module: the
    rest (the agent, the bench) asks that module for it."""
    importers: set[str] = set()
    for path in python_files(*SOURCE_DIRS):
        for node in ast.walk(parse(path)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "qh3" or n.startswith("qh3.") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {str(QH3_MODULE)}, importers
