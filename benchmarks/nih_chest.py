"""Multi-label chest X-rays at real resolution: experiments/nih_chest.yaml end to end (720 NIH images, 224 px).

    python -m benchmarks.nih_chest [--out DIR]

Runs `tlfusion run experiments/nih_chest.yaml --out DIR` in a subprocess (ImageNet MobileNetV1 + V2 fine-tuned with
a 14-output sigmoid head, the loss chosen per backbone on validation; semantic-prototype losses on the fused
features, the selected one chosen on validation) and records from its metrics.json: the selected model's test mean
AUROC with its patient-bootstrap CI, every loss's, the per-finding AUROCs with CIs and positives, the dual-weighted
(and focused-Euclidean) minus BCE paired deltas, GZSL seen / unseen / H with intervals, the fine-tuning loss choices,
and the run's wall time, peak memory and stage times. Nothing is chosen on the test split. A re-run on the same run
folder skips the stages whose inputs and code did not change (recorded in `stages_reused`; `stage_seconds_last_run`
keeps the seconds of each stage's run that made its outputs). Writes
benchmarks/results/nih_chest.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._common import REPO, machine_info, measure_command, write_result
from benchmarks.end_to_end import stage_timings
from tlfusion.metrics_schema import read_metrics
from tlfusion.run_paths import RunPaths
from tlfusion.runfiles import read_json_object

EXPERIMENT = "experiments/nih_chest.yaml"
PUBLISHED = {
    "mean_auroc": 0.826,
    "source": "dual-weighted metric loss, full ChestX-ray14 (112,120 images) at 224 px (Jin et al. 2023)",
}
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
    payload = {
        "command": " ".join(command),
        "run": {**measured, "stage_timings_s": stages, "stage_seconds_last_run": read_json_object(paths.timings)},
        "stages_reused": sorted(stage for stage, seconds in stages.items() if seconds == "skipped"),
        **summary(read_metrics(paths.metrics)),
        "published_reference": PUBLISHED,
        "targets": TARGETS,
        "machine": machine,
    }
    print(json.dumps({key: payload[key] for key in ("selected", "selected_test_mean_auroc", "vs_bce")}, indent=1))
    print(f"wrote {write_result('nih_chest', payload)}")
    return payload


if __name__ == "__main__":
    main()
