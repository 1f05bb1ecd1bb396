"""The architecture as a test: every import points down the layers of docs/design/layers.md.

The imports of every module under ``corral/`` are read with ``ast`` (no module is imported), and
each edge between two top-level parts of Corral must go from a higher layer to a lower one, or
stay within one part. A cycle between modules is refused even inside one part. The runner, which
runs inside sandboxes, imports nothing from Corral at all.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "corral"

# Bottom to top; parts in one layer may not import each other (they are independent).
LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "limits", "states", "statuses", "outbound", "processes", "identity"},
    {"store"},
    {"snapshots", "vault", "billing"},
    {"releases", "observability"},
    {"sandbox"},
    {"envs"},
    {"bridge"},
    {"pipeline"},
    {"triggers"},
    {"context"},
    {"api"},
    {"cli"},
]
LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Module -> the corral modules it imports (``from corral.x import y`` counts as
    ``corral.x.y`` when that is a module, else ``corral.x``)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                targets += [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name and target.startswith("corral"):
                    edges[name].add(target)
        edges.setdefault(name, set())
    return edges


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "corral"


def test_every_part_has_a_layer() -> None:
    parts = {part(m) for m in imports()} - {"corral", "runner"}
    assert parts <= set(LEVEL), f"parts missing from LAYERS: {sorted(parts - set(LEVEL))}"


def test_imports_point_down() -> None:
    upward = []
    for source, targets in imports().items():
        a = part(source)
        if a in ("corral", "runner"):
            continue
        for target in targets:
            b = part(target)
            if b == a or b == "corral":
                continue
            if LEVEL.get(b, -1) >= LEVEL[a]:
                upward.append(f"{source} -> {target} ({a} at {LEVEL[a]}, {b} at {LEVEL.get(b)})")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_the_runner_imports_nothing_from_corral() -> None:
    outside = [
        f"{s} -> {t}"
        for s, targets in imports().items()
        if part(s) == "runner"
        for t in targets
        if part(t) != "runner"
    ]
    assert not outside, outside


def test_no_module_cycle() -> None:
    edges = imports()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
