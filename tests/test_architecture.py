"""The package layout is the architecture: stage folders, imports flowing one way down the data's path.

Every module's imports are read from its source (AST, nothing executed; imports inside functions and
``TYPE_CHECKING`` blocks count too). A module may import from its own stage or an earlier one, never
from a later one, and no set of modules may import each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# data -> noise/train -> score -> metrics -> leaderboard; shared helpers below every stage, wiring above.
LAYERS = {
    "shared": 0,       # pipeline/__init__, atomic, common, errors, fingerprint, layout, runtime
    "data": 1,
    "model": 2,
    "scoring": 3,
    "evaluation": 4,
    "leaderboard": 5,
    "wiring": 6,       # bundle, protocols, api, cli/, __main__
}
WIRING = {"bundle", "protocols", "verify", "api", "cli", "__main__"}
STAGES = {"data", "model", "scoring", "evaluation", "leaderboard"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, known: set[str], current: str | None = None) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import mod`` names the module ``pkg.mod``)."""
    current = current or module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, current, path.name == "__init__.py")
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
    return {name for name in found if name in known and name != current}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) for name, path in found.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["shared"]
    if parts[1] in STAGES:
        return LAYERS[parts[1]]
    return LAYERS["wiring"] if parts[1] in WIRING else LAYERS["shared"]


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, targets in graph.items() for dst in targets if layer(dst) > layer(src))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), i.e. each import circle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_every_module_has_a_known_place():
    unplaced = [m for m in modules() if len(m.split(".")) > 1 and m.split(".")[1] not in STAGES | WIRING
                and m.split(".")[1] not in {"atomic", "common", "errors", "fingerprint", "layout", "provenance", "runtime"}]
    assert not unplaced, f"modules outside a stage folder or the shared/wiring lists: {unplaced}"


def test_imports_flow_down_the_stages():
    assert backward_imports(import_graph()) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("src, dst", [("pipeline.data.transforms", "pipeline.scoring.settings"),
                                      ("pipeline.evaluation.metrics", "pipeline.leaderboard.registry"),
                                      ("pipeline.common", "pipeline.data.dataset")])
def test_a_backward_import_is_caught(src, dst):
    graph = import_graph()
    graph[src] = graph[src] | {dst}
    assert backward_imports(graph) == [f"{src} -> {dst}"]


def test_a_circle_is_caught():
    graph = import_graph()
    graph["pipeline.data.split"] = graph["pipeline.data.split"] | {"pipeline.data.prepare"}
    assert any({"pipeline.data.prepare", "pipeline.data.split"} <= set(group) for group in cycles(graph))


def test_imports_are_read_from_source(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("import os\nfrom pipeline.scoring import settings\n\n"
                      "def lazy():\n    from pipeline.leaderboard.site import build_site\n")
    known = set(modules())
    assert imports_of(source, known, "pipeline.probe") == {"pipeline.scoring.settings", "pipeline.leaderboard.site"}


def test_each_stage_says_what_it_does():
    for stage in STAGES | {"cli"}:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"pipeline/{stage}/__init__.py needs a one-line docstring"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_public_names_of_a_stage_resolve(stage):
    import importlib

    package = importlib.import_module(f"pipeline.{stage}")
    assert package.__all__ and all(getattr(package, name) is not None for name in package.__all__)
