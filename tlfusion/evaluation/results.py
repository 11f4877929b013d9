"""Scoring predictions: binary result rows (image and study level), fusion vs single backbones (multi-label runs:
`tlfusion.semantic.evaluation`).

Every confidence interval comes from `tlfusion.evaluation.metrics`' one patient bootstrap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tlfusion.evaluation import metrics
from tlfusion.models.names import ModelName

if TYPE_CHECKING:
    from tlfusion.config.experiment import EvaluateSpec


def evaluate_predictions(
    predictions: pd.DataFrame, thresholds: dict[str, float], study_aggregation: str | None, n_boot: int, seed: int
) -> list[dict]:
    """metrics.json result rows: every model, CV (out-of-fold) and test split, image and (optionally) study level."""
    results = []
    for (model, split), rows in predictions.groupby(["model", "split"], sort=False):
        threshold = thresholds[model]
        for level, y, p, groups in evaluation_levels(rows, study_aggregation):
            row = {
                "model": model,
                "level": level,
                "split": split,
                **metrics.binary_metrics(y, p, threshold),
                "threshold": threshold,
            }
            row["ci"] = (
                metrics.bootstrap_ci(y, p, groups, threshold, n_boot=n_boot, seed=seed)
                if n_boot and split == "test"
                else {}
            )
            results.append(row)
    return results


def evaluation_levels(rows: pd.DataFrame, study_aggregation: str | None) -> list[tuple[str, np.ndarray, ...]]:
    """(level, labels, probabilities, patient of each item) at image level and, when aggregating, study level."""
    levels = [("image", rows["y_true"].to_numpy(), rows["prob"].to_numpy(), rows["patient"].to_numpy())]
    if study_aggregation:
        studies, y, p = metrics.aggregate_by_study(
            rows["study"].to_numpy(), rows["y_true"].to_numpy(), rows["prob"].to_numpy(), how=study_aggregation
        )
        patient_of = dict(zip(rows["study"], rows["patient"], strict=True))
        levels.append(("study", y, p, np.array([patient_of[s] for s in studies])))
    return levels


def fusion_vs_single(
    predictions: pd.DataFrame,
    thresholds: dict[str, float],
    study_aggregation: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Fusion minus each single backbone with the same classifier on the test split, per level: kappa and AUROC
    differences with paired patient-bootstrap CIs (both models scored on the same resamples)."""
    if not n_boot:
        return []
    test = predictions[predictions["split"] == "test"].sort_values("path", kind="stable")
    levels = {model: evaluation_levels(rows, study_aggregation) for model, rows in test.groupby("model", sort=False)}
    comparisons = []
    for fused in levels:
        classifier = ModelName.parse(fused).classifier
        if not ModelName.parse(fused).is_fusion:
            continue
        for single in levels:
            if single == fused or ModelName.parse(single).classifier != classifier:
                continue
            for (level, y, p_fused, groups), (_, _, p_single, _) in zip(levels[fused], levels[single], strict=True):
                pair = (thresholds[fused], thresholds[single])
                delta = metrics.paired_bootstrap_delta(y, p_fused, p_single, groups, pair, n_boot=n_boot, seed=seed)
                row = {"level": level, "classifier": classifier, "fusion": fused, "single": single}
                comparisons.append(row | {metric: delta[metric] for metric in ("kappa", "auroc")})
    return comparisons


OUTCOMES = ("FN", "FP", "TP", "TN")
"""Outcome order of `pick_cases`: errors first."""


def pick_cases(test: pd.DataFrame, threshold: float, count: int) -> pd.DataFrame:
    """`count` cases worth a reviewer's time, from every outcome present (columns prob, y_true): one FN, FP, TP
    and TN in turn (so both classes and both right and wrong predictions are shown), each outcome's most confident
    first; column `outcome` names each case's."""
    predicted = (test["prob"] >= threshold).astype(int)
    test = test.assign(
        outcome=np.where(predicted == test["y_true"], "T", "F") + np.where(predicted == 1, "P", "N"),
        confidence=(test["prob"] - threshold).abs(),
    )
    ranked = test.sort_values("confidence", ascending=False, kind="stable")
    turn = ranked.groupby("outcome").cumcount()
    order = ranked["outcome"].map({outcome: index for index, outcome in enumerate(OUTCOMES)})
    return (
        ranked.assign(turn=turn, order=order)
        .sort_values(["turn", "order"], kind="stable")
        .head(count)
        .drop(columns=["turn", "order"])
    )


def clinical_checks(
    predictions: pd.DataFrame,
    table: pd.DataFrame,
    spec: EvaluateSpec,
    selected: str,
    threshold: float,
    seed: int,
    split: str = "test",
    stage: str = "before",
) -> dict:
    """metrics.json's `calibration` (every model on `split`, as predicted: `stage`, and recalibrated with
    `spec.calibration`) and `subgroups` (model `selected` at `threshold` per value of each `spec.subgroups` column)."""
    from tlfusion.evaluation.calibration import calibration_record
    from tlfusion.evaluation.subgroups import subgroup_results, with_columns

    checks = {"calibration": calibration_record(predictions, spec.calibration, split, spec.bootstrap, seed, stage)}
    if spec.subgroups:
        rows = predictions[(predictions["model"] == selected) & (predictions["split"] == split)]
        rows = with_columns(rows, table, spec.subgroups)
        checks["subgroups"] = subgroup_results(rows, spec.subgroups, threshold, spec.bootstrap, seed)
    return checks


def class_results(
    predictions: pd.DataFrame, classes: list[str], n_boot: int, seed: int, ordinal: bool = False
) -> list[dict]:
    """metrics.json result rows of a multiclass run: every model on CV (out-of-fold) and test, image level, with
    patient-bootstrap intervals (headline and per class) on the test split; ordered classes add `cut_auroc`
    (`class_metrics.cut_aurocs`, with intervals on the test split)."""
    return [
        _class_row(model, split, rows, classes, n_boot if split == "test" else 0, seed, ordinal)
        for (model, split), rows in predictions.groupby(["model", "split"], sort=False)
    ]


def _class_row(
    model: str, split: str, rows: pd.DataFrame, classes: list[str], n_boot: int, seed: int, ordinal: bool
) -> dict:
    """One model's result row on one split, with intervals when `n_boot`."""
    from tlfusion.evaluation.class_metrics import class_bootstrap_ci, class_metrics, cut_auroc_ci, cut_aurocs

    y, P, groups = _class_arrays(rows, len(classes))
    row = {"model": model, "level": "image", "split": split, **class_metrics(y, P, classes), "ci": {}}
    if ordinal:
        row["cut_auroc"] = cut_aurocs(y, P, classes)
    if not n_boot:
        return row
    row["ci"], per_class = class_bootstrap_ci(y, P, groups, n_boot=n_boot, seed=seed)
    for entry, intervals in zip(row["per_class"], per_class, strict=True):
        entry["ci"] = intervals
    if ordinal:
        for entry, interval in zip(row["cut_auroc"], cut_auroc_ci(y, P, groups, n_boot=n_boot, seed=seed), strict=True):
            entry["ci"] = interval
    return row


def class_fusion_vs_single(predictions: pd.DataFrame, n_classes: int, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Fusion minus each single backbone with the same classifier on the test split: every `CLASS_METRICS`
    difference with its paired patient-bootstrap interval."""
    from tlfusion.evaluation.class_metrics import paired_class_delta

    if not n_boot:
        return []
    test = predictions[predictions["split"] == "test"].sort_values("path", kind="stable")
    arrays = {model: _class_arrays(rows, n_classes) for model, rows in test.groupby("model", sort=False)}
    comparisons = []
    for fused, (y, P_fused, groups) in arrays.items():
        if not ModelName.parse(fused).is_fusion:
            continue
        classifier = ModelName.parse(fused).classifier
        for single, (_, P_single, _) in arrays.items():
            if single == fused or ModelName.parse(single).classifier != classifier:
                continue
            delta = paired_class_delta(y, P_fused, P_single, groups, n_boot=n_boot, seed=seed)
            comparisons.append({"level": "image", "classifier": classifier, "fusion": fused, "single": single} | delta)
    return comparisons


def _class_arrays(rows: pd.DataFrame, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class codes, probabilities [n, K], patients) of multiclass prediction rows."""
    from tlfusion.run.readers import class_columns

    prob = rows[class_columns(n_classes)].to_numpy(np.float64)
    return rows["y_true"].to_numpy(np.int64), prob, rows["patient"].astype(str).to_numpy()


def pick_class_cases(test: pd.DataFrame, n_classes: int, count: int) -> pd.DataFrame:
    """`count` test cases of a multiclass model worth review, spread over the confusion cells present (errors
    first, then correct ones; each cell's most confident case first, cells taken in turn); columns `predicted`
    (code) and `cell` ("true -> predicted" codes) added."""
    _, P, _ = _class_arrays(test, n_classes)
    predicted = P.argmax(axis=1)
    test = test.assign(predicted=predicted, confidence=P.max(axis=1), correct=predicted == test["y_true"].to_numpy())
    test = test.assign(cell=test["y_true"].astype(str) + " -> " + test["predicted"].astype(str))
    ranked = test.sort_values("confidence", ascending=False, kind="stable")
    ranked = ranked.assign(turn=ranked.groupby("cell").cumcount())
    ordered = ranked.sort_values(["turn", "correct", "y_true"], kind="stable")
    return ordered.head(count).drop(columns=["turn", "confidence", "correct"])
