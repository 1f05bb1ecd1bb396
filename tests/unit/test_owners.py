"""Each outside thing is reached from one module: the rules, read off the source with ``ast``.

* ``tar`` is run only by ``corral/snapshots/tar.py``;
* HTTP clients (``http.client``, ``urllib.request``, httpx, requests) are imported only by
  ``corral/outbound.py``: the bridge's proxy speaks HTTP over its own sockets;
* ciphers (``cryptography``'s AEADs) are used only by ``corral/vault/sealed.py``.

``corral/runner`` runs inside the sandbox, imports nothing from corral and is not held to
these rules (the agent's SDK calls the bridge with ``urllib``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import corral

ROOT = Path(corral.__file__).parent


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        if not rel.startswith("corral/runner/"):
            out[rel] = ast.parse(path.read_text(), rel)
    return out


def imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def runs_tar(tree: ast.Module) -> bool:
    """Whether the module builds an argv (a list) that starts with ``tar``. The host check's
    ``("tar", "tar")`` (binary, package) only looks for the binary."""
    for node in ast.walk(tree):
        if isinstance(node, ast.List) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value == "tar":
                return True
    return False


@pytest.mark.parametrize(
    ("owner", "uses"),
    [
        ("corral/outbound.py", ("http.client", "urllib.request", "httpx", "requests")),
        ("corral/vault/sealed.py", ("cryptography.hazmat.primitives.ciphers",)),
    ],
)
def test_one_module_imports_it(owner: str, uses: tuple[str, ...]) -> None:
    def hit(name: str) -> bool:
        return any(name == use or name.startswith(use + ".") for use in uses)

    found = {rel for rel, tree in modules().items() if any(hit(n) for n in imported(tree))}
    assert found == {owner}


def test_one_module_runs_tar() -> None:
    assert {rel for rel, tree in modules().items() if runs_tar(tree)} == {"corral/snapshots/tar.py"}
