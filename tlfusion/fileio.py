"""Atomic file writes: write to a temporary name in the same folder, then rename over the target."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tlfusion.errors import InputError

LOCK = ".lock"


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)`, then move the temp file onto `path`; a failure leaves `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _new_temp_file(path)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _new_temp_file(path: Path) -> Path:
    """A new empty file beside `path`, named `.<stem>.<random>.tmp<suffixes>` (kept: Keras checks ".weights.h5" and
    ".keras"), created with mode 0666 less the process umask, as a plain `open` would."""
    suffixes = "".join(path.suffixes[-2:])
    while True:
        temp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{suffixes}"
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue


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


def remove_leftovers(folder: str | Path) -> None:
    """Remove what killed writers left under `folder`: `write_atomic` temp files (`.<stem>.*.tmp*`) and
    `bundle.folder.save_bundle` staging / replaced folders (`.<name>.*.partial`, `.<name>.*.old`). Only for a caller
    that holds `folder`'s lock, so that no writer is still using them."""
    for leftover in Path(folder).rglob(".*.tmp*"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()
    for pattern in (".*.partial", ".*.old"):
        for leftover in Path(folder).rglob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)


@contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive OS lock (`fcntl.flock` on `folder/.lock`) for the block; the OS releases it when the
    process ends, however it ends. A folder another process holds raises InputError naming the holder."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            message = f"{folder}: in use by another tlfusion run ({holder}); wait for it or use another --out"
            raise InputError(message) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
