"""The evaluate stage: every model's CV and test metrics with intervals, fusion vs single, into metrics.json."""

from __future__ import annotations

import logging

from tlfusion.evaluation.results import (
    class_fusion_vs_single,
    class_results,
    clinical_checks,
    evaluate_predictions,
    fusion_vs_single,
)
from tlfusion.evaluation.schema import write_metrics
from tlfusion.stages.context import RunContext
from tlfusion.stages.leakage import seen_in_training, warn_if_test_seen

log = logging.getLogger("tlfusion")


def evaluate_binary(run: RunContext) -> None:
    """metrics.json: every model's CV and test metrics (test CIs by patient bootstrap), fusion vs single."""
    from tlfusion.data.sources import summarise
    from tlfusion.reports.report import summary_lines

    experiment, table = run.experiment, run.table
    selection, predictions = run.fit_outputs()
    spec, thresholds, seed = experiment.evaluate, selection["thresholds"], experiment.seed
    seen = seen_in_training(experiment, table[table["split"] == "test"])
    metrics = {
        "experiment": experiment.name,
        "task": "binary",
        "positive_class": experiment.positive_class,
        "selected": selection["selected"],
        "selection": {k: selection[k] for k in ("scoring", "cv", "cv_scores")},
        "results": evaluate_predictions(
            predictions, thresholds, spec.study_aggregation, spec.bootstrap, experiment.seed
        ),
        "fusion_vs_single": fusion_vs_single(predictions, thresholds, spec.study_aggregation, spec.bootstrap, seed),
        "data": summarise(table),
        "test_images_seen_in_pretraining": seen,
    }
    warn_if_test_seen(seen)
    selected = selection["selected"]
    metrics |= clinical_checks(predictions, table, spec, selected, thresholds[selected], seed)
    write_metrics(run.paths.metrics, metrics)
    for line in summary_lines(metrics):
        log.info(line)


def evaluate_multiclass(run: RunContext) -> None:
    """metrics.json: every model's CV and test metrics (test CIs by patient bootstrap, per class and, ordered
    classes, per cut point too), fusion vs single backbone (paired)."""
    from tlfusion.data.sources import summarise
    from tlfusion.reports.report import summary_lines

    experiment, table = run.experiment, run.table
    selection, predictions = run.fit_outputs()
    classes, n_boot, seed = selection["classes"], experiment.evaluate.bootstrap, experiment.seed
    seen = seen_in_training(experiment, table[table["split"] == "test"])
    metrics = {
        "experiment": experiment.name,
        "task": "multiclass",
        "classes": classes,
        "ordinal": experiment.ordinal,
        "selected": selection["selected"],
        "selection": {key: selection[key] for key in ("scoring", "cv", "cv_scores")},
        "results": class_results(predictions, classes, n_boot, seed, experiment.ordinal),
        "fusion_vs_single": class_fusion_vs_single(predictions, len(classes), n_boot, seed),
        "data": summarise(table),
        "test_images_seen_in_pretraining": seen,
    }
    warn_if_test_seen(seen)
    write_metrics(run.paths.metrics, metrics)
    for line in summary_lines(metrics):
        log.info(line)


def run_evaluate(run: RunContext) -> None:
    """metrics.json: every model's CV and test metrics (test CIs by patient bootstrap), fusion vs single.

    Multiclass: metrics.json: every model's CV and test metrics (test CIs by patient bootstrap, per class and, ordered
    classes, per cut point too), fusion vs single backbone (paired)."""
    (evaluate_multiclass if run.experiment.task == "multiclass" else evaluate_binary)(run)
