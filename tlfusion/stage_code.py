"""The code each pipeline stage runs, as a key: a stage's cache is only reused when its code is unchanged.

A stage's modules are the roots its registry entry names (`tlfusion.stages.REGISTRY`) plus every tlfusion module
they import at module level, recursively (imports inside functions are not followed: the stage modules import the
heavy modules lazily, inside the stage functions, so each root list names them).
The key is the package version and the sha256 of each of those source files' bytes.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from tlfusion import __version__

PACKAGE = "tlfusion"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(name: str) -> Path | None:
    """The source file of tlfusion module `name` (a package's `__init__.py`); None if it is not one."""
    package, *parts = name.split(".")
    base = PACKAGE_DIR.joinpath(*parts)
    candidates = [base / "__init__.py"] + ([base.with_suffix(".py")] if parts else [])
    return next((path for path in candidates if package == PACKAGE and path.is_file()), None)


def top_level_imports(path: Path) -> set[str]:
    """tlfusion modules `path` imports at module level (`from tlfusion import x` counts `tlfusion.x` if a module)."""
    names: set[str] = set()
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            names.update({name for name in submodules if module_file(name)} or {node.module})
    return {name for name in names if name.split(".")[0] == PACKAGE and module_file(name)}


def stage_files(modules: tuple[str, ...]) -> list[Path]:
    """Source files of `modules` and everything they import at module level, sorted."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += top_level_imports(module_file(name))
    return sorted(module_file(name) for name in seen)


def source_hash(path: Path) -> str:
    """sha256 of a source file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_key(modules: tuple[str, ...]) -> str:
    """Package version and the hash of every source file a stage with these root `modules` runs."""
    files = {str(path.relative_to(PACKAGE_DIR)): source_hash(path) for path in stage_files(modules)}
    return hashlib.sha256(json.dumps([__version__, files], sort_keys=True).encode()).hexdigest()[:16]
