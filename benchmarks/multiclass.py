"""K-class tasks end to end: experiments/kermany_subtype.yaml and experiments/knee_kl.yaml, cold, as shipped.

    python -m benchmarks.multiclass [--experiments kermany_subtype knee_kl] [--root DIR]

Each experiment runs `tlfusion run experiments/NAME.yaml --out ROOT/NAME` in a subprocess into a fresh run folder
(fine-tuning, extraction, CV selection, evaluation, explanations and reports all computed) and records from its
metrics.json: the CV-selected model and every candidate's CV score, the selected model's test headline metrics
with patient-bootstrap CIs, its per-class table and confusion matrix, the cut-point AUROCs of ordinal tasks
(knee KL >= 2: radiographic OA), the paired fusion-minus-single-backbone deltas of the selected classifier, and the
run's wall time, peak memory and stage times. The selection is the run's own (CV on the training split); nothing
here is chosen on the test split. Writes benchmarks/results/multiclass.json (one entry per experiment run; an
earlier entry of an experiment not re-run is kept, with the commit it ran at).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._common import REPO, RESULTS_DIR, machine_info, write_result
from benchmarks.end_to_end import run_once
from tlfusion.evaluation.schema import read_metrics
from tlfusion.run.paths import RunPaths

EXPERIMENTS = ("kermany_subtype", "knee_kl")
HEADLINE = ("quadratic_kappa", "accuracy", "balanced_accuracy", "macro_f1", "kappa", "macro_auroc")
TARGETS = {
    "knee_kl": {
        "test_quadratic_kappa": {"min": 0.82},
        "test_accuracy": {"min": 0.67},
        "test_auroc_ge_2": {"min": 0.93},
        "wall_s": {"max": 5400},
    },
}
PUBLISHED = {
    "knee_kl": {
        "quadratic_kappa": 0.83,
        "accuracy": 0.667,
        "auroc_ge_2": 0.93,
        "source": "Tiulpin et al., Sci. Rep. 2018 (deep Siamese CNN, trained on another cohort: MOST, tested on OAI)",
    },
}
PACKAGES = ("tensorflow-cpu", "keras", "onnxruntime", "scikit-learn", "xgboost", "numpy")


def selected_test_row(metrics: dict) -> dict:
    """The selected model's image-level test row of a K-class metrics.json."""
    return next(
        row
        for row in metrics["results"]
        if row["model"] == metrics["selected"] and row["split"] == "test" and row["level"] == "image"
    )


def headline(row: dict) -> dict:
    """Metric -> {value, ci} for the headline K-class metrics of one result row."""
    return {key: {"value": row[key], "ci": row.get("ci", {}).get(key)} for key in HEADLINE}


def fusion_deltas(metrics: dict) -> list[dict]:
    """The paired fusion-minus-single rows of the selected model's classifier (all rows when fusion was not run)."""
    classifier = metrics["selected"].split("/")[-1]
    rows = metrics.get("fusion_vs_single", [])
    return [row for row in rows if row["classifier"] == classifier] or rows


def summary(metrics: dict) -> dict:
    """What the benchmark records of one K-class run's metrics.json."""
    row = selected_test_row(metrics)
    return {
        "selected": metrics["selected"],
        "selection": metrics["selection"],
        "test_n": row["n"],
        "test": headline(row),
        "test_per_class": row["per_class"],
        "test_confusion": row["confusion"],
        "test_cut_auroc": row.get("cut_auroc"),
        "fusion_vs_single": fusion_deltas(metrics),
        "data": metrics["data"],
        "test_images_seen_in_pretraining": metrics.get("test_images_seen_in_pretraining"),
    }


def target_checks(name: str, entry: dict) -> dict:
    """Each target of experiment `name` -> {value, target, met}."""
    cuts = {f"auroc_ge_{cut['cut']}": cut["auroc"] for cut in entry.get("test_cut_auroc") or []}
    values = {f"test_{key}": entry["test"][key]["value"] for key in HEADLINE}
    values |= {f"test_{key}": value for key, value in cuts.items()}
    values["wall_s"] = entry["run"]["wall_s"]
    checks = {}
    for key, target in TARGETS.get(name, {}).items():
        value = values.get(key)
        met = value is not None and value >= target.get("min", -1e18) and value <= target.get("max", 1e18)
        checks[key] = {"value": value, "target": target, "met": met}
    return checks


def run_experiment(name: str, root: Path) -> dict:
    """One cold run of experiments/NAME.yaml into root/NAME and its summary."""
    run_dir = root / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: a cold run needs a fresh run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    command = ["tlfusion", "run", f"experiments/{name}.yaml"]
    measured = run_once(command, run_dir)
    if measured["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} exited {measured['returncode']}; see {run_dir}.log")
    metrics = read_metrics(RunPaths(run_dir).metrics)
    entry = {"command": " ".join([*command, "--out", "DIR"]), "run": measured, **summary(metrics)}
    entry["targets"] = target_checks(name, entry)
    entry["published_reference"] = PUBLISHED.get(name)
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "benchmarks" / "multiclass", help="run folders")
    args = parser.parse_args(argv)
    previous = RESULTS_DIR / "multiclass.json"
    experiments = json.loads(previous.read_text())["experiments"] if previous.is_file() else {}
    for name in args.experiments:
        machine = machine_info(*PACKAGES)
        experiments[name] = {**run_experiment(name, args.root), "machine": machine}
        print(name, json.dumps({k: experiments[name][k] for k in ("selected", "test", "targets")}), flush=True)
        payload = {"benchmark": "multiclass", "machine": machine, "experiments": experiments}
        print(f"wrote {write_result('multiclass', payload)}")
    return payload


if __name__ == "__main__":
    main()
