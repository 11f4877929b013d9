"""An experiment's data table made ready for the stages: scanned (with a cache), split and given a target: binary
(`y` 1 for the positive class) or multi-class (`y` the class code)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tlfusion.data.images import scan_images
from tlfusion.data.splits import assign_splits
from tlfusion.errors import InputError
from tlfusion.fileio import write_json
from tlfusion.run.readers import read_json_object

if TYPE_CHECKING:
    from tlfusion.config.experiment import SplitSpec

log = logging.getLogger("tlfusion")


def with_binary_target(table: pd.DataFrame, positive: str) -> pd.DataFrame:
    """Add `y` (1 for the positive class); the data must have exactly two classes."""
    classes = sorted(table["label"].astype(str).unique())
    if positive not in classes:
        raise InputError(f"positive_class: {positive!r} is not a label of the data (labels: {classes})")
    if len(classes) != 2:
        raise InputError(f"data: a binary experiment needs exactly two labels, found {classes} (use data.label_map)")
    return table.assign(label=table["label"].astype(str), y=(table["label"].astype(str) == positive).astype(int))


def class_order(labels: pd.Series, classes: list[str] | None = None) -> list[str]:
    """A multiclass experiment's classes in order: `classes` when given (every label must be one and every class
    must have images), else the sorted label names (numerically when every name is a number); at least three."""
    found = sorted(set(labels.astype(str)))
    if classes is not None:
        unknown, empty = sorted(set(found) - set(classes)), [name for name in classes if name not in found]
        if unknown:
            raise InputError(f"classes: the data has label(s) {unknown} not listed in classes {classes}")
        if empty:
            raise InputError(f"classes: no images of class(es) {empty} in the data (labels: {found})")
        return list(classes)
    if len(found) < 3:
        raise InputError(f"data: a multiclass experiment needs at least 3 labels, found {found} (use task: binary)")
    return sorted(found, key=float) if all(is_number(name) for name in found) else found


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def with_class_codes(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Add `y`, each row's index in `classes` (`class_order`)."""
    labels = table["label"].astype(str)
    return table.assign(label=labels, y=labels.map({name: code for code, name in enumerate(classes)}).astype(int))


def class_names(labels: pd.Series, positive: str) -> list[str]:
    """[negative, positive] as a bundle stores them."""
    return [*sorted(set(labels.astype(str)) - {positive}), positive]


def split_table(table: pd.DataFrame, spec: SplitSpec, seed: int) -> pd.DataFrame:
    """`assign_splits` with an experiment's `split` settings; a multi-label table is stratified on "any finding"."""
    multilabel = "label" not in table.columns
    if multilabel:
        table = table.assign(label=table["labels"].map(lambda labels: "abnormal" if labels else "normal"))
    split = assign_splits(table, spec.test_fraction, spec.val_fraction, spec.group, seed, tuple(spec.test_split))
    return split.drop(columns="label") if multilabel else split


def scan_with_cache(paths: list[str], cache_path: Path, skip_bad: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """`images.scan_images` with a cache keyed by (path, size, mtime), so an unchanged data set re-scans in seconds."""
    cache = _read_scan_cache(cache_path)

    def stamp(path: str) -> str:
        info = Path(path).stat()
        return f"{path}|{info.st_size}|{info.st_mtime_ns}"

    stamps = [stamp(p) if Path(p).is_file() else "" for p in paths]
    todo = [p for p, s in zip(paths, stamps, strict=True) if not s or s not in cache]
    hashes, bad = scan_images(todo, skip_bad=skip_bad)
    fresh = dict(zip(todo, hashes, strict=True))
    cache.update({s: fresh[p] for p, s in zip(paths, stamps, strict=True) if s and fresh.get(p)})
    write_json(cache_path, cache)
    return [fresh[p] if p in fresh else cache[s] for p, s in zip(paths, stamps, strict=True)], bad


def _read_scan_cache(path: Path) -> dict[str, str]:
    """data/scan.json (file stamp -> sha256); an unreadable one is a stale cache: warned about, then rebuilt."""
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        cache = read_json_object(path)
    except InputError as error:
        log.warning("%s; scanning every image again", error)
        return {}
    return {stamp: digest for stamp, digest in cache.items() if isinstance(digest, str)}
