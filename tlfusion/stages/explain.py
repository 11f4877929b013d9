"""The explain stage: Grad-CAM / LIME of the selected model on test cases, and their review page."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tlfusion.console import activity
from tlfusion.evaluation.results import pick_cases, pick_class_cases
from tlfusion.models.names import ModelName
from tlfusion.stages.context import RunContext, fit_rows

log = logging.getLogger("tlfusion")


def run_explain(run: RunContext) -> None:
    """explanations/: Grad-CAM / LIME of test cases from every outcome (TP, TN, FP, FN where present) of the
    selected model, and a review page; a non-linear classifier's surrogate is fitted on the training split.

    Multiclass: Grad-CAM / LIME of the selected model's predicted class (and the true class where they differ) for
    test cases spread over the confusion cells, and a review page grouped by cell."""
    spec = run.experiment.explain
    if not spec.enabled or spec.cases == 0:
        log.info("explanations disabled")
        return
    from tlfusion.bundle.folder import load_bundle

    selection, test, reference = selected_test_rows(run)
    if run.experiment.task == "multiclass":
        from tlfusion.explain.classes import explain_class_cases as explain

        cases, options = pick_class_cases(test, len(selection["classes"]), spec.cases), {}
    else:
        from tlfusion.explain.cases import explain_cases as explain

        cases = pick_cases(test, selection["thresholds"][selection["selected"]], spec.cases)
        options = {"clahe": run.experiment.image.clahe}
    with activity(f"explaining {len(cases)} cases ({', '.join(spec.methods)})"):
        explain(
            load_bundle(run.paths.bundle),
            cases["path"].tolist(),
            cases["y_true"].tolist(),
            run.paths.explanations,
            methods=tuple(spec.methods),
            lime_samples=spec.lime_samples,
            seed=run.experiment.seed,
            reference=reference,
            reference_label="images of the training split (train + val)",
            **options,
        )


def selected_test_rows(run: RunContext) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """What explain works from: the fit selection, the selected model's test predictions and its feature set's
    features of the training split (a surrogate's reference rows)."""
    selection, predictions = run.fit_outputs()
    selected = selection["selected"]
    test = predictions[(predictions["model"] == selected) & (predictions["split"] == "test")]
    X, _ = run.load_features(run.feature_sets()[ModelName.parse(selected).feature_set])
    return selection, test, X[fit_rows(run.table)]
