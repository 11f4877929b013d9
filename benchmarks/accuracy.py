"""Accuracy: each backbone alone vs fusion, each classifier, per initialisation, on the test split.

    python -m benchmarks.accuracy [--quick] [--experiments NAME ...] [--inits imagenet imagenet_frozen ...]
                                  [--seeds 0 1 2] [--no-run] [--reuse-finetuned 'runs/hand/s{seed}']

For every (experiment, init, seed) it runs `tlfusion run experiments/NAME.yaml --out
runs/benchmarks/accuracy/NAME__INIT[__seedN] --set explain.enabled=false [--set seed=N] ...` (explanations do not
change the scores; a finished run is re-used, as the pipeline skips stages whose config, data and code are
unchanged). The inits (`INITS`): `imagenet`, the experiment's backbones from ImageNet, fine-tuned;
`imagenet_frozen`, the same backbones not fine-tuned; `imagenet_msk` / `imagenet_msk_frozen`, the same from the
shipped ImageNet -> musculoskeletal backbones (`saved_models/*_imagenet_msk`, experiments/pretrain_msk.yaml);
`scratch`, random init, fine-tuned; `in_domain_xray128`, the backbones shipped before ImageNet weights were
available (EfficientNetB0 + MobileNetV2 pretrained from scratch on ~1,600 radiographs), fine-tuned. It then reads
each run's metrics.json: the image-level test rows (kappa, F1, accuracy, AUROC with patient-bootstrap 95% CIs), the
model selected on the training split, fusion minus the single backbone chosen on CV and minus the best single
backbone on test, per classifier (with paired 95% CIs), and, per model, the init comparisons in `COMPARISONS` (e.g.
imagenet minus scratch), and for the pairs in `PAIRED` the CV-selected model of one init minus the other's on the
same test images with a paired patient-bootstrap CI. Runnable experiments on ../shared/data: fracatlas_hand,
fracatlas_leg, kermany_pneumonia; `--quick` takes fracatlas_hand only. `--no-run` tabulates the runs already
finished. `--seeds` repeats each (experiment, init) with a new split, initialisation and CV folds.
`--reuse-finetuned` lets init `imagenet` extract from the backbones another finished run of the same experiment and
seed fine-tuned, after checking their train.json recipe is the experiment's, so a change to extraction or
classification is measured without fine-tuning again; the row records that run's folder and commit (`finetuned_in`).
Writes benchmarks/results/accuracy.json, keeping the runs of its earlier version that this invocation did not
measure (listed in `carried_over`), so runs can be added one at a time; each run records the commit it ran at.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from benchmarks._common import RESULTS_DIR, git_state, load_average, machine_info, measure_command, write_result
from tlfusion.fileio import write_json
from tlfusion.run.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "benchmarks" / "accuracy"
EXPERIMENTS = ("fracatlas_hand", "kermany_pneumonia", "fracatlas_leg")
OLD_IN_DOMAIN = {  # the backbones shipped before ImageNet weights were available
    "efficientnetb0": REPO / "saved_models" / "efficientnetb0_xray128" / "model.keras",
    "mobilenetv2": REPO / "saved_models" / "mobilenetv2_xray128" / "model.keras",
}
IMAGENET_MSK = {  # ImageNet -> musculoskeletal radiographs, multi-task (experiments/pretrain_msk.yaml)
    arch: REPO / "saved_models" / f"{arch}_imagenet_msk" / "model.keras" for arch in ("mobilenet", "mobilenetv2")
}
INITS = ("imagenet", "imagenet_frozen", "imagenet_msk", "imagenet_msk_frozen", "scratch", "in_domain_xray128")
COMPARISONS = (
    ("imagenet", "scratch"),
    ("imagenet", "imagenet_frozen"),
    ("imagenet", "in_domain_xray128"),
    ("imagenet_msk", "imagenet"),
    ("imagenet_msk_frozen", "imagenet_frozen"),
)
PAIRED = (("imagenet_msk", "imagenet"), ("imagenet_msk_frozen", "imagenet_frozen"))
"""Init pairs whose CV-selected models are compared on the same test images with a paired patient bootstrap."""
METRICS = ("kappa", "f1", "accuracy", "auroc")
RUN_GIT = "benchmark_git.json"
NOTES = [
    "imagenet: the experiment as shipped (MobileNetV1 + MobileNetV2 from the offline ImageNet weights, fine-tuned);",
    "imagenet_frozen: the same backbones, not fine-tuned; scratch: random init, fine-tuned; in_domain_xray128: the",
    "backbones shipped before (EfficientNetB0 + MobileNetV2 pretrained from scratch on ~1,600 radiographs), which saw",
    "the seed-0 training parts of Kermany and FracAtlas leg (never their seed-0 test parts). FracAtlas hand was never",
    "used in any pretraining, so hand is the true transfer target and the experiment run at several seeds.",
    "FracAtlas holds identical files under two ids (21 sets in hand, 4 in leg); a copy split from its twin joins",
    "the twin's earlier part (train, then val, then test), so no test image has a copy in training.",
    "Test sets are small (hand 147 images, Kermany ~170): differences inside the CIs are not evidence.",
    "FracAtlas hand, init imagenet: flip test-time augmentation (features.flip, chosen on seed 0's val part) measured",
    "with --reuse-finetuned on the backbones fine-tuned at 8d2528c (same recipe, checked); without flip those same",
    "backbones gave kappa 0.495 / 0.594 / 0.509 and AUROC 0.858 / 0.900 / 0.804 at seeds 0-2 (mean 0.533 / 0.854).",
    "imagenet_frozen uses the experiment as shipped (flip included) with fine-tuning off.",
    "imagenet_msk: ImageNet -> musculoskeletal multi-task pretraining (knee KL, bone age, FracAtlas leg/hip/shoulder/",
    "mixed fracture and region; never FracAtlas hand, never a test part), then the experiment's fine-tuning.",
    "The hand runs of all four inits ran cold at 8e66d7d (pipeline code as at HEAD but for the clinical merge's",
    "calibration and subgroup reporting); the imagenet_msk runs read saved_models/*_imagenet_msk as shipped at",
    "64ddbf3 (same sha256, copied into that checkout). Start decision (validation only, fixed before the",
    "imagenet_msk runs): mean best-epoch val AUROC of the fine-tuned backbones over seeds 0-2: imagenet 0.838,",
    "imagenet_msk 0.811, so the hand experiment keeps the ImageNet start.",
]
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "scikit-learn", "xgboost", "numpy")


def experiment_file(name: str) -> Path:
    return REPO / "experiments" / f"{name}.yaml"


def overrides(name: str, init: str, seed: int = 0, reuse: str | None = None) -> list[str]:
    """`--set` arguments: no explanations, the init's backbone changes, a seed other than 0, and with `reuse` (a
    folder template such as `runs/hand/s{seed}`) the fine-tuned backbones of that finished run (`reused_backbones`)."""
    sets = ["explain.enabled=false"] + ([f"seed={seed}"] if seed else [])
    backbones = yaml.safe_load(experiment_file(name).read_text())["backbones"]
    if init.endswith("_frozen"):
        sets.append("finetune.enabled=false")
    if init.startswith("imagenet_msk"):
        sets += [f"backbones.{index}.weights={IMAGENET_MSK[entry['name']]}" for index, entry in enumerate(backbones)]
    elif init.startswith("imagenet"):
        sets += [f"backbones.{index}.weights=imagenet" for index in range(len(backbones))]
    elif init == "scratch":
        sets += [f"backbones.{index}.weights=null" for index in range(len(backbones))]
    elif init == "in_domain_xray128":
        for index, (arch, weights) in enumerate(OLD_IN_DOMAIN.items()):
            sets += [f"backbones.{index}.name={arch}", f"backbones.{index}.weights={weights}"]
    if reuse and init == "imagenet":
        sets.append("finetune.enabled=false")
        models = reused_backbones(name, seed, Path(reuse.format(seed=seed)))
        sets += [f"backbones.{index}.weights={model}" for index, model in enumerate(models)]
    return [argument for value in sets for argument in ("--set", value)]


def reused_backbones(name: str, seed: int, folder: Path) -> list[Path]:
    """The fine-tuned `model.keras` of each backbone in a finished run `folder` of experiment `name` at `seed`,
    after checking that its `train.json` recipe is the experiment's (fine-tuning settings, start, size, seed)."""
    from tlfusion.config.experiment import load_experiment

    experiment = load_experiment(experiment_file(name), [f"seed={seed}"])
    spec = experiment.finetune.model_dump(exclude={"enabled", "distribute"})  # where it ran, not what it learnt
    models = []
    for entry in experiment.backbones:
        trained = json.loads((folder / "backbones" / entry.name / "train.json").read_text())["settings"]
        expected = spec | {"weights": entry.weights, "image_size": experiment.image.size, "seed": seed}
        differing = {key: (trained.get(key), value) for key, value in expected.items() if trained.get(key) != value}
        if differing:
            raise SystemExit(f"{folder}: {entry.name} was fine-tuned with other settings (theirs, ours): {differing}")
        models.append((folder / "backbones" / entry.name / "model.keras").resolve())
    return models


def run_dir(name: str, init: str, seed: int = 0) -> Path:
    return RUNS / (f"{name}__{init}" + (f"__seed{seed}" if seed else ""))


def run(name: str, init: str, seed: int = 0, reuse: str | None = None) -> dict:
    """`tlfusion run` for one (experiment, init, seed), its output appended to the run folder's name + `.out`."""
    folder = run_dir(name, init, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    arguments = overrides(name, init, seed, reuse)
    command = ["tlfusion", "run", str(experiment_file(name)), "--out", str(folder), *arguments]
    with open(folder.parent / f"{folder.name}.out", "a") as log:
        measured = measure_command(command, cwd=REPO, stdout=log, stderr=log)
    if measured.get("returncode") == 0:
        write_json(folder / RUN_GIT, git_state())
    print(name, init, seed, measured, flush=True)
    return measured


def test_rows(metrics: dict) -> dict[str, dict]:
    """Image-level test-split scores per model name, with their 95% CIs."""
    rows = {}
    for row in metrics["results"]:
        if row["split"] == "test" and row["level"] == "image":
            scores = {metric: row.get(metric) for metric in METRICS}
            ci = {metric: row["ci"][metric] for metric in METRICS if metric in row.get("ci", {})}
            rows[row["model"]] = {"n": row["n"], **scores, "ci": ci}
    return rows


def read_run(name: str, init: str, seed: int = 0, reuse: str | None = None) -> dict | None:
    """One finished run's test rows, selected model and stage timings (None when metrics.json is missing)."""
    paths = RunPaths(run_dir(name, init, seed))
    if not paths.metrics.is_file():
        return None
    metrics = json.loads(paths.metrics.read_text())
    timings = json.loads(paths.timings.read_text()) if paths.timings.is_file() else metrics.get("timings", {})
    return {
        "experiment": name,
        "init": init,
        "seed": seed,
        "selected": metrics["selected"],
        "cv_scores": metrics.get("selection", {}).get("cv_scores", {}),
        "timings_s": timings,
        "models": test_rows(metrics),
        "fusion_vs_single": paired_intervals(metrics, run_dir(name, init, seed)),
        "test_images_seen_in_pretraining": test_images_seen(name, init, seed, reuse),
        "git": run_git(run_dir(name, init, seed)),
        **({"finetuned_in": reused_run(Path(reuse.format(seed=seed)))} if reuse and init == "imagenet" else {}),
    }


def reused_run(folder: Path) -> dict:
    """Where a run's fine-tuned backbones came from: the folder and the git state it recorded."""
    return {"folder": str(folder), "git": run_git(folder)}


def run_git(folder: Path) -> dict | None:
    """The git state a run was made at (written after it finished), None for runs made before it was recorded."""
    path = folder / RUN_GIT
    return json.loads(path.read_text()) if path.is_file() else None


def test_images_seen(name: str, init: str, seed: int, reuse: str | None = None) -> dict[str, int]:
    """Backbone -> how many of the run's test images its initial weights were pretrained on."""
    import pandas as pd

    from tlfusion.config.experiment import load_experiment
    from tlfusion.stages.leakage import seen_in_training

    experiment = load_experiment(experiment_file(name), overrides(name, init, seed, reuse)[1::2])
    table = pd.read_csv(RunPaths(run_dir(name, init, seed)).table)
    return seen_in_training(experiment, table[table["split"] == "test"])


def paired_intervals(metrics: dict, folder: Path) -> dict[str, dict]:
    """Single model -> paired 95% CIs of fusion minus it (image level, test split), from metrics.json or, for runs
    made before it recorded them, computed from the run's fit/predictions.csv as the pipeline would."""
    rows = metrics.get("fusion_vs_single")
    if rows is None:
        import pandas as pd

        from tlfusion.evaluation.results import fusion_vs_single

        paths = RunPaths(folder)
        predictions = pd.read_csv(paths.predictions, dtype={"patient": str, "study": str})
        thresholds = json.loads(paths.selection.read_text())["thresholds"]
        rows = fusion_vs_single(predictions, thresholds)
    return {row["single"]: {m: row[m]["ci"] for m in ("kappa", "auroc")} for row in rows if row["level"] == "image"}


def selected_paired(results: list[dict], first: str, second: str) -> list[dict]:
    """Per experiment and seed with both runs on disk: init `first`'s CV-selected model minus `second`'s on the same
    test images, kappa and AUROC with paired patient-bootstrap 95% CIs."""

    from tlfusion.evaluation.metrics import paired_bootstrap_delta

    found = {(r["experiment"], r["seed"], r["init"]): r for r in results}
    rows = []
    for name, seed in dict.fromkeys((r["experiment"], r["seed"]) for r in results):
        pair = [found.get((name, seed, init)) for init in (first, second)]
        folders = [run_dir(name, init, seed) for init in (first, second)]
        if not all(pair) or not all(RunPaths(folder).predictions.is_file() for folder in folders):
            continue
        tests = [_selected_test(folder, result["selected"]) for folder, result in zip(folders, pair, strict=True)]
        (a, threshold_a), (b, threshold_b) = tests
        merged = a.merge(b, on=["path", "y_true", "patient"], suffixes=("_a", "_b"))
        delta = paired_bootstrap_delta(
            merged["y_true"], merged["prob_a"], merged["prob_b"], merged["patient"], (threshold_a, threshold_b)
        )
        row = {"comparison": f"{first} - {second}", "experiment": name, "seed": seed, "n": len(merged)}
        rows.append(row | {"models": [r["selected"] for r in pair]} | {m: delta[m] for m in ("kappa", "auroc")})
    return rows


def _selected_test(folder: Path, selected: str):
    """The selected model's test rows (path, y_true, patient, prob) of a run, and its threshold."""
    import pandas as pd

    paths = RunPaths(folder)
    predictions = pd.read_csv(paths.predictions, dtype={"patient": str, "study": str})
    rows = predictions[(predictions["split"] == "test") & (predictions["model"] == selected)]
    threshold = json.loads(paths.selection.read_text())["thresholds"][selected]
    return rows[["path", "y_true", "patient", "prob"]], threshold


def split_model(model: str) -> tuple[str, str]:
    """`fusion/lr` -> ("fusion", "lr")."""
    features, classifier = model.split("/", 1)
    return features, classifier


def fusion_gain(result: dict) -> list[dict]:
    """Per classifier, test split: fusion's score minus (a) the single backbone chosen on CV, as a user without
    fusion would pick it, and (b) the best single backbone on test (per metric; biased towards the singles)."""
    by_classifier: dict[str, dict[str, dict]] = {}
    for model, scores in result["models"].items():
        features, classifier = split_model(model)
        by_classifier.setdefault(classifier, {})[features] = scores
    gains = []
    for classifier, sets in by_classifier.items():
        singles = {features: scores for features, scores in sets.items() if features != "fusion"}
        if "fusion" not in sets or not singles:
            continue
        row = {key: result[key] for key in ("experiment", "init", "seed")} | {"classifier": classifier}
        chosen = max(singles, key=lambda features: result["cv_scores"].get(f"{features}/{classifier}", -1.0))
        row["cv_chosen_single"] = chosen
        for metric in ("kappa", "auroc"):
            best = max(singles, key=lambda features, metric=metric: singles[features][metric] or 0.0)
            row[f"fusion_{metric}"] = sets["fusion"][metric]
            row[f"cv_chosen_single_{metric}"] = singles[chosen][metric]
            row.update(_delta(result, sets, classifier, chosen, metric, f"delta_{metric}_vs_cv_chosen"))
            row[f"best_single_{metric}"] = singles[best][metric]
            row[f"best_single_{metric}_backbone"] = best
            row.update(_delta(result, sets, classifier, best, metric, f"delta_{metric}"))
        gains.append(row)
    return gains


def _delta(result: dict, sets: dict, classifier: str, single: str, metric: str, key: str) -> dict:
    """``{key: fusion minus single, key_paired_ci: its paired CI or None}``."""
    paired = result.get("fusion_vs_single", {}).get(f"{single}/{classifier}", {})
    return {key: round(sets["fusion"][metric] - sets[single][metric], 4), f"{key}_paired_ci": paired.get(metric)}


def init_gain(results: list[dict], first: str, second: str) -> list[dict]:
    """Per experiment, seed and model present in both: init `first` minus init `second`, test kappa and AUROC."""
    found = {(r["experiment"], r["seed"], r["init"]): r for r in results}
    gains = []
    for name, seed in dict.fromkeys((r["experiment"], r["seed"]) for r in results):
        a, b = found.get((name, seed, first)), found.get((name, seed, second))
        if not a or not b:
            continue
        for model in a["models"]:
            if model in b["models"]:
                row = {"comparison": f"{first} - {second}", "experiment": name, "seed": seed, "model": model}
                row.update({f"delta_{m}": round(a["models"][model][m] - b["models"][model][m], 4) for m in METRICS})
                gains.append(row)
    return gains


def mean_deltas(gains: list[dict], keys: tuple[str, ...], count_name: str, suffix: str = "") -> list[dict]:
    """Per distinct value of ``keys``: each metric's ``delta_METRIC{suffix}`` averaged over its rows, the number of
    rows (as ``count_name``) and how many of them are above 0."""
    summary = []
    for value in dict.fromkeys(tuple(g[key] for key in keys) for g in gains):
        rows = [g for g in gains if tuple(g[key] for key in keys) == value]
        row = dict(zip(keys, value, strict=True)) | {count_name: len(rows)}
        for metric in ("kappa", "auroc"):
            deltas = [g[f"delta_{metric}{suffix}"] for g in rows]
            row[f"mean_delta_{metric}{suffix}"] = round(sum(deltas) / len(deltas), 4)
            row[f"positive_delta_{metric}{suffix}"] = sum(delta > 0 for delta in deltas)
        summary.append(row)
    return summary


def selected_means(results: list[dict]) -> list[dict]:
    """Per experiment and init: the CV-selected model's test kappa and AUROC, averaged over the seeds run."""
    summary = []
    for name, init in dict.fromkeys((r["experiment"], r["init"]) for r in results):
        runs = [r for r in results if (r["experiment"], r["init"]) == (name, init)]
        scores = [r["models"][r["selected"]] for r in runs]
        row = {"experiment": name, "init": init, "seeds": [r["seed"] for r in runs]}
        row.update({f"mean_{m}": round(sum(s[m] for s in scores) / len(scores), 4) for m in ("kappa", "auroc")})
        summary.append(row)
    return summary


def run_key(result: dict) -> str:
    return run_dir(result["experiment"], result["init"], result["seed"]).name


def earlier_runs(measured: list[dict]) -> list[dict]:
    """Runs in the earlier accuracy.json for (experiment, init, seed) not in `measured`."""
    path = RESULTS_DIR / "accuracy.json"
    if not path.is_file():
        return []
    fresh = {run_key(result) for result in measured}
    return [result for result in json.loads(path.read_text()).get("runs", []) if run_key(result) not in fresh]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fracatlas_hand only")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, help="default: all three")
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="experiment seeds (default: 0)")
    parser.add_argument("--no-run", action="store_true", help="tabulate finished runs only; start none")
    parser.add_argument(
        "--reuse-finetuned",
        metavar="TEMPLATE",
        help="init imagenet: extract from the backbones a finished run at TEMPLATE.format(seed=N) fine-tuned with the "
        "experiment's recipe (checked) instead of fine-tuning again",
    )
    args = parser.parse_args(argv)
    names = args.experiments or (["fracatlas_hand"] if args.quick else list(EXPERIMENTS))
    wanted = [(n, i, s) for n in names for s in args.seeds for i in args.inits]
    machine = machine_info(*PACKAGES)
    started = time.perf_counter()
    reuse = args.reuse_finetuned
    runs = {} if args.no_run else {run_dir(*key).name: run(*key, reuse) for key in wanted}
    found = {key: read_run(*key, reuse) for key in wanted}
    results = [result for result in found.values() if result]
    missing = [run_dir(*key).name for key, result in found.items() if not result]
    carried = earlier_runs(results)
    results = sorted(
        results + carried, key=lambda r: (EXPERIMENTS.index(r["experiment"]), r["seed"], INITS.index(r["init"]))
    )
    init_gains = [gain for first, second in COMPARISONS for gain in init_gain(results, first, second)]
    fusion_gains = [gain for result in results for gain in fusion_gain(result)]
    machine["load_average_1min_after"] = load_average()[0]
    payload = {
        "benchmark": "accuracy",
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "experiments": list(dict.fromkeys(result["experiment"] for result in results)),
            "measured_now": names,
            "inits": args.inits,
            "seeds_now": args.seeds,
            "overrides": {init: " ".join(overrides(names[0], init)) for init in args.inits},
            "reuse_finetuned": reuse,
            "runs_folder": str(RUNS.relative_to(REPO)),
            "split": "test, image level; CIs: patient bootstrap 95%",
            "repeats": "one run per (experiment, init, seed)",
        },
        "notes": NOTES,
        "wall_s": round(time.perf_counter() - started, 1),
        "command_runs": runs,
        "missing": missing,
        "carried_over": [run_key(result) for result in carried],
        "runs": results,
        "selected_mean_over_seeds": selected_means(results),
        "fusion_minus_single": fusion_gains,
        "fusion_minus_cv_chosen_single_mean": mean_deltas(
            fusion_gains, ("experiment", "seed", "init"), "classifiers", "_vs_cv_chosen"
        ),
        "init_selected_paired": [row for pair in PAIRED for row in selected_paired(results, *pair)],
        "init_comparisons": init_gains,
        "init_comparisons_mean": mean_deltas(init_gains, ("comparison", "experiment", "seed"), "models"),
        "init_comparisons_mean_over_seeds": mean_deltas(init_gains, ("comparison", "experiment"), "models"),
    }
    print("missing runs:", missing or "none")
    print("results:", write_result("accuracy", payload))
    return payload


if __name__ == "__main__":
    main()
