"""Fine-tuning length screened on validation data only: how many epochs FracAtlas hand fine-tunes for.

    python -m benchmarks.epochs_screen [--epochs 5 10] [--seed 0]

For each epoch count, the shipped FracAtlas hand experiment (ImageNet MobileNetV1 + MobileNetV2, the shipped recipe
otherwise) runs up to feature extraction into `runs/benchmarks/finetuned_hand_e{E}/s{seed}`; a standardised logistic
regression fitted on the *train* part scores the *val* part (`init_screen.val_scores`), per backbone and fused. The
fine-tuning keeps the epoch with the best val AUC (early stopping, patience as shipped), so the val scores of
both lengths are optimistic, the longer one slightly more (more epochs to pick from): a longer schedule has to win
clearly. The test part is never scored (its features are cached, unread). The finished folders serve
`benchmarks.accuracy --reuse-finetuned`. Writes benchmarks/results/epochs_screen.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from benchmarks._common import machine_info, write_result
from benchmarks.flip_screen import train_val
from benchmarks.init_screen import feature_sets, val_scores

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "fracatlas_hand.yaml"


def finetuned_folder(epochs: int, seed: int) -> Path:
    return REPO / "runs" / "benchmarks" / f"finetuned_hand_e{epochs}" / f"s{seed}"


def training_summary(folder: Path, backbone: str) -> dict:
    """The epoch fine-tuning kept and the val AUC of every epoch, from the backbone's `train.json` and history."""
    from tlfusion.run.paths import RunPaths

    model_dir = RunPaths(folder).model(backbone).parent
    trained = json.loads((model_dir / "train.json").read_text())
    history = pd.read_csv(model_dir / "history.csv")
    return {
        "best_epoch": trained["best_epoch"],
        "val_auc_by_epoch": [round(float(value), 4) for value in history["val_auc"]],
        "train_auc_by_epoch": [round(float(value), 4) for value in history["auc"]],
    }


def screen(epochs: int, seed: int) -> dict:
    """Fine-tune and extract with `epochs`, then the train -> val scores of each backbone and of the fusion."""
    overrides = [f"finetune.epochs={epochs}", f"seed={seed}", "explain.enabled=false"]
    return screen_recipe(finetuned_folder(epochs, seed), overrides)


def screen_recipe(folder: Path, overrides: list[str]) -> dict:
    """The hand experiment with `overrides` run up to extraction into `folder`, then the train -> val scores of each
    backbone and of the fusion and what each fine-tuning kept."""
    from tlfusion.config.experiment import load_experiment
    from tlfusion.pipeline import Pipeline
    from tlfusion.run.paths import RunPaths

    experiment = load_experiment(EXPERIMENT, overrides)
    Pipeline(experiment, folder).run(until="extract")
    table = pd.read_csv(RunPaths(folder).table)
    seen = table["split"].isin(["train", "val"]).to_numpy()
    return {
        "folder": str(folder.relative_to(REPO)),
        "val_scores": {name: val_scores(X[seen], train_val(table)) for name, X in feature_sets(folder).items()},
        "training": {entry.name: training_summary(folder, entry.name) for entry in experiment.backbones},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    payload = {
        "benchmark": "epochs_screen",
        "machine": machine_info("scikit-learn", "tensorflow-cpu", "keras"),
        "settings": {
            "experiment": "fracatlas_hand (flip on, as shipped)",
            "seed": args.seed,
            "classifier": "StandardScaler + LogisticRegression(C=0.1, class_weight=balanced), train -> val",
        },
        "epochs": {str(epochs): screen(epochs, args.seed) for epochs in args.epochs},
    }
    print("results:", write_result("epochs_screen", payload))
    return payload


if __name__ == "__main__":
    main()
