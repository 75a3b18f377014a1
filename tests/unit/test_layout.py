"""Import direction (DESIGN.md §2) and the public API list."""

from __future__ import annotations

import ast
from pathlib import Path

import parm

SRC = Path(parm.__file__).parent

# package -> parm packages it may import (besides itself)
ALLOWED = {
    "coding": {"errors"},
    "models": {"errors"},
    "data": {"errors"},
    "training": {"errors", "coding", "models", "data"},
    "serving": {"errors", "coding", "backends"},
    "backends": {"errors", "coding", "models", "faults", "training"},
    "faults": {"errors"},
}


def _parm_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "parm" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_serving_never_imports_training_and_backends_never_import_serving() -> None:
    for package, banned in (("serving", "training"), ("backends", "serving")):
        for path in (SRC / package).glob("**/*.py"):
            assert banned not in _parm_imports(path), f"{path} imports parm.{banned}"


def test_import_direction() -> None:
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((SRC / package).glob("**/*.py")):
            bad = _parm_imports(path) - allowed - {package}
            if bad:
                violations.append(f"{path.relative_to(SRC)} imports parm.{', parm.'.join(sorted(bad))}")
    assert not violations, "\n".join(violations)


def test_public_api_resolves() -> None:
    missing = [name for name in parm.__all__ if not hasattr(parm, name)]
    assert not missing
    assert parm.__version__
