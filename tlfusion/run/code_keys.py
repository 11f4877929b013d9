"""The code each pipeline stage runs, as a key: a stage's cache is only reused when its code is unchanged.

A stage's code is its own file (`stages.registry.Stage.module`) and every tlfusion module it imports, recursively:
imports at module level and inside functions alike (the stage files import heavy modules inside the stage
functions), type-only imports too, and the package `__init__.py` files an import runs. The key is the package
version and the sha256 of each of those source files' bytes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

from tlfusion import __version__

PACKAGE = "tlfusion"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The source file of tlfusion module `name` (a package's `__init__.py`); None if it is not one."""
    package, *parts = name.split(".")
    base = PACKAGE_DIR.joinpath(*parts)
    candidates = [base / "__init__.py"] + ([base.with_suffix(".py")] if parts else [])
    return next((path for path in candidates if package == PACKAGE and path.is_file()), None)


def _with_packages(name: str) -> set[str]:
    """`name` and the packages above it inside tlfusion (importing a.b.c runs a/__init__.py and a/b/__init__.py)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}


@functools.cache
def imports(path: Path) -> frozenset[str]:
    """tlfusion modules `path` imports anywhere (`from tlfusion.a import x` counts `tlfusion.a.x` if a module).

    Parsed once per file and process: every stage's key walks the same modules, and the code a process runs does
    not change under it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            names.update({node.module} | {name for name in submodules if module_file(name)})
    found = {name for name in names if name.split(".")[0] == PACKAGE and module_file(name)}
    return frozenset().union(*map(_with_packages, found))


def module_files(module: str) -> list[Path]:
    """Source files of `module` and of everything it imports, recursively, sorted."""
    seen: set[str] = set()
    todo = list(_with_packages(module))
    while todo:
        name = todo.pop()
        if name not in seen and module_file(name):
            seen.add(name)
            todo += imports(module_file(name))
    return sorted(module_file(name) for name in seen)


def source_hash(path: Path) -> str:
    """sha256 of a source file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_key(module: str) -> str:
    """Package version and the hash of every source file that stage file `module` runs."""
    files = {path.relative_to(PACKAGE_DIR).as_posix(): source_hash(path) for path in module_files(module)}
    return hashlib.sha256(json.dumps([__version__, files], sort_keys=True).encode()).hexdigest()[:16]
