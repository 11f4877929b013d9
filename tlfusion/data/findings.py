"""Multi-label data: the ChestX-ray14 reader and the finding labels of a table as a 0/1 matrix."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tlfusion.data.files import finish, image_files, read_table, require_columns, require_files, resolve_inside
from tlfusion.data.images import read_regular
from tlfusion.errors import InputError

log = logging.getLogger(__name__)

CHESTXRAY14_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)


NO_FINDING = "No Finding"


def read_chestxray14(
    csv: str | Path,
    root: str | Path | None = None,
    findings: Sequence[str] = CHESTXRAY14_FINDINGS,
    split_lists: bool = True,
    follow_symlinks: bool = False,
) -> pd.DataFrame:
    """`Data_Entry_2017.csv`-style multi-label findings (`Finding Labels` joined by `|`).

    Images are found through a `path` column when present, else by `Image Index` anywhere under `root`
    (the official release spreads them over `images_0NN/images/`). The official `train_val_list.txt` /
    `test_list.txt` beside the CSV set `split` when `split_lists` is on and they exist. Paths stay inside `root`
    (through links too, unless `follow_symlinks`).
    """
    csv_path = Path(csv)
    root = Path(root) if root is not None else csv_path.parent
    table = read_table(csv_path)
    require_columns(table, ["Finding Labels", "Patient ID"], csv_path)
    labels = [_parse_findings(text, findings, csv_path) for text in table["Finding Labels"]]
    if "path" in table.columns:
        paths = [str(resolve_inside(root, p, str(csv_path), follow_symlinks)) for p in table["path"]]
    else:
        require_columns(table, ["Image Index"], csv_path)
        index = {p.name: str(p) for p in image_files(Path(os.path.abspath(root)), follow_symlinks=follow_symlinks)}
        missing = [name for name in table["Image Index"] if name not in index]
        if missing:
            raise InputError(f"{csv_path}: {len(missing)} images not found under {root}, e.g. {missing[0]}")
        paths = [index[name] for name in table["Image Index"]]
    rows = pd.DataFrame({"path": paths, "labels": labels, "patient": table["Patient ID"].to_numpy()})
    rows["study"] = [Path(p).stem for p in paths]
    rows["split"] = _official_split(csv_path.parent, [Path(p).name for p in paths]) if split_lists else ""
    rows["region"] = "chest"
    require_files(rows["path"], csv_path)
    rows = finish(rows, str(csv_path))
    rows.attrs["findings"] = list(findings)
    return rows


def _parse_findings(text: str, findings: Sequence[str], csv_path: Path) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split("|") if name.strip() and name.strip() != NO_FINDING)
    unknown = [name for name in names if name not in findings]
    if unknown:
        raise InputError(f"{csv_path}: unknown finding(s) {unknown} in 'Finding Labels'; known: {list(findings)}")
    return names


def _official_split(folder: Path, names: list[str]) -> list[str]:
    """Each image's official split ("train" / "test", "" when unlisted); none when both lists are absent. One list
    without the other, or one that is not a regular UTF-8 text file, raises InputError naming it (never read)."""
    lists = {"train": folder / "train_val_list.txt", "test": folder / "test_list.txt"}
    present = [path for path in lists.values() if path.exists() or path.is_symlink()]
    if not present:
        return [""] * len(names)
    membership: dict[str, str] = {}
    for split, path in lists.items():
        if path not in present:
            raise InputError(f"{path}: missing beside {present[0].name}; add it or set split_lists: false")
        membership.update((name, split) for name in _list_text(path).split())
    return [membership.get(name, "") for name in names]


def _list_text(path: Path) -> str:
    try:
        return read_regular(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None


def label_matrix(table: pd.DataFrame, findings: Sequence[str]) -> np.ndarray:
    """0/1 matrix [n_images, n_findings] from a multi-label table's `labels` column: lists of findings, or text
    joined by '|' as `data/table.csv` stores them (empty or missing: no finding)."""
    rows = [labels.split("|") if isinstance(labels, str) else labels for labels in table["labels"]]
    rows = [row if isinstance(row, (list, tuple)) else [] for row in rows]
    return np.array([[name in row for name in findings] for row in rows], dtype=np.float32)
