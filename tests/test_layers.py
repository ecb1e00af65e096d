"""Imports point down the layers of docs/DESIGN.md; this test reads every import of the package and fails on a new
upward import or a new import past another package's ``__init__`` (none is allowed: the lists below are empty)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "forgetpatch"

#: docs/DESIGN.md's layers, bottom first; modules beside the bottom (-1) may be imported by any layer.
LAYER = {
    "errors": -1, "quiet": -1, "progress": -1, "testing": -1, "toy": -1, "archs": -1, "tokenizer": -1, "distributed": -1, "lazy": -1, "rates": -1,
    "lowrank": 0, "format": 0,
    "loader": 1, "hub": 1,
    "methods": 2, "recipes": 2,
    "eval": 3,
    "attacks": 4,
    "cli": 5,
    "__init__": 6, "__main__": 6,
}

#: Upward imports allowed: none since issue 16 moved the last (format's lineage now comes from a source the loader
#: registers). Add none.
KNOWN_UPWARD: set[tuple[str, str]] = set()

#: Imports allowed to reach past another package's ``__init__``: none since issue 16. Add none.
KNOWN_DEEP: set[tuple[str, str]] = set()


def _imports() -> list[tuple[str, str]]:
    """``(module, imported forgetpatch module)`` for every import in the package, lazy ones included."""
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        module = str(file.relative_to(PACKAGE).with_suffix(""))
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("forgetpatch."):
                found.append((module, node.module))
            elif isinstance(node, ast.Import):
                found += [(module, a.name) for a in node.names if a.name.startswith("forgetpatch.")]
    return found


def test_every_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert tops - {"__pycache__", "weights"} <= set(LAYER), "give the new module a layer here and in docs/DESIGN.md"


def test_imports_point_down_only():
    upward = set()
    for module, target in _imports():
        home, there = module.split("/")[0], target.split(".")[1]
        if home != there and LAYER[there] > LAYER[home]:
            upward.add((module, target))
    assert upward == KNOWN_UPWARD, f"new upward imports: {upward - KNOWN_UPWARD}; gone: {KNOWN_UPWARD - upward}"


def test_no_new_imports_past_a_packages_init():
    deep = set()
    for module, target in _imports():
        parts = target.split(".")
        if len(parts) > 2 and parts[1] != module.split("/")[0] and (PACKAGE / parts[1]).is_dir():
            deep.add((module, target))
    assert deep <= KNOWN_DEEP, f"import these through the package's __init__: {deep - KNOWN_DEEP}"
    assert deep == KNOWN_DEEP, f"gone, take them off KNOWN_DEEP: {KNOWN_DEEP - deep}"
