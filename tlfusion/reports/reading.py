"""Reading a metrics.json document for the report: rows by split, level and finding, the headline metric, CV scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfusion.errors import InputError
from tlfusion.models.names import FUSION, ModelName

if TYPE_CHECKING:
    pass


MISSING = "—"
PLOT_DPI = 100
PREDICTION_COLUMNS = ("model", "split", "y_true", "prob")
METRIC_LABELS = {
    "accuracy": "accuracy",
    "f1": "F1",
    "kappa": "kappa",
    "auroc": "AUROC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}
GZSL_KEYS = {"seen": "seen", "unseen": "unseen", "h": "H (harmonic mean)"}


def format_metric(value: Any, ci: Sequence | None = None, digits: int = 3) -> str:
    """``0.812 [0.751, 0.866]`` (the interval only when both bounds are numbers); ``—`` for an undefined value."""
    if not is_number(value):
        return MISSING
    text = f"{value:.{digits}f}"
    if is_interval(ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def check_metrics(metrics: Mapping) -> None:
    if not isinstance(metrics, Mapping):
        raise InputError(f"metrics.json: expected an object, got {type(metrics).__name__}")
    if not isinstance(metrics.get("results"), list):
        raise InputError("metrics.json: 'results' must be a list of result rows")
    for index, row in enumerate(metrics["results"]):
        if not isinstance(row, Mapping) or not isinstance(row.get("model"), str) or "split" not in row:
            raise InputError(f"metrics.json: results[{index}] needs a 'model' name and a 'split'")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def is_interval(ci: Sequence | None) -> bool:
    return ci is not None and len(ci) == 2 and all(is_number(bound) for bound in ci)


def is_multilabel(metrics: Mapping) -> bool:
    return metrics.get("task") == "multilabel"


def evaluation_split(metrics: Mapping) -> str:
    """``"test"``, or for a bundle evaluated on another split the first split that is not cross-validation."""
    splits = [row["split"] for row in metrics["results"] if row["split"] != "cv"]
    return "test" if "test" in splits or not splits else splits[0]


def headline_level(metrics: Mapping, split: str) -> str:
    """``"study"`` when the split has study-level rows (MURA's unit of evaluation), else ``"image"``."""
    levels = {row.get("level", "image") for row in metrics["results"] if row["split"] == split}
    return "study" if "study" in levels else "image"


def metric_levels(metrics: Mapping, split: str) -> list[str]:
    """The split's levels, headline level first."""
    recorded = dict.fromkeys(row.get("level", "image") for row in metrics["results"] if row["split"] == split)
    headline = headline_level(metrics, split)
    return [headline, *(level for level in recorded if level != headline)]


def metric_rows(metrics: Mapping, split: str, level: str | None = None, finding: str | None = None) -> dict[str, dict]:
    """Result rows of one split (and level, or multi-label finding), keyed by model, in recorded order."""
    return {
        row["model"]: row
        for row in metrics["results"]
        if row["split"] == split
        and (level is None or row.get("level", "image") == level)
        and row.get("finding") == finding
    }


def interval_of(row: Mapping, metric: str) -> Sequence | None:
    return (row.get("ci") or {}).get(metric)


def metric_text(row: Mapping, metric: str) -> str:
    return format_metric(row.get(metric), interval_of(row, metric))


def labelled_model(row: Mapping, metric: str) -> str:
    return f"{METRIC_LABELS[metric]} {metric_text(row, metric)}"


def ranked_by_cv(values: Mapping[str, Any]) -> list[str]:
    """Names, highest value first, undefined values last, ties by name."""
    return sorted(values, key=lambda name: (0, -values[name], name) if is_number(values[name]) else (1, 0, name))


def sorted_by(rows: Mapping[str, Mapping], metric: str) -> list[str]:
    """Model names, highest ``metric`` first, undefined last, ties by name."""
    return ranked_by_cv({name: row.get(metric) for name, row in rows.items()})


def feature_sets_and_classifiers(models: Sequence[str]) -> tuple[list[str], list[str]]:
    """Single backbones in recorded order then fusion, and classifiers in recorded order."""
    parts = [ModelName.parse(name) for name in models]
    singles = list(dict.fromkeys(fs for fs, _ in parts if fs != FUSION))
    fused = [FUSION] if any(fs == FUSION for fs, _ in parts) else []
    return singles + fused, list(dict.fromkeys(classifier for _, classifier in parts))


def cv_scores_of(metrics: Mapping) -> dict[str, Any]:
    return (metrics.get("selection") or {}).get("cv_scores") or {}


def selection_note(metrics: Mapping) -> str:
    """``5-fold CV kappa 0.610 on the training split``; empty without a selection record."""
    selection = metrics.get("selection")
    if not selection:
        return ""
    folds = f"{selection['cv']}-fold " if selection.get("cv") else ""
    score = format_metric(cv_scores_of(metrics).get(metrics.get("selected")))
    return f"{folds}CV {selection.get('scoring', 'score')} {score} on the training split"


@dataclass(frozen=True)
class Headline:
    """The number models are compared by: kappa (binary) or mean AUROC over findings (multi-label)."""

    metric: str
    label: str
    rows: dict[str, dict]


def headline_of(metrics: Mapping) -> Headline:
    split = evaluation_split(metrics)
    if is_multilabel(metrics):
        return Headline("auroc", f"{split} mean AUROC over findings", metric_rows(metrics, split, finding="mean"))
    level = headline_level(metrics, split)
    return Headline("kappa", f"{split} kappa ({level} level)", metric_rows(metrics, split, level))


def rows_by_finding(metrics: Mapping) -> dict[str, dict[str, dict]]:
    """Multi-label rows of the evaluated split: finding -> model -> row, findings in recorded order, mean last."""
    split = evaluation_split(metrics)
    findings = dict.fromkeys(row["finding"] for row in metrics["results"] if row["split"] == split and "finding" in row)
    ordered = [finding for finding in findings if finding != "mean"] + (["mean"] if "mean" in findings else [])
    return {finding: metric_rows(metrics, split, finding=finding) for finding in ordered}


def finding_models(metrics: Mapping) -> list[str]:
    """Multi-label models, best mean AUROC first (recorded order when no mean was recorded)."""
    ranked = sorted_by(headline_of(metrics).rows, "auroc")
    return ranked or list(dict.fromkeys(model for rows in rows_by_finding(metrics).values() for model in rows))
