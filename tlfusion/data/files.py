"""A dataset's files inside its root: paths resolved without leaving it, image files found, CSV tables checked."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from tlfusion.data.dicom import is_dicom_file
from tlfusion.data.images import IMAGE_SUFFIXES
from tlfusion.errors import InputError

log = logging.getLogger(__name__)


COLUMNS = ["path", "label", "patient", "study", "split", "region"]


def resolve_inside(root: Path, relative: str, what: str, follow_symlinks: bool = False) -> Path:
    """`root / relative` as an absolute path, refusing one that escapes `root` (e.g. `../../etc/passwd`), and, unless
    `follow_symlinks`, one whose links lead out of it."""
    path = Path(os.path.abspath(root / relative))
    if not path.is_relative_to(os.path.abspath(root)):
        raise InputError(f"{what}: path {relative!r} escapes the data root {root}")
    check_link(path, root, what, follow_symlinks)
    return path


def check_link(path: Path, root: Path, what: str, follow_symlinks: bool) -> None:
    """Refuse a path inside `root` whose links lead out of it, unless `follow_symlinks` (`data.follow_symlinks`)."""
    if not _inside(path, root, follow_symlinks):
        raise InputError(
            f"{what}: {path} links outside the data root {root} (to {os.path.realpath(path)}); "
            "set data.follow_symlinks: true to read it"
        )


def image_files(folder: Path, root: Path | None = None, follow_symlinks: bool = False) -> list[Path]:
    """Every entry under `folder` whose name has an image suffix, and every regular file that starts like a DICOM
    file whatever its name (`dicom.is_dicom_file`), sorted, with its path inside the data set.

    Entries with an image suffix that are not regular files (folders named `*.png`, FIFOs, devices, dangling links)
    are listed too, so that decoding refuses them by name. Unless `follow_symlinks`, a link out of `root` (default:
    `folder`) is an error for a name with an image suffix (and, for any other name, not read to look for DICOM), and
    linked folders are not entered (one inside the root holds files listed under their own path); with it, linked
    folders are entered once each.
    """
    root = Path(root or folder)
    check_link(folder, root, "data.root", follow_symlinks)
    found, entered = [], set()
    for top, folders, names in os.walk(folder, followlinks=follow_symlinks):
        if follow_symlinks and os.path.realpath(top) in entered:
            folders.clear()
            continue
        entered.add(os.path.realpath(top))
        for name in sorted(folders + names):
            path = Path(top, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                check_link(path, root, "data.root", follow_symlinks)
                found.append(path)
            elif _inside(path, root, follow_symlinks) and is_dicom_file(path):
                found.append(path)
    return sorted(found)


def _inside(path: Path, root: Path, follow_symlinks: bool) -> bool:
    """Whether `path` may be read: it leads to a file inside `root`, or links are followed."""
    return follow_symlinks or Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def require_dir(root: str | Path, what: str) -> Path:
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise InputError(f"{what}: data folder not found: {root}")
    return root


def read_table(csv_path: Path, **options: Any) -> pd.DataFrame:
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: {'not a regular file' if csv_path.exists() else 'file not found'}")
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{csv_path}: not a readable CSV ({error})") from None


def require_columns(table: pd.DataFrame, columns: Iterable[str | None], csv_path: Path) -> None:
    missing = [column for column in columns if column and column not in table.columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {missing}; columns are {list(table.columns)}")


def finish(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    if rows.empty:
        raise InputError(f"{what}: no images found")
    return rows.reset_index(drop=True)


def require_files(paths: Iterable[str], csv_path: Path) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{csv_path}: image listed but not found: {path}")
