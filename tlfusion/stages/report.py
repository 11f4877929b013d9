"""The report stage that ends binary and multi-label runs."""

from __future__ import annotations

from tlfusion.evaluation.schema import read_metrics
from tlfusion.run.readers import read_json_object
from tlfusion.stages.context import RunContext


def run_report(run: RunContext) -> None:
    """report.md, report.html, plots/: from metrics.json, the fit predictions (binary) and the stage timings."""
    from tlfusion.reports.report import write_reports

    metrics = read_metrics(run.paths.metrics)
    predictions = run.fit_outputs()[1] if run.paths.predictions.exists() else None
    timings = read_json_object(run.paths.timings) if run.paths.timings.is_file() else {}
    write_reports(run.paths.root, metrics, predictions, timings)
