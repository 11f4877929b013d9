"""Fine-tuning input size screened on validation data only: FracAtlas hand at 224 px vs larger inputs.

    python -m benchmarks.size_screen [--sizes 224 320] [--seeds 0 1 2]

For each input size and seed, the shipped FracAtlas hand experiment (ImageNet MobileNetV1 + MobileNetV2, 10 epochs,
flip, everything else as shipped but `image.size`) runs cold up to feature extraction into
`runs/benchmarks/finetuned_hand_px{size}/s{seed}` (`epochs_screen.screen_recipe`). Two validation-only readings
per run: the fine-tuned backbones' best-epoch val AUROC (the rule that chose the hand experiment's start) and a
standardised logistic regression fitted on the train part scoring the val part, per backbone and fused. The
shared FracAtlas images are stored at up to 320 px, so 320 is the largest size that adds detail. The test part is
never scored. Writes benchmarks/results/size_screen.json with the means over the seeds run so far, after every run.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks._common import REPO, machine_info, write_result
from benchmarks.epochs_screen import screen_recipe


def run_size(size: int, seed: int) -> dict:
    folder = REPO / "runs" / "benchmarks" / f"finetuned_hand_px{size}" / f"s{seed}"
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty: the screen runs cold into a fresh folder")
    return screen_recipe(folder, [f"image.size={size}", f"seed={seed}", "explain.enabled=false"])


def size_means(runs: dict[str, dict]) -> dict:
    """Over seeds: the mean best-epoch val AUROC of the fine-tuned backbones and each feature set's val AUROC."""
    best = [
        summary["val_auc_by_epoch"][summary["best_epoch"] - 1]
        for run in runs.values()
        for summary in run["training"].values()
    ]
    sets = next(iter(runs.values()))["val_scores"]
    return {
        "finetuned_best_epoch_val_auroc": statistics.fmean(best),
        **{
            f"{name}_val_auroc": statistics.fmean(r["val_scores"][name]["auroc"] for r in runs.values())
            for name in sets
        },
        **{
            f"{name}_val_kappa": statistics.fmean(r["val_scores"][name]["kappa"] for r in runs.values())
            for name in sets
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 320])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    payload = {
        "benchmark": "size_screen",
        "machine": machine_info("scikit-learn", "tensorflow-cpu", "keras"),
        "settings": {
            "experiment": "fracatlas_hand as shipped but image.size",
            "seeds": args.seeds,
            "classifier": "StandardScaler + LogisticRegression(C=0.1, class_weight=balanced), train -> val",
        },
        "sizes": {},
    }
    for seed in args.seeds:  # seed by seed, every size, so a cut-short screen still holds paired seeds
        for size in args.sizes:
            block = payload["sizes"].setdefault(str(size), {"runs": {}})
            block["runs"][str(seed)] = run_size(size, seed)
            block["mean_over_seeds"] = size_means(block["runs"])
            print(size, seed, block["mean_over_seeds"], flush=True)
            print("results:", write_result("size_screen", payload))
    return payload


if __name__ == "__main__":
    main()
