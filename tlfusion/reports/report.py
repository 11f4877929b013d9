"""Run reports: ``report.md``, ``report.html`` and ``plots/`` from a run's metrics and predictions.

The report shows what the pipeline measured and nothing more: every number comes from ``metrics`` (the content
of ``metrics.json``) or, for ROC curves, from the evaluated split of ``predictions``. Nothing is selected here:
the selected model is the one ``metrics["selected"]`` names (chosen by cross-validation on the training split),
and the extra models drawn beside it are picked by their CV scores, never by test results. Both documents are
rendered from one list of sections, so the Markdown and HTML versions say the same thing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfusion.errors import InputError
from tlfusion.fileio import write_bytes
from tlfusion.models.names import ModelName
from tlfusion.reports import reading
from tlfusion.reports.classes import class_plots, class_sections, class_summary_lines
from tlfusion.reports.clinical import RELIABILITY, reliability_figure
from tlfusion.reports.content import report_sections
from tlfusion.reports.plots import (
    Plot,
    compared_models,
    confusion_figure,
    forest_figure,
    grouped_bars,
    png_bytes,
    roc_curves,
    roc_figure,
)
from tlfusion.reports.render import render_html, render_markdown
from tlfusion.run.paths import PLOTS, REPORT_HTML, REPORT_MD, RunPaths

if TYPE_CHECKING:
    import pandas as pd


def summary_lines(metrics: Mapping) -> list[str]:
    """3-5 lines for the terminal: the selected model, how it was chosen, its headline results with CIs."""
    reading.check_metrics(metrics)
    if metrics.get("task") == "multiclass":
        return class_summary_lines(metrics)
    selected = metrics.get("selected")
    split = reading.evaluation_split(metrics)
    note = reading.selection_note(metrics)
    lines = [
        f"{metrics.get('experiment', 'run')}: selected {selected or reading.MISSING}" + (f" ({note})" if note else "")
    ]
    if reading.is_multilabel(metrics):
        row = reading.metric_rows(metrics, split, finding="mean").get(selected)
        gzsl = (metrics.get("gzsl") or {}).get(selected)
        if row:
            lines.append(f"{split}: mean AUROC over findings {reading.metric_text(row, 'auroc')}")
        if gzsl:
            lines.append(
                "GZSL AUROC: "
                + "   ".join(f"{key} {reading.format_metric(gzsl.get(key))}" for key in reading.GZSL_KEYS)
            )
    else:
        level = reading.headline_level(metrics, split)
        row = reading.metric_rows(metrics, split, level).get(selected)
        if row:
            lines.append(f"{split}, {level} level, n={row.get('n', reading.MISSING)}:")
            pairs = (("accuracy", "f1"), ("kappa", "auroc"))
            lines += ["  " + "   ".join(reading.labelled_model(row, metric) for metric in pair) for pair in pairs]
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

    ``predictions`` (columns model, split, y_true, prob; one row per image, model and split; a multiclass run's
    has prob_0 ... prob_<K-1>) feeds the ROC curves; ``None`` leaves them out. ``timings`` (stage -> seconds) adds
    a Timings section. A review gallery at ``run_dir/explanations/index.html`` (the explain stage's) is linked from
    an Explanations section.
    Returns the written files keyed by their path relative to ``run_dir``: ``"report.md"``, ``"report.html"``,
    ``"plots/confusion.png"``, ...
    """
    reading.check_metrics(metrics)
    multiclass = metrics.get("task") == "multiclass"
    if predictions is not None and not multiclass:
        missing = [column for column in reading.PREDICTION_COLUMNS if column not in predictions.columns]
        if missing:
            raise InputError(f"predictions: missing column(s) {', '.join(missing)}")
    run_dir = Path(run_dir)
    plots = _write_plots(run_dir, metrics, predictions)
    title = f"tlfusion report: {metrics.get('experiment', run_dir.name)}"
    gallery = RunPaths(run_dir).gallery
    gallery = gallery.relative_to(run_dir).as_posix() if gallery.is_file() else None
    if multiclass:
        sections = class_sections(metrics, plots, timings or {}, gallery)
    else:
        sections = report_sections(metrics, plots, timings or {}, gallery)
    written = {plot.file: run_dir / plot.file for plot in plots}
    paths = RunPaths(run_dir)
    written[REPORT_MD] = write_bytes(paths.report_md, render_markdown(title, sections).encode())
    written[REPORT_HTML] = write_bytes(paths.report, render_html(title, sections).encode())
    return written


def _write_plots(run_dir: Path, metrics: Mapping, predictions: pd.DataFrame | None) -> list[Plot]:
    """Draw every plot the run's results allow; return them in report order."""
    plots: list[Plot] = []

    def save(figure, name: str, caption: str) -> None:
        file = f"{PLOTS}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        write_bytes(run_dir / file, png_bytes(figure))
        plots.append(Plot(file, caption))

    if metrics.get("task") == "multiclass":
        class_plots(metrics, predictions, save)
        return plots
    headline = reading.headline_of(metrics)
    selected = metrics.get("selected")
    split = reading.evaluation_split(metrics)
    if predictions is not None and not reading.is_multilabel(metrics):
        _roc_plots(save, metrics, predictions, split)
    confusion = (headline.rows.get(selected) or {}).get("confusion")
    if confusion:
        save(
            confusion_figure(confusion, selected, metrics.get("positive_class")),
            "confusion",
            f"Confusion matrix of {selected} on the {split} split ({reading.headline_level(metrics, split)} level): "
            "counts and row-normalised.",
        )
    if any(reading.is_number(row.get(headline.metric)) for row in headline.rows.values()):
        feature_sets, classifiers = reading.feature_sets_and_classifiers(list(headline.rows))
        series = {fs: [headline.rows.get(str(ModelName(fs, clf)), {}) for clf in classifiers] for fs in feature_sets}
        save(
            grouped_bars(classifiers, series, headline.metric, headline.label, selected),
            f"{headline.metric}_by_classifier",
            f"{headline.label[0].upper()}{headline.label[1:]} of every model, grouped by "
            "classifier, single backbones beside fusion (error bars: bootstrap CI; outlined: selected).",
        )
    reliability = reliability_figure(metrics)
    if reliability:
        save(reliability[0], Path(RELIABILITY).stem, reliability[1])
    _finding_plots(save, metrics, selected, split)
    return plots


def _roc_plots(save: Callable, metrics: Mapping, predictions: pd.DataFrame, split: str) -> None:
    """ROC curves on the evaluated split: the selected model beside the best single and the fused ones, then every
    classifier per feature set."""
    curves = roc_curves(predictions, split)
    compared = compared_models(metrics, curves)
    if compared:
        save(
            roc_figure({m: curves[m] for m in compared}, f"{split}: selected, best single, fused"),
            "roc_selected",
            f"ROC on the {split} split (image level): "
            + "; ".join(f"{model} ({role})" for model, role in compared.items())
            + ".",
        )
    for feature_set in reading.feature_sets_and_classifiers(list(curves))[0]:
        members = {m: curve for m, curve in curves.items() if ModelName.parse(m).feature_set == feature_set}
        save(
            roc_figure(members, f"{split}: {feature_set} features"),
            f"roc_{feature_set}",
            f"ROC on the {split} split (image level) of every classifier on the {feature_set} features.",
        )


def _finding_plots(save: Callable, metrics: Mapping, selected: str | None, split: str) -> None:
    """Multi-label runs: AUROC per finding of every model, and the selected model's forest plot."""
    findings = reading.rows_by_finding(metrics)
    if not findings:
        return
    series = {
        f"{model} (selected)" if model == selected else model: [rows.get(model, {}) for rows in findings.values()]
        for model in reading.finding_models(metrics)
    }
    save(
        grouped_bars(list(findings), series, "auroc", f"{split} AUROC", chance=0.5),
        "auroc_by_finding",
        f"AUROC per finding on the {split} split, one bar per model (error bars: bootstrap CI; dotted: chance).",
    )
    forest = {finding: rows[selected] for finding, rows in findings.items() if selected in rows}
    if forest:
        save(
            forest_figure(forest, f"{selected}: {split} AUROC per finding"),
            "auroc_per_finding",
            f"Forest plot: {selected}'s AUROC per finding on the {split} split with patient-bootstrap 95% "
            "intervals; n+ = test images with the finding (dotted: chance).",
        )
