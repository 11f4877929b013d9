"""The fit stage: every feature set x classifier cross-validated on the training split, refitted, the best bundled."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pandas as pd

from tlfusion.console import progress
from tlfusion.data.table import class_names
from tlfusion.fileio import write_atomic, write_json
from tlfusion.models.names import ModelName
from tlfusion.run.readers import class_prediction_rows, prediction_rows
from tlfusion.stages.context import RunContext, fit_rows, run_classes

log = logging.getLogger("tlfusion")


def make_fusion(run: RunContext, block_sizes: list[int]):
    """The experiment's (unfitted) feature fusion for blocks of these widths."""
    from tlfusion.features.fusion import FeatureFusion

    spec = run.experiment.features
    return FeatureFusion(block_sizes=block_sizes, standardize=spec.standardize, l2=spec.l2, pca=spec.pca)


def fit_binary(run: RunContext) -> None:
    """fit/selection.json, fit/predictions.csv and bundle/: every feature set x classifier, as a fusion + classifier
    pipeline, cross-validated on the training split (train + val; each fold fits its own fusion transform),
    refitted on all of it; the best CV score is selected and bundled."""
    from tlfusion.models.classifiers import select_model

    experiment, table, is_fit = run.experiment, run.table, fit_rows(run.table)
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
    from tlfusion.models.classifiers import build_model

    experiment, table, is_fit = run.experiment, run.table, fit_rows(run.table)
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


def save_run_bundle(
    run: RunContext,
    selected: str,
    keys: list[str],
    estimator,
    threshold: float | None,
    classes: list[str] | None = None,
) -> None:
    """bundle/: the selected model with its fine-tuned backbones (and the ONNX graphs extract converted), and the
    out-of-distribution check calibrated on the training split's features (`tlfusion.bundle.ood`). With `classes` (a
    multiclass run, `threshold` None) the bundle is K-class."""
    from tlfusion.backbones.registry import load_model_file
    from tlfusion.bundle.folder import save_bundle
    from tlfusion.bundle.model import Bundle
    from tlfusion.bundle.ood import fit_feature_distance

    experiment, is_fit = run.experiment, fit_rows(run.table)
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
    predictions (`evaluation.calibration.calibrated_model`); (None, `threshold`) without."""
    method = run.experiment.evaluate.calibration
    if method is None:
        return None, threshold
    from tlfusion.evaluation.calibration import calibrated_model

    calibrator, calibrated = calibrated_model(run.fit_outputs()[1], selected, method)
    log.info("bundle: %s recalibration of %s, threshold %.4g (was %.4g)", method, selected, calibrated, threshold)
    return calibrator, calibrated


def _converted_onnx_graphs(run: RunContext, keys: list[str]) -> dict[str, bytes]:
    """The ONNX graphs the extract stage converted (and checked) for these backbones, none where it ran Keras; a
    cached graph damaged since is converted again."""
    from tlfusion.features.onnx_graphs import cached_onnx_graph, onnx_cache_path
    from tlfusion.features.source import ModelSource

    sources = {key: ModelSource(run.paths.model(key)) for key in keys}
    cache = run.paths.cache
    return {
        key: cached_onnx_graph(source, cache)
        for key, source in sources.items()
        if onnx_cache_path(cache, source.key).exists()
    }


def fit_multiclass(run: RunContext) -> None:
    """fit/selection.json, fit/predictions.csv (one probability column per class) and bundle/: every feature set x
    classifier as a fusion + classifier pipeline, cross-validated (grouped, stratified) on the training split by
    `classifiers.scoring`, refitted on all of it; the best CV score is selected and bundled."""
    from tlfusion.models.classifiers import select_class_model

    experiment, table, classes, is_fit = run.experiment, run.table, run_classes(run), fit_rows(run.table)
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


def run_fit(run: RunContext) -> None:
    """fit/selection.json, fit/predictions.csv and bundle/: every feature set x classifier, as a fusion + classifier
    pipeline, cross-validated on the training split (train + val; each fold fits its own fusion transform),
    refitted on all of it; the best CV score is selected and bundled.

    Multiclass: the same, fit/predictions.csv with one probability column per class and the cross-validation
    grouped and stratified, by `classifiers.scoring`."""
    (fit_multiclass if run.experiment.task == "multiclass" else fit_binary)(run)
