"""The fewshot stage: n-way k-shot episodes on the cached features, overall, per subgroup and over shots."""

from __future__ import annotations

import logging

import numpy as np

from tlfusion.fileio import write_json
from tlfusion.stages.context import RunContext
from tlfusion.stages.leakage import check_unseen

log = logging.getLogger("tlfusion")


def run_fewshot_stage(run: RunContext) -> None:
    """fewshot.json, fewshot_curve.json and its plot: episodes on the test pool (every image without a test split)."""
    from tlfusion.features.fusion import FeatureFusion
    from tlfusion.fewshot.evaluation import plot_shots_curve, run_fewshot, shots_curve

    spec, table, seed = run.experiment.fewshot, run.table, run.experiment.seed
    check_unseen(run.experiment, table)
    X, block_sizes = run.load_features(run.backbone_keys)
    if len(block_sizes) > 1:  # stateless per-block L2: nothing is fitted on the evaluated images
        X = FeatureFusion(block_sizes=block_sizes, standardize=False, l2=True).fit_transform(X)
    y, groups = table["label"].astype(str).to_numpy(), table["patient"].astype(str).to_numpy()
    keep = np.isin(y, spec.classes) if spec.classes else np.ones(len(y), bool)
    if (table["split"] == "test").any():  # a defined test split is the evaluated pool
        keep &= (table["split"] == "test").to_numpy()
    X, y, groups = X[keep], y[keep], groups[keep]
    result = run_fewshot(X, y, groups, spec.ways, spec.shots, spec.queries, spec.episodes, spec.classifier, seed=seed)
    if run.experiment.evaluate.subgroups:
        result["subgroups"] = _fewshot_subgroups(run, X, y, groups, table[keep])
    write_json(run.paths.fewshot, result)
    curve = shots_curve(
        X,
        y,
        groups,
        shots_list=spec.shots_curve,
        ways=spec.ways,
        queries=spec.queries,
        episodes=spec.episodes,
        classifiers=[spec.classifier],
        seed=seed,
    )
    write_json(run.paths.fewshot_curve, curve)
    plot_shots_curve(curve, run.paths.fewshot_plot)
    auroc = result["auroc"]
    log.info("few-shot %d-way %d-shot AUROC %.3f %s", spec.ways, spec.shots, auroc["mean"], auroc["ci95"])


def _fewshot_subgroups(run: RunContext, X: np.ndarray, y: np.ndarray, groups: np.ndarray, rows) -> dict:
    """Per column of `evaluate.subgroups` and value: episodes drawn within the subgroup alone (its AUROC and
    accuracy with intervals), or why none could be drawn (too few patients of a class)."""
    from tlfusion.errors import InputError
    from tlfusion.fewshot.evaluation import run_fewshot

    spec, seed = run.experiment.fewshot, run.experiment.seed
    found: dict[str, dict] = {}
    for column in run.experiment.evaluate.subgroups:
        values = rows[column].fillna("").astype(str).replace("", "(none)").to_numpy()
        for value in sorted(set(values)):
            inside = values == value
            record: dict = {"images": int(inside.sum()), "patients": len(set(groups[inside]))}
            try:
                episodes = (spec.ways, spec.shots, spec.queries, spec.episodes, spec.classifier)
                result = run_fewshot(X[inside], y[inside], groups[inside], *episodes, seed=seed)
                record |= {key: result[key] for key in ("auroc", "accuracy")}
                log.info(
                    "few-shot %s = %s: AUROC %.3f %s", column, value, result["auroc"]["mean"], result["auroc"]["ci95"]
                )
            except InputError as error:
                record["skipped"] = str(error)
                log.warning("few-shot %s = %s: not evaluated (%s)", column, value, error)
            found.setdefault(column, {})[value] = record
    return found
