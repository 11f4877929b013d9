"""Multi-label chest X-rays at real resolution: experiments/nih_chest.yaml end to end (720 NIH images, 224 px).

    python -m benchmarks.nih_chest [--out DIR]

Runs `tlfusion run experiments/nih_chest.yaml --out DIR` in a subprocess (ImageNet MobileNetV1 + V2 fine-tuned with
a 14-output sigmoid head, the loss chosen per backbone on validation; semantic-prototype losses on the fused
features, the selected one chosen on validation) and records from its metrics.json: the selected model's test mean
AUROC with its patient-bootstrap CI, every loss's, the per-finding AUROCs with CIs and positives, the dual-weighted
(and focused-Euclidean) minus BCE paired deltas, GZSL seen / unseen / H with intervals, the fine-tuning loss choices,
and the run's wall time, peak memory and stage times. Then a start screen on the run's own split, validation only:
frozen 224-px features of ImageNet and of the shipped in-domain (musculoskeletal) ImageNet -> MSK MobileNets, per
backbone and fused, a standardised logistic regression per finding fitted on train, mean AUROC on val (whether the
experiment's start is the val-best is recorded in `start_screen`). Nothing is chosen on the test split. A re-run on
the same run folder skips the stages whose inputs and code did not change (recorded in `stages_reused`;
`stage_seconds_last_run` keeps the seconds of each stage's run that made its outputs). Writes
benchmarks/results/nih_chest.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import REPO, machine_info, measure_command, write_result
from benchmarks.end_to_end import stage_timings
from benchmarks.pretrain_screen import _probe, candidate_models, feature_sets
from tlfusion.evaluation.schema import read_metrics
from tlfusion.run.paths import RunPaths
from tlfusion.run.readers import read_json_object

EXPERIMENT = "experiments/nih_chest.yaml"
PUBLISHED = {
    "mean_auroc": 0.826,
    "source": "dual-weighted metric loss, full ChestX-ray14 (112,120 images) at 224 px (Jin et al. 2023)",
}
STARTS = ("imagenet", "imagenet_msk")
"""The start screen's candidates: `pretrain_screen` families (ImageNet, saved_models/<arch>_imagenet_msk)."""
TARGETS = {"selected_test_mean_auroc": {"min": 0.68}}
PACKAGES = ("tensorflow-cpu", "keras", "onnxruntime", "scikit-learn", "numpy")


def test_rows(metrics: dict, model: str) -> dict:
    """One model's test rows: finding -> {auroc, ci, positives}, the mean included."""
    return {
        row["finding"]: {"auroc": row["auroc"], "ci": (row.get("ci") or {}).get("auroc"), "positives": row["positives"]}
        for row in metrics["results"]
        if row["model"] == model and row["split"] == "test"
    }


def summary(metrics: dict) -> dict:
    """What the benchmark records of a run's metrics.json."""
    selected = metrics["selected"]
    losses = list(metrics["val_mean_auroc"])
    return {
        "selected": selected,
        "selected_on": "validation mean AUROC (semantic model fitted on the train part)",
        "selected_test_mean_auroc": test_rows(metrics, selected)["mean"]["auroc"],
        "selected_test_mean_auroc_ci": test_rows(metrics, selected)["mean"]["ci"],
        "val_mean_auroc": metrics["val_mean_auroc"],
        "test_mean_auroc": {loss: test_rows(metrics, loss)["mean"] for loss in losses},
        "per_finding_selected": {k: v for k, v in test_rows(metrics, selected).items() if k != "mean"},
        "vs_bce": metrics.get("vs_bce", {}),
        "gzsl": {
            loss: {**values, "ci": metrics.get("gzsl_ci", {}).get(loss)} for loss, values in metrics["gzsl"].items()
        },
        "gzsl_selected": metrics["gzsl"].get(selected),
        "unseen": metrics["unseen"],
        "finetune_loss_choice": metrics.get("finetune", {}),
        "data": metrics["data"],
    }


def val_mean_auroc(features: np.ndarray, Y: np.ndarray, train: np.ndarray, findings: list[str]) -> float | None:
    """Mean val AUROC of one standardised logistic regression per finding, fitted on the `train` rows (findings with
    one class in train left out)."""
    from tlfusion.evaluation.multilabel_metrics import multilabel_auroc

    defined = [j for j in range(len(findings)) if len(np.unique(Y[train, j])) == 2]
    scores = np.stack(
        [_probe().fit(features[train], Y[train, j]).decision_function(features[~train]) for j in defined], axis=1
    )
    mean = multilabel_auroc(Y[~train][:, defined], scores, [findings[j] for j in defined])["mean"]
    return None if mean is None else round(mean, 4)


def screen_starts(paths: RunPaths, findings: list[str]) -> dict:
    """Start -> feature set (each backbone, fusion) -> val mean AUROC, on the train and val rows of the run's table."""
    from tlfusion.data.findings import label_matrix

    table = pd.read_csv(paths.table)
    rows = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    Y, train = label_matrix(rows, findings), (rows["split"] == "train").to_numpy()
    screen = {}
    for start in STARTS:
        features = feature_sets(candidate_models(start), list(rows["path"]))
        screen[start] = {name: val_mean_auroc(x, Y, train, findings) for name, x in features.items()}
    return {"n_train": int(train.sum()), "n_val": int((~train).sum()), "val_mean_auroc": screen}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "nih_chest", help="run folder")
    args = parser.parse_args(argv)
    machine = machine_info(*PACKAGES)
    paths = RunPaths(args.out)
    offset = paths.log.stat().st_size if paths.log.is_file() else 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.parent / f"{args.out.name}.log", "a") as log:
        command = ["tlfusion", "run", EXPERIMENT, "--out", str(args.out)]
        measured = measure_command(command, cwd=REPO, stdout=log, stderr=log)
    if measured["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} exited {measured['returncode']}; see {args.out}.log")
    with open(paths.log, "rb") as lines:
        lines.seek(offset)
        stages = stage_timings(lines.read().decode(errors="replace"))
    metrics = read_metrics(paths.metrics)
    start_screen = screen_starts(paths, metrics["findings"])
    fused = {start: scores.get("fusion") for start, scores in start_screen["val_mean_auroc"].items()}
    start_screen["val_best_fused"] = max(fused, key=lambda start: fused[start] or 0.0)
    payload = {
        "command": " ".join(command),
        "run": {**measured, "stage_timings_s": stages, "stage_seconds_last_run": read_json_object(paths.timings)},
        "stages_reused": sorted(stage for stage, seconds in stages.items() if seconds == "skipped"),
        **summary(metrics),
        "start_screen": start_screen,
        "published_reference": PUBLISHED,
        "targets": TARGETS,
        "machine": machine,
    }
    print(json.dumps({key: payload[key] for key in ("selected", "selected_test_mean_auroc", "vs_bce")}, indent=1))
    print(f"wrote {write_result('nih_chest', payload)}")
    return payload


if __name__ == "__main__":
    main()
