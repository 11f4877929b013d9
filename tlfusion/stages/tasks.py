"""The few-shot and multi-label tasks' own stages (after extract)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tlfusion.fileio import write_atomic, write_json
from tlfusion.metrics_schema import write_metrics
from tlfusion.stages.context import RunContext
from tlfusion.stages.leakage import check_unseen

log = logging.getLogger("tlfusion")


def run_fewshot_stage(run: RunContext) -> None:
    """fewshot.json, fewshot_curve.json and its plot: episodes on the test pool (every image without a test split)."""
    from tlfusion.features import FeatureFusion
    from tlfusion.fewshot import plot_shots_curve, run_fewshot, shots_curve

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
    from tlfusion.fewshot import run_fewshot

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


def run_semantic(run: RunContext) -> None:
    """metrics.json: per-finding test AUROC of each semantic loss with intervals, each metric loss vs BCE, GZSL on the
    unseen findings; fit/semantic_scores.csv: every loss's test probabilities."""
    from tlfusion.data.sources import label_matrix
    from tlfusion.reports import summary_lines
    from tlfusion.semantic_eval import semantic_metrics

    table, findings = run.table, run.findings
    X, _ = run.load_features(run.backbone_keys)
    metrics, scores = semantic_metrics(run.experiment, X, label_matrix(table, findings), table, findings)
    metrics["data"] = {"images": len(table), "patients": int(table["patient"].nunique())}
    metrics["finetune"] = finetune_choices(run)
    write_metrics(run.paths.metrics, metrics)
    test = table[table["split"] == "test"].reset_index(drop=True)
    frames = [
        test[["path", "patient"]].assign(model=loss, **dict(zip(findings, (1 / (1 + np.exp(-s))).T, strict=True)))
        for loss, s in scores.items()
    ]
    write_atomic(run.paths.semantic_scores, lambda temp: pd.concat(frames).to_csv(temp, index=False))
    for line in summary_lines(metrics):
        log.info(line)


def finetune_choices(run: RunContext) -> dict[str, dict]:
    """Backbone -> its fine-tuning loss choice (`loss_choice.json`), for the backbones fine-tuned multi-label."""
    from tlfusion.multilabel_training import CHOICE
    from tlfusion.runfiles import read_json_object

    paths = {key: run.paths.model(key).parent / CHOICE for key in run.backbone_keys}
    return {key: read_json_object(path) for key, path in paths.items() if path.is_file()}


def run_explain_findings(run: RunContext) -> None:
    """explanations/: Grad-CAM per finding for the top findings of the most confident test cases of the selected
    semantic model, on the fine-tuned backbones' sigmoid heads (none when the backbones were not fine-tuned)."""
    from tlfusion.backbones import load_model_file
    from tlfusion.data.sources import label_matrix
    from tlfusion.explain.findings import explain_findings
    from tlfusion.metrics_schema import read_metrics

    spec, findings = run.experiment.explain, run.findings
    if not spec.enabled or spec.cases == 0 or "gradcam" not in spec.methods:
        log.info("explanations disabled")
        return
    models = {key: load_model_file(run.paths.model(key)) for key in run.backbone_keys}
    if any(int(model.output.shape[-1]) != len(findings) for model in models.values()):
        log.info("no Grad-CAM per finding: the backbones were not fine-tuned with one output per finding")
        return
    selected = read_metrics(run.paths.metrics)["selected"]
    scores = pd.read_csv(run.paths.semantic_scores)
    probabilities = scores.loc[scores["model"] == selected, findings].to_numpy()
    test = run.table[run.table["split"] == "test"].reset_index(drop=True)
    chosen = np.argsort(-probabilities.max(axis=1), kind="stable")[: spec.cases]
    explain_findings(
        models,
        test["path"].iloc[chosen].tolist(),
        probabilities[chosen],
        label_matrix(test, findings)[chosen],
        findings,
        run.paths.explanations,
        image_size=run.experiment.image.size,
        clahe=run.experiment.image.clahe,
        model=selected,
    )
    log.info("explained %d test cases, Grad-CAM of their top findings", len(chosen))
