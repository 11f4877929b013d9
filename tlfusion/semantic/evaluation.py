"""The multi-label run's evaluation: each semantic loss fitted on the training rows and the selected one chosen on
the validation rows; test AUROC per finding with patient-bootstrap CIs and support counts, every metric loss
against BCE on the same features (paired patient bootstrap), and GZSL seen / unseen / H with intervals.

Every interval comes from `tlfusion.evaluation.metrics`' patient bootstrap: the same seed draws the same patient
resamples for every model, so the intervals of one run are comparable and the differences paired.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tlfusion.errors import InputError
from tlfusion.evaluation import multilabel_metrics

if TYPE_CHECKING:
    from tlfusion.config.experiment import Experiment


def semantic_metrics(
    experiment: Experiment, X: np.ndarray, Y: np.ndarray, table: pd.DataFrame, findings: list[str]
) -> tuple[dict, dict[str, np.ndarray]]:
    """metrics.json's multi-label document, and each loss's test scores (logits [test images, findings])."""
    from tlfusion.semantic.label_embeddings import load_label_vectors

    spec = experiment.semantic
    vectors = dict(zip(findings, load_label_vectors(spec.label_vectors, findings), strict=True))
    unknown = sorted(set(spec.unseen) - set(findings))
    if unknown:
        raise InputError(f"semantic.unseen: unknown finding(s) {unknown}")
    seen = [name for name in findings if name not in spec.unseen]
    parts = {part: table["split"].to_numpy() == part for part in ("train", "val", "test")}
    for part, rows in parts.items():
        if not rows.any():
            raise InputError(f"split: a multi-label experiment needs '{part}' rows (train: fit, val: choose, test)")
    patients = table["patient"].astype(str).to_numpy()[parts["test"]]
    val_scores, test_scores = {}, {}
    for loss in spec.losses:
        model = _classifier(experiment, loss).fit(X[parts["train"]], Y[parts["train"]], vectors, seen=findings)
        val_scores[loss] = _mean_auroc(Y[parts["val"]], model.decision_function(X[parts["val"]], vectors), findings)
        test_scores[loss] = model.decision_function(X[parts["test"]], vectors)
    Y_test, bootstrap = Y[parts["test"]], {"n_boot": experiment.evaluate.bootstrap, "seed": experiment.seed}
    document = {
        "experiment": experiment.name,
        "task": "multilabel",
        "selected": max(val_scores, key=lambda loss: val_scores[loss] or 0),
        "val_mean_auroc": val_scores,
        "findings": findings,
        "seen": seen,
        "unseen": list(spec.unseen),
        "results": [
            row
            for loss in spec.losses
            for row in finding_rows(loss, Y_test, test_scores[loss], patients, findings, bootstrap)
        ],
        "vs_bce": versus_bce(Y_test, test_scores, patients, bootstrap),
    }
    if spec.unseen:
        document |= gzsl_results(experiment, X, Y, parts, vectors, findings, seen, patients)
    return document, test_scores


def _classifier(experiment: Experiment, loss: str):
    from tlfusion.semantic.metric_learning import SemanticMetricClassifier

    spec = experiment.semantic
    return SemanticMetricClassifier(loss=loss, dim=spec.dim, epochs=spec.epochs, random_state=experiment.seed)


def finding_rows(
    model: str, Y: np.ndarray, scores: np.ndarray, patients: np.ndarray, findings: list[str], bootstrap: dict
) -> list[dict]:
    """metrics.json rows of one model: each finding's AUROC with its interval and positives, then the mean's."""
    auroc = multilabel_metrics.multilabel_auroc(Y, scores, findings)
    n_boot, seed = bootstrap["n_boot"], bootstrap["seed"]
    per_finding = (
        multilabel_metrics.bootstrap_finding_auroc_ci(Y, scores, patients, n_boot=n_boot, seed=seed)
        if n_boot
        else [None] * len(findings)
    )
    mean_ci = multilabel_metrics.bootstrap_mean_auroc_ci(Y, scores, patients, n_boot=n_boot, seed=seed)
    rows = [
        {
            "model": model,
            "finding": name,
            "split": "test",
            "n": len(Y),
            "positives": int(Y[:, j].sum()),
            "auroc": auroc[name],
            "ci": {"auroc": per_finding[j]},
        }
        for j, name in enumerate(findings)
    ]
    mean = {"model": model, "finding": "mean", "split": "test", "n": len(Y), "positives": int(Y.any(axis=1).sum())}
    return [*rows, mean | {"auroc": auroc["mean"], "ci": {"auroc": mean_ci}}]


def versus_bce(Y: np.ndarray, scores: dict[str, np.ndarray], patients: np.ndarray, bootstrap: dict) -> dict:
    """Each other loss's test mean AUROC minus BCE's on the same images, with a paired patient-bootstrap interval;
    empty without BCE among the losses or without a bootstrap."""
    if "bce" not in scores or not bootstrap["n_boot"]:
        return {}
    return {
        loss: multilabel_metrics.paired_bootstrap_mean_auroc_delta(
            Y, loss_scores, scores["bce"], patients, n_boot=bootstrap["n_boot"], seed=bootstrap["seed"]
        )
        for loss, loss_scores in scores.items()
        if loss != "bce"
    }


def gzsl_results(
    experiment: Experiment,
    X: np.ndarray,
    Y: np.ndarray,
    parts: dict[str, np.ndarray],
    vectors: dict,
    findings: list[str],
    seen: list[str],
    patients: np.ndarray,
) -> dict:
    """`gzsl` (seen / unseen / h per loss, trained on the seen findings' columns only) and `gzsl_ci` (intervals)."""
    from tlfusion.semantic.metric_learning import evaluate_gzsl

    unseen = list(experiment.semantic.unseen)
    seen_columns, unseen_columns = ([findings.index(name) for name in group] for group in (seen, unseen))
    train, test = parts["train"], parts["test"]
    gzsl, intervals = {}, {}
    for loss in experiment.semantic.losses:
        model = _classifier(experiment, loss).fit(X[train], Y[train][:, seen_columns], vectors, seen=seen)
        scores = model.decision_function(X[test], vectors)
        gzsl[loss] = evaluate_gzsl(Y[test], scores, findings, seen, unseen)
        if experiment.evaluate.bootstrap:
            n_boot, seed = experiment.evaluate.bootstrap, experiment.seed
            columns = (seen_columns, unseen_columns)
            intervals[loss] = multilabel_metrics.bootstrap_gzsl_ci(
                Y[test], scores, patients, *columns, n_boot=n_boot, seed=seed
            )
    return {"gzsl": gzsl, "gzsl_ci": intervals}


def _mean_auroc(Y: np.ndarray, scores: np.ndarray, findings: list[str]) -> float | None:
    return multilabel_metrics.multilabel_auroc(Y, scores, findings)["mean"]
