"""The explain_findings stage: Grad-CAM per finding for the most confident test cases of a multi-label run."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tlfusion.stages.context import RunContext

log = logging.getLogger("tlfusion")


def run_explain_findings(run: RunContext) -> None:
    """explanations/: Grad-CAM per finding for the top findings of the most confident test cases of the selected
    semantic model, on the fine-tuned backbones' sigmoid heads (none when the backbones were not fine-tuned)."""
    from tlfusion.backbones.registry import load_model_file
    from tlfusion.data.findings import label_matrix
    from tlfusion.evaluation.schema import read_metrics
    from tlfusion.explain.findings import explain_findings

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
