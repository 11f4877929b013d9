"""The report's figures (matplotlib, Agg): ROC curves, confusion matrix, grouped bars with CI error bars."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfusion.evaluation.metrics import binary_metrics
from tlfusion.models.names import FUSION, ModelName
from tlfusion.reports.reading import PLOT_DPI, cv_scores_of, format_metric, interval_of, is_interval, is_number

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Plot:
    file: str
    """Path relative to the run folder, e.g. ``plots/confusion.png``."""
    caption: str


def new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols)


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def roc_curves(predictions: pd.DataFrame, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """(false-positive rates, true-positive rates, AUROC) per model on ``split``; one-class models are left out."""
    from sklearn.metrics import roc_curve

    curves = {}
    for model, rows in predictions[predictions["split"] == split].groupby("model", sort=False):
        y_true, prob = rows["y_true"].to_numpy(), rows["prob"].to_numpy()
        auroc = binary_metrics(y_true, prob)["auroc"]
        if auroc is not None:
            fpr, tpr, _ = roc_curve(y_true, prob)
            curves[str(model)] = (fpr, tpr, auroc)
    return curves


def compared_models(metrics: Mapping, available: Mapping[str, Any]) -> dict[str, str]:
    """Model -> role: the selected model, the single-backbone model with the best CV score (never the best on
    test), the fused model with the selected classifier; those without a curve in ``available`` are left out."""
    selected = metrics.get("selected") or ""
    cv_scores = cv_scores_of(metrics)
    singles = [m for m in available if not ModelName.parse(m).is_fusion and is_number(cv_scores.get(m))]
    best_single = max(singles, key=cv_scores.__getitem__, default=None)
    fused = str(ModelName(FUSION, ModelName.parse(selected).classifier))
    roles: dict[str, str] = {}
    for model, role in (
        (selected, "selected"),
        (best_single, "single backbone with the best CV score"),
        (fused, "fusion with the same classifier"),
    ):
        if model in available:
            roles.setdefault(model, role)
    return roles


def roc_figure(curves: Mapping[str, tuple], title: str):
    figure, axes = new_figure(5.2, 5)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for name, (fpr, tpr, auroc) in curves.items():
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {format_metric(auroc)})")
    axes.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize="small")
    return figure


def confusion_figure(confusion: Sequence[Sequence[int]], model: str, positive_class: str | None):
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    labels = ["negative", f"positive ({positive_class})" if positive_class else "positive"]
    figure, panels = new_figure(8.5, 3.8, ncols=2)
    for axes, values, digits, title in ((panels[0], counts, 0, "counts"), (panels[1], normalised, 2, "row-normalised")):
        shade = np.nan_to_num(values / max(np.nanmax(values, initial=0), 1e-12))
        axes.imshow(shade, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(values):
            axes.text(
                j,
                i,
                format_metric(value, digits=digits),
                ha="center",
                va="center",
                color="white" if shade[i, j] > 0.5 else "black",
            )
        axes.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="true", title=f"{model}: {title}")
        axes.set_xticklabels(labels)
        axes.set_yticklabels(labels)
    return figure


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[Mapping]],
    metric: str,
    ylabel: str,
    highlight: str | None = None,
    chance: float | None = None,
):
    """A group of bars per entry of ``groups``; ``series[name][i]`` is the result row of bar ``name`` in group i.

    Bars carry their row's CI as error bars (nothing where undefined); the bar of model ``highlight`` is outlined.
    """
    width = 0.8 / max(len(series), 1)
    rotate = len(groups) > 6
    legend_width = 0.6 + 0.075 * max((len(name) for name in series), default=0)
    figure, axes = new_figure(min(16, max(4.5, 1 + 0.25 * len(groups) * len(series)) + legend_width), 4.5)
    positions = np.arange(len(groups))
    outlined = []
    for index, (name, rows) in enumerate(series.items()):
        values = np.array([row.get(metric) if is_number(row.get(metric)) else np.nan for row in rows], dtype=float)
        bounds = np.array(
            [interval_of(row, metric) if is_interval(interval_of(row, metric)) else [np.nan] * 2 for row in rows]
        )
        errors = np.clip([values - bounds[:, 0], bounds[:, 1] - values], 0, None)
        offset = (index - (len(series) - 1) / 2) * width
        bars = axes.bar(positions + offset, np.nan_to_num(values), width, yerr=errors, label=name, capsize=2)
        outlined.extend(bar for bar, row in zip(bars, rows, strict=True) if row and row.get("model") == highlight)
    if chance is not None:
        axes.axhline(chance, color="grey", linestyle=":", linewidth=1)
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xticks(positions, groups, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    axes.set_ylabel(ylabel)
    figure.legend(loc="outside right upper", fontsize="small")
    for bar in outlined:  # after the legend, whose keys copy the first bar of each series
        bar.set(edgecolor="black", linewidth=2)
    return figure


def forest_figure(rows: Mapping[str, Mapping], title: str):
    """AUROC per finding (``rows``: finding -> result row, the mean last) as points with their CI bars, each
    labelled with its positives; a dotted line at chance."""
    names = list(rows)
    figure, axes = new_figure(6.5, 1.2 + 0.32 * len(names))
    positions = np.arange(len(names))[::-1]
    for position, name in zip(positions, names, strict=True):
        row = rows[name]
        value, ci = row.get("auroc"), interval_of(row, "auroc")
        if is_interval(ci):
            axes.plot(ci, [position, position], color="tab:blue", linewidth=1.5)
        if is_number(value):
            marker = "D" if name == "mean" else "o"
            axes.plot([value], [position], marker, color="black" if name == "mean" else "tab:blue")
    labels = [f"{name} (n+={rows[name].get('positives', '?')})" for name in names]
    axes.set_yticks(positions, labels)
    axes.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.set(xlim=(0, 1), xlabel="AUROC (95% patient-bootstrap CI)", title=title)
    return figure
