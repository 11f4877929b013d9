"""The semantic stage: the multi-label task's semantic losses fitted and scored per finding."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tlfusion.evaluation.schema import write_metrics
from tlfusion.fileio import write_atomic
from tlfusion.stages.context import RunContext

log = logging.getLogger("tlfusion")


def run_semantic(run: RunContext) -> None:
    """metrics.json: per-finding test AUROC of each semantic loss with intervals, each metric loss vs BCE, GZSL on the
    unseen findings; fit/semantic_scores.csv: every loss's test probabilities."""
    from tlfusion.data.findings import label_matrix
    from tlfusion.reports.report import summary_lines
    from tlfusion.semantic.evaluation import semantic_metrics

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
    from tlfusion.run.readers import read_json_object
    from tlfusion.training.multilabel import CHOICE

    paths = {key: run.paths.model(key).parent / CHOICE for key in run.backbone_keys}
    return {key: read_json_object(path) for key, path in paths.items() if path.is_file()}
