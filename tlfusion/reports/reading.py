"""Reading a metrics.json document for the report: rows by split, level and finding, the headline metric, CV scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfusion.errors import InputError
from tlfusion.model_name import FUSION, ModelName

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
    if not _is_number(value):
        return MISSING
    text = f"{value:.{digits}f}"
    if _is_interval(ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _check_metrics(metrics: Mapping) -> None:
    if not isinstance(metrics, Mapping):
        raise InputError(f"metrics.json: expected an object, got {type(metrics).__name__}")
    if not isinstance(metrics.get("results"), list):
        raise InputError("metrics.json: 'results' must be a list of result rows")
    for index, row in enumerate(metrics["results"]):
        if not isinstance(row, Mapping) or not isinstance(row.get("model"), str) or "split" not in row:
            raise InputError(f"metrics.json: results[{index}] needs a 'model' name and a 'split'")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _is_interval(ci: Sequence | None) -> bool:
    return ci is not None and len(ci) == 2 and all(_is_number(bound) for bound in ci)


def _is_multilabel(metrics: Mapping) -> bool:
    return metrics.get("task") == "multilabel"


def _evaluation_split(metrics: Mapping) -> str:
    """``"test"``, or for a bundle evaluated on another split the first split that is not cross-validation."""
    splits = [row["split"] for row in metrics["results"] if row["split"] != "cv"]
    return "test" if "test" in splits or not splits else splits[0]


def _headline_level(metrics: Mapping, split: str) -> str:
    """``"study"`` when the split has study-level rows (MURA's unit of evaluation), else ``"image"``."""
    levels = {row.get("level", "image") for row in metrics["results"] if row["split"] == split}
    return "study" if "study" in levels else "image"


def _levels(metrics: Mapping, split: str) -> list[str]:
    """The split's levels, headline level first."""
    recorded = dict.fromkeys(row.get("level", "image") for row in metrics["results"] if row["split"] == split)
    headline = _headline_level(metrics, split)
    return [headline, *(level for level in recorded if level != headline)]


def _rows(metrics: Mapping, split: str, level: str | None = None, finding: str | None = None) -> dict[str, dict]:
    """Result rows of one split (and level, or multi-label finding), keyed by model, in recorded order."""
    return {
        row["model"]: row
        for row in metrics["results"]
        if row["split"] == split
        and (level is None or row.get("level", "image") == level)
        and row.get("finding") == finding
    }


def _ci(row: Mapping, metric: str) -> Sequence | None:
    return (row.get("ci") or {}).get(metric)


def _metric_text(row: Mapping, metric: str) -> str:
    return format_metric(row.get(metric), _ci(row, metric))


def _labelled(row: Mapping, metric: str) -> str:
    return f"{METRIC_LABELS[metric]} {_metric_text(row, metric)}"


def _ranked(values: Mapping[str, Any]) -> list[str]:
    """Names, highest value first, undefined values last, ties by name."""
    return sorted(values, key=lambda name: (0, -values[name], name) if _is_number(values[name]) else (1, 0, name))


def _sorted_by(rows: Mapping[str, Mapping], metric: str) -> list[str]:
    """Model names, highest ``metric`` first, undefined last, ties by name."""
    return _ranked({name: row.get(metric) for name, row in rows.items()})


def _feature_sets_and_classifiers(models: Sequence[str]) -> tuple[list[str], list[str]]:
    """Single backbones in recorded order then fusion, and classifiers in recorded order."""
    parts = [ModelName.parse(name) for name in models]
    singles = list(dict.fromkeys(fs for fs, _ in parts if fs != FUSION))
    fused = [FUSION] if any(fs == FUSION for fs, _ in parts) else []
    return singles + fused, list(dict.fromkeys(classifier for _, classifier in parts))


def _cv_scores(metrics: Mapping) -> dict[str, Any]:
    return (metrics.get("selection") or {}).get("cv_scores") or {}


def _selection_note(metrics: Mapping) -> str:
    """``5-fold CV kappa 0.610 on the training split``; empty without a selection record."""
    selection = metrics.get("selection")
    if not selection:
        return ""
    folds = f"{selection['cv']}-fold " if selection.get("cv") else ""
    score = format_metric(_cv_scores(metrics).get(metrics.get("selected")))
    return f"{folds}CV {selection.get('scoring', 'score')} {score} on the training split"


@dataclass(frozen=True)
class _Headline:
    """The number models are compared by: kappa (binary) or mean AUROC over findings (multi-label)."""

    metric: str
    label: str
    rows: dict[str, dict]


def _headline(metrics: Mapping) -> _Headline:
    split = _evaluation_split(metrics)
    if _is_multilabel(metrics):
        return _Headline("auroc", f"{split} mean AUROC over findings", _rows(metrics, split, finding="mean"))
    level = _headline_level(metrics, split)
    return _Headline("kappa", f"{split} kappa ({level} level)", _rows(metrics, split, level))


def _rows_by_finding(metrics: Mapping) -> dict[str, dict[str, dict]]:
    """Multi-label rows of the evaluated split: finding -> model -> row, findings in recorded order, mean last."""
    split = _evaluation_split(metrics)
    findings = dict.fromkeys(row["finding"] for row in metrics["results"] if row["split"] == split and "finding" in row)
    ordered = [finding for finding in findings if finding != "mean"] + (["mean"] if "mean" in findings else [])
    return {finding: _rows(metrics, split, finding=finding) for finding in ordered}


def _finding_models(metrics: Mapping) -> list[str]:
    """Multi-label models, best mean AUROC first (recorded order when no mean was recorded)."""
    ranked = _sorted_by(_headline(metrics).rows, "auroc")
    return ranked or list(dict.fromkeys(model for rows in _rows_by_finding(metrics).values() for model in rows))
