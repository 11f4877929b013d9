"""Ensemble screen on validation data only: do the ImageNet and the ImageNet -> MSK fine-tuned backbones add up?

    python -m benchmarks.ensemble_screen [--seeds 0 1 2]

For each seed of FracAtlas hand, the backbones that `benchmarks.accuracy` fine-tuned from each start (init
`imagenet` and `imagenet_msk`, runs/benchmarks/accuracy/fracatlas_hand__INIT[__seedN]/backbones/*/model.keras) give
flip-averaged 224-px features of the split's train and val images; a standardised logistic regression (C 0.1,
balanced) fitted on train is scored on val (AUROC, kappa at 0) for each start's fusion and for the fusion of all
four backbones. No test image is read. Writes benchmarks/results/ensemble_screen.json with the commit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import machine_info, write_result
from benchmarks.accuracy import run_dir
from benchmarks.pretrain_screen import ARCHITECTURES, CACHE, SIZE, binary_val_scores, experiment_table

STARTS = ("imagenet", "imagenet_msk")
METRICS = ("auroc", "kappa")


def start_features(start: str, seed: int, paths: list[str]) -> np.ndarray:
    """One start's fine-tuned backbones' flip-averaged features of `paths`, concatenated."""
    from tlfusion.features.extraction import extract_features

    folder = run_dir("fracatlas_hand", start, seed) / "backbones"
    blocks = [
        extract_features(folder / arch / "model.keras", paths, SIZE, cache_dir=CACHE, progress=False, flip=True)
        for arch in ARCHITECTURES
    ]
    return np.hstack(blocks)


def seed_scores(seed: int) -> dict:
    """Val scores of each start's fusion and of the four-backbone fusion at one seed."""
    table = experiment_table("fracatlas_hand", seed)
    rows = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    features = {start: start_features(start, seed, list(rows["path"])) for start in STARTS}
    sets = {**features, "imagenet+imagenet_msk": np.hstack([features[start] for start in STARTS])}
    return {name: binary_val_scores(x, rows) for name, x in sets.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    machine = machine_info("scikit-learn", "tensorflow-cpu", "keras")
    started = time.perf_counter()
    seeds = {f"seed{seed}": seed_scores(seed) for seed in args.seeds}
    means = {
        name: {
            metric: round(float(np.mean([s[name][metric] for s in seeds.values()])), 4) for metric in ("auroc", "kappa")
        }
        for name in next(iter(seeds.values()))
    }
    payload = {
        "benchmark": "ensemble_screen",
        "machine": machine,
        "settings": {"image_size": SIZE, "flip": True, "classifier": "StandardScaler + LogisticRegression(C=0.1)"},
        "seeds": seeds,
        "mean_over_seeds": means,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("results:", write_result("ensemble_screen", payload))
    return payload


if __name__ == "__main__":
    main()
