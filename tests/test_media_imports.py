"""The media package has no import cycle: lower layers (room, participant, hooks, cluster…) see the layers that
own them through the Protocols of services/media/interfaces.py, never by importing them. Every import counts,
including those under TYPE_CHECKING and inside functions (both are how a cycle usually hides)."""

from __future__ import annotations

import ast
from pathlib import Path

MEDIA = Path(__file__).resolve().parent.parent / "services" / "media"
PACKAGE = "services.media"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(MEDIA).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _is_module(name: str, modules: dict[str, Path]) -> bool:
    if name in modules:
        return True
    parent, _, leaf = name.rpartition(".")
    folder = MEDIA.joinpath(*parent.split(".")[2:])
    return any(folder.glob(f"{leaf}.*")) if parent.startswith(PACKAGE) else False  # e.g. a C extension


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in MEDIA.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name.removeprefix("braid.") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = (node.module or "").removeprefix("braid.")
                # `from pkg import x`: the submodule x if there is one, else a name defined by pkg itself.
                targets = [f"{source}.{a.name}" if _is_module(f"{source}.{a.name}", modules) else source
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_media_package_has_no_import_cycle():
    graph = import_graph()
    assert "services.media.node" in graph and graph["services.media.node"], "the parser found the package"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(m.removeprefix(PACKAGE + ".") for m in cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
