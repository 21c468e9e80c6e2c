"""The dependency rule of design.md, checked on the source tree (a light import-linter).

cli -> workflows -> {isac, variability} -> core; workflows -> io, parallel.
core imports nothing from isavar but core, conventions, errors and types; the algorithms may use
the particle-table schema (io.particles: column names, no file access) but no file I/O;
mpi4py is imported only in parallel/mpi.py; print and sys.exit only in cli/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "isavar"

ALLOWED = {
    "core": {"core", "conventions", "errors", "types"},
    "isac": {"core", "conventions", "errors", "types", "isac", "parallel", "_progress", "io.particles"},
    "variability": {"core", "conventions", "errors", "types", "variability", "parallel", "_progress", "io.particles"},
    "io": {"io", "conventions", "errors", "types"},
    "parallel": {"parallel"},
    "report": {"report", "core", "conventions"},
}


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def _isavar_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_dependency_rule(path):
    rel = path.relative_to(SRC)
    layer = rel.parts[0] if len(rel.parts) > 1 else None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imports = list(_isavar_imports(tree))
    if layer in ALLOWED:
        for name in imports:
            if name.startswith("isavar."):
                parts = name.split(".")[1:]
                ok = parts[0] in ALLOWED[layer] or ".".join(parts[:2]) in ALLOWED[layer]
                assert ok, f"{rel} imports {name}: {layer} may import only {ALLOWED[layer]}"
    if rel != Path("parallel/mpi.py"):
        assert not any(n.split(".")[0] == "mpi4py" for n in imports), f"{rel} imports mpi4py"


@pytest.mark.parametrize("path", [p for p in _modules() if p.relative_to(SRC).parts[0] != "cli"],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_no_print_or_exit_outside_cli(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            assert not (isinstance(f, ast.Name) and f.id == "print"), f"print() in {path.relative_to(SRC)}"
            assert not (isinstance(f, ast.Attribute) and f.attr == "exit" and isinstance(f.value, ast.Name)
                        and f.value.id == "sys"), f"sys.exit in {path.relative_to(SRC)}"


def test_import_has_no_side_effects():
    import logging
    import subprocess
    import sys

    code = ("import logging, sys; import isavar, isavar.cli; "
            "assert not logging.getLogger().handlers; assert 'mpi4py' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert logging.getLogger("isavar").level in (logging.NOTSET, logging.DEBUG)
