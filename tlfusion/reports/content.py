"""The report's sections: data, selected model, metric tables, fusion vs single, CV, findings, timings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tlfusion.evaluation.metrics import METRICS
from tlfusion.models.names import FUSION, ModelName
from tlfusion.reports.clinical import RELIABILITY, clinical_sections
from tlfusion.reports.plots import Plot
from tlfusion.reports.reading import (
    GZSL_KEYS,
    METRIC_LABELS,
    MISSING,
    Headline,
    cv_scores_of,
    evaluation_split,
    feature_sets_and_classifiers,
    finding_models,
    format_metric,
    headline_level,
    headline_of,
    is_interval,
    is_multilabel,
    is_number,
    labelled_model,
    metric_levels,
    metric_rows,
    metric_text,
    ranked_by_cv,
    rows_by_finding,
    selection_note,
    sorted_by,
)
from tlfusion.reports.render import Block, Cell, Section, Table

if TYPE_CHECKING:
    pass


def report_sections(
    metrics: Mapping, plots: Sequence[Plot], timings: Mapping[str, Any], gallery: str | None = None
) -> list[Section]:
    split = evaluation_split(metrics)
    sections: list[Section] = [("Data", data_blocks(metrics)), ("Selected model", _selected_blocks(metrics))]
    if gallery:
        sections.append(("Explanations", [_gallery_block(metrics, gallery)]))
    if is_multilabel(metrics):
        sections += [
            (f"Mean AUROC on the {split} split", [_metrics_table(metrics, headline_of(metrics).rows, ("auroc",))]),
            (f"AUROC per finding on the {split} split", _finding_blocks(metrics)),
        ]
        if metrics.get("vs_bce"):
            sections.append(("Metric losses vs BCE on the same features", _versus_bce_blocks(metrics)))
        if metrics.get("gzsl"):
            sections.append(("Generalised zero-shot (seen / unseen findings)", _gzsl_blocks(metrics)))
        if metrics.get("finetune"):
            sections.append(("Multi-label fine-tuning loss", _finetune_blocks(metrics)))
    else:
        sections += [
            (
                f"Metrics on the {split} split, {level} level",
                [_metrics_table(metrics, metric_rows(metrics, split, level))],
            )
            for level in metric_levels(metrics, split)
        ]
    sections += clinical_sections(metrics, plots)
    plots = [plot for plot in plots if plot.file != RELIABILITY]  # shown in the calibration section
    sections += [
        ("Single backbones vs fusion", _fusion_blocks(metrics)),
        ("Cross-validation on the training split", _cv_blocks(metrics)),
        ("Plots", list(plots) or ["No plots: no results to draw."]),
    ]
    if timings:
        sections.append(("Timings", timing_blocks(timings)))
    return sections


def _gallery_block(metrics: Mapping, gallery: str) -> str:
    selected = metrics.get("selected") or MISSING
    if is_multilabel(metrics):
        return f"Grad-CAM per finding for the top findings of {selected} on test cases: [{gallery}]({gallery})."
    return (
        f"Grad-CAM and LIME of {selected} on test cases from every outcome, for review: [{gallery}]({gallery}) "
        "(verdicts go in `review.csv` beside it)."
    )


def model_cell(name: str, selected: str | None) -> Cell:
    chosen = name == selected
    return Cell(f"{name} (selected)" if chosen else name, name, bold=chosen)


def value_cell(value: Any, text: str | None = None, bold: bool = False) -> Cell:
    """A number (``format_metric`` unless ``text`` is given) that sorts numerically; undefined sorts last."""
    return Cell(format_metric(value) if text is None else text, value if is_number(value) else None, bold)


def metric_cell(row: Mapping, metric: str, bold: bool = False) -> Cell:
    return value_cell(row.get(metric), metric_text(row, metric), bold)


def _count_cell(count: Any) -> Cell:
    return value_cell(count, str(count) if is_number(count) else MISSING)


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


def data_blocks(metrics: Mapping) -> list[Block]:
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


def _selected_blocks(metrics: Mapping) -> list[Block]:
    selected = metrics.get("selected")
    if not selected:
        return ["No model was selected."]
    selection = metrics.get("selection")
    if selection:
        why = (
            f"**{selected}** was chosen by its {selection_note(metrics)}; the test split played no part in the choice."
        )
    else:
        why = f"**{selected}** is the model evaluated here (no selection record in metrics.json)."
    split = evaluation_split(metrics)
    if is_multilabel(metrics):
        row = metric_rows(metrics, split, finding="mean").get(selected, {})
        facts = [f"{split} mean AUROC over findings: {metric_text(row, 'auroc')}"]
        gzsl = (metrics.get("gzsl") or {}).get(selected)
        if gzsl:
            facts += [f"GZSL {label}: {format_metric(gzsl.get(key))}" for key, label in GZSL_KEYS.items()]
        return [why, facts]
    level = headline_level(metrics, split)
    row = metric_rows(metrics, split, level).get(selected, {})
    facts = [
        f"{split} split, {level} level, n={row.get('n', MISSING)}, threshold {format_metric(row.get('threshold'))}"
    ]
    blocks: list[Block] = [why, facts + [labelled_model(row, metric) for metric in METRICS]]
    confusion = row.get("confusion")
    if confusion:
        names = ("negative", "positive")
        blocks.append(
            Table(
                ["true \\ predicted", *names],
                [
                    [Cell(f"true {name}", name)] + [Cell(str(n), n) for n in counts]
                    for name, counts in zip(names, confusion, strict=True)
                ],
            )
        )
    return blocks


def _metrics_table(metrics: Mapping, rows: Mapping[str, Mapping], columns: Sequence[str] = METRICS) -> Table:
    """One row per model, best headline metric first, CIs in brackets; the selected model in bold."""
    selected = metrics.get("selected")
    extra = [] if is_multilabel(metrics) else ["threshold"]
    order = sorted_by(rows, headline_of(metrics).metric)
    return Table(
        ["model", "n", *(METRIC_LABELS[column] for column in columns), *extra],
        [
            [model_cell(name, selected), _count_cell(rows[name].get("n"))]
            + [metric_cell(rows[name], column) for column in (*columns, *extra)]
            for name in order
        ],
    )


def _best_cells(rows: Sequence[Mapping], metric: str) -> list[Cell]:
    """One cell per row with the highest defined ``metric`` in bold (every tied cell)."""
    best = max((row.get(metric) for row in rows if is_number(row.get(metric))), default=None)
    return [metric_cell(row, metric, bold=best is not None and row.get(metric) == best) for row in rows]


def _fusion_blocks(metrics: Mapping) -> list[Block]:
    """Rows = classifier, columns = each single backbone and fusion: does fusing the features help?"""
    headline = headline_of(metrics)
    feature_sets, classifiers = feature_sets_and_classifiers(list(headline.rows))
    singles = [fs for fs in feature_sets if fs != FUSION]
    if not singles or FUSION not in feature_sets:
        return ["Needs at least one single-backbone model and one fusion model on the same split."]
    paired = _paired_gains(metrics, headline)
    cv_scores = cv_scores_of(metrics)
    table = Table(["classifier", *feature_sets, "fusion − single chosen on CV"], [])
    for classifier in classifiers:
        rows = [headline.rows.get(str(ModelName(fs, classifier)), {}) for fs in feature_sets]
        chosen = _cv_chosen_single(cv_scores, singles, classifier)
        single_value = headline.rows.get(chosen, {}).get(headline.metric) if chosen else None
        fused = rows[-1].get(headline.metric)
        gain = fused - single_value if is_number(single_value) and is_number(fused) else None
        label = signed_text(gain, paired.get((classifier, chosen)))
        gain_cell = value_cell(gain, f"{label} vs {ModelName.parse(chosen).feature_set}" if is_number(gain) else label)
        table.rows.append([Cell(classifier, classifier), *_best_cells(rows, headline.metric), gain_cell])
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
    ranked = [name for name in ranked_by_cv(scored) if is_number(scored[name])]
    return ranked[0] if ranked else None


def signed_text(value: Any, ci: Sequence | None = None) -> str:
    """``+0.042 [-0.010, +0.093]``: a difference, signed, with its interval when there is one."""
    if not is_number(value):
        return MISSING
    return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if is_interval(ci) else "")


def _paired_gains(metrics: Mapping, headline: Headline) -> dict[tuple[str, str], Sequence]:
    """(classifier, single model) -> the paired CI of fusion minus that model on the headline metric and level."""
    level = headline_level(metrics, evaluation_split(metrics))
    return {
        (row["classifier"], row["single"]): row[headline.metric]["ci"]
        for row in metrics.get("fusion_vs_single") or []
        if row["level"] == level and headline.metric in row and row[headline.metric]["ci"]
    }


def _cv_blocks(metrics: Mapping) -> list[Block]:
    selection = metrics.get("selection") or {}
    cv_scores = cv_scores_of(metrics)
    blocks: list[Block] = []
    if cv_scores:
        headline = headline_of(metrics)
        scoring = selection.get("scoring", "score")
        order = ranked_by_cv(cv_scores)
        blocks += [
            f"Scores the selection compared (CV {scoring}; the {headline.label} is shown beside it, not used).",
            Table(
                ["model", f"CV {scoring}", headline.label],
                [
                    [
                        model_cell(name, metrics.get("selected")),
                        value_cell(cv_scores[name]),
                        metric_cell(headline.rows.get(name, {}), headline.metric),
                    ]
                    for name in order
                ],
            ),
        ]
    if any(row["split"] == "cv" for row in metrics["results"]):
        level = headline_level(metrics, "cv")
        blocks += [
            f"Out-of-fold predictions on the training split, {level} level:",
            _metrics_table(metrics, metric_rows(metrics, "cv", level)),
        ]
    return blocks or ["No cross-validation scores recorded."]


def _finding_blocks(metrics: Mapping) -> list[Block]:
    findings = rows_by_finding(metrics)
    models = finding_models(metrics)
    table = Table(
        ["finding", "positives", *(f"{m} (selected)" if m == metrics.get("selected") else m for m in models)],
        [
            [
                Cell(finding, finding),
                _count_cell(next((row.get("positives") for row in rows.values()), None)),
                *_best_cells([rows.get(m, {}) for m in models], "auroc"),
            ]
            for finding, rows in findings.items()
        ],
    )
    note = (
        "AUROC of each model per finding with its patient-bootstrap 95% interval; the best of each row is in bold. "
        "Positives: test images with the finding (mean row: with any finding); few positives, wide intervals."
    )
    return [note, table]


def _versus_bce_blocks(metrics: Mapping) -> list[Block]:
    rows = [
        [Cell(f"{loss} − bce", loss), value_cell(delta.get("delta"), signed_text(delta.get("delta"), delta.get("ci")))]
        for loss, delta in metrics["vs_bce"].items()
    ]
    note = (
        "Test mean AUROC of each metric loss minus BCE's, both semantic-prototype models on the same fused features, "
        "with a paired patient-bootstrap 95% interval (both on the same resamples): an interval that contains 0 is "
        "no evidence either way."
    )
    return [note, Table(["loss", "Δ mean AUROC [95% CI]"], rows)]


def _gzsl_blocks(metrics: Mapping) -> list[Block]:
    gzsl, intervals = metrics["gzsl"], metrics.get("gzsl_ci") or {}
    order = sorted_by(gzsl, "h")
    table = Table(
        ["model", *GZSL_KEYS.values()],
        [
            [model_cell(name, metrics.get("selected"))]
            + [metric_cell({**gzsl[name], "ci": intervals.get(name, {})}, key) for key in GZSL_KEYS]
            for name in order
        ],
    )
    unseen = ", ".join(metrics.get("unseen") or [])
    return [f"Trained on the seen findings only; unseen: {unseen}. Patient-bootstrap 95% intervals.", table]


def _finetune_blocks(metrics: Mapping) -> list[Block]:
    choices = metrics["finetune"]
    losses = list(dict.fromkeys(loss for choice in choices.values() for loss in choice.get("val_auc", {})))
    rows = [
        [Cell(key, key), Cell(choice.get("chosen", MISSING), choice.get("chosen"), bold=True)]
        + [value_cell(choice.get("val_auc", {}).get(loss)) for loss in losses]
        for key, choice in choices.items()
    ]
    note = "Each backbone's sigmoid head was fine-tuned with each loss; the best validation mean AUROC was kept."
    return [note, Table(["backbone", "chosen", *(f"val AUROC {loss}" for loss in losses)], rows)]


def timing_blocks(timings: Mapping[str, Any]) -> list[Block]:
    total = sum(seconds for seconds in timings.values() if is_number(seconds))
    rows = [
        [Cell(stage, stage), value_cell(seconds, format_metric(seconds, digits=1))]
        for stage, seconds in timings.items()
    ]
    return [f"Recorded stage times: {format_metric(total, digits=1)} s in all.", Table(["stage", "seconds"], rows)]
