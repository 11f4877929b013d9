"""Run reports: ``report.md``, ``report.html`` and ``plots/`` from a run's metrics and predictions.

The report shows what the pipeline measured and nothing more: every number comes from ``metrics`` (the content
of ``metrics.json``) or, for ROC curves, from the evaluated split of ``predictions``. Nothing is selected here:
the selected model is the one ``metrics["selected"]`` names (chosen by cross-validation on the training split),
and the extra models drawn beside it are picked by their CV scores, never by test results. Both documents are
rendered from one list of sections, so the Markdown and HTML versions say the same thing.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfusion.errors import InputError
from tlfusion.fileio import write_bytes
from tlfusion.metrics import METRICS, binary_metrics
from tlfusion.model_name import FUSION, ModelName

if TYPE_CHECKING:
    import pandas as pd

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


# ----------------------------------------------------------------------------------------------- public API


def format_metric(value: Any, ci: Sequence | None = None, digits: int = 3) -> str:
    """``0.812 [0.751, 0.866]`` (the interval only when both bounds are numbers); ``—`` for an undefined value."""
    if not _is_number(value):
        return MISSING
    text = f"{value:.{digits}f}"
    if _is_interval(ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def summary_lines(metrics: Mapping) -> list[str]:
    """3-5 lines for the terminal: the selected model, how it was chosen, its headline results with CIs."""
    _check_metrics(metrics)
    selected = metrics.get("selected")
    split = _evaluation_split(metrics)
    note = _selection_note(metrics)
    lines = [f"{metrics.get('experiment', 'run')}: selected {selected or MISSING}" + (f" ({note})" if note else "")]
    if _is_multilabel(metrics):
        row = _rows(metrics, split, finding="mean").get(selected)
        gzsl = (metrics.get("gzsl") or {}).get(selected)
        if row:
            lines.append(f"{split}: mean AUROC over findings {_metric_text(row, 'auroc')}")
        if gzsl:
            lines.append("GZSL AUROC: " + "   ".join(f"{key} {format_metric(gzsl.get(key))}" for key in GZSL_KEYS))
    else:
        level = _headline_level(metrics, split)
        row = _rows(metrics, split, level).get(selected)
        if row:
            lines.append(f"{split}, {level} level, n={row.get('n', MISSING)}:")
            pairs = (("accuracy", "f1"), ("kappa", "auroc"))
            lines += ["  " + "   ".join(_labelled(row, metric) for metric in pair) for pair in pairs]
    if len(lines) == 1:
        lines.append(f"no {split} results recorded for the selected model")
    return lines


def write_reports(
    run_dir: str | os.PathLike,
    metrics: Mapping,
    predictions: pd.DataFrame | None,
    timings: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``plots/*.png``, ``report.md`` and ``report.html`` into ``run_dir``, each atomically.

    ``predictions`` (columns model, split, y_true, prob; one row per image, model and split) feeds the ROC
    curves of binary runs; ``None`` leaves them out. ``timings`` (stage -> seconds) adds a Timings section.
    Returns the written files keyed by their path relative to ``run_dir``: ``"report.md"``, ``"report.html"``,
    ``"plots/confusion.png"``, ...
    """
    _check_metrics(metrics)
    if predictions is not None:
        missing = [column for column in PREDICTION_COLUMNS if column not in predictions.columns]
        if missing:
            raise InputError(f"predictions: missing column(s) {', '.join(missing)}")
    run_dir = Path(run_dir)
    plots = _write_plots(run_dir, metrics, predictions)
    title = f"tlfusion report: {metrics.get('experiment', run_dir.name)}"
    sections = _sections(metrics, plots, timings or {})
    written = {plot.file: run_dir / plot.file for plot in plots}
    written["report.md"] = write_bytes(run_dir / "report.md", _render_markdown(title, sections).encode())
    written["report.html"] = write_bytes(run_dir / "report.html", _render_html(title, sections).encode())
    return written


# ----------------------------------------------------------------------------------------------- reading metrics


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


# ----------------------------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class _Plot:
    file: str
    """Path relative to the run folder, e.g. ``plots/confusion.png``."""
    caption: str


def _write_plots(run_dir: Path, metrics: Mapping, predictions: pd.DataFrame | None) -> list[_Plot]:
    """Draw every plot the run's results allow; return them in report order."""
    plots: list[_Plot] = []

    def save(figure, name: str, caption: str) -> None:
        file = f"plots/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        write_bytes(run_dir / file, _png_bytes(figure))
        plots.append(_Plot(file, caption))

    headline = _headline(metrics)
    selected = metrics.get("selected")
    split = _evaluation_split(metrics)
    if predictions is not None and not _is_multilabel(metrics):
        curves = _roc_curves(predictions, split)
        compared = _compared_models(metrics, curves)
        if compared:
            save(
                _roc_figure({m: curves[m] for m in compared}, f"{split}: selected, best single, fused"),
                "roc_selected",
                f"ROC on the {split} split (image level): "
                + "; ".join(f"{model} ({role})" for model, role in compared.items())
                + ".",
            )
        for feature_set in _feature_sets_and_classifiers(list(curves))[0]:
            members = {m: curve for m, curve in curves.items() if ModelName.parse(m).feature_set == feature_set}
            save(
                _roc_figure(members, f"{split}: {feature_set} features"),
                f"roc_{feature_set}",
                f"ROC on the {split} split (image level) of every classifier on the {feature_set} features.",
            )
    confusion = (headline.rows.get(selected) or {}).get("confusion")
    if confusion:
        save(
            _confusion_figure(confusion, selected, metrics.get("positive_class")),
            "confusion",
            f"Confusion matrix of {selected} on the {split} split ({_headline_level(metrics, split)} level): "
            "counts and row-normalised.",
        )
    if any(_is_number(row.get(headline.metric)) for row in headline.rows.values()):
        feature_sets, classifiers = _feature_sets_and_classifiers(list(headline.rows))
        series = {fs: [headline.rows.get(str(ModelName(fs, clf)), {}) for clf in classifiers] for fs in feature_sets}
        save(
            _grouped_bars(classifiers, series, headline.metric, headline.label, selected),
            f"{headline.metric}_by_classifier",
            f"{headline.label[0].upper()}{headline.label[1:]} of every model, grouped by "
            "classifier, single backbones beside fusion (error bars: bootstrap CI; outlined: selected).",
        )
    findings = _rows_by_finding(metrics)
    if findings:
        series = {
            f"{model} (selected)" if model == selected else model: [rows.get(model, {}) for rows in findings.values()]
            for model in _finding_models(metrics)
        }
        save(
            _grouped_bars(list(findings), series, "auroc", f"{split} AUROC", chance=0.5),
            "auroc_by_finding",
            f"AUROC per finding on the {split} split, one bar per model (error bars: bootstrap CI; dotted: chance).",
        )
    return plots


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols)


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def _roc_curves(predictions: pd.DataFrame, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
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


def _compared_models(metrics: Mapping, available: Mapping[str, Any]) -> dict[str, str]:
    """Model -> role: the selected model, the single-backbone model with the best CV score (never the best on
    test), the fused model with the selected classifier; those without a curve in ``available`` are left out."""
    selected = metrics.get("selected") or ""
    cv_scores = _cv_scores(metrics)
    singles = [m for m in available if not ModelName.parse(m).is_fusion and _is_number(cv_scores.get(m))]
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


def _roc_figure(curves: Mapping[str, tuple], title: str):
    figure, axes = _new_figure(5.2, 5)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for name, (fpr, tpr, auroc) in curves.items():
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {format_metric(auroc)})")
    axes.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize="small")
    return figure


def _confusion_figure(confusion: Sequence[Sequence[int]], model: str, positive_class: str | None):
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    labels = ["negative", f"positive ({positive_class})" if positive_class else "positive"]
    figure, panels = _new_figure(8.5, 3.8, ncols=2)
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


def _grouped_bars(
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
    figure, axes = _new_figure(min(16, max(4.5, 1 + 0.25 * len(groups) * len(series)) + legend_width), 4.5)
    positions = np.arange(len(groups))
    outlined = []
    for index, (name, rows) in enumerate(series.items()):
        values = np.array([row.get(metric) if _is_number(row.get(metric)) else np.nan for row in rows], dtype=float)
        bounds = np.array([_ci(row, metric) if _is_interval(_ci(row, metric)) else [np.nan] * 2 for row in rows])
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


# ----------------------------------------------------------------------------------------------- report content


@dataclass(frozen=True)
class _Cell:
    text: str
    sort: float | str | None = None
    """Value the HTML table sorts by (``None``: undefined, sorts last)."""
    bold: bool = False


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[_Cell]]


_Block = str | list | _Table | _Plot  # paragraph (may hold **bold** / `code`), bullet list, table, figure
_Section = tuple[str, list[_Block]]


def _sections(metrics: Mapping, plots: Sequence[_Plot], timings: Mapping[str, Any]) -> list[_Section]:
    split = _evaluation_split(metrics)
    sections: list[_Section] = [("Data", _data_blocks(metrics)), ("Selected model", _selected_blocks(metrics))]
    if _is_multilabel(metrics):
        sections += [
            (f"Mean AUROC on the {split} split", [_metrics_table(metrics, _headline(metrics).rows, ("auroc",))]),
            (f"AUROC per finding on the {split} split", _finding_blocks(metrics)),
        ]
        if metrics.get("gzsl"):
            sections.append(("Generalised zero-shot (seen / unseen findings)", [_gzsl_table(metrics)]))
    else:
        sections += [
            (f"Metrics on the {split} split, {level} level", [_metrics_table(metrics, _rows(metrics, split, level))])
            for level in _levels(metrics, split)
        ]
    sections += [
        ("Single backbones vs fusion", _fusion_blocks(metrics)),
        ("Cross-validation on the training split", _cv_blocks(metrics)),
        ("Plots", list(plots) or ["No plots: no results to draw."]),
    ]
    if timings:
        sections.append(("Timings", _timing_blocks(timings)))
    return sections


def _model_cell(name: str, selected: str | None) -> _Cell:
    chosen = name == selected
    return _Cell(f"{name} (selected)" if chosen else name, name, bold=chosen)


def _value_cell(value: Any, text: str | None = None, bold: bool = False) -> _Cell:
    """A number (``format_metric`` unless ``text`` is given) that sorts numerically; undefined sorts last."""
    return _Cell(format_metric(value) if text is None else text, value if _is_number(value) else None, bold)


def _metric_cell(row: Mapping, metric: str, bold: bool = False) -> _Cell:
    return _value_cell(row.get(metric), _metric_text(row, metric), bold)


def _count_cell(count: Any) -> _Cell:
    return _value_cell(count, str(count) if _is_number(count) else MISSING)


def _describe(value: Any) -> str:
    """Data-summary values as text: ``{"train": 1200, "test": 300}`` -> ``train 1200, test 300``."""
    if isinstance(value, Mapping):
        parts = [
            f"{key} ({_describe(item)})" if isinstance(item, Mapping) else f"{key} {_describe(item)}"
            for key, item in value.items()
        ]
        return ", ".join(parts) or MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_describe, value)) or MISSING
    return str(value)


def _data_blocks(metrics: Mapping) -> list[_Block]:
    task = metrics.get("task", "binary")
    positive = metrics.get("positive_class")
    intro = f"Task: {task}" + (f", positive class `{positive}`." if positive else ".")
    intro += (
        f" Brackets hold bootstrap confidence intervals; {MISSING} marks a value that is undefined or not recorded."
    )
    data = metrics.get("data") or {}
    blocks = [intro, [f"{key}: {_describe(value)}" for key, value in data.items()] or "No data summary recorded."]
    seen = {key: count for key, count in (metrics.get("test_images_seen_in_pretraining") or {}).items() if count}
    if seen:
        pretrained_on = ", ".join(f"{key} on {count}" for key, count in seen.items())
        blocks.append(f"WARNING: backbones pretrained on test images ({pretrained_on}): test scores are optimistic.")
    return blocks


def _selected_blocks(metrics: Mapping) -> list[_Block]:
    selected = metrics.get("selected")
    if not selected:
        return ["No model was selected."]
    selection = metrics.get("selection")
    if selection:
        why = (
            f"**{selected}** was chosen by its {_selection_note(metrics)}; the test split played no part in the choice."
        )
    else:
        why = f"**{selected}** is the model evaluated here (no selection record in metrics.json)."
    split = _evaluation_split(metrics)
    if _is_multilabel(metrics):
        row = _rows(metrics, split, finding="mean").get(selected, {})
        facts = [f"{split} mean AUROC over findings: {_metric_text(row, 'auroc')}"]
        gzsl = (metrics.get("gzsl") or {}).get(selected)
        if gzsl:
            facts += [f"GZSL {label}: {format_metric(gzsl.get(key))}" for key, label in GZSL_KEYS.items()]
        return [why, facts]
    level = _headline_level(metrics, split)
    row = _rows(metrics, split, level).get(selected, {})
    facts = [
        f"{split} split, {level} level, n={row.get('n', MISSING)}, threshold {format_metric(row.get('threshold'))}"
    ]
    blocks: list[_Block] = [why, facts + [_labelled(row, metric) for metric in METRICS]]
    confusion = row.get("confusion")
    if confusion:
        names = ("negative", "positive")
        blocks.append(
            _Table(
                ["true \\ predicted", *names],
                [
                    [_Cell(f"true {name}", name)] + [_Cell(str(n), n) for n in counts]
                    for name, counts in zip(names, confusion, strict=True)
                ],
            )
        )
    return blocks


def _metrics_table(metrics: Mapping, rows: Mapping[str, Mapping], columns: Sequence[str] = METRICS) -> _Table:
    """One row per model, best headline metric first, CIs in brackets; the selected model in bold."""
    selected = metrics.get("selected")
    extra = [] if _is_multilabel(metrics) else ["threshold"]
    order = _sorted_by(rows, _headline(metrics).metric)
    return _Table(
        ["model", "n", *(METRIC_LABELS[column] for column in columns), *extra],
        [
            [_model_cell(name, selected), _count_cell(rows[name].get("n"))]
            + [_metric_cell(rows[name], column) for column in (*columns, *extra)]
            for name in order
        ],
    )


def _best_cells(rows: Sequence[Mapping], metric: str) -> list[_Cell]:
    """One cell per row with the highest defined ``metric`` in bold (every tied cell)."""
    best = max((row.get(metric) for row in rows if _is_number(row.get(metric))), default=None)
    return [_metric_cell(row, metric, bold=best is not None and row.get(metric) == best) for row in rows]


def _fusion_blocks(metrics: Mapping) -> list[_Block]:
    """Rows = classifier, columns = each single backbone and fusion: does fusing the features help?"""
    headline = _headline(metrics)
    feature_sets, classifiers = _feature_sets_and_classifiers(list(headline.rows))
    singles = [fs for fs in feature_sets if fs != FUSION]
    if not singles or FUSION not in feature_sets:
        return ["Needs at least one single-backbone model and one fusion model on the same split."]
    paired = _paired_gains(metrics, headline)
    cv_scores = _cv_scores(metrics)
    table = _Table(["classifier", *feature_sets, "fusion − single chosen on CV"], [])
    for classifier in classifiers:
        rows = [headline.rows.get(str(ModelName(fs, classifier)), {}) for fs in feature_sets]
        chosen = _cv_chosen_single(cv_scores, singles, classifier)
        single_value = headline.rows.get(chosen, {}).get(headline.metric) if chosen else None
        fused = rows[-1].get(headline.metric)
        gain = fused - single_value if _is_number(single_value) and _is_number(fused) else None
        label = _signed(gain, paired.get((classifier, chosen)))
        gain_cell = _value_cell(
            gain, f"{label} vs {ModelName.parse(chosen).feature_set}" if _is_number(gain) else label
        )
        table.rows.append([_Cell(classifier, classifier), *_best_cells(rows, headline.metric), gain_cell])
    note = (
        f"Each cell is the {headline.label} of one feature set with one classifier; the best of each row is in bold. "
        "The last column is fusion minus the single backbone a user would have picked without fusion: the one "
        "with the best CV score for that classifier (picking the best on test would favour the single backbones)"
        + (
            ", with a paired patient-bootstrap 95% interval (both models on the same resamples): "
            "an interval that contains 0 is no evidence either way."
            if paired
            else ", a difference of point estimates: where the intervals overlap it may be noise."
        )
    )
    return [note, table]


def _cv_chosen_single(cv_scores: Mapping[str, Any], singles: Sequence[str], classifier: str) -> str | None:
    """The single-backbone model with ``classifier`` that has the best CV score; None without CV scores."""
    scored = {str(ModelName(fs, classifier)): cv_scores.get(str(ModelName(fs, classifier))) for fs in singles}
    ranked = [name for name in _ranked(scored) if _is_number(scored[name])]
    return ranked[0] if ranked else None


def _signed(value: Any, ci: Sequence | None = None) -> str:
    """``+0.042 [-0.010, +0.093]``: a difference, signed, with its interval when there is one."""
    if not _is_number(value):
        return MISSING
    return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if _is_interval(ci) else "")


def _paired_gains(metrics: Mapping, headline: _Headline) -> dict[tuple[str, str], Sequence]:
    """(classifier, single model) -> the paired CI of fusion minus that model on the headline metric and level."""
    level = _headline_level(metrics, _evaluation_split(metrics))
    return {
        (row["classifier"], row["single"]): row[headline.metric]["ci"]
        for row in metrics.get("fusion_vs_single") or []
        if row["level"] == level and headline.metric in row and row[headline.metric]["ci"]
    }


def _cv_blocks(metrics: Mapping) -> list[_Block]:
    selection = metrics.get("selection") or {}
    cv_scores = _cv_scores(metrics)
    blocks: list[_Block] = []
    if cv_scores:
        headline = _headline(metrics)
        scoring = selection.get("scoring", "score")
        order = _ranked(cv_scores)
        blocks += [
            f"Scores the selection compared (CV {scoring}; the {headline.label} is shown beside it, not used).",
            _Table(
                ["model", f"CV {scoring}", headline.label],
                [
                    [
                        _model_cell(name, metrics.get("selected")),
                        _value_cell(cv_scores[name]),
                        _metric_cell(headline.rows.get(name, {}), headline.metric),
                    ]
                    for name in order
                ],
            ),
        ]
    if any(row["split"] == "cv" for row in metrics["results"]):
        level = _headline_level(metrics, "cv")
        blocks += [
            f"Out-of-fold predictions on the training split, {level} level:",
            _metrics_table(metrics, _rows(metrics, "cv", level)),
        ]
    return blocks or ["No cross-validation scores recorded."]


def _finding_blocks(metrics: Mapping) -> list[_Block]:
    findings = _rows_by_finding(metrics)
    models = _finding_models(metrics)
    table = _Table(
        ["finding", *(f"{m} (selected)" if m == metrics.get("selected") else m for m in models)],
        [
            [_Cell(finding, finding), *_best_cells([rows.get(m, {}) for m in models], "auroc")]
            for finding, rows in findings.items()
        ],
    )
    return ["AUROC of each model per finding; the best of each row is in bold.", table]


def _gzsl_table(metrics: Mapping) -> _Table:
    gzsl = metrics["gzsl"]
    order = _sorted_by(gzsl, "h")
    return _Table(
        ["model", *GZSL_KEYS.values()],
        [
            [_model_cell(name, metrics.get("selected"))] + [_metric_cell(gzsl[name], key) for key in GZSL_KEYS]
            for name in order
        ],
    )


def _timing_blocks(timings: Mapping[str, Any]) -> list[_Block]:
    total = sum(seconds for seconds in timings.values() if _is_number(seconds))
    rows = [
        [_Cell(stage, stage), _value_cell(seconds, format_metric(seconds, digits=1))]
        for stage, seconds in timings.items()
    ]
    return [f"Recorded stage times: {format_metric(total, digits=1)} s in all.", _Table(["stage", "seconds"], rows)]


# ----------------------------------------------------------------------------------------------- rendering

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1300px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ccc; } h2 { font-size: 1.25em; margin-top: 1.8em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; white-space: nowrap; }
th { background: #f2f4f7; cursor: pointer; user-select: none; text-align: left; }
th:hover { background: #e4e8ee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; } td b { color: #0b4f9c; } .ci { color: #777; font-size: 11px; }
code { background: #f2f4f7; padding: 0 3px; border-radius: 3px; }
.plots { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; max-width: 100%; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; max-width: 560px; }
"""

_SORT_SCRIPT = """
for (const th of document.querySelectorAll("table.sortable th")) {
  th.title = "click to sort";
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0], up = th.dataset.order !== "asc";
    th.dataset.order = up ? "asc" : "desc";
    const key = row => row.cells[th.cellIndex].dataset.sort;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y) return 0; if (x === "") return 1; if (y === "") return -1;
      const order = isNaN(x) || isNaN(y) ? x.localeCompare(y) : Number(x) - Number(y);
      return up ? order : -order;
    });
    body.append(...rows);
  });
}
"""


def _render_markdown(title: str, sections: Sequence[_Section]) -> str:
    def cell(item: _Cell) -> str:
        text = item.text.replace("|", "\\|")
        return f"**{text}**" if item.bold else text

    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, _Table):
                lines.append("| " + " | ".join(name.replace("|", "\\|") for name in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block.rows]
            elif isinstance(block, _Plot):
                lines += [f"![{Path(block.file).stem}]({block.file})", "", f"*{block.caption}*"]
            elif isinstance(block, list):
                lines += [f"- {item}" for item in block]
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape ``text`` and turn its Markdown ``**bold**`` and ```code``` into HTML."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text, quote=False))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _render_html(title: str, sections: Sequence[_Section]) -> str:
    def cell(item: _Cell) -> str:
        sort = "" if item.sort is None else html.escape(str(item.sort))
        numeric = ' class="num"' if item.sort is not None and not isinstance(item.sort, str) else ""
        text = re.sub(r" (\[[^\]]*\])$", r' <span class="ci">\1</span>', html.escape(item.text))
        return f'<td data-sort="{sort}"{numeric}>{f"<b>{text}</b>" if item.bold else text}</td>'

    def block_html(block: _Block) -> str:
        if isinstance(block, _Table):
            header = "".join(f"<th>{html.escape(name)}</th>" for name in block.header)
            body = "\n".join("<tr>" + "".join(map(cell, row)) + "</tr>" for row in block.rows)
            table = f'<table class="sortable"><thead><tr>{header}</tr></thead>\n<tbody>{body}</tbody></table>'
            return f'<div class="scroll">{table}</div>'
        if isinstance(block, _Plot):
            caption = html.escape(block.caption)
            file = html.escape(block.file)
            image = f'<a href="{file}"><img src="{file}" alt="{caption}"></a>'
            return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"
        if isinstance(block, list):
            return "<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block) + "</ul>"
        return f"<p>{_inline_html(block)}</p>"

    body = []
    for heading, blocks in sections:
        content = "\n".join(map(block_html, blocks))
        if any(isinstance(block, _Plot) for block in blocks):
            content = f'<div class="plots">{content}</div>'
        body.append(f"<section><h2>{html.escape(heading)}</h2>\n{content}</section>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(body)
        + f"\n<script>{_SORT_SCRIPT}</script></body></html>\n"
    )
