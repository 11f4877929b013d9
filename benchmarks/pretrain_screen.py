"""Pretraining screen on validation data only: which start (ImageNet or an in-domain backbone) transfers best.

    python -m benchmarks.pretrain_screen [--candidates imagenet msk_multitask ...] [--seeds 0 1 2]

Each candidate start (`imagenet`, or a family of shipped backbones `saved_models/<arch>_<family>/model.keras`) is
used frozen at 224 px: its pooled features, per backbone and fused (MobileNetV1 + MobileNetV2 concatenated), go to
a standardised logistic regression (C 0.1, balanced) fitted on a train part and scored on a validation part:

- FracAtlas hand (never pretrained on), the split of `experiments/fracatlas_hand.yaml` at each seed: train -> val
  (AUROC, kappa at 0);
- FracAtlas leg, the split of `experiments/fracatlas_leg.yaml` at seed 0: train -> val (the in-domain backbones saw
  those images too: leg is a check, not a transfer target);
- knee KL: the knee validation part of `experiments/pretrain_msk.yaml` (upstream train subjects the pretraining
  only validated on), 5-fold subject-grouped CV of a multinomial regression (quadratic kappa, accuracy).

No test part is read: the knee experiment's test split (the upstream val part) and every experiment's test part are
left out. Writes benchmarks/results/pretrain_screen.json with the commit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "pretrain_screen"
ARCHITECTURES = ("mobilenet", "mobilenetv2")
SIZE = 224
NOTES = [
    "Frozen features, logistic regression: a screen of the starts, not the shipped pipeline (which fine-tunes).",
    "Val parts are small (hand ~120 images, leg ~100): read differences of a few hundredths with that in mind.",
]


def experiment_table(name: str, seed: int) -> pd.DataFrame:
    """An experiment's data table split as `tlfusion run` splits it (identical files in one part)."""
    from tlfusion.config.experiment import load_experiment
    from tlfusion.data.images import file_sha256
    from tlfusion.data.sources import read_sources
    from tlfusion.data.table import split_table, with_binary_target

    experiment = load_experiment(REPO / "experiments" / f"{name}.yaml", [f"seed={seed}"])
    table = read_sources(experiment.data)
    table = with_binary_target(table.assign(sha256=[file_sha256(p) for p in table["path"]]), experiment.positive_class)
    return split_table(table, experiment.split, experiment.seed)


def knee_validation_table() -> pd.DataFrame:
    """The knee rows `experiments/pretrain_msk.yaml` validates on (never trained on, never the knee test split)."""
    from tlfusion.config.pretraining import load_pretraining_config
    from tlfusion.data.pretraining import pretraining_table

    config = load_pretraining_config(REPO / "experiments" / "pretrain_msk.yaml")
    knee = [source for source in config.sources if source.name == "knee"]
    table = pretraining_table(knee, config.data_root, config.split, config.drop_splits)
    rows = table[table["split"] == "val"].reset_index(drop=True)
    return rows.assign(y=rows["label"].str.rsplit("/", n=1).str[-1].astype(int))


def candidate_models(family: str) -> dict[str, object]:
    """Architecture -> a model at 224 px, from ImageNet or a shipped `model.keras` of the family (pretrained at any
    size, its weights moved into a 224-px model as fine-tuning does); missing files left out."""
    from tlfusion.backbones.registry import build_backbone

    if family == "imagenet":
        return {arch: build_backbone(arch, SIZE, "imagenet") for arch in ARCHITECTURES}
    files = {arch: REPO / "saved_models" / f"{arch}_{family}" / "model.keras" for arch in ARCHITECTURES}
    return {arch: build_backbone(arch, SIZE, path) for arch, path in files.items() if path.is_file()}


def feature_sets(models: dict[str, object], paths: list[str]) -> dict[str, np.ndarray]:
    """Each backbone's frozen features of `paths`, and their concatenation ("fusion") when there are two."""
    from tlfusion.features.extraction import extract_features

    blocks = {
        arch: extract_features(model, paths, SIZE, cache_dir=CACHE, progress=False) for arch, model in models.items()
    }
    return {**blocks, **({"fusion": np.hstack(list(blocks.values()))} if len(blocks) > 1 else {})}


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))


def binary_val_scores(features: np.ndarray, table: pd.DataFrame) -> dict:
    """Fitted on the train rows, scored on the val rows: AUROC and kappa at a decision value of 0."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    train, val = (table["split"] == "train").to_numpy(), (table["split"] == "val").to_numpy()
    y = table["y"].to_numpy()
    scores = _probe().fit(features[train], y[train]).decision_function(features[val])
    return {
        "n_train": int(train.sum()),
        "n_val": int(val.sum()),
        "auroc": round(float(roc_auc_score(y[val], scores)), 4),
        "kappa": round(float(cohen_kappa_score(y[val], scores > 0)), 4),
    }


def knee_cv_scores(features: np.ndarray, table: pd.DataFrame) -> dict:
    """5-fold subject-grouped CV predictions of a multinomial regression: quadratic kappa and accuracy."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    y = table["y"].to_numpy()
    predicted = cross_val_predict(_probe(), features, y, groups=table["patient"], cv=GroupKFold(5))
    return {
        "n": len(y),
        "qwk": round(float(cohen_kappa_score(y, predicted, weights="quadratic")), 4),
        "accuracy": round(float(accuracy_score(y, predicted)), 4),
    }


def screen(family: str, tables: dict[str, pd.DataFrame]) -> dict:
    """Every task's scores for one candidate start."""
    models = candidate_models(family)
    if not models:
        return {"missing": True}
    result: dict = {"backbones": sorted(models)}
    for task, table in tables.items():
        score = knee_cv_scores if task == "knee" else binary_val_scores
        rows = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
        result[task] = {name: score(x, rows) for name, x in feature_sets(models, list(rows["path"])).items()}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=["imagenet", "imagenet_msk", "msk_contrastive"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    machine = machine_info("scikit-learn", "tensorflow-cpu", "keras")
    tables = {f"hand_seed{seed}": experiment_table("fracatlas_hand", seed) for seed in args.seeds}
    tables |= {"leg_seed0": experiment_table("fracatlas_leg", 0), "knee": knee_validation_table()}
    started = time.perf_counter()
    results = {family: screen(family, tables) for family in args.candidates}
    payload = {
        "benchmark": "pretrain_screen",
        "machine": machine,
        "settings": {"image_size": SIZE, "classifier": "StandardScaler + LogisticRegression(C=0.1, balanced)"},
        "notes": NOTES,
        "candidates": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("results:", write_result("pretrain_screen", payload))
    return payload


if __name__ == "__main__":
    main()
