"""The report's clinical checks: calibration (Brier, ECE before / after recalibration, reliability diagrams) and
metrics per subgroup, from metrics.json's `calibration` and `subgroups`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tlfusion.reports.plots import Plot
from tlfusion.reports.reading import METRIC_LABELS, PLOT_DPI, format_metric, interval_of, is_number
from tlfusion.reports.render import Block, Cell, Section, Table
from tlfusion.run.paths import PLOTS

RELIABILITY = f"{PLOTS}/reliability.png"
_SUBGROUP_METRICS = (*METRIC_LABELS, "brier", "ece")
_LABELS = {**METRIC_LABELS, "brier": "Brier", "ece": "ECE"}


def _number(row: Mapping, key: str, bold: bool = False) -> Cell:
    """A row's value with its interval, sorting by the value (undefined last)."""
    value = row.get(key)
    return Cell(format_metric(value, interval_of(row, key)), value if is_number(value) else None, bold)


def _by_model(rows: Sequence[Mapping]) -> dict[str, dict[str, Mapping]]:
    """Calibration rows as model -> stage ("before" / "after") -> row, in recorded order."""
    models: dict[str, dict[str, Mapping]] = {}
    for row in rows:
        models.setdefault(row["model"], {})[row["stage"]] = row
    return models


def clinical_sections(metrics: Mapping, plots: Sequence[Plot]) -> list[Section]:
    """The "Calibration" and "Subgroups" sections, where metrics.json has them."""
    sections: list[Section] = []
    record = metrics.get("calibration")
    if record and record.get("rows"):
        figure = [plot for plot in plots if plot.file == RELIABILITY]
        title = f"Calibration on the {record['rows'][0]['split']} split"
        sections.append((title, _calibration_blocks(metrics) + figure))
    if metrics.get("subgroups"):
        sections.append(("Subgroups", _subgroup_blocks(metrics)))
    return sections


def _calibration_blocks(metrics: Mapping) -> list[Block]:
    record, selected = metrics["calibration"], metrics.get("selected")
    method = record.get("method")
    models = _by_model(record["rows"])
    after = any("after" in stages for stages in models.values())
    intro = (
        f"Brier score (mean squared error of the probability) and expected calibration error (ECE: {record['binning']};"
        " the count-weighted mean gap between the observed fraction of positives and the mean probability), image "
        "level, lower is better; brackets: patient-bootstrap intervals (ECE is biased upward on few images, so its "
        "interval can lie above its value)."
    )
    if method:
        intro += (
            f" After: {method} recalibration fitted on each model's out-of-fold probabilities (the training split, "
            "never this one); its threshold is chosen again on them."
        )
    header = ["model", "n", "Brier", "ECE"] + (["Brier after", "ECE after", "threshold after"] if after else [])
    table = []
    for model, stages in models.items():
        first = stages.get("before") or stages["after"]
        cells = [Cell(f"{model} (selected)" if model == selected else model, model, model == selected)]
        cells += [Cell(str(first["n"]), first["n"]), _number(first, "brier"), _number(first, "ece")]
        if after:
            later = stages.get("after", {}) if "before" in stages else {}
            cells += [_number(later, "brier"), _number(later, "ece"), _number(later, "threshold")]
        table.append(cells)
    return [intro, Table(header, table)]


def _subgroup_blocks(metrics: Mapping) -> list[Block]:
    rows = metrics["subgroups"]
    header = ["column", "value", "n", "positives", *(_LABELS[key] for key in _SUBGROUP_METRICS)]
    table = [
        [Cell(row["column"], row["column"]), Cell(str(row["value"]), str(row["value"]))]
        + [Cell(str(row[key]), row[key]) for key in ("n", "positives")]
        + [_number(row, key) for key in _SUBGROUP_METRICS]
        for row in rows
    ]
    first = rows[0]
    intro = (
        f"{first['model']} on the {first['split']} split per subgroup (image level, its threshold "
        f"{format_metric(first['threshold'])}, probabilities as fitted); brackets: patient-bootstrap intervals."
    )
    warnings = [f"WARNING: {row['column']} = {row['value']}: {row['warning']}" for row in rows if row.get("warning")]
    return [intro, Table(header, table), *([warnings] if warnings else [])]


def reliability_figure(metrics: Mapping) -> tuple[Any, str] | None:
    """(figure, caption): one reliability diagram per model, before and (where recalibrated) after; None when
    metrics.json records no calibration."""
    record = metrics.get("calibration") or {}
    models = _by_model(record.get("rows") or [])
    if not models:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(4, len(models))
    rows = math.ceil(len(models) / columns)
    figure = Figure(figsize=(3 * columns, 3 * rows + 0.4), layout="constrained", dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, (model, stages) in zip(panels, models.items(), strict=False):
        _reliability_panel(axes, model, stages, model == metrics.get("selected"))
    for axes in panels[len(models) :]:
        axes.set_axis_off()
    caption = (
        f"Reliability diagrams on the {record['rows'][0]['split']} split ({record['binning']}): the observed "
        "fraction of positives against the mean probability per bin (marker area: images in the bin); the dotted "
        "diagonal is perfect calibration."
    )
    return figure, caption


def _reliability_panel(axes, model: str, stages: Mapping[str, Mapping], selected: bool) -> None:
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for stage, row in stages.items():
        bins = row["bins"]
        x, y = np.array([[b["mean_prob"], b["observed"]] for b in bins]).T if bins else ([], [])
        sizes = [12 + 80 * b["n"] / max(row["n"], 1) for b in bins]
        label = f"{stage}: ECE {format_metric(row['ece'])}"
        axes.plot(x, y, marker="", linewidth=1.2, label=label)
        axes.scatter(x, y, s=sizes, alpha=0.7)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean probability", ylabel="observed fraction")
    title = f"{model} (selected)" if selected else model
    axes.set_title(title, fontsize="small", fontweight="bold" if selected else "normal")
    axes.set_aspect("equal")
    axes.legend(loc="upper left", fontsize="x-small")
