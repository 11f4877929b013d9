"""Does in-domain pretraining help a small target set? Fine-tune MobileNetV2 on FracAtlas hand three ways.

    python -m benchmarks.finetune_transfer [--quick] [--seeds 0 1 2]

FracAtlas hand (never seen in pretraining, see saved_models/mobilenetv2_xray128/MODEL_CARD.md) is cut into five
label-stratified parts (each image is its own group: FracAtlas has no patient ids): part 0 (20 %) trains, part 1
(20 %) validates (best epoch and decision threshold), parts 2-4 (60 %) are the held-out test set, touched once
per model. The same architecture is fine-tuned from random init, from our in-domain checkpoint and from ImageNet
(recorded as unavailable when the weights cannot be downloaded), each with the same three recipes (RECIPES),
pretrained starts both with BatchNorm statistics kept and re-estimated; the recipe with the best val AUROC is
that start's result. The in-domain and scratch results are then compared on the same test images (kappa and AUROC
differences with paired image-bootstrap CIs). Each seed cuts the parts anew and re-initialises and augments
differently; the test sets of different seeds overlap, so seeds are summarised by the mean difference and how
many seeds favour in-domain, not by a pooled interval. Writes benchmarks/results/finetune_transfer.json, keeping
the seeds of its earlier version that this invocation did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd

from benchmarks._common import RESULTS_DIR, machine_info, write_result
from tlfusion.backbones.registry import load_model_file
from tlfusion.data.images import file_sha256, load_batch
from tlfusion.data.sources import read_csv
from tlfusion.data.splits import content_groups, grouped_folds, join_identical_images
from tlfusion.errors import InputError
from tlfusion.evaluation.metrics import binary_metrics, bootstrap_ci, choose_threshold, paired_bootstrap_delta
from tlfusion.training.finetune import finetune
from tlfusion.training.provenance import SEEN_IMAGES, read_seen_images
from tlfusion.training.task import TrainSettings

ROOT = Path(__file__).resolve().parent.parent
DATA_CSV = ROOT.parent / "shared" / "data" / "fracatlas" / "dataset.csv"
PRETRAINED = ROOT / "saved_models" / "mobilenetv2_xray128" / "model.keras"
RUNS = ROOT / "runs" / "finetune_transfer"
ARCHITECTURE = "mobilenetv2"
POSITIVE = "1"
FULL = {"image_size": 128, "epochs": 20, "patience": 6, "batch_size": 16}
QUICK = {"image_size": 64, "epochs": 5, "patience": 2, "batch_size": 16}
INITS = {"scratch": None, "in_domain": PRETRAINED, "imagenet": "imagenet"}
# Every start tries the same recipes; the one with the best val AUROC is its result (the test split never picks).
RECIPES = {
    "all_at_once": {"warmup_epochs": 0, "unfrozen_learning_rate": 1e-3},
    "warmup_then_gentle": {"warmup_epochs": 2, "unfrozen_learning_rate": 1e-4},
    "long_warmup_then_gentler": {"warmup_epochs": 4, "unfrozen_learning_rate": 3e-5},
}
# Random init must train BatchNorm; pretrained starts try both keeping its statistics and re-estimating them.
BATCHNORM = {"scratch": ("train",), "in_domain": ("freeze", "train"), "imagenet": ("freeze", "train")}


def candidates(init: str) -> dict[str, dict]:
    """Recipe name -> finetune keyword arguments, for one start."""
    modes = BATCHNORM[init]
    return {
        recipe if len(modes) == 1 else f"{recipe}/bn_{mode}": {**arguments, "batchnorm": mode}
        for recipe, arguments in RECIPES.items()
        for mode in modes
    }


def hand_table(seed: int = 0) -> pd.DataFrame:
    """FracAtlas hand with split train (fold 0) / val (fold 1) / test (folds 2-4) of a stratified 5-fold cut; an
    identical file under another id joins its twin's earlier part."""
    table = read_csv(
        DATA_CSV, label_column="fractured", region_column="primary_region", filters={"primary_region": "hand"}
    )
    folds = grouped_folds(table["label"].to_numpy(), table["patient"].to_numpy(), n_splits=5, seed=seed)
    table["split"] = "test"
    table.loc[folds[0][1], "split"] = "train"
    table.loc[folds[1][1], "split"] = "val"
    table["sha256"] = [file_sha256(path) for path in table["path"]]
    table["split"] = join_identical_images(table["split"].to_numpy(), content_groups(table))  # twins: one part
    return table


def seed_dir(seed: int) -> Path:
    return RUNS / f"seed{seed}"


def split_scores(model_path: Path, table: pd.DataFrame, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, probabilities) of the val and test images under one fine-tuned model."""
    model = load_model_file(model_path, expected=ARCHITECTURE)
    scores = {}
    for split in ("val", "test"):
        part = table[table["split"] == split]
        logits = model.predict(load_batch(list(part["path"]), image_size), batch_size=32, verbose=0).ravel()
        scores[split] = ((part["label"] == POSITIVE).to_numpy(int), 1 / (1 + np.exp(-logits.astype(float))))
    return scores


def evaluate(model_path: Path, table: pd.DataFrame, image_size: int) -> dict:
    """Threshold chosen on validation (max kappa), then test metrics with image-bootstrap 95 % CIs."""
    scores = split_scores(model_path, table, image_size)
    threshold = choose_threshold(*scores["val"], criterion="kappa")
    test = binary_metrics(*scores["test"], threshold=threshold)
    intervals = bootstrap_ci(*scores["test"], None, threshold)
    test["ci95"] = {key: intervals[key] for key in ("kappa", "auroc")}
    return {"threshold_from_val": threshold, "val_auroc": binary_metrics(*scores["val"])["auroc"], "test": test}


def in_domain_minus_scratch(table: pd.DataFrame, results: dict, image_size: int, seed: int) -> dict | None:
    """Each start's val-selected model on the same test images: the kappa and AUROC differences with paired
    image-bootstrap 95 % CIs (each model at its own val threshold)."""
    if any(results[init]["status"] != "ok" for init in ("in_domain", "scratch")):
        return None
    test = {
        init: split_scores(seed_dir(seed) / init / results[init]["selected_on_val"] / "model.keras", table, image_size)[
            "test"
        ]
        for init in ("in_domain", "scratch")
    }
    (labels, in_domain), (_, scratch) = test["in_domain"], test["scratch"]
    thresholds = (results["in_domain"]["threshold_from_val"], results["scratch"]["threshold_from_val"])
    delta = paired_bootstrap_delta(labels, in_domain, scratch, None, thresholds)
    return {metric: delta[metric] for metric in ("kappa", "auroc")}


def run_one(init: str, recipe: str, arguments: dict, table: pd.DataFrame, settings: dict, seed: int) -> dict:
    """Fine-tune from `init` with one recipe's `arguments`; val and test metrics of the best-val-AUC epoch."""
    started = time.perf_counter()
    result = finetune(
        table,
        ARCHITECTURE,
        seed_dir(seed) / init / recipe,
        TrainSettings(weights=INITS[init], learning_rate=1e-3, seed=seed, **arguments, **settings),
        positive_class=POSITIVE,
        verbose=0,
    )
    return {
        "status": "ok",
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(time.perf_counter() - started, 1),
        **evaluate(result.model_path, table, settings["image_size"]),
    }


def run_init(init: str, table: pd.DataFrame, settings: dict, seed: int) -> dict:
    """Every recipe from one start, and the recipe selected on val AUROC; ImageNet may be unavailable offline."""
    try:
        runs = {
            recipe: run_one(init, recipe, arguments, table, settings, seed)
            for recipe, arguments in candidates(init).items()
        }
    except InputError as error:
        if init == "imagenet":
            return {"status": "unavailable offline", "error": str(error)}
        raise
    selected = max(runs, key=lambda recipe: runs[recipe]["val_auroc"])
    return {"status": "ok", "selected_on_val": selected, **runs[selected], "recipes": runs}


def leaked_images(table: pd.DataFrame) -> int:
    """How many hand images the in-domain checkpoint saw in pretraining (must be 0)."""
    return int(table["sha256"].isin(read_seen_images(PRETRAINED.parent / SEEN_IMAGES)).sum())


def run_seed(seed: int, settings: dict) -> dict:
    """Every start and recipe on the parts cut by ``seed``; in-domain minus scratch on its test images."""
    table = hand_table(seed)
    started = time.perf_counter()
    results = {init: run_init(init, table, settings, seed) for init in INITS}
    return {
        "counts": table.groupby(["split", "label"]).size().unstack(fill_value=0).to_dict(orient="index"),
        "hand_images_seen_in_pretraining": leaked_images(table),
        "results": results,
        "in_domain_minus_scratch": in_domain_minus_scratch(table, results, settings["image_size"], seed),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def over_seeds(seeds: dict[str, dict]) -> dict:
    """Per metric: in-domain minus scratch per seed, its mean, and how many seeds have it above 0."""
    paired = {seed: run["in_domain_minus_scratch"] for seed, run in seeds.items() if run["in_domain_minus_scratch"]}
    summary = {}
    for metric in ("kappa", "auroc"):
        deltas = {seed: delta[metric]["delta"] for seed, delta in paired.items()}
        summary[metric] = {
            "per_seed": deltas,
            "mean": float(np.mean(list(deltas.values()))) if deltas else None,
            "seeds_above_0": sum(delta > 0 for delta in deltas.values()),
            "seeds_with_ci_above_0": sum(delta[metric]["ci"][0] > 0 for delta in paired.values()),
        }
    return summary


def earlier_seeds(name: str, settings: dict) -> dict[str, dict]:
    """Seeds in the earlier result file, when it was made with the same settings."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = {key: earlier["settings"].get(key) for key in settings} == settings
    return earlier.get("seeds", {}) if same else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px, 5 epochs: a smoke run, not a result")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="split and training seeds (default: 0)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if not PRETRAINED.is_file():
        raise SystemExit(f"{PRETRAINED} not found: run the pretraining in experiments/pretrain_xray.yaml first")
    name = "finetune_transfer_quick" if args.quick else "finetune_transfer"
    seeds = earlier_seeds(name, settings) | {str(seed): run_seed(seed, settings) for seed in args.seeds}
    seeds = dict(sorted(seeds.items(), key=lambda item: int(item[0])))
    payload = {
        "benchmark": "finetune_transfer",
        "quick": args.quick,
        "machine": machine_info("tensorflow", "keras", "numpy", "scikit-learn"),
        "settings": {
            "architecture": ARCHITECTURE,
            "seeds_run_now": args.seeds,
            "head_learning_rate": 1e-3,
            "recipes": RECIPES,
            "batchnorm": BATCHNORM,
            "recipe_selection": "max val AUROC per start",
            **settings,
            "threshold": "max kappa on val",
            "early_stopping": "val AUC",
            "augment": True,
        },
        "data": {
            "source": "FracAtlas hand (held out of pretraining)",
            "positive_class": "fractured",
            "pretrained_checkpoint": {"path": str(PRETRAINED.relative_to(ROOT)), "sha256": file_sha256(PRETRAINED)},
        },
        "seeds": seeds,
        "in_domain_minus_scratch_over_seeds": over_seeds(seeds),
    }
    path = write_result(name, payload)
    for seed, run in seeds.items():
        for init, row in run["results"].items():
            test = row.get("test", {})
            recipe = row.get("selected_on_val", row["status"])
            print(f"seed {seed} {init:10s} {recipe:25s} kappa {test.get('kappa')} auroc {test.get('auroc')}")
    print("in-domain minus scratch over seeds:", payload["in_domain_minus_scratch_over_seeds"])
    print("results:", path)


if __name__ == "__main__":
    main()
