"""The multiclass task's stages after extract (K >= 3 classes, optionally ordinal): fit (select, refit, bundle),
evaluate and explain. The data, finetune and extract stages are the binary task's (`stages.prepare`)."""

from __future__ import annotations

import logging

from tlfusion.console import activity
from tlfusion.evaluation import class_fusion_vs_single, class_results, pick_class_cases
from tlfusion.metrics_schema import write_metrics
from tlfusion.runfiles import class_prediction_rows
from tlfusion.stages.binary import (
    _fit_rows,
    refitted_candidates,
    save_run_bundle,
    selected_test_rows,
    write_fit_outputs,
)
from tlfusion.stages.context import RunContext
from tlfusion.stages.leakage import seen_in_training, warn_if_test_seen
from tlfusion.stages.prepare import run_classes

log = logging.getLogger("tlfusion")


def run_class_fit(run: RunContext) -> None:
    """fit/selection.json, fit/predictions.csv (one probability column per class) and bundle/: every feature set x
    classifier as a fusion + classifier pipeline, cross-validated (grouped, stratified) on the training split by
    `classifiers.scoring`, refitted on all of it; the best CV score is selected and bundled."""
    from tlfusion.classifiers import select_class_model

    experiment, table, classes, is_fit = run.experiment, run.table, run_classes(run), _fit_rows(run.table)
    spec = experiment.classifiers

    def select(X, y, groups, label, fusion):
        settings = {"cv": spec.cv, "random_state": experiment.seed, "scoring": spec.scoring}
        return select_class_model(X, y, groups, spec.models, len(classes), label=label, fusion=fusion, **settings)

    rows, cv_scores, fitted = [], {}, {}
    for model_name, clf_name, keys, selection, estimator, X in refitted_candidates(run, select):
        cv_scores[model_name], fitted[model_name] = selection.scores[clf_name], (keys, estimator)
        rows.append(class_prediction_rows(table[is_fit], model_name, "cv", selection.oof_prob[clf_name]))
        rows.append(class_prediction_rows(table[~is_fit], model_name, "test", estimator.predict_proba(X[~is_fit])))
    selected = write_fit_outputs(run, rows, cv_scores, {"classes": classes, "ordinal": experiment.ordinal})
    save_run_bundle(run, selected, *fitted[selected], None, classes)


def run_class_evaluate(run: RunContext) -> None:
    """metrics.json: every model's CV and test metrics (test CIs by patient bootstrap, per class and, ordered
    classes, per cut point too), fusion vs single backbone (paired)."""
    from tlfusion.data.sources import summarise
    from tlfusion.reports import summary_lines

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


def run_class_explain(run: RunContext) -> None:
    """explanations/: Grad-CAM / LIME of the selected model's predicted class (and the true class where they
    differ) for test cases spread over the confusion cells, and a review page grouped by cell."""
    spec = run.experiment.explain
    if not spec.enabled or spec.cases == 0:
        log.info("explanations disabled")
        return
    from tlfusion.bundle import load_bundle
    from tlfusion.explain.classes import explain_class_cases

    selection, test, reference = selected_test_rows(run)
    cases = pick_class_cases(test, len(selection["classes"]), spec.cases)
    with activity(f"explaining {len(cases)} cases ({', '.join(spec.methods)})"):
        explain_class_cases(
            load_bundle(run.paths.bundle),
            cases["path"].tolist(),
            cases["y_true"].tolist(),
            run.paths.explanations,
            methods=tuple(spec.methods),
            lime_samples=spec.lime_samples,
            seed=run.experiment.seed,
            reference=reference,
            reference_label="images of the training split (train + val)",
        )
