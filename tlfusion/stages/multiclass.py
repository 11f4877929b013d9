"""The multiclass task's stages after extract (K >= 3 classes, optionally ordinal): fit (select, refit, bundle),
evaluate and explain. The data, finetune and extract stages are the binary task's (`stages.prepare`)."""

from __future__ import annotations

import logging

import pandas as pd

from tlfusion.console import activity, progress
from tlfusion.evaluation import class_fusion_vs_single, class_results, pick_class_cases
from tlfusion.fileio import write_atomic, write_json
from tlfusion.metrics_schema import write_metrics
from tlfusion.model_name import ModelName
from tlfusion.runfiles import class_prediction_rows
from tlfusion.stages.binary import _fit_rows, make_fusion, save_run_bundle
from tlfusion.stages.context import RunContext
from tlfusion.stages.leakage import seen_in_training, warn_if_test_seen
from tlfusion.stages.prepare import run_classes

log = logging.getLogger("tlfusion")


def run_class_fit(run: RunContext) -> None:
    """fit/selection.json, fit/predictions.csv (one probability column per class) and bundle/: every feature set x
    classifier as a fusion + classifier pipeline, cross-validated (grouped, stratified) on the training split by
    `classifiers.scoring`, refitted on all of it; the best CV score is selected and bundled."""
    from tlfusion.classifiers import build_model, select_class_model

    experiment, table, classes = run.experiment, run.table, run_classes(run)
    spec = experiment.classifiers
    is_fit = _fit_rows(table)
    y, groups = table["y"].to_numpy(), table["patient"].astype(str).to_numpy()
    rows, cv_scores, fitted = [], {}, {}
    for set_name, keys in progress(list(run.feature_sets().items()), "selecting models on", lambda item: item[0]):
        X, block_sizes = run.load_features(keys)
        fusion = make_fusion(run, block_sizes)
        selection = select_class_model(
            X[is_fit],
            y[is_fit],
            groups[is_fit],
            spec.models,
            len(classes),
            cv=spec.cv,
            random_state=experiment.seed,
            scoring=spec.scoring,
            label=set_name,
            fusion=fusion,
        )
        for clf_name in spec.models:
            model_name = str(ModelName(set_name, clf_name))
            estimator = build_model(clf_name, experiment.seed, selection.params[clf_name], fusion)
            estimator.fit(X[is_fit], y[is_fit])
            cv_scores[model_name], fitted[model_name] = selection.scores[clf_name], (keys, estimator)
            rows.append(class_prediction_rows(table[is_fit], model_name, "cv", selection.oof_prob[clf_name]))
            rows.append(class_prediction_rows(table[~is_fit], model_name, "test", estimator.predict_proba(X[~is_fit])))
    selected = max(cv_scores, key=lambda name: (cv_scores[name], ModelName.parse(name).is_fusion))
    predictions = pd.concat(rows, ignore_index=True)
    write_atomic(run.paths.predictions, lambda temp: predictions.to_csv(temp, index=False))
    record = {"selected": selected, "scoring": spec.scoring, "cv": spec.cv, "cv_scores": cv_scores}
    write_json(run.paths.selection, record | {"classes": classes, "ordinal": experiment.ordinal})
    log.info("selected %s (CV %s %.3f on the training split)", selected, spec.scoring, cv_scores[selected])
    save_run_bundle(run, selected, *fitted[selected], None, classes)


def run_class_evaluate(run: RunContext) -> None:
    """metrics.json: every model's CV and test metrics (test CIs by patient bootstrap, per class too), fusion vs
    single backbone (paired)."""
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
        "results": class_results(predictions, classes, n_boot, seed),
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

    selection, predictions = run.fit_outputs()
    selected = selection["selected"]
    test = predictions[(predictions["model"] == selected) & (predictions["split"] == "test")]
    cases = pick_class_cases(test, len(selection["classes"]), spec.cases)
    X, _ = run.load_features(run.feature_sets()[ModelName.parse(selected).feature_set])
    with activity(f"explaining {len(cases)} cases ({', '.join(spec.methods)})"):
        explain_class_cases(
            load_bundle(run.paths.bundle),
            cases["path"].tolist(),
            cases["y_true"].tolist(),
            run.paths.explanations,
            methods=tuple(spec.methods),
            lime_samples=spec.lime_samples,
            seed=run.experiment.seed,
            reference=X[_fit_rows(run.table)],
            reference_label="images of the training split (train + val)",
        )
