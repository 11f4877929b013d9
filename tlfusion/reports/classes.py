"""The report of a multiclass run (K >= 3 classes): headline and per-class tables, the K x K confusion matrix as a
table and a heatmap, per-class one-vs-rest ROC curves, fusion vs single backbone, CV scores.

Every number comes from metrics.json, the ROC curves from the evaluated split of the fit predictions; nothing is
chosen here (the selected model is metrics.json's, chosen by CV on the training split).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tlfusion.evaluation.class_metrics import CLASS_METRICS, PER_CLASS_METRICS
from tlfusion.reports.content import (
    data_blocks,
    metric_cell,
    model_cell,
    signed_text,
    timing_blocks,
    value_cell,
)
from tlfusion.reports.plots import Plot, new_figure
from tlfusion.reports.reading import MISSING, evaluation_split, format_metric, metric_rows, selection_note
from tlfusion.reports.render import Block, Cell, Section, Table
from tlfusion.run.readers import class_columns

LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "kappa": "kappa",
    "quadratic_kappa": "quadratic kappa",
    "macro_auroc": "macro AUROC (one-vs-rest)",
}


def _headline_metric(metrics: Mapping) -> str:
    """Quadratic kappa for ordered classes, macro-F1 otherwise (the default selection scores)."""
    return "quadratic_kappa" if metrics.get("ordinal") else "macro_f1"


def class_summary_lines(metrics: Mapping) -> list[str]:
    """The terminal summary: selected model, how it was chosen, its evaluated-split metrics with CIs."""
    selected, split = metrics.get("selected"), evaluation_split(metrics)
    note = selection_note(metrics)
    lines = [f"{metrics.get('experiment', 'run')}: selected {selected or MISSING}" + (f" ({note})" if note else "")]
    row = metric_rows(metrics, split).get(selected)
    if not row:
        return [*lines, f"no {split} results recorded for the selected model"]
    lines.append(f"{split}, {len(metrics['classes'])} classes, n={row['n']}:")
    for pair in (CLASS_METRICS[:3], CLASS_METRICS[3:]):
        lines.append("  " + "   ".join(f"{LABELS[m]} {format_metric(row.get(m), row['ci'].get(m))}" for m in pair))
    cuts = [f">= {e['cut']} {format_metric(e['auroc'], e.get('ci'))}" for e in row.get("cut_auroc", [])]
    return [*lines, "  AUROC per cut point: " + "   ".join(cuts)] if cuts else lines


def class_sections(
    metrics: Mapping, plots: Sequence[Plot], timings: Mapping[str, Any], gallery: str | None
) -> list[Section]:
    """The report's sections, in order."""
    split = evaluation_split(metrics)
    sections: list[Section] = [("Data", data_blocks(metrics) + [_classes_line(metrics)])]
    sections.append(("Selected model", _selected_blocks(metrics, split)))
    if gallery:
        sections.append(("Explanations", [_gallery_line(metrics, gallery)]))
    sections += [
        (f"Metrics on the {split} split", [_metrics_table(metrics, metric_rows(metrics, split))]),
        ("Single backbones vs fusion", _fusion_blocks(metrics)),
        ("Cross-validation on the training split", _cv_blocks(metrics)),
        ("Plots", list(plots) or ["No plots: no results to draw."]),
    ]
    if timings:
        sections.append(("Timings", timing_blocks(timings)))
    return sections


def _gallery_line(metrics: Mapping, gallery: str) -> str:
    return (
        f"Grad-CAM and LIME of {metrics.get('selected') or MISSING} for the predicted and the true class of test "
        f"cases spread over the confusion cells, for review: [{gallery}]({gallery}) (verdicts go in `review.csv`)."
    )


def _classes_line(metrics: Mapping) -> str:
    order = "ordered grades, lowest first" if metrics.get("ordinal") else "unordered"
    return f"Classes ({order}): " + ", ".join(f"`{name}`" for name in metrics["classes"]) + "."


def _selected_blocks(metrics: Mapping, split: str) -> list[Block]:
    selected = metrics.get("selected")
    row = metric_rows(metrics, split).get(selected)
    why = f"**{selected}** was chosen by its {selection_note(metrics)}; the test split played no part in the choice."
    if not metrics.get("selection"):
        why = f"**{selected}** is the model evaluated here (no selection record in metrics.json)."
    if not row:
        return [why, f"No {split} results recorded for {selected}."]
    facts = [f"{split} split, n={row['n']}; predicted class: the most probable one"]
    facts += [f"{LABELS[m]} {format_metric(row.get(m), row['ci'].get(m))}" for m in CLASS_METRICS]
    blocks = [why, facts, "Per class (one vs the rest):", _per_class_table(row), "Confusion matrix:", _confusion(row)]
    if row.get("cut_auroc"):
        blocks += ["Per cut point (grade >= c vs the rest, scored by P(grade >= c)):", _cut_table(row)]
    return blocks


def _cut_table(row: Mapping) -> Table:
    return Table(
        ["grade >= c", "positives", "AUROC"],
        [
            [
                Cell(f">= {entry['cut']}", entry["cut"]),
                value_cell(entry["positives"], str(entry["positives"])),
                value_cell(entry["auroc"], format_metric(entry["auroc"], entry.get("ci"))),
            ]
            for entry in row["cut_auroc"]
        ],
    )


def _per_class_table(row: Mapping) -> Table:
    header = ["class", "n", *PER_CLASS_METRICS]
    rows = [
        [Cell(entry["class"], entry["class"]), value_cell(entry["n"], str(entry["n"]))]
        + [value_cell(entry.get(m), format_metric(entry.get(m), entry.get("ci", {}).get(m))) for m in PER_CLASS_METRICS]
        for entry in row["per_class"]
    ]
    return Table(header, rows)


def _confusion(row: Mapping) -> Table:
    names = [entry["class"] for entry in row["per_class"]]
    return Table(
        ["true \\ predicted", *names],
        [
            [Cell(f"true {name}", name)] + [Cell(str(n), n) for n in counts]
            for name, counts in zip(names, row["confusion"], strict=True)
        ],
    )


def _metrics_table(metrics: Mapping, rows: Mapping[str, Mapping]) -> Table:
    """One row per model, best headline metric first; the selected model in bold."""
    headline = _headline_metric(metrics)
    order = sorted(rows, key=lambda name: -(rows[name].get(headline) or -np.inf))
    selected = metrics.get("selected")
    return Table(
        ["model", "n", *(LABELS[m] for m in CLASS_METRICS)],
        [
            [model_cell(name, selected), value_cell(rows[name]["n"], str(rows[name]["n"]))]
            + [metric_cell(rows[name], m, bold=name == selected) for m in CLASS_METRICS]
            for name in order
        ],
    )


def _fusion_blocks(metrics: Mapping) -> list[Block]:
    comparisons = metrics.get("fusion_vs_single") or []
    if not comparisons:
        return ["No fusion vs single-backbone comparison (one backbone, or no bootstrap)."]
    shown = ("quadratic_kappa", "macro_auroc", "accuracy", "macro_f1")
    return [
        "Fusion minus each single backbone with the same classifier on the test split (paired patient bootstrap; "
        "an interval excluding 0 is a difference at the 95% level).",
        Table(
            ["fusion", "single", *(f"Δ {LABELS[m]}" for m in shown)],
            [
                [Cell(row["fusion"], row["fusion"]), Cell(row["single"], row["single"])]
                + [value_cell(row[m]["delta"], signed_text(row[m]["delta"], row[m]["ci"])) for m in shown]
                for row in comparisons
            ],
        ),
    ]


def _cv_blocks(metrics: Mapping) -> list[Block]:
    selection = metrics.get("selection") or {}
    cv_scores = selection.get("cv_scores") or {}
    if not cv_scores:
        return ["No cross-validation scores recorded."]
    scoring = selection.get("scoring", "score")
    order = sorted(cv_scores, key=lambda name: -(cv_scores[name] if cv_scores[name] is not None else -np.inf))
    return [
        f"Scores the selection compared (mean over grouped CV folds of {LABELS.get(scoring, scoring)}).",
        Table(
            ["model", f"CV {scoring}"],
            [[model_cell(name, metrics.get("selected")), value_cell(cv_scores[name])] for name in order],
        ),
        "Out-of-fold predictions on the training split:",
        _metrics_table(metrics, metric_rows(metrics, "cv")),
    ]


def class_plots(metrics: Mapping, predictions: pd.DataFrame | None, save: Callable[[Any, str, str], None]) -> None:
    """The confusion-matrix heatmap and the per-class ROC curves of the selected model (`save(figure, name,
    caption)` writes each)."""
    selected, split = metrics.get("selected"), evaluation_split(metrics)
    row = metric_rows(metrics, split).get(selected)
    if row:
        save(confusion_figure(row, selected), "confusion", f"Confusion matrix of {selected} on the {split} split.")
    if predictions is not None and row:
        rows = predictions[(predictions["model"] == selected) & (predictions["split"] == split)]
        if len(rows):
            caption = f"One-vs-rest ROC curve of each class, {selected} on the {split} split."
            save(_class_roc_figure(rows, row, metrics["classes"], selected), "roc_per_class", caption)


def confusion_figure(row: Mapping, model: str):
    counts = np.asarray(row["confusion"], float)
    names = [entry["class"] for entry in row["per_class"]]
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = 3.0 + 0.7 * len(names)
    figure, axes = new_figure(size + 1.0, size)
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(counts):
        colour = "white" if normalised[i, j] > 0.5 else "black"
        axes.text(j, i, f"{int(value)}\n{normalised[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ticks = list(range(len(names)))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=f"{model}: counts, row share")
    axes.set_xticklabels(names, rotation=45, ha="right")
    axes.set_yticklabels(names)
    figure.colorbar(image, ax=axes, fraction=0.046)
    return figure


def _class_roc_figure(rows: pd.DataFrame, result: Mapping, classes: Sequence[str], model: str):
    """Each class's ROC curve from the predictions, labelled with its AUROC from metrics.json's `result` row."""
    from sklearn.metrics import roc_curve

    y, P = rows["y_true"].to_numpy(), rows[class_columns(len(classes))].to_numpy()
    figure, axes = new_figure(5.2, 5)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for k, name in enumerate(classes):
        truth = (y == k).astype(int)
        if 0 < truth.sum() < len(truth):
            fpr, tpr, _ = roc_curve(truth, P[:, k])
            auroc = format_metric(result["per_class"][k].get("auroc"))
            axes.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {auroc})")
    axes.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=f"{model}, one vs rest")
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize="small")
    return figure
