"""The report's sections: data, selected model, metric tables, fusion vs single, CV, findings, timings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tlfusion.metrics import METRICS
from tlfusion.model_name import FUSION, ModelName
from tlfusion.reports.clinical import RELIABILITY, clinical_sections
from tlfusion.reports.plots import _Plot
from tlfusion.reports.reading import (
    GZSL_KEYS,
    METRIC_LABELS,
    MISSING,
    _cv_scores,
    _evaluation_split,
    _feature_sets_and_classifiers,
    _finding_models,
    _Headline,
    _headline,
    _headline_level,
    _is_interval,
    _is_multilabel,
    _is_number,
    _labelled,
    _levels,
    _metric_text,
    _ranked,
    _rows,
    _rows_by_finding,
    _selection_note,
    _sorted_by,
    format_metric,
)
from tlfusion.reports.render import _Block, _Cell, _Section, _Table

if TYPE_CHECKING:
    pass


def _sections(
    metrics: Mapping, plots: Sequence[_Plot], timings: Mapping[str, Any], gallery: str | None = None
) -> list[_Section]:
    split = _evaluation_split(metrics)
    sections: list[_Section] = [("Data", _data_blocks(metrics)), ("Selected model", _selected_blocks(metrics))]
    if gallery:
        sections.append(("Explanations", [_gallery_block(metrics, gallery)]))
    if _is_multilabel(metrics):
        sections += [
            (f"Mean AUROC on the {split} split", [_metrics_table(metrics, _headline(metrics).rows, ("auroc",))]),
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
            (f"Metrics on the {split} split, {level} level", [_metrics_table(metrics, _rows(metrics, split, level))])
            for level in _levels(metrics, split)
        ]
    sections += clinical_sections(metrics, plots)
    plots = [plot for plot in plots if plot.file != RELIABILITY]  # shown in the calibration section
    sections += [
        ("Single backbones vs fusion", _fusion_blocks(metrics)),
        ("Cross-validation on the training split", _cv_blocks(metrics)),
        ("Plots", list(plots) or ["No plots: no results to draw."]),
    ]
    if timings:
        sections.append(("Timings", _timing_blocks(timings)))
    return sections


def _gallery_block(metrics: Mapping, gallery: str) -> str:
    selected = metrics.get("selected") or MISSING
    if _is_multilabel(metrics):
        return f"Grad-CAM per finding for the top findings of {selected} on test cases: [{gallery}]({gallery})."
    return (
        f"Grad-CAM and LIME of {selected} on test cases from every outcome, for review: [{gallery}]({gallery}) "
        "(verdicts go in `review.csv` beside it)."
    )


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
        ["finding", "positives", *(f"{m} (selected)" if m == metrics.get("selected") else m for m in models)],
        [
            [
                _Cell(finding, finding),
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


def _versus_bce_blocks(metrics: Mapping) -> list[_Block]:
    rows = [
        [_Cell(f"{loss} − bce", loss), _value_cell(delta.get("delta"), _signed(delta.get("delta"), delta.get("ci")))]
        for loss, delta in metrics["vs_bce"].items()
    ]
    note = (
        "Test mean AUROC of each metric loss minus BCE's, both semantic-prototype models on the same fused features, "
        "with a paired patient-bootstrap 95% interval (both on the same resamples): an interval that contains 0 is "
        "no evidence either way."
    )
    return [note, _Table(["loss", "Δ mean AUROC [95% CI]"], rows)]


def _gzsl_blocks(metrics: Mapping) -> list[_Block]:
    gzsl, intervals = metrics["gzsl"], metrics.get("gzsl_ci") or {}
    order = _sorted_by(gzsl, "h")
    table = _Table(
        ["model", *GZSL_KEYS.values()],
        [
            [_model_cell(name, metrics.get("selected"))]
            + [_metric_cell({**gzsl[name], "ci": intervals.get(name, {})}, key) for key in GZSL_KEYS]
            for name in order
        ],
    )
    unseen = ", ".join(metrics.get("unseen") or [])
    return [f"Trained on the seen findings only; unseen: {unseen}. Patient-bootstrap 95% intervals.", table]


def _finetune_blocks(metrics: Mapping) -> list[_Block]:
    choices = metrics["finetune"]
    losses = list(dict.fromkeys(loss for choice in choices.values() for loss in choice.get("val_auc", {})))
    rows = [
        [_Cell(key, key), _Cell(choice.get("chosen", MISSING), choice.get("chosen"), bold=True)]
        + [_value_cell(choice.get("val_auc", {}).get(loss)) for loss in losses]
        for key, choice in choices.items()
    ]
    note = "Each backbone's sigmoid head was fine-tuned with each loss; the best validation mean AUROC was kept."
    return [note, _Table(["backbone", "chosen", *(f"val AUROC {loss}" for loss in losses)], rows)]


def _timing_blocks(timings: Mapping[str, Any]) -> list[_Block]:
    total = sum(seconds for seconds in timings.values() if _is_number(seconds))
    rows = [
        [_Cell(stage, stage), _value_cell(seconds, format_metric(seconds, digits=1))]
        for stage, seconds in timings.items()
    ]
    return [f"Recorded stage times: {format_metric(total, digits=1)} s in all.", _Table(["stage", "seconds"], rows)]
