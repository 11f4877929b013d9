"""The binary task's stages after extract: fit (select, refit, bundle), evaluate and explain."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd

from tlfusion.console import activity, progress
from tlfusion.data.table import class_names
from tlfusion.evaluation import clinical_checks, evaluate_predictions, fusion_vs_single, pick_cases
from tlfusion.fileio import write_atomic, write_json
from tlfusion.metrics_schema import write_metrics
from tlfusion.model_name import ModelName
from tlfusion.runfiles import prediction_rows
from tlfusion.stages.context import RunContext
from tlfusion.stages.leakage import seen_in_training, warn_if_test_seen

log = logging.getLogger("tlfusion")


def make_fusion(run: RunContext, block_sizes: list[int]):
    """The experiment's (unfitted) feature fusion for blocks of these widths."""
    from tlfusion.features import FeatureFusion

    spec = run.experiment.features
    return FeatureFusion(block_sizes=block_sizes, standardize=spec.standardize, l2=spec.l2, pca=spec.pca)


def run_fit(run: RunContext) -> None:
    """fit/selection.json, fit/predictions.csv and bundle/: every feature set x classifier, as a fusion + classifier
    pipeline, cross-validated on the training split (train + val; each fold fits its own fusion transform),
    refitted on all of it; the best CV score is selected and bundled."""
    from tlfusion.classifiers import select_model

    experiment, table, is_fit = run.experiment, run.table, _fit_rows(run.table)
    spec = experiment.classifiers

    def select(X, y, groups, label, fusion):
        settings = {"cv": spec.cv, "random_state": experiment.seed, "scoring": spec.scoring}
        return select_model(X, y, groups, spec.models, label=label, fusion=fusion, **settings)

    rows, cv_scores, thresholds, fitted = [], {}, {}, {}
    for model_name, clf_name, keys, selection, estimator, X in refitted_candidates(run, select):
        cv_scores[model_name] = selection.scores[clf_name]
        thresholds[model_name] = selection.thresholds[clf_name]
        fitted[model_name] = (keys, estimator)
        rows.append(prediction_rows(table[is_fit], model_name, "cv", selection.oof_prob[clf_name]))
        rows.append(prediction_rows(table[~is_fit], model_name, "test", estimator.predict_proba(X[~is_fit])[:, 1]))
    selected = write_fit_outputs(run, rows, cv_scores, {"thresholds": thresholds})
    save_run_bundle(run, selected, *fitted[selected], thresholds[selected])


def refitted_candidates(run: RunContext, select: Callable) -> Iterator[tuple]:
    """For each feature set: `select(X, y, groups, label, fusion)` on the training split's rows (the CV selection),
    then each classifier refitted on all of them; yields (model name, classifier name, backbone keys, selection,
    refitted estimator, the feature set's features of every row)."""
    from tlfusion.classifiers import build_model

    experiment, table, is_fit = run.experiment, run.table, _fit_rows(run.table)
    y, groups = table["y"].to_numpy(), table["patient"].astype(str).to_numpy()
    for set_name, keys in progress(list(run.feature_sets().items()), "selecting models on", lambda item: item[0]):
        X, block_sizes = run.load_features(keys)
        fusion = make_fusion(run, block_sizes)
        selection = select(X[is_fit], y[is_fit], groups[is_fit], set_name, fusion)
        for clf_name in experiment.classifiers.models:
            estimator = build_model(clf_name, experiment.seed, selection.params[clf_name], fusion)
            estimator.fit(X[is_fit], y[is_fit])
            yield str(ModelName(set_name, clf_name)), clf_name, keys, selection, estimator, X


def write_fit_outputs(run: RunContext, rows: list[pd.DataFrame], cv_scores: dict[str, float], extra: dict) -> str:
    """fit/predictions.csv and fit/selection.json (`extra` after the CV scores); returns the selected model: the
    best CV score, fusion first on ties."""
    spec = run.experiment.classifiers
    selected = max(cv_scores, key=lambda name: (cv_scores[name], ModelName.parse(name).is_fusion))
    predictions = pd.concat(rows, ignore_index=True)
    write_atomic(run.paths.predictions, lambda temp: predictions.to_csv(temp, index=False))
    record = {"selected": selected, "scoring": spec.scoring, "cv": spec.cv}
    write_json(run.paths.selection, record | {"cv_scores": cv_scores} | extra)
    log.info("selected %s (CV %s %.3f on the training split)", selected, spec.scoring, cv_scores[selected])
    return selected


def _fit_rows(table: pd.DataFrame) -> np.ndarray:
    """The training split's rows (train + val): what models are cross-validated and fitted on."""
    return table["split"].isin(["train", "val"]).to_numpy()


def save_run_bundle(
    run: RunContext,
    selected: str,
    keys: list[str],
    estimator,
    threshold: float | None,
    classes: list[str] | None = None,
) -> None:
    """bundle/: the selected model with its fine-tuned backbones (and the ONNX graphs extract converted), and the
    out-of-distribution check calibrated on the training split's features (`tlfusion.ood`). With `classes` (a
    multiclass run, `threshold` None) the bundle is K-class."""
    from tlfusion.backbones import load_model_file
    from tlfusion.bundle import Bundle, save_bundle
    from tlfusion.ood import fit_feature_distance

    experiment, is_fit = run.experiment, _fit_rows(run.table)
    X, _ = run.load_features(keys)
    ood = fit_feature_distance(X[is_fit], run.table["patient"].astype(str).to_numpy()[is_fit])
    if ood is None:
        log.info("bundle: too few training images for an out-of-distribution check; predict will not flag images")
    calibrator, threshold = _bundle_calibration(run, selected, threshold)
    bundle = Bundle(
        models={key: load_model_file(run.paths.model(key)) for key in keys},
        estimator=estimator,
        threshold=None if threshold is None else float(threshold),
        class_names=classes or class_names(run.table["label"], experiment.positive_class),
        ordinal=experiment.ordinal,
        image_size=experiment.image.size,
        clahe=experiment.image.clahe,
        flip=experiment.features.flip,
        meta={
            "experiment": experiment.name,
            "model": selected,
            "data_fingerprint": run.data_fingerprint(),
            "config": experiment.model_dump(),
        },
        onnx_graphs=_converted_onnx_graphs(run, keys),
        ood=ood,
        calibration=calibrator,
    )
    save_bundle(bundle, run.paths.bundle)


def _bundle_calibration(run: RunContext, selected: str, threshold: float):
    """(the selected model's calibrator, its threshold) with `evaluate.calibration`, fitted on its out-of-fold
    predictions (`calibration.calibrated_model`); (None, `threshold`) without."""
    method = run.experiment.evaluate.calibration
    if method is None:
        return None, threshold
    from tlfusion.calibration import calibrated_model

    calibrator, calibrated = calibrated_model(run.fit_outputs()[1], selected, method)
    log.info("bundle: %s recalibration of %s, threshold %.4g (was %.4g)", method, selected, calibrated, threshold)
    return calibrator, calibrated


def _converted_onnx_graphs(run: RunContext, keys: list[str]) -> dict[str, bytes]:
    """The ONNX graphs the extract stage converted (and checked) for these backbones, none where it ran Keras; a
    cached graph damaged since is converted again."""
    from tlfusion.feature_runners import ModelSource
    from tlfusion.onnx_graphs import cached_onnx_graph, onnx_cache_path

    sources = {key: ModelSource(run.paths.model(key)) for key in keys}
    cache = run.paths.cache
    return {
        key: cached_onnx_graph(source, cache)
        for key, source in sources.items()
        if onnx_cache_path(cache, source.key).exists()
    }


def run_evaluate(run: RunContext) -> None:
    """metrics.json: every model's CV and test metrics (test CIs by patient bootstrap), fusion vs single."""
    from tlfusion.data.sources import summarise
    from tlfusion.reports import summary_lines

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


def run_explain(run: RunContext) -> None:
    """explanations/: Grad-CAM / LIME of test cases from every outcome (TP, TN, FP, FN where present) of the
    selected model, and a review page; a non-linear classifier's surrogate is fitted on the training split."""
    spec = run.experiment.explain
    if not spec.enabled or spec.cases == 0:
        log.info("explanations disabled")
        return
    from tlfusion.bundle import load_bundle
    from tlfusion.explain import explain_cases

    selection, test, reference = selected_test_rows(run)
    cases = pick_cases(test, selection["thresholds"][selection["selected"]], spec.cases)
    with activity(f"explaining {len(cases)} cases ({', '.join(spec.methods)})"):
        explain_cases(
            load_bundle(run.paths.bundle),
            cases["path"].tolist(),
            cases["y_true"].tolist(),
            run.paths.explanations,
            methods=tuple(spec.methods),
            lime_samples=spec.lime_samples,
            seed=run.experiment.seed,
            clahe=run.experiment.image.clahe,
            reference=reference,
            reference_label="images of the training split (train + val)",
        )


def selected_test_rows(run: RunContext) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """What explain works from: the fit selection, the selected model's test predictions and its feature set's
    features of the training split (a surrogate's reference rows)."""
    selection, predictions = run.fit_outputs()
    selected = selection["selected"]
    test = predictions[(predictions["model"] == selected) & (predictions["split"] == "test")]
    X, _ = run.load_features(run.feature_sets()[ModelName.parse(selected).feature_set])
    return selection, test, X[_fit_rows(run.table)]
