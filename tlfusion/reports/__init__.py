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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlfusion.errors import InputError
from tlfusion.fileio import write_bytes
from tlfusion.model_name import ModelName
from tlfusion.reports.classes import class_plots, class_sections, class_summary_lines
from tlfusion.reports.clinical import RELIABILITY, reliability_figure
from tlfusion.reports.content import _sections
from tlfusion.reports.plots import (
    _compared_models,
    _confusion_figure,
    _forest_figure,
    _grouped_bars,
    _Plot,
    _png_bytes,
    _roc_curves,
    _roc_figure,
)
from tlfusion.reports.reading import (
    GZSL_KEYS,
    MISSING,
    PREDICTION_COLUMNS,
    _check_metrics,
    _evaluation_split,
    _feature_sets_and_classifiers,
    _finding_models,
    _headline,
    _headline_level,
    _is_multilabel,
    _is_number,
    _labelled,
    _metric_text,
    _rows,
    _rows_by_finding,
    _selection_note,
    format_metric,
)
from tlfusion.reports.render import _render_html, _render_markdown
from tlfusion.run_paths import RunPaths

if TYPE_CHECKING:
    import pandas as pd


def summary_lines(metrics: Mapping) -> list[str]:
    """3-5 lines for the terminal: the selected model, how it was chosen, its headline results with CIs."""
    _check_metrics(metrics)
    if metrics.get("task") == "multiclass":
        return class_summary_lines(metrics)
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

    ``predictions`` (columns model, split, y_true, prob; one row per image, model and split; a multiclass run's
    has prob_0 ... prob_<K-1>) feeds the ROC curves; ``None`` leaves them out. ``timings`` (stage -> seconds) adds
    a Timings section. A review gallery at ``run_dir/explanations/index.html`` (the explain stage's) is linked from
    an Explanations section.
    Returns the written files keyed by their path relative to ``run_dir``: ``"report.md"``, ``"report.html"``,
    ``"plots/confusion.png"``, ...
    """
    _check_metrics(metrics)
    multiclass = metrics.get("task") == "multiclass"
    if predictions is not None and not multiclass:
        missing = [column for column in PREDICTION_COLUMNS if column not in predictions.columns]
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
        sections = _sections(metrics, plots, timings or {}, gallery)
    written = {plot.file: run_dir / plot.file for plot in plots}
    written["report.md"] = write_bytes(run_dir / "report.md", _render_markdown(title, sections).encode())
    written["report.html"] = write_bytes(run_dir / "report.html", _render_html(title, sections).encode())
    return written


def _write_plots(run_dir: Path, metrics: Mapping, predictions: pd.DataFrame | None) -> list[_Plot]:
    """Draw every plot the run's results allow; return them in report order."""
    plots: list[_Plot] = []

    def save(figure, name: str, caption: str) -> None:
        file = f"plots/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        write_bytes(run_dir / file, _png_bytes(figure))
        plots.append(_Plot(file, caption))

    if metrics.get("task") == "multiclass":
        class_plots(metrics, predictions, save)
        return plots
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
    reliability = reliability_figure(metrics)
    if reliability:
        save(reliability[0], Path(RELIABILITY).stem, reliability[1])
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
        forest = {finding: rows[selected] for finding, rows in findings.items() if selected in rows}
        if forest:
            save(
                _forest_figure(forest, f"{selected}: {split} AUROC per finding"),
                "auroc_per_finding",
                f"Forest plot: {selected}'s AUROC per finding on the {split} split with patient-bootstrap 95% "
                "intervals; n+ = test images with the finding (dotted: chance).",
            )
    return plots
