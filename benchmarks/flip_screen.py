"""Flip test-time augmentation screened on validation parts only: which experiments set `features.flip`.

    python -m benchmarks.flip_screen [--finetuned runs/benchmarks/finetuned_hand/s0]

Two screens, each scoring a standardised logistic regression fitted on the *train* part on the *val* part
(`init_screen.val_scores`), per backbone and fused, with and without flip (each image's features averaged with its
left-right mirror's): (1) FracAtlas hand, on the backbones a finished seed-0 run fine-tuned (`--finetuned`, default
the reused fine-tuning of `benchmarks.accuracy`); (2) FracAtlas leg, seed-0 split, the shipped ImageNet backbones
frozen. Test images are never decoded. Writes benchmarks/results/flip_screen.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import machine_info, write_result
from benchmarks.init_screen import val_scores

REPO = Path(__file__).resolve().parents[1]
FINETUNED = REPO / "runs" / "benchmarks" / "finetuned_hand" / "s0"
LEG = REPO / "experiments" / "fracatlas_leg.yaml"
LEG_SPLIT = REPO / "runs" / "benchmarks" / "flip_screen" / "fracatlas_leg"


def train_val(table: pd.DataFrame) -> pd.DataFrame:
    """The train and val rows of a run's data table, in order."""
    return table[table["split"].isin(["train", "val"])].reset_index(drop=True)


def with_and_without_flip(models: dict, paths: list[str], size: int) -> dict[str, np.ndarray]:
    """Features of each backbone and of their fusion, plain and flip-averaged."""
    from tlfusion.features.extraction import extract_features

    sets: dict[str, np.ndarray] = {}
    for flip in (False, True):
        suffix = "+flip" if flip else ""
        blocks = [extract_features(model, paths, size, progress=False, flip=flip) for model in models.values()]
        sets |= {name + suffix: block for name, block in zip(models, blocks, strict=True)}
        sets["fusion" + suffix] = np.hstack(blocks)
    return sets


def screen_finetuned_hand(folder: Path) -> dict:
    """Screen (1): the fine-tuned backbones of a finished FracAtlas hand run."""
    from tlfusion.run.paths import RunPaths

    paths = RunPaths(folder)
    table = train_val(pd.read_csv(paths.table))
    models = {name: paths.model(name) for name in ("mobilenet", "mobilenetv2")}
    return {name: val_scores(X, table) for name, X in with_and_without_flip(models, list(table["path"]), 224).items()}


def screen_frozen_leg() -> dict:
    """Screen (2): the shipped ImageNet backbones, frozen, on FracAtlas leg's seed-0 split."""
    from tlfusion.backbones.registry import plain_backbone
    from tlfusion.config.experiment import load_experiment
    from tlfusion.pipeline import Pipeline
    from tlfusion.run.paths import RunPaths

    experiment = load_experiment(LEG, ["finetune.enabled=false", "explain.enabled=false"])
    Pipeline(experiment, LEG_SPLIT).run(until="data")
    table = train_val(pd.read_csv(RunPaths(LEG_SPLIT).table))
    size = experiment.image.size
    models = {entry.name: plain_backbone(entry, size, experiment.seed) for entry in experiment.backbones}
    return {name: val_scores(X, table) for name, X in with_and_without_flip(models, list(table["path"]), size).items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", type=Path, default=FINETUNED, help="a finished seed-0 FracAtlas hand run")
    args = parser.parse_args(argv)
    payload = {
        "benchmark": "flip_screen",
        "machine": machine_info("scikit-learn", "tensorflow-cpu", "keras"),
        "settings": {
            "classifier": "StandardScaler + LogisticRegression(C=0.1, class_weight=balanced), train -> val",
            "fracatlas_hand": f"seed 0, backbones fine-tuned in {args.finetuned}",
            "fracatlas_leg": "seed 0, ImageNet MobileNetV1 + MobileNetV2 frozen",
        },
        "fracatlas_hand_finetuned": screen_finetuned_hand(args.finetuned),
        "fracatlas_leg_frozen": screen_frozen_leg(),
    }
    print("results:", write_result("flip_screen", payload))
    return payload


if __name__ == "__main__":
    main()
