"""Patient-grouped, label-stratified splits and the leakage check that guards them."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from tlfusion.errors import InputError

log = logging.getLogger("tlfusion")


def _check_two_classes(labels: np.ndarray, what: str) -> None:
    if len(np.unique(labels)) < 2:
        raise InputError(f"{what}: labels have only one class ({np.unique(labels).tolist()}); need at least two")


def grouped_folds(
    labels, groups, n_splits: int, seed: int = 0, what: str = "split"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold where no group (patient) is on both sides of any fold.

    The one rule for too few groups, shared by the data split and model selection: when a class has fewer groups
    than `n_splits`, the folds are reduced to that number (with a warning); a class with fewer than 2 groups, or
    labels of one class, is an InputError naming `what`.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    _check_two_classes(labels, what)
    if not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise InputError(f"{what}: the number of folds must be an integer of at least 2, got {n_splits!r}")
    fewest = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    if fewest < 2:
        raise InputError(f"{what}: a class has fewer than 2 patient groups; cannot form grouped folds")
    if fewest < n_splits:
        log.warning(
            "%s: folds reduced from %d to %d because a class has only %d patient groups", what, n_splits, fewest, fewest
        )
        n_splits = fewest
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def grouped_holdout(labels, groups, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices with about `fraction` of the patients held out, stratified by label."""
    if not 0 < fraction < 1:
        raise InputError(f"split: fraction must be between 0 and 1, got {fraction}")
    return grouped_folds(labels, groups, max(2, round(1 / fraction)), seed)[0]


SPLIT_ORDER = ("train", "val", "test")


def content_groups(table: pd.DataFrame, group_column: str = "patient", content_column: str = "sha256") -> np.ndarray:
    """Per row, its `group_column` group joined with every group that holds an identical image (same
    `content_column`, e.g. a file's sha256): identical files under different ids count as one patient. A joined
    group is named after its first row's group; without `content_column`, the groups are returned as they are."""
    groups = table[group_column].astype(str).to_numpy()
    if content_column not in table.columns:
        return groups
    parent: dict[str, str] = {}

    def root(group: str) -> str:
        while parent.get(group, group) != group:
            group = parent[group]
        return group

    for rows in table.groupby(content_column, sort=False).indices.values():
        first = root(groups[rows[0]])
        for other in {root(groups[row]) for row in rows[1:]} - {first}:
            parent[other] = first
    return np.array([root(group) for group in groups], dtype=object)


def assign_splits(
    table: pd.DataFrame,
    test_fraction: float | None = 0.2,
    val_fraction: float = 0.2,
    group_column: str = "patient",
    seed: int = 0,
    test_values: tuple[str, ...] = (),
    content_column: str = "sha256",
) -> pd.DataFrame:
    """Copy of `table` whose `split` column is train / val / test, grouped by `group_column`.

    With `test_values`, rows whose existing split is one of them form the test set (e.g. MURA's official
    `valid`); otherwise `test_fraction` of the patients are held out. `val_fraction` of the remaining patients
    form the validation part used for early stopping. When the table has `content_column`, identical images are
    kept in one part (`join_identical_images`).
    """
    table = table.copy()
    label_key = table["label"].astype(str).to_numpy()
    is_test = np.zeros(len(table), dtype=bool)
    if test_values:
        is_test = table["split"].isin(test_values).to_numpy()
        if not is_test.any():
            raise InputError(f"split: no rows with split in {list(test_values)}")
    elif test_fraction:
        _, held = grouped_holdout(label_key, table[group_column], test_fraction, seed)
        is_test[held] = True
    rest = np.flatnonzero(~is_test)
    is_val = np.zeros(len(table), dtype=bool)
    if val_fraction:
        _, held = grouped_holdout(label_key[rest], table[group_column].to_numpy()[rest], val_fraction, seed + 1)
        is_val[rest[held]] = True
    table["split"] = np.where(is_test, "test", np.where(is_val, "val", "train"))
    check_no_leakage(table, group_column)
    if content_column in table.columns:
        joined = join_identical_images(table["split"].to_numpy(), content_groups(table, group_column))
        moved = int((joined != table["split"].to_numpy()).sum())
        if moved:
            log.info("split: %d image(s) moved to the part holding an identical copy of them", moved)
        table["split"] = joined
    return table


def join_identical_images(split: np.ndarray, joined_groups: np.ndarray) -> np.ndarray:
    """`split` with each joined group (`content_groups`) moved whole into the earliest part any of it is in
    (train, then val, then test): an image never sits in test while its identical copy trains the model.

    Groups with no copy elsewhere keep their part, so the patient-grouped assignment changes only for copies.
    """
    rank = pd.Series(split).map({part: i for i, part in enumerate(SPLIT_ORDER)})
    earliest = rank.groupby(joined_groups).transform("min").to_numpy()
    return np.asarray(SPLIT_ORDER, dtype=object)[earliest]


def check_no_leakage(table: pd.DataFrame, group_column: str = "patient") -> None:
    """Refuse a split where one patient (group) appears in more than one part."""
    parts_per_group = table.groupby(group_column)["split"].nunique()
    leaked = parts_per_group[parts_per_group > 1]
    if not leaked.empty:
        raise InputError(
            f"split: {len(leaked)} {group_column}(s) appear in more than one split, e.g. {leaked.index[0]!r}"
        )
