"""Import direction (docs/ARCHITECTURE.md, "Import direction") and the public API list."""

from __future__ import annotations

import ast
from pathlib import Path

import parm

SRC = Path(parm.__file__).parent

# every top-level package or module under src/parm -> the parm packages/modules it may import
# (besides itself). Lower layers first; a new top-level name must be added here (the test fails).
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "testing": set(),
    "coding": {"errors"},
    "models": {"errors", "coding"},  # the tiles parity model reads the concat grid rule
    "data": {"errors"},
    "faults": {"errors"},
    "devices": {"errors"},
    "checkpoint": {"errors", "coding", "models", "_version"},
    "training": {"errors", "coding", "models", "data", "checkpoint", "devices"},
    "backends": {"errors", "coding", "models", "faults", "checkpoint", "devices"},
    "serving": {"errors", "coding", "backends"},
    "http": {"errors", "serving"},
    "system": {"errors", "backends", "checkpoint", "coding", "devices", "faults", "serving", "http"},
    "bench": {"errors", "backends", "checkpoint", "coding", "data", "faults", "models", "serving", "system",
              "testing"},
    "cli": {"errors", "bench", "checkpoint", "coding", "data", "devices", "faults", "http", "serving", "system",
            "training"},
    "__init__": {"_version", "checkpoint", "coding", "data", "devices", "errors", "models", "serving", "training"},
}


def _top_level() -> dict[str, list[Path]]:
    """Each top-level package (its files) or module under src/parm."""
    entries: dict[str, list[Path]] = {}
    for entry in sorted(SRC.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").exists():
            entries[entry.name] = sorted(entry.glob("**/*.py"))
        elif entry.suffix == ".py":
            entries[entry.stem] = [entry]
    return entries


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


def test_serving_and_backends_never_import_training_and_backends_never_import_serving() -> None:
    for package, banned in (("serving", "training"), ("backends", "training"), ("backends", "serving"),
                            ("bench", "http"), ("bench", "cli")):
        for path in (SRC / package).glob("**/*.py"):
            assert banned not in _parm_imports(path), f"{path} imports parm.{banned}"


def test_every_top_level_module_has_an_import_rule() -> None:
    assert sorted(_top_level()) == sorted(ALLOWED), "add the new module to ALLOWED (and docs/ARCHITECTURE.md)"


def test_import_direction() -> None:
    violations = []
    for name, paths in _top_level().items():
        for path in paths:
            bad = _parm_imports(path) - ALLOWED.get(name, set()) - {name}
            if bad:
                violations.append(f"{path.relative_to(SRC)} imports parm.{', parm.'.join(sorted(bad))}")
    assert not violations, "\n".join(violations)


def test_public_api_resolves() -> None:
    missing = [name for name in parm.__all__ if not hasattr(parm, name)]
    assert not missing
    assert parm.__version__
