"""Metrics per subgroup: the selected model on the rows of each value of a data-table column (view, hardware,
source, sex, region, ...), every binary metric plus Brier and ECE, with patient-bootstrap intervals.

A subgroup is too small, and warned about, with fewer than `MIN_IMAGES` images or fewer than `MIN_PER_CLASS` of
either class: its intervals are wide and its AUROC may be undefined. Rows without a value form the subgroup "(none)".
Subgroup rows score the model as the results table does: its out-of-fold threshold, its probabilities as fitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tlfusion.errors import InputError
from tlfusion.evaluation import metrics
from tlfusion.evaluation.calibration import calibration_summary

MIN_IMAGES = 30
MIN_PER_CLASS = 5
NONE = "(none)"


def check_columns(table: pd.DataFrame, columns: Sequence[str], key: str = "evaluate.subgroups") -> None:
    """InputError naming `key` when a subgroup column is not in the data table."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise InputError(f"{key}: column(s) {missing} not in the data table; its columns are {list(table.columns)}")


def with_columns(rows: pd.DataFrame, table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Prediction `rows` with the data table's `columns`, matched by image path, as text ("" -> "(none)")."""
    check_columns(table, columns)
    values = table.drop_duplicates("path").set_index("path")[list(columns)]
    joined = values.reindex(rows["path"].to_numpy()).fillna("").astype(str).replace("", NONE)
    return rows.assign(**{column: joined[column].to_numpy() for column in columns})


def size_warning(y: np.ndarray) -> str | None:
    """Why a subgroup with labels `y` is too small to read much into, or None."""
    positives = int(y.sum())
    negatives = len(y) - positives
    if len(y) >= MIN_IMAGES and min(positives, negatives) >= MIN_PER_CLASS:
        return None
    return (
        f"small subgroup: {len(y)} images ({positives} positive, {negatives} negative); under {MIN_IMAGES} images or "
        f"{MIN_PER_CLASS} of a class, its intervals are wide and AUROC may be undefined"
    )


def subgroup_results(
    rows: pd.DataFrame, columns: Sequence[str], threshold: float, n_boot: int, seed: int
) -> list[dict]:
    """metrics.json `subgroups`: for one model's rows on one split (with `columns`, `with_columns`), one result per
    column and value, values sorted."""
    results = []
    for column in columns:
        for value, group in rows.groupby(column, sort=True):
            results.append(_subgroup_row(group, column, str(value), threshold, n_boot, seed))
    return results


def _subgroup_row(group: pd.DataFrame, column: str, value: str, threshold: float, n_boot: int, seed: int) -> dict:
    y, prob, patients = (group[name].to_numpy() for name in ("y_true", "prob", "patient"))
    calibration = calibration_summary(y, prob, patients, n_boot, seed)
    ci = metrics.bootstrap_ci(y, prob, patients, threshold, n_boot=n_boot, seed=seed) if n_boot else {}
    return {
        "model": str(group["model"].iloc[0]),
        "level": "image",
        "split": str(group["split"].iloc[0]),
        "column": column,
        "value": value,
        **metrics.binary_metrics(y, prob, threshold),
        "positives": int(y.sum()),
        "threshold": threshold,
        "brier": calibration["brier"],
        "ece": calibration["ece"],
        "ci": ci | calibration["ci"],
        "warning": size_warning(y),
    }
