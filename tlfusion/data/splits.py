"""Patient-grouped, label-stratified splits and the leakage check that guards them."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from tlfusion.errors import InputError


def _check_two_classes(labels: np.ndarray, what: str) -> None:
    if len(np.unique(labels)) < 2:
        raise InputError(f"{what}: labels have only one class ({np.unique(labels).tolist()}); need at least two")


def grouped_folds(labels, groups, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold where no group (patient) is on both sides of any fold."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    _check_two_classes(labels, "split")
    fewest = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    if fewest < n_splits:
        raise InputError(f"split: a class has only {fewest} patient(s), fewer than the {n_splits} folds asked for")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def grouped_holdout(labels, groups, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices with about `fraction` of the patients held out, stratified by label."""
    if not 0 < fraction < 1:
        raise InputError(f"split: fraction must be between 0 and 1, got {fraction}")
    return grouped_folds(labels, groups, max(2, round(1 / fraction)), seed)[0]


def assign_splits(
    table: pd.DataFrame,
    test_fraction: float | None = 0.2,
    val_fraction: float = 0.2,
    group_column: str = "patient",
    seed: int = 0,
    test_values: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Copy of `table` whose `split` column is train / val / test, grouped by `group_column`.

    With `test_values`, rows whose existing split is one of them form the test set (e.g. MURA's official
    `valid`); otherwise `test_fraction` of the patients are held out. `val_fraction` of the remaining patients
    form the validation part used for early stopping.
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
    return table


def check_no_leakage(table: pd.DataFrame, group_column: str = "patient") -> None:
    """Refuse a split where one patient (group) appears in more than one part."""
    parts_per_group = table.groupby(group_column)["split"].nunique()
    leaked = parts_per_group[parts_per_group > 1]
    if not leaked.empty:
        raise InputError(
            f"split: {len(leaked)} {group_column}(s) appear in more than one split, e.g. {leaked.index[0]!r}"
        )
