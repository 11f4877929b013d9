"""Atomic file writes: write to a temporary name in the same folder, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)`, then move the temp file onto `path`; a failure leaves `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(path.suffixes[-2:])  # keep ".weights.h5" / ".keras": Keras checks the file name
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + suffixes, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual permissions
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda temp: temp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
